#!/usr/bin/env bash
# The Raspberry Pi's userland on arm64, under qemu-user (binfmt_misc): a Debian bookworm arm64
# root shaped like Raspberry Pi OS bookworm (Debian's python3 3.11 and python3-numpy 1.24), edgecam
# set up by `setup.sh --system-site-packages` (a --system-site-packages venv under
# constraints/bookworm.txt), then the model and CAM tests (pytest -m model) on ai-edge-litert and on
# tflite-runtime, and `edgecam explain --json` on the shared photographs with the three shared models,
# compared with the same command on this x86_64 host. Prints one PASS/FAIL line per step with its
# time, and which aarch64 wheels exist.
#   bash lab/arm64.sh [--quick]   (root; --quick: ~25 min, all: ~1.5 hours on 2 shared cores; see docs/lab.md)
# --quick runs, of the model tests, the CAM identity (mean + bias = logit), the README's labels through
# `edgecam explain`, and the exposed feature map bit-exact, each on the three shared ImageNet models.
# The emulator is Debian trixie's qemu-aarch64 (QEMU 10), from its qemu-user .deb (cached by version),
# registered under a name of this run's own and removed at the end; bookworm's QEMU 7.2 hands the
# host's x86 /proc/cpuinfo to the guest, and ai-edge-litert's CPU detection crashes on it (docs/lab.md).
# LAB_QEMU_AARCH64=/path/to/qemu-aarch64 uses another build; LAB_QEMU_CPU another CPU model.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
cache="${LAB_CACHE:-/var/cache/edgecam-lab}"
shared="${LAB_SHARED:-$repo/../shared}"
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "lab/arm64.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "lab/arm64.sh: run as root (debootstrap, chroot, binfmt_misc)" >&2; exit 2; }
[ -d "$shared/models" ] && [ -d "$shared/images" ] \
  || { echo "lab/arm64.sh: $shared/models and $shared/images are missing (set LAB_SHARED)" >&2; exit 2; }
command -v debootstrap >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap \
    >/dev/null; } || { echo "lab/arm64.sh: could not install debootstrap" >&2; exit 1; }
mkdir -p "$cache"

# The emulator: trixie's qemu-aarch64, a static binary inside the qemu-user .deb, fetched with apt
# through a private sources list (the host's apt configuration is left alone), cached per Debian version.
qemu_from_trixie() {
  local apt="$cache/apt-trixie" version dir
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    > "$apt/sources.list"
  local opts=(-o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o APT::Sandbox::User=root)
  if apt-get "${opts[@]}" update -qq >/dev/null 2>&1; then
    version="$(apt-cache "${opts[@]}" policy qemu-user | sed -n 's/^ *Candidate: //p')"
  fi
  if [ -z "${version:-}" ] || [ "$version" = "(none)" ]; then  # offline: the newest one cached
    dir="$(ls -d "$cache"/qemu-aarch64-*/ 2>/dev/null | sort -V | tail -1)"
    [ -n "$dir" ] && [ -f "$dir/.complete" ] && { echo "${dir%/}/qemu-aarch64"; return 0; }
    echo "lab/arm64.sh: Debian trixie's archive is unreachable and no qemu-aarch64 is cached" >&2; return 1
  fi
  dir="$cache/qemu-aarch64-${version//[:~]/_}"
  if [ ! -f "$dir/.complete" ]; then
    local tmp; tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get "${opts[@]}" download -qq "qemu-user=$version" >/dev/null 2>&1 \
      && dpkg-deb -x qemu-user_*.deb x) \
      || { rm -rf "$tmp"; echo "lab/arm64.sh: could not fetch qemu-user $version from trixie" >&2; return 1; }
    rm -rf "$dir" && mkdir -p "$dir" && cp "$tmp/x/usr/bin/qemu-aarch64" "$dir/" \
      && sha256sum "$tmp"/qemu-user_*.deb | sed "s|$tmp/||" > "$dir/deb.sha256" && touch "$dir/.complete"
    rm -rf "$tmp"
  fi
  echo "$dir/qemu-aarch64"
}
qemu="${LAB_QEMU_AARCH64:-$(qemu_from_trixie)}" || exit 1
"$qemu" --version >/dev/null 2>&1 || { echo "lab/arm64.sh: $qemu does not run" >&2; exit 1; }

# Registered under this run's own name with the F flag (the kernel opens the emulator now, so it need
# not exist inside the root); the newest entry for a magic wins over the system's qemu-aarch64, if any.
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
binfmt="edgecam-lab-aarch64-$$"
printf ':%s:M::%s:%s:%s:FP' "$binfmt" \
  '\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00' \
  '\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff' "$qemu" \
  > /proc/sys/fs/binfmt_misc/register || { echo "lab/arm64.sh: could not register $qemu with binfmt_misc" >&2; exit 1; }

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
cleanup() {
  for m in proc sys dev; do mountpoint -q "$root/$m" && umount -l "$root/$m"; done
  rm -rf "$root"
  echo -1 > "/proc/sys/fs/binfmt_misc/$binfmt" 2>/dev/null
}
trap cleanup EXIT
echo "lab arm64: logs in $run"

