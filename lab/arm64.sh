#!/usr/bin/env bash
# The Raspberry Pi's userland on arm64, under qemu-user (binfmt_misc): a Debian bookworm arm64
# root shaped like Raspberry Pi OS bookworm (Debian's python3 3.11 and python3-numpy 1.24), edgecam
# set up by `setup.sh --system-site-packages` (a --system-site-packages venv under
# constraints/bookworm.txt), then the model and CAM tests (pytest -m model) on ai-edge-litert and on
# tflite-runtime, and `edgecam explain` on the shared photographs. Prints one PASS/FAIL line per step
# with its time, and which aarch64 wheels exist.
#   bash lab/arm64.sh            (root; ~1 hour on 2 shared cores; not part of CI, see docs/lab.md)
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
cache="${LAB_CACHE:-/var/cache/edgecam-lab}"
shared="${LAB_SHARED:-$repo/../shared}"
[ "$(id -u)" -eq 0 ] || { echo "lab/arm64.sh: run as root (debootstrap, chroot, binfmt_misc)" >&2; exit 2; }
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -e /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
    >/dev/null || { echo "lab/arm64.sh: could not install ${need[*]}" >&2; exit 1; }
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "lab/arm64.sh: qemu-aarch64 is not registered with binfmt_misc" >&2; exit 1; }

status=0
step() {  # name, command...: one PASS/FAIL line with the time it took
  local name="$1"; shift
  local t0; t0=$(date +%s)
  if "$@" > "$run/$name.log" 2>&1; then
    echo "PASS $name ($(( $(date +%s) - t0 )) s): $(tail -1 "$run/$name.log")"
  else
    echo "FAIL $name ($(( $(date +%s) - t0 )) s): $(tail -3 "$run/$name.log" | tr '\n' ' ')"; status=1
  fi
}
packages="python3,python3-venv,python3-numpy,python3-pip,ca-certificates,mosquitto"
key="$(echo "bookworm arm64 minbase $packages" | sha256sum | cut -c1-16)"
base="$cache/arm64-bookworm-$key"
run="$(mktemp -d "$cache/arm64-run.XXXXXX")"
root="$run/root"
echo "lab arm64: logs in $run"

if [ ! -f "$base/.complete" ]; then
  rm -rf "$base"; mkdir -p "$base" "$cache/debs-bookworm-arm64"
  step debootstrap debootstrap --arch=arm64 --variant=minbase --include="$packages" \
    --cache-dir="$cache/debs-bookworm-arm64" bookworm "$base/root" http://deb.debian.org/debian \
    && touch "$base/.complete"
fi
[ -f "$base/.complete" ] || { echo "lab arm64: no root"; exit 1; }
cp -a "$base/root" "$root"
cleanup() { for m in proc sys dev; do mountpoint -q "$root/$m" && umount -l "$root/$m"; done; rm -rf "$root"; }
trap cleanup EXIT
mount -t proc proc "$root/proc"; mount -t sysfs sys "$root/sys"; mount --bind /dev "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# pip in the root trusts what the host's pip trusts (a site's proxy CA, where there is one).
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$root/etc/ssl/certs/lab-host-ca.crt"
mkdir -p "$root/work/edgecam" "$root/work/shared"
git ls-files -co --exclude-standard -z | tar -c --null -T - | tar -x -C "$root/work/edgecam"
cp -r "$shared/models" "$shared/images" "$root/work/shared/"
# A Raspberry Pi 4's cores (QEMU_CPU=cortex-a76 for a Pi 5); qemu's default "max" has features no Pi has.
qemu_cpu="${LAB_QEMU_CPU:-cortex-a72}"
in_root() { chroot "$root" env -i QEMU_CPU="$qemu_cpu" HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  PIP_CERT=/etc/ssl/certs/lab-host-ca.crt "$@"; }

step python in_root python3 -c 'import sys, numpy, platform; print(platform.machine(), sys.version.split()[0], "numpy", numpy.__version__)'
# Which aarch64 wheels exist for CPython 3.11 (pip's own answer, no install).
wheels() {
  for req in ai-edge-litert 'tflite-runtime>=2.14' 'numpy<2' 'opencv-python-headless<4.12' 'ml-dtypes<0.6' paho-mqtt; do
    if in_root python3 -m pip download -q --no-deps --only-binary=:all: -d /tmp/probe "$req" >/dev/null 2>&1; then
      echo "$req: $(cd "$root/tmp/probe" && ls -t | head -1)"
    else
      echo "$req: no aarch64 wheel for CPython 3.11"
    fi
  done
}
step wheels wheels
cat "$run/wheels.log"
# Raspberry Pi OS's path, without Debian's picamera2: setup.sh --system-site-packages.
step setup in_root bash -c 'cd /work/edgecam && bash setup.sh --system-site-packages --no-broker --mirror ../shared/models'
step numpy in_root bash -c 'cd /work/edgecam && .venv/bin/python -c "import numpy; print(\"venv uses numpy\", numpy.__version__, numpy.__file__)"'
step test-deps in_root bash -c 'cd /work/edgecam && .venv/bin/pip install -q -c constraints/bookworm.txt -e ".[test]" && echo installed the test extra'
step pytest-litert in_root bash -o pipefail -c 'cd /work/edgecam && EDGECAM_RUNTIME=litert .venv/bin/python -m pytest -q -p no:cacheprovider -m model 2>&1 | tail -15'
step tflite in_root bash -c 'cd /work/edgecam && .venv/bin/pip install -q -c constraints/bookworm.txt ".[tflite]" && .venv/bin/edgecam --version'
step pytest-tflite in_root bash -o pipefail -c 'cd /work/edgecam && EDGECAM_RUNTIME=tflite .venv/bin/python -m pytest -q -p no:cacheprovider -m model 2>&1 | tail -15'
step explain in_root bash -o pipefail -c 'cd /work/edgecam && .venv/bin/edgecam explain ../shared/images 2>&1 | tail -20'
grep -h "passed\|failed" "$run"/pytest-*.log | tail -4
exit $status
