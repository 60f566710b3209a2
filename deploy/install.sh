#!/usr/bin/env bash
# Install mqtt-agent on Debian 12 / Raspberry Pi OS (bookworm; bullseye with Python 3.9), x86_64 or ARM.
#
#   sudo deploy/install.sh                    install or upgrade from this checkout
#   sudo deploy/install.sh --root /srv/image  stage into an image tree (no apt-get, no running systemd)
#   sudo deploy/install.sh --uninstall        remove program and unit; keep config, keys and state
#   sudo deploy/install.sh --uninstall --purge   ... and remove /etc/mqtt-agent and /var/lib/mqtt-agent
#
# What it installs: the system user and group mqtt-agent (systemd-sysusers), a virtual environment in
# /opt/mqtt-agent with the agent and its dependencies, the unit /etc/systemd/system/mqtt-agent.service
# (enabled, not started: the device has no certificate yet), and /etc/mqtt-agent/ with the example
# config. Idempotent: a second run changes nothing, and an existing (edited) config is never touched.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$HERE/.." && pwd)"

USER_NAME=mqtt-agent
VENV=/opt/mqtt-agent
CONF_DIR=/etc/mqtt-agent
STATE_DIR=/var/lib/mqtt-agent
UNIT_NAME=mqtt-agent.service
UNIT_PATH=/etc/systemd/system/$UNIT_NAME
SOCKET_NAME=mqtt-agent.socket
SOCKET_PATH=/etc/systemd/system/$SOCKET_NAME
APPS_GROUP=mqtt-agent-apps
SYSUSERS_PATH=/usr/lib/sysusers.d/mqtt-agent.conf
STAMP=$VENV/.mqtt-agent-source
DEBIAN_SYSTEMD=/usr/lib/python3/dist-packages/systemd

ROOT=""
SOURCE=""
PYTHON=/usr/bin/python3
SYSTEMD_PYTHON=debian
USE_APT=1
ACTION=install
PURGE=0
CHANGES=0

usage() {
    cat <<EOF
usage: deploy/install.sh [--root DIR] [--source SPEC] [--python PATH] [--systemd-python debian|build|none]
                         [--no-apt] [--uninstall [--purge]]

Install mqtt-agent as a systemd service on Debian / Raspberry Pi OS. Run as root.

options:
  --root DIR        install into the tree DIR instead of / (an image being built, or a test); no
                    apt-get and no running systemd are used; paths inside the tree stay the runtime
                    ones (/opt/mqtt-agent, /etc/mqtt-agent), so DIR can become a device's root file system
  --source SPEC     what pip installs (default: this checkout, $CHECKOUT);
                    e.g. a wheel file or "mqtt-agent==0.1.0" from your package index
  --python PATH     Python 3.9+ for the virtual environment (default: $PYTHON, Debian's)
  --systemd-python MODE
                    debian (default): use Debian's python3-systemd (no compiler needed)
                    build: pip-build systemd-python against libsystemd-dev (needs gcc, python3-dev)
                    none: without it the agent logs plain lines to stderr (journald still keeps them)
  --no-apt          do not install Debian packages (python3-venv, python3-systemd); they must be present
  --uninstall       stop and disable the service, remove the unit and /opt/mqtt-agent; the config,
                    keys, certificates, state and the user are kept
  --purge           with --uninstall: also remove $CONF_DIR (keys!) and $STATE_DIR
  -h, --help        show this help

Architectures: the agent is pure Python. x86_64 and aarch64 get wheels of its dependencies
(cryptography) from PyPI. On 32-bit Raspberry Pi OS (armv7l/armv6l) pip takes them from piwheels,
which Raspberry Pi OS configures in /etc/pip.conf; elsewhere on armhf cryptography must be built
(Rust toolchain) unless a wheel is provided.
EOF
}

say() { echo "mqtt-agent install: $*"; }
changed() { CHANGES=$((CHANGES + 1)); say "$*"; }
die() { echo "mqtt-agent install: error: $*" >&2; exit 1; }
usage_error() { echo "mqtt-agent install: $*" >&2; echo "try: deploy/install.sh --help" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || usage_error "--root needs a directory"; ROOT="$2"; shift 2 ;;
        --root=*) ROOT="${1#*=}"; shift ;;
        --source) [ $# -ge 2 ] || usage_error "--source needs a value"; SOURCE="$2"; shift 2 ;;
        --source=*) SOURCE="${1#*=}"; shift ;;
        --python) [ $# -ge 2 ] || usage_error "--python needs a path"; PYTHON="$2"; shift 2 ;;
        --python=*) PYTHON="${1#*=}"; shift ;;
        --systemd-python) [ $# -ge 2 ] || usage_error "--systemd-python needs a mode"; SYSTEMD_PYTHON="$2"; shift 2 ;;
        --systemd-python=*) SYSTEMD_PYTHON="${1#*=}"; shift ;;
        --no-apt) USE_APT=0; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown option: $1" ;;
    esac
