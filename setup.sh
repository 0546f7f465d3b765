#!/usr/bin/env bash
# Installs edgecam into ./.venv, Mosquitto if it is missing, and the default model.
#   bash setup.sh [--mirror DIR_OR_URL] [--system-site-packages] [--no-broker]
# On Raspberry Pi OS with python3-picamera2 installed, the venv sees the system
# packages (picamera2, libcamera) and keeps Debian's NumPy 1.x: see docs/install.md.
# --system-site-packages takes that path without Debian's picamera2 (Debian's NumPy,
# constraints/bookworm.txt); --no-broker neither installs nor starts Mosquitto.
set -euo pipefail
cd "$(dirname "$0")"

mirror="${EDGECAM_MODEL_MIRROR:-}"
system_site=0
broker=1
while [ $# -gt 0 ]; do
  case "$1" in
    --mirror) mirror="${2:?--mirror needs a directory or URL}"; shift 2 ;;
    --mirror=*) mirror="${1#--mirror=}"; shift ;;
    --system-site-packages) system_site=1; shift ;;
    --no-broker) broker=0; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup.sh: edgecam needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
  exit 2
fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if [ "$broker" -eq 1 ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: installing Mosquitto (broker for the tests, and for a local set-up)"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null \
      || echo "setup.sh: warning: could not install mosquitto; install it by hand for the MQTT features" >&2
  else
    echo "setup.sh: warning: no apt-get; install a Mosquitto broker by hand" >&2
  fi
fi

# The README's first command publishes to a broker on localhost:1883. On Raspberry Pi
# OS the package starts one under systemd; elsewhere (containers, no systemd) start
# one in local-only mode, which accepts connections from this machine only.
broker_up() { (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; }
if [ "$broker" -eq 1 ] && ! broker_up; then
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl enable --now mosquitto >/dev/null 2>&1 || true
  fi
  if ! broker_up; then
    mosq="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
    if [ -x "$mosq" ]; then
      echo "setup.sh: starting a local Mosquitto on 127.0.0.1:1883 (no systemd here)"
      "$mosq" -d -p 1883 || echo "setup.sh: warning: could not start mosquitto" >&2
    fi
  fi
fi

venv_args=()
constraints=()
if "$PYTHON" -c 'import picamera2' >/dev/null 2>&1; then
  # Raspberry Pi OS: picamera2 is Debian's, built against the system NumPy 1.x.
  system_site=1
  echo "setup.sh: found the system's picamera2; the venv uses system site-packages and NumPy < 2"
fi
if [ "$system_site" -eq 1 ]; then
  venv_args+=(--system-site-packages)
  # Only where the system's NumPy is 1.x (bookworm): trixie's is 2.x, and Python 3.13 has no NumPy 1.x.
  if "$PYTHON" -c 'import numpy, sys; sys.exit(int(numpy.__version__.split(".")[0]) >= 2)' >/dev/null 2>&1; then
    constraints+=(-c constraints/bookworm.txt)
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv "${venv_args[@]}" .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "${constraints[@]}" . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import edgecam' || { echo "setup.sh: the install failed" >&2; exit 1; }

if [ -n "$mirror" ]; then
  .venv/bin/edgecam models fetch --mirror "$mirror"
else
  .venv/bin/edgecam models fetch
fi
.venv/bin/edgecam --version
