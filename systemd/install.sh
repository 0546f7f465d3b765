#!/usr/bin/env bash
# Installs edgecam as a hardened systemd service, from this checkout.
#   sudo bash systemd/install.sh [--mirror DIR_OR_URL] [--wheelhouse DIR] [--prefix DIR] [--python PY]
#   sudo bash systemd/install.sh --uninstall [--purge] [--prefix DIR]
# Puts the package in its own venv (/opt/edgecam/venv), the default model in /opt/edgecam/models,
# a commented config in /etc/edgecam/edgecam.toml and a secrets file /etc/edgecam/edgecam.env
# (root only) when they do not exist (never overwritten), and installs and enables
# edgecam.service. Running it again changes nothing unless the checkout changed.
# --wheelhouse DIR installs the Python packages from DIR only (pip --no-index), for a site
# without internet; with --mirror DIR for the model, the install needs no network at all.
# --prefix installs into another root (a staging directory, or a test's throw-away root);
# systemctl is only called for the real root on a running systemd. --uninstall removes the
# unit and /opt/edgecam, keeping config and state unless --purge.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$(dirname "$here")"

prefix="/"
mirror="${EDGECAM_MODEL_MIRROR:-}"
wheelhouse=""
uninstall=0
purge=0
PYTHON="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --mirror) mirror="${2:?--mirror needs a directory or URL}"; shift 2 ;;
    --wheelhouse) wheelhouse="${2:?--wheelhouse needs a directory of wheels}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$wheelhouse" ] && [ ! -d "$wheelhouse" ]; then
  echo "install.sh: --wheelhouse $wheelhouse: no such directory" >&2; exit 2
fi
[ "$purge" -eq 0 ] || [ "$uninstall" -eq 1 ] || { echo "install.sh: --purge goes with --uninstall" >&2; exit 2; }

root="${prefix%/}"   # "" for the real root
live=0               # the real root on a running systemd: systemctl may be used
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then live=1; fi
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo), or give --prefix for a staging root" >&2
  exit 2
fi

opt="$root/opt/edgecam"
etc="$root/etc/edgecam"
unit_dir="$root/etc/systemd/system"
unit="$unit_dir/edgecam.service"
wants="$unit_dir/multi-user.target.wants/edgecam.service"
say() { echo "install.sh: $*"; }

if [ "$uninstall" -eq 1 ]; then
  if [ "$live" -eq 1 ]; then
    systemctl disable --now edgecam.service >/dev/null 2>&1 || true
  fi
  rm -f "$wants" "$unit"
  rm -rf "$opt"
  [ "$live" -eq 1 ] && systemctl daemon-reload
  if [ "$purge" -eq 1 ]; then
    rm -rf "$etc" "$root/var/lib/edgecam" "$root/var/lib/private/edgecam"
    say "removed edgecam, its config and its state"
  else
    say "removed edgecam; kept $etc and the state in $root/var/lib/edgecam (--purge removes them)"
  fi
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install.sh: edgecam needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
  exit 2
fi

# 1. The package, in its own venv; reinstalled only when the checkout's sources changed.
install -d -m 0755 "$opt" "$opt/models"
# Every file the package is built from, in a fixed order (the subpackages too, and the dashboard's page).
stamp="$(cd "$src" && find pyproject.toml models/manifest.toml edgecam -type f ! -name '*.pyc' -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
pip_source=()
[ -n "$wheelhouse" ] && pip_source=(--no-index --find-links "$(cd "$wheelhouse" && pwd)")
venv_args=()
constraints=()
if "$PYTHON" -c 'import picamera2' >/dev/null 2>&1; then
  venv_args+=(--system-site-packages)   # Debian's picamera2 and libcamera (see docs/install.md)
  # bookworm's packages are built against its NumPy 1.24: keep NumPy 1.x there. trixie's NumPy is
  # 2.x (and no NumPy 1.x wheel exists for its Python 3.13): no constraints.
  if "$PYTHON" -c 'import numpy, sys; sys.exit(int(numpy.__version__.split(".")[0]) >= 2)' >/dev/null 2>&1; then
    constraints+=(-c "$src/constraints/bookworm.txt")
  fi
fi
if [ ! -x "$opt/venv/bin/python" ]; then
  say "creating $opt/venv"
  "$PYTHON" -m venv "${venv_args[@]}" "$opt/venv"
fi
if [ "$(cat "$opt/.installed" 2>/dev/null || true)" != "$stamp" ]; then
  say "installing edgecam into $opt/venv"
  "$opt/venv/bin/python" -m pip install -q --disable-pip-version-check "${pip_source[@]}" "${constraints[@]}" "$src" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$opt/venv/bin/python" -c 'import edgecam' || { echo "install.sh: the package install failed" >&2; exit 1; }
  install -m 0644 "$src/README.md" "$opt/README.md"
  echo "$stamp" > "$opt/.installed"
fi
edgecam="$opt/venv/bin/edgecam"

# 2. The default model, checked against its sha256.
fetch=(models fetch)
[ -n "$mirror" ] && fetch+=(--mirror "$mirror")
EDGECAM_MODEL_DIR="$opt/models" "$edgecam" "${fetch[@]}" | sed 's/^/install.sh: /'
chmod -R a+rX "$opt/models"

# 3. Config and secrets, only when absent: an engineer's edits are never overwritten.
install -d -m 0755 "$etc"
if [ ! -e "$etc/edgecam.toml" ]; then
  tmp="$(mktemp "$etc/.edgecam.toml.XXXXXX")"
  "$edgecam" config default > "$tmp"
  chmod 0644 "$tmp"
  mv "$tmp" "$etc/edgecam.toml"
  say "wrote $etc/edgecam.toml (every key commented out: the defaults)"
fi
if [ ! -e "$etc/edgecam.env" ]; then
  (umask 077 && cat > "$etc/edgecam.env" <<'ENV'
# Secrets for edgecam.service, read by systemd (as root) before it starts the daemon.
# Keep this file mode 0600, owned by root. Example:
# EDGECAM_MQTT_PASSWORD=...
ENV
  )
  say "wrote $etc/edgecam.env (mode 0600, for the broker password)"
fi

# 4. The unit, enabled.
install -d -m 0755 "$unit_dir" "$unit_dir/multi-user.target.wants"
if ! cmp -s "$here/edgecam.service" "$unit" 2>/dev/null; then
  install -m 0644 "$here/edgecam.service" "$unit"
  say "installed $unit"
  [ "$live" -eq 1 ] && systemctl daemon-reload
fi
if [ "$live" -eq 1 ]; then
  systemctl is-enabled --quiet edgecam.service 2>/dev/null || systemctl enable edgecam.service
elif [ "$(readlink "$wants" 2>/dev/null || true)" != "/etc/systemd/system/edgecam.service" ]; then
  ln -sfn /etc/systemd/system/edgecam.service "$wants"
  say "enabled edgecam.service (multi-user.target.wants)"
fi

"$edgecam" --version | sed 's/^/install.sh: /'
if [ "$live" -eq 1 ]; then
  say "done. Edit $etc/edgecam.toml, check it with: $edgecam config check -c $etc/edgecam.toml"
  say "then: systemctl start edgecam; journalctl -u edgecam -f"
else
  say "done (into $prefix; systemctl was not called)"
fi
