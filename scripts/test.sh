#!/usr/bin/env bash
# Set up everything the test suite needs on Debian / Ubuntu / Raspberry Pi OS and run it.
#   ./scripts/test.sh                 # lint, type-check, all tests
#   ./scripts/test.sh -k tls -x       # extra arguments go to pytest
# Installs (if missing): mosquitto, mosquitto-clients, prometheus (promtool), systemd (systemd-analyze),
# libsystemd-dev + pkg-config (to build systemd-python), openssl, shellcheck, polkitd + dbus (the polkit
# rule test runs a private polkitd); a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup-common.sh
. scripts/setup-common.sh

missing=()
command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v mosquitto_rr >/dev/null || missing+=(mosquitto-clients)
command -v promtool >/dev/null || missing+=(prometheus)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v openssl >/dev/null || missing+=(openssl)
command -v shellcheck >/dev/null || missing+=(shellcheck)
# The PUBACK-order test reads the agent's system calls; sick-disk tests mount a small tmpfs (util-linux).
command -v strace >/dev/null || missing+=(strace)
command -v pkg-config >/dev/null || missing+=(pkg-config)
pkg-config --exists libsystemd 2>/dev/null || missing+=(libsystemd-dev)
# deploy/install.sh (and its test) builds the agent's venv with Debian's own python3 and its venv module.
/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
# The polkit rule test runs the real polkitd on a private D-Bus.
[ -x /usr/lib/polkit-1/polkitd ] || missing+=(polkitd)
command -v dbus-daemon >/dev/null || missing+=(dbus-daemon)
command -v dbus-send >/dev/null || missing+=(dbus-bin)
apt_install "${missing[@]}"
# The Debian package starts a system-wide mosquitto on port 1883 where systemd runs; tests use their own.
make_venv "[test,systemd]"

echo "== ruff"; .venv/bin/ruff check agent tests scripts bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
