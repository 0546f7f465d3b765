#!/usr/bin/env bash
# A wheelhouse for a guest's Python, made by pip on the host (binary wheels only, the guest's
# platform tags): edgecam's dependencies and its build backend, so that
# `install.sh --wheelhouse DIR` needs no network.
#   bash lab/wheelhouse.sh CACHE_DIR PYTHON_VERSION ARCH REPO [EXTRA_REQUIREMENT...]
#   bash lab/wheelhouse.sh --only CACHE_DIR PYTHON_VERSION ARCH REPO REQUIREMENT...   (those, without deps)
# Prints the directory; its name is a hash of the requirements, pyproject.toml and this script.
set -euo pipefail
only=0
[ "${1:-}" = --only ] && { only=1; shift; }
cache="$1" pyver="$2" arch="$3" repo="$4"; shift 4
extra=("$@")
key="$( { cat "$0" "$repo/pyproject.toml" "$repo/constraints/bookworm.txt"; echo "$only $pyver $arch ${extra[*]}"; } \
  | sha256sum | cut -c1-16)"
out="$cache/wheels-cp${pyver/./}-$arch-$key"
[ "$only" -eq 1 ] && out="$cache/wheels-only-cp${pyver/./}-$arch-$key"
[ -f "$out/.complete" ] && { echo "$out"; exit 0; }
py="$repo/.venv/bin/python"
# The dependencies as pyproject.toml states them, read with the host's tomllib.
mapfile -t deps < <("$py" -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))
print(*p["project"]["dependencies"], *p["build-system"]["requires"], sep="\n")' "$repo/pyproject.toml")
nodeps=()
[ "$only" -eq 1 ] && { deps=(); nodeps=(--no-deps); }
platforms=()
for v in 41 39 38 36 35 34 31 28 27 24 17 12 5; do platforms+=(--platform "manylinux_2_${v}_$arch"); done
platforms+=(--platform "manylinux2014_$arch" --platform any)
rm -rf "$out.tmp"; mkdir -p "$out.tmp"
PIP_CONSTRAINT="" "$py" -m pip download -q --disable-pip-version-check --only-binary=:all: "${platforms[@]}" \
  --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none \
  "${nodeps[@]}" -d "$out.tmp" "${deps[@]}" "${extra[@]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
ls "$out.tmp"/*.whl >/dev/null 2>&1 || { echo "wheelhouse.sh: pip download failed" >&2; exit 1; }
touch "$out.tmp/.complete"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "$out"