if [ ! -f "$base/.complete" ]; then
  rm -rf "$base"; mkdir -p "$base" "$cache/debs-bookworm-arm64"
  step debootstrap debootstrap --arch=arm64 --variant=minbase --include="$packages" \
    --cache-dir="$cache/debs-bookworm-arm64" bookworm "$base/root" http://deb.debian.org/debian \
    && touch "$base/.complete"
fi
[ -f "$base/.complete" ] || { echo "lab arm64: no root"; exit 1; }
cp -a "$base/root" "$root"
mount -t proc proc "$root/proc"; mount -t sysfs sys "$root/sys"; mount --bind /dev "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# pip in the root trusts what the host's pip trusts (a site's proxy CA, where there is one).
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$root/etc/ssl/certs/lab-host-ca.crt"
mkdir -p "$root/work/edgecam" "$root/work/shared"
git ls-files -co --exclude-standard -z | tar -c --null -T - | tar -x -C "$root/work/edgecam"
cp -r "$shared/models" "$shared/images" "$root/work/shared/"
# A Raspberry Pi 4's cores (LAB_QEMU_CPU=cortex-a76 for a Pi 5); QEMU's default "max" has features no Pi has.
qemu_cpu="${LAB_QEMU_CPU:-cortex-a72}"
in_root() { chroot "$root" env -i QEMU_CPU="$qemu_cpu" HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/lab-host-ca.crt "$@"; }

# The emulator the root really runs under, and the CPU it shows: XNNPACK's CPU detection reads
# /proc/cpuinfo, which must describe ARM cores (QEMU 7.2 passed the host's x86 file through).
emulator() {
  local part
  part="$(in_root grep -m1 "CPU part" /proc/cpuinfo)" || { echo "/proc/cpuinfo in the root shows no ARM core"; return 1; }
  echo "$("$qemu" --version | head -1), QEMU_CPU=$qemu_cpu, /proc/cpuinfo: $(echo "$part" | tr -s '\t ' ' ')"
}
step emulator emulator
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

# The model tests: all of `-m model`, or with --quick the three properties on the three shared models.
selection=(-m model)
[ "$quick" -eq 1 ] && selection=(-m model tests/test_cam.py tests/test_graph_and_head.py tests/test_explain_cli.py
  -k "mean_plus_bias_is_the_logit or exposed_feature_map or labels_the_models_readme_lists")
pytest_on() {  # runtime: pytest under it, the summary line last
  in_root env EDGECAM_RUNTIME="$1" bash -o pipefail -c \
    "cd /work/edgecam && .venv/bin/python -m pytest -q -p no:cacheprovider -rs --durations=10 ${selection[*]@Q} 2>&1 | tail -40"
}
# Every shared ImageNet model on every shared photograph, as one JSON line each.
explain_each() {  # output directory, models directory, images directory, the edgecam command...
  local out="$1" models="$2" images="$3"; shift 3
  mkdir -p "$out"
  for model in tf2_mobilenet_v2_1.0_224_ptq mobilenet_v2_1.0_224_quant mobilenet_v1_0.25_128_quant; do
    "$@" explain --json --model "$models/$model.tflite" "$images" > "$out/$model.json" || return 1
  done
  echo "$(cat "$out"/*.json | wc -l) results from $("$@" --version)"
}
explain_on() { explain_each "$run/explain-aarch64-$1" /work/shared/models /work/shared/images \
  in_root env EDGECAM_RUNTIME="$1" /work/edgecam/.venv/bin/edgecam; }
x86="$repo/.venv/bin/edgecam"

step pytest-litert pytest_on litert
step explain-litert explain_on litert
step tflite in_root bash -c 'cd /work/edgecam && .venv/bin/pip install -q -c constraints/bookworm.txt ".[tflite]" && EDGECAM_RUNTIME=tflite .venv/bin/edgecam --version'
step pytest-tflite pytest_on tflite
step explain-tflite explain_on tflite
# The same command on this host (x86_64, the project's .venv), and the two compared within what the
# tests allow between set-ups: 0.05 (the shared README's), 0.08 for tflite-runtime's own kernels. Not
# tighter: OpenCV's INTER_AREA resize gives other bytes on aarch64 than on x86_64 (docs/lab.md).
if "$x86" --version >/dev/null 2>&1; then
  step explain-x86_64 explain_each "$run/explain-x86_64" "$shared/models" "$shared/images" "$x86"
  step compare-litert python3 lab/compare_explain.py --tolerance 0.05 "$run/explain-x86_64" "$run/explain-aarch64-litert"
  step compare-tflite python3 lab/compare_explain.py --tolerance 0.08 "$run/explain-x86_64" "$run/explain-aarch64-tflite"
else
  echo "SKIP compare: no $x86 to compare with (bash setup.sh makes it)"
fi
grep -h "passed\|failed" "$run"/pytest-*.log | tail -4
exit $status