done

case "$SYSTEMD_PYTHON" in debian|build|none) ;; *) usage_error "--systemd-python must be debian, build or none" ;; esac
if [ "$PURGE" -eq 1 ] && [ "$ACTION" != uninstall ]; then usage_error "--purge is only used with --uninstall"; fi
if [ -n "$ROOT" ]; then
    case "$ROOT" in /*) ;; *) usage_error "--root must be an absolute path, got '$ROOT'" ;; esac
    ROOT="${ROOT%/}"   # "/" becomes "", the live system
fi
if [ "$(id -u)" -ne 0 ]; then die "run as root (sudo): it creates a system user and writes to /opt, /etc"; fi

# --- helpers ------------------------------------------------------------------------------------

# The numeric id of a user or group in the target tree (the host's names may differ from the image's).
id_in_root() { # file name
    awk -F: -v n="$2" '$1 == n { print $3; found = 1 } END { exit !found }' "$ROOT$1"
}

# Install FILE's content at DEST (inside ROOT) with MODE and OWNER (uid:gid) if anything differs.
put_file() { # src dest mode owner
    local src="$1" dest="$ROOT$2" mode="$3" owner="$4"
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        if [ "$(stat -c '%a %u:%g' "$dest")" != "${mode#0} $owner" ]; then
            chmod "$mode" "$dest"; chown "$owner" "$dest"
            changed "fixed mode/owner of $2"
        fi
        return 0
    fi
    install -D -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$src" "$dest"
    changed "installed $2"
}

ensure_dir() { # dir mode owner
    local dir="$ROOT$1"
    if [ ! -d "$dir" ]; then
        install -d -m "$2" -o "${3%:*}" -g "${3#*:}" "$dir"
        changed "created $1"
    fi
}

systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

systemctl_root() {
    if [ -n "$ROOT" ]; then systemctl --root="$ROOT" "$@"; else systemctl "$@"; fi
}

# A fingerprint of what pip would install, so an unchanged source is not reinstalled.
source_fingerprint() {
    local spec="$1"
    if [ -d "$spec" ]; then
        (cd "$spec" && find agent pyproject.toml -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
            | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
    elif [ -f "$spec" ]; then
        sha256sum "$spec" | cut -d' ' -f1
    else
        printf '%s' "$spec" | sha256sum | cut -d' ' -f1
    fi
}

# --- install ------------------------------------------------------------------------------------

check_platform() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null \
        || die "$PYTHON is not Python 3.9 or newer (Debian 11 bullseye has 3.9, Debian 12 bookworm 3.11)"
    if [ -z "$ROOT" ] && [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091
        . /etc/os-release
        case " ${ID:-} ${ID_LIKE:-} " in
            *" debian "*|*" raspbian "*) ;;
            *) say "note: this script is written for Debian / Raspberry Pi OS, not ${PRETTY_NAME:-this system}" ;;
        esac
    fi
    case "$(uname -m)" in
        armv6l|armv7l)
            if ! grep -qs piwheels /etc/pip.conf; then
                say "note: 32-bit ARM without piwheels in /etc/pip.conf: pip may have to build cryptography"
            fi ;;
    esac
}

install_packages() {
    local wanted=(python3-venv) missing=() pkg
    case "$SYSTEMD_PYTHON" in
        debian) wanted+=(python3-systemd) ;;
        build) wanted+=(libsystemd-dev pkg-config gcc python3-dev) ;;
    esac
    if [ -n "$ROOT" ] || [ "$USE_APT" -eq 0 ]; then
        if [ -n "$ROOT" ]; then say "note: --root: not installing Debian packages; the image needs: ${wanted[*]}"; fi
        return 0
    fi
    for pkg in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        changed "installed Debian packages: ${missing[*]}"
    fi
}

install_user() {
    local conf
    conf="$(mktemp)"
    # A static system user: files in /etc/mqtt-agent keep a stable owner across reinstalls.
    printf 'u %s - "mqtt-agent device agent" %s /usr/sbin/nologin\n' "$USER_NAME" "$STATE_DIR" >"$conf"
    # The apps that may publish through the local API (the socket's group; add their users to it).
    printf 'g %s -\n' "$APPS_GROUP" >>"$conf"
    put_file "$conf" "$SYSUSERS_PATH" 0644 0:0
    rm -f "$conf"
    if id_in_root /etc/passwd "$USER_NAME" >/dev/null 2>&1 && id_in_root /etc/group "$APPS_GROUP" >/dev/null 2>&1; then
        return 0
    fi
    if id_in_root /etc/passwd "$USER_NAME" >/dev/null 2>&1; then  # an upgrade: only the group is new
        if command -v systemd-sysusers >/dev/null; then
            systemd-sysusers --root="${ROOT:-/}" "$(basename "$SYSUSERS_PATH")" >/dev/null 2>&1 || true
        elif [ -z "$ROOT" ]; then
            groupadd --system "$APPS_GROUP" || true
        fi
        if id_in_root /etc/group "$APPS_GROUP" >/dev/null 2>&1; then changed "created group $APPS_GROUP"; fi
        return 0
    fi
    if command -v systemd-sysusers >/dev/null; then
        mkdir -p "$ROOT/etc"
        local out
        out="$(systemd-sysusers --root="${ROOT:-/}" "$(basename "$SYSUSERS_PATH")" 2>&1)" \
            || die "systemd-sysusers failed: $out"
    elif [ -z "$ROOT" ]; then
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin \
            --comment "mqtt-agent device agent" "$USER_NAME"
    else
        die "systemd-sysusers is needed to create the user in --root $ROOT"
    fi
    id_in_root /etc/passwd "$USER_NAME" >/dev/null || die "could not create the user $USER_NAME"
    changed "created system user and group $USER_NAME"
}

venv_python() { echo "$ROOT$VENV/bin/python"; }

install_venv() {
    local py spec fingerprint site
    py="$(venv_python)"
    local want have
    want="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    have="$("$py" -I -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
    if [ "$have" != "$want" ]; then
        # Missing, or broken by a Python upgrade (bullseye -> bookworm): make it anew.
        "$PYTHON" -m venv --clear "$ROOT$VENV" || die "could not create the virtual environment (apt-get install python3-venv)"
        rm -f "$ROOT$STAMP"
        changed "created the virtual environment $VENV (Python $want)"
    fi
    spec="${SOURCE:-$CHECKOUT}"
    fingerprint="$(source_fingerprint "$spec") systemd-python=$SYSTEMD_PYTHON"
    if [ -f "$ROOT$STAMP" ] && [ "$(cat "$ROOT$STAMP")" = "$fingerprint" ]; then
        return 0
    fi
    say "installing the agent from $spec (pip)"
    local target="$spec" work=""
    if [ -d "$spec" ]; then
        # Build from a clean copy: setuptools' in-tree build/ can carry modules deleted since, and the
        # checkout may be read-only.
        work="$(mktemp -d)"
        cp -r "$spec/pyproject.toml" "$spec/agent" "$work/"
        for f in README.md LICENSE; do
            if [ -e "$spec/$f" ]; then cp "$spec/$f" "$work/"; fi
        done
        find "$work" -name __pycache__ -prune -exec rm -rf {} +
        target="$work"
    fi
    if ! "$py" -I -m pip install --quiet --disable-pip-version-check --no-warn-script-location "$target"; then
        rm -rf "${work:-/nonexistent}"
        die "pip could not install $spec (network? a missing wheel on this architecture?)"
    fi
    if [ -n "$work" ]; then rm -rf "$work"; fi
    site="$("$py" -I -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    case "$SYSTEMD_PYTHON" in
        debian)
            # Only Debian's systemd module is borrowed, not all of dist-packages: it is built for the
            # same Debian python3 the venv runs on. In an image tree the link is resolved at run time.
            if [ "$(readlink "$site/systemd" 2>/dev/null || true)" != "$DEBIAN_SYSTEMD" ]; then
                rm -rf "$site/systemd"
                ln -s "$DEBIAN_SYSTEMD" "$site/systemd"
            fi
            if [ -z "$ROOT" ] && ! "$py" -I -c 'import systemd.journal' 2>/dev/null; then
                rm -f "$site/systemd"
                say "note: Debian's python3-systemd does not load in this venv ($PYTHON); the agent runs without it"
            fi ;;
        build)
            "$py" -I -m pip install --quiet --disable-pip-version-check 'systemd-python>=234' \
                || die "could not build systemd-python (needs libsystemd-dev, pkg-config, gcc, python3-dev)" ;;
        none) ;;
    esac
    if [ -n "$ROOT" ]; then
        # pip wrote the staging path into the scripts' #! lines; on the device the venv is at $VENV.
        grep -rlF -- "$ROOT$VENV" "$ROOT$VENV/bin" "$ROOT$VENV/pyvenv.cfg" | while IFS= read -r f; do
            sed -i "s|$ROOT$VENV|$VENV|g" "$f"
        done
    fi
    printf '%s\n' "$fingerprint" >"$ROOT$STAMP"
    # -I: not the checkout in the current directory, the installed package.
    changed "installed $("$py" -I -m agent --version 2>/dev/null || echo mqtt-agent) into $VENV"
    RESTART_NEEDED=1
}

install_files() {
    local gid
    gid="$(id_in_root /etc/group "$USER_NAME")"
    local before="$CHANGES"
    put_file "$CHECKOUT/systemd/$UNIT_NAME" "$UNIT_PATH" 0644 0:0
    put_file "$CHECKOUT/systemd/$SOCKET_NAME" "$SOCKET_PATH" 0644 0:0
    if [ "$CHANGES" -gt "$before" ]; then UNIT_CHANGED=1; RESTART_NEEDED=1; fi
    ensure_dir "$CONF_DIR" 0755 0:0
    put_file "$CHECKOUT/etc/mqtt-agent.toml" "$CONF_DIR/mqtt-agent.toml.example" 0644 0:0
    if [ ! -e "$ROOT$CONF_DIR/mqtt-agent.toml" ]; then
        # Readable by the service user, not by everyone: operators add credentials' paths and commands here.
        install -m 0640 -o 0 -g "$gid" "$CHECKOUT/etc/mqtt-agent.toml" "$ROOT$CONF_DIR/mqtt-agent.toml"
        changed "installed $CONF_DIR/mqtt-agent.toml (the example; edit it)"
    fi
}

enable_service() {
    if systemd_running && [ "$UNIT_CHANGED" -eq 1 ]; then
        systemctl daemon-reload
    fi
    if ! systemctl_root is-enabled --quiet "$UNIT_NAME" 2>/dev/null; then
        systemctl_root enable --quiet "$UNIT_NAME"
        changed "enabled $UNIT_NAME"
    fi
    if ! systemctl_root is-enabled --quiet "$SOCKET_NAME" 2>/dev/null; then
        systemctl_root enable --quiet "$SOCKET_NAME"
        changed "enabled $SOCKET_NAME (the local API for apps in group $APPS_GROUP)"
    fi
    if systemd_running && [ "$RESTART_NEEDED" -eq 1 ] && systemctl is-active --quiet "$UNIT_NAME"; then
        systemctl restart "$UNIT_NAME"
        changed "restarted $UNIT_NAME (it was running)"
    fi
}

do_install() {
    UNIT_CHANGED=0
    RESTART_NEEDED=0
    check_platform
    install_packages
    install_user
    install_venv
    install_files
    enable_service
    if [ "$CHANGES" -eq 0 ]; then
        say "nothing to do: mqtt-agent is installed and up to date${ROOT:+ in $ROOT}"
        return 0
    fi
    say "done${ROOT:+ (in $ROOT)}. Next steps on the device:"
    cat <<EOF
  1. edit $CONF_DIR/mqtt-agent.toml: agent.device_id, mqtt.hosts, tls.ca_file (the broker's CA)
  2. sudo $VENV/bin/mqtt-agent enroll          # device key + CSR; the key never leaves the device
  3. have the CSR signed by the fleet CA, then:
     sudo $VENV/bin/mqtt-agent enroll --install-cert device.pem
  4. sudo $VENV/bin/mqtt-agent check-config && sudo systemctl restart $UNIT_NAME
EOF
}

# --- uninstall ----------------------------------------------------------------------------------

do_uninstall() {
    if systemd_running && systemctl is-active --quiet "$UNIT_NAME"; then
        systemctl stop "$UNIT_NAME"
        changed "stopped $UNIT_NAME"
    fi
    if [ -e "$ROOT$SOCKET_PATH" ]; then
        if systemd_running; then systemctl stop "$SOCKET_NAME" 2>/dev/null || true; fi
        systemctl_root disable --quiet "$SOCKET_NAME" 2>/dev/null || true
        rm -f "$ROOT$SOCKET_PATH"
        changed "removed $SOCKET_PATH"
    fi
    if [ -e "$ROOT$UNIT_PATH" ]; then
        if systemctl_root is-enabled --quiet "$UNIT_NAME" 2>/dev/null; then
            systemctl_root disable --quiet "$UNIT_NAME"
            changed "disabled $UNIT_NAME"
        fi
        rm -f "$ROOT$UNIT_PATH"
        changed "removed $UNIT_PATH"
        if systemd_running; then systemctl daemon-reload; fi
    fi
    if [ -d "$ROOT$VENV" ]; then
        rm -rf -- "$ROOT${VENV:?}"
        changed "removed $VENV"
    fi
    if [ -e "$ROOT$SYSUSERS_PATH" ]; then
        rm -f "$ROOT$SYSUSERS_PATH"
        changed "removed $SYSUSERS_PATH (the user $USER_NAME is kept: files may still belong to it)"
    fi
    if [ "$PURGE" -eq 1 ]; then
        local dir
        for dir in "$CONF_DIR" "$STATE_DIR"; do
            if [ -e "$ROOT$dir" ]; then
                rm -rf -- "$ROOT${dir:?}"
                changed "removed $dir"
            fi
        done
    elif [ -e "$ROOT$CONF_DIR" ]; then
        say "kept $CONF_DIR (config, key, certificate) and $STATE_DIR; --purge removes them"
    fi
    if [ "$CHANGES" -eq 0 ]; then say "nothing to do: mqtt-agent is not installed${ROOT:+ in $ROOT}"; fi
}

if [ -n "$ROOT" ]; then mkdir -p "$ROOT"; fi
if [ "$ACTION" = uninstall ]; then do_uninstall; else do_install; fi
