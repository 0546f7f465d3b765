#!/usr/bin/env bash
# The test command (README, and .ci/run): lint, the whole suite on the default
# install (ai-edge-litert, NumPy 2), then the model and CAM tests again on the
# Raspberry Pi OS bookworm shape (NumPy 1.x, OpenCV 4.11): with tflite-runtime
# 2.14, and with ai-edge-litert under ml-dtypes<0.6.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

make_venv() {  # dir, pip args...
  local dir="$1"; shift
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir" || return 1
  "$dir/bin/python" -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true
  "$dir/bin/python" -c 'import edgecam' || return 1
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {  # why, packages...
  local why="$1"; shift
  echo "== installing $* (Debian packages) for $why"
  { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } \
    || { echo "tests/run.sh: could not install $* (apt-get install $*)" >&2; exit 1; }
}
# The MQTT tests start their own Mosquitto processes on free loopback ports; the dashboard
# test drives a real headless Chromium. Both come from Debian's packages, as in setup.sh.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install "the MQTT tests" mosquitto
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  apt_install "the dashboard test" chromium chromium-driver
fi
command -v openssl >/dev/null 2>&1 || apt_install "the TLS tests" openssl

# The disk-full tests mount small tmpfs filesystems. As root (CI) they must run, not skip
# (tests/smallfs.py); other users run them in user namespaces where the kernel allows.
if [ "$(id -u)" -eq 0 ]; then export EDGECAM_REQUIRE_MOUNTS=1; fi

status=0
echo "== default install: ai-edge-litert"
make_venv .venv -e ".[test]" || { echo "tests/run.sh: could not install .venv" >&2; exit 1; }
.venv/bin/ruff check edgecam tests bench || status=1
.venv/bin/python -m pytest -q "$@" || status=1

echo "== bookworm shape: tflite-runtime 2.14, numpy<2 (model and CAM tests)"
if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  make_venv .venv-bookworm -c constraints/bookworm.txt -e ".[test,tflite]" \
    || { echo "tests/run.sh: could not install .venv-bookworm" >&2; exit 1; }
  EDGECAM_RUNTIME=tflite .venv-bookworm/bin/python -m pytest -q -m model "$@" || status=1
  echo "== bookworm shape with ai-edge-litert (a Pi's default install): model and CAM tests"
  EDGECAM_RUNTIME=litert .venv-bookworm/bin/python -m pytest -q -m model "$@" || status=1
else
  echo "tflite-runtime has no wheels for $("$PYTHON" -V); skipped"
fi
exit $status
