#!/usr/bin/env bash
# Set up everything the test suite needs on Debian / Ubuntu / Raspberry Pi OS and run it.
#   ./scripts/test.sh                 # lint, type-check, all tests
#   ./scripts/test.sh -k tls -x       # extra arguments go to pytest
# Installs (if missing): mosquitto, mosquitto-clients, prometheus (promtool), systemd (systemd-analyze),
# libsystemd-dev + pkg-config (to build systemd-python), openssl, shellcheck, polkitd + dbus (the polkit
# rule test runs a private polkitd), rabbitmq-server, debootstrap, nodejs + npm (other brokers), the
# Debian packaging tools, systemd-container and qemu-user-static (the package's system tests); a
# virtualenv in .venv.
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
# The interop suite (tests/system/interop) and issue 17's broker tests: RabbitMQ 3.10 from Debian 12,
# aedes from npm on Node, and a debootstrapped Debian 13 root (mosquitto 2.0.21, RabbitMQ 4.0) cached in
# /var/cache/mqtt-agent-tests. Where systemd runs, the rabbitmq-server package starts a system-wide node
# (5672, epmd 4369); the tests use none of it (own node names, ports, epmd, cookie).
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
# The Debian package (scripts/build-deb.sh, deploy/apt-repo.sh) and its system tests: a booted Debian in
# systemd-nspawn, ARM roots emulated by qemu-user-static (tests/system/, roots cached in
# /var/cache/mqtt-agent-tests).
for pkg in debhelper dh-python python3-all dpkg-dev fakeroot lintian python3-pip apt-utils gnupg \
           systemd-container qemu-user-static; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
apt_install "${missing[@]}"
# The Debian package starts a system-wide mosquitto on port 1883 where systemd runs; tests use their own.
make_venv "[test,systemd]"

# Built once per machine (about 2 minutes, then cached): the Debian 13 broker root and the aedes install.
echo "== brokers"; .venv/bin/python -m tests.support.brokers.trixie && .venv/bin/python -m tests.support.brokers.aedes
echo "== ruff"; .venv/bin/ruff check agent tests scripts bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
