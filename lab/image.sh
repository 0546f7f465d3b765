#!/usr/bin/env bash
# Builds (or finds in the cache) the lab's boot files: a Debian root as an ext4 image made with
# `mkfs.ext4 -d` (no loop mount), Debian's own kernel and initrd, and an SSH key to drive it.
#   bash lab/image.sh [--arch amd64] [--suite trixie] CACHE_DIR
# Prints the directory holding root.img, vmlinuz, initrd.img and id_ed25519. The directory's name
# is a hash of every input (this script, the package list, the guest files, suite, arch), so a
# changed input builds a new image and an unchanged one is reused. Runs as root (debootstrap).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
arch=amd64
suite=trixie
mirror="${LAB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
while [ $# -gt 1 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --suite) suite="$2"; shift 2 ;;
    *) echo "image.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
cache="${1:?image.sh: give the cache directory}"

# What the guest has: systemd as PID 1, Debian's kernel (vivid is a module of it), Python for
# edgecam's venv, sshd to drive it, libcamera with its virtual pipeline handler for picamera2.
packages=(systemd-sysv udev kmod linux-image-amd64 python3 python3-venv openssh-server iproute2 procps
  e2fsprogs v4l-utils python3-libcamera libcamera-ipa libcamera-tools python3-prctl python3-pil
  python3-jsonschema python3-piexif python3-numpy python3-av python3-libarchive-c python3-tqdm)

key="$( { cat "$0" "$here"/guest/*; echo "$arch $suite $mirror ${packages[*]}"; } | sha256sum | cut -c1-16)"
out="$cache/image-$suite-$arch-$key"
if [ -s "$out/root.img" ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
  echo "$out"; exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "image.sh: building the image needs root (debootstrap)" >&2; exit 2; }
for tool in debootstrap mkfs.ext4 ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "image.sh: $tool is missing (lab/run.sh installs it)" >&2; exit 2; }
done

work="$cache/build-$key.$$"
rm -rf "$work" "$out.tmp"; mkdir -p "$work" "$out.tmp" "$cache/debs-$suite-$arch"
trap 'mountpoint -q "$work/root/proc" && umount "$work/root/proc"; rm -rf "$work"' EXIT
root="$work/root"
t0=$(date +%s)
echo "image.sh: debootstrap $suite/$arch (packages cached in $cache/debs-$suite-$arch)" >&2
debootstrap --arch="$arch" --variant=minbase --cache-dir="$cache/debs-$suite-$arch" \
  --include="$(IFS=,; echo "${packages[*]}")" "$suite" "$root" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; echo "image.sh: debootstrap failed" >&2; exit 1; }

# The guest's own configuration: no password anywhere, root logs in with the lab's key only.
echo lab > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 lab\n' > "$root/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"
# /lab: where the lab mounts each run's payload disk (checkout, wheelhouse, models, photographs).
install -d "$root/lab"
: > "$root/etc/machine-id"
install -d -m 0700 "$root/root/.ssh"
ssh-keygen -q -t ed25519 -N '' -C edgecam-lab -f "$work/id_ed25519"
install -m 0600 "$work/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
install -m 0644 "$here/guest/lab-net.service" "$root/etc/systemd/system/lab-net.service"
ln -sf /etc/systemd/system/lab-net.service "$root/etc/systemd/system/multi-user.target.wants/lab-net.service"
install -d "$root/etc/systemd/system/network-online.target.wants"
ln -sf /etc/systemd/system/lab-net.service "$root/etc/systemd/system/network-online.target.wants/lab-net.service"
# A root shell on the serial console, for looking at a guest that the lab could not reach.
install -d "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
printf '[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear %%I 115200 linux\n' \
  > "$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"
# Journal on disk: the lab reads the previous boot's journal after a power cut.
install -d "$root/var/log/journal"
# picamera2's one dependency that has no wheel on PyPI (PiDNG: C code, sdist only) is built here,
# in the guest's own userland, with build tools that are removed again: the guest has no compiler.
pidng="${LAB_PIDNG:-pidng==4.0.9}"
mkdir -p "$work/sdist" "$out.tmp/wheels"
"${LAB_PIP:-pip}" download -q --no-deps --no-binary=:all: -d "$work/sdist" "$pidng" 2>&1 | grep -v "^WARNING: Location" >&2 || true
if [ "$arch" = amd64 ] && ls "$work"/sdist/*.tar.gz >/dev/null 2>&1; then
  build=(gcc libc6-dev python3-dev python3-pip python3-setuptools python3-wheel)
  mount -t proc proc "$root/proc"
  cp "$work"/sdist/*.tar.gz "$root/tmp/"
  { chroot "$root" apt-get update -qq && chroot "$root" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${build[@]}" \
    && chroot "$root" sh -c 'pip wheel -q --no-deps --no-build-isolation --no-index -w /tmp/wheels /tmp/*.tar.gz' \
    && chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq --autoremove "${build[@]}"; } \
    > "$work/pidng.log" 2>&1 || { tail -5 "$work/pidng.log" >&2; echo "image.sh: warning: no PiDNG wheel" >&2; }
  cp "$root"/tmp/wheels/*.whl "$out.tmp/wheels/" 2>/dev/null || true
  rm -rf "$root"/tmp/*
  umount "$root/proc"
fi
chroot "$root" apt-get clean

cp "$(ls "$root"/boot/vmlinuz-* | tail -1)" "$out.tmp/vmlinuz"
cp "$(ls "$root"/boot/initrd.img-* | tail -1)" "$out.tmp/initrd.img"
chmod 0644 "$out.tmp/vmlinuz" "$out.tmp/initrd.img"
mkfs.ext4 -q -F -L labroot -d "$root" "$out.tmp/root.img" 4G
mv "$work/id_ed25519" "$work/id_ed25519.pub" "$out.tmp/"
cp "$work/debootstrap.log" "$out.tmp/"
echo "$(( $(date +%s) - t0 ))" > "$out.tmp/build-seconds"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "image.sh: built $out in $(cat "$out/build-seconds")s" >&2
echo "$out"
