#!/usr/bin/env bash
# The device lab, one command: builds what it needs (cached by content in $LAB_CACHE), boots a
# Debian trixie VM under QEMU (TCG) with systemd as PID 1, installs edgecam there as
# docs/install.md's Deploy section says, and prints one PASS/FAIL line per check.
#   bash lab/run.sh [--checks quick|all|NAME,...] [--smp N] [--keep]
# Exits non-zero if any check fails. Runs as root (debootstrap, the image). See docs/lab.md.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
cache="${LAB_CACHE:-/var/cache/edgecam-lab}"
shared="${LAB_SHARED:-$repo/../shared}"
checks=all
smp=2
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --checks) checks="${2:?--checks needs quick, all or names}"; shift 2 ;;
    --smp) smp="${2:?--smp needs a number}"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "lab/run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "lab/run.sh: run as root (debootstrap and the image need it)" >&2; exit 2; }
[ -d "$shared/models" ] && [ -d "$shared/images" ] \
  || { echo "lab/run.sh: $shared/models and $shared/images are missing (set LAB_SHARED)" >&2; exit 2; }

# Host tools, from Debian's packages, only when missing.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v socat >/dev/null || need+=(socat)
command -v ssh >/dev/null || need+=(openssh-client)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need+=(mosquitto)
if [ "${#need[@]}" -gt 0 ]; then
  echo "lab: installing ${need[*]} (Debian packages)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
      >/dev/null; } || { echo "lab/run.sh: could not install ${need[*]}" >&2; exit 1; }
fi

# The host side's Python: the project's .venv (tests/run.sh makes it), else made here.
py="$repo/.venv/bin/python"
if ! "$py" -c 'import edgecam, paho.mqtt' 2>/dev/null; then
  python3 -m venv "$repo/.venv" && "$py" -m pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true
  "$py" -c 'import edgecam, paho.mqtt' || { echo "lab/run.sh: could not make .venv" >&2; exit 1; }
fi

mkdir -p "$cache"
t0=$(date +%s)
image="$(LAB_PIP="$repo/.venv/bin/pip" bash lab/image.sh --arch amd64 --suite trixie "$cache")"
t_image=$(( $(date +%s) - t0 ))

# The wheelhouse for the guest's CPython 3.13, by pip on the host; keyed by what it resolves.
t1=$(date +%s)
wheels="$(bash lab/wheelhouse.sh "$cache" 3.13 x86_64 "$repo")"
t_wheels=$(( $(date +%s) - t1 ))
# picamera2 from PyPI, and those of its dependencies that Debian trixie does not package (PiDNG,
# which has no wheel, was built into the image's wheels/ directory).
picam_wheels="$(bash lab/wheelhouse.sh --only "$cache" 3.13 x86_64 "$repo" picamera2 videodev2 simplejpeg openexr)"

# The run's payload disk: this checkout (tracked and untracked files, as a clone would have them
# plus local edits), the wheelhouse, the models and the photographs. Rebuilt every run: seconds.
run="$(mktemp -d "$cache/run.XXXXXX")"
cleanup() { [ "$keep" -eq 1 ] && echo "lab: kept $run" || rm -rf "$run"; }
trap cleanup EXIT
mkdir -p "$run/payload/models" "$run/payload/images"
git ls-files -co --exclude-standard -z | tar -c --null -T - -f "$run/payload/src.tar"
cp -r "$wheels" "$run/payload/wheels"
mkdir -p "$run/payload/wheels-picamera2"
cp "$picam_wheels"/*.whl "$image"/wheels/*.whl "$run/payload/wheels-picamera2/"
find "$shared/models" -maxdepth 1 -type f -exec cp {} "$run/payload/models/" \;
cp "$shared"/images/* "$run/payload/images/"
chmod -R a+rX "$run/payload"
size_mb=$(( $(du -sm "$run/payload" | cut -f1) + 64 ))
mkfs.ext4 -q -F -L labpayload -d "$run/payload" "$run/payload.img" "${size_mb}M"
rm -rf "$run/payload"

echo "lab: image $image (${t_image} s), wheelhouse $wheels (${t_wheels} s); logs in $run"
"$py" lab/lab.py --image "$image" --payload "$run/payload.img" --workdir "$run" --checks "$checks" --smp "$smp" \
  --payload-images "$shared/images"
