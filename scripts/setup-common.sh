# shellcheck shell=bash
# Shared by scripts/test.sh, scripts/demo.sh and bench/run.sh (sourced, from the repository root):
# installing Debian packages, and the project's virtualenv in .venv.

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# apt_install [PACKAGE...]: install these Debian packages (nothing to do without arguments).
apt_install() {
    [ "$#" -gt 0 ] || return 0
    echo "installing Debian packages: $*"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null
}

# make_venv [EXTRAS]: .venv (with $PYTHON, default python3) holding the agent in editable mode, e.g.
# make_venv "[test,systemd]".
make_venv() {
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        "$python" -m venv .venv || { apt_install python3-venv && "$python" -m venv .venv; }
        .venv/bin/pip install -q --upgrade pip >/dev/null
    fi
    .venv/bin/pip install -q -e ".${1:-}"
}
