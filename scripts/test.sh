#!/usr/bin/env bash
# Set up everything the test suite needs on Debian / Ubuntu / Raspberry Pi OS and run it.
#   ./scripts/test.sh                 # lint, type-check, all tests
#   ./scripts/test.sh -k tls -x       # extra arguments go to pytest
# Installs (if missing): mosquitto, mosquitto-clients, prometheus (promtool), systemd (systemd-analyze),
# libsystemd-dev + pkg-config + gcc + python3-dev (to build systemd-python), openssl, shellcheck, polkitd
# + dbus (the polkit rule test runs a private polkitd), rabbitmq-server, debootstrap, nodejs + npm (other
# brokers), the Debian packaging tools, systemd-container and qemu-user-static (the package's system
# tests); a virtualenv in .venv. The cached roots and aedes are built in the background (see below).
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
# systemd-python has no wheel on PyPI: pip compiles it (a fresh Debian 12 has no Python.h, and gcc only
# through dpkg-dev's dependencies).
command -v gcc >/dev/null || missing+=(gcc)
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
    2>/dev/null || missing+=(python3-dev)
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
t_start=$SECONDS
elapsed() { echo "$((SECONDS - t_start)) s"; }

# What the suite caches (debootstrapped roots, the aedes install; tests/support/prebuild.py) is built in
# the background while the venv, lint, mypy and the fast tiers run: on a fresh machine that is about
# 15 minutes of downloading and (for the ARM roots) emulation. With everything cached it takes seconds.
# Tests that need a root (marked `roots`) run last and wait for it; one whose build failed fails with
# the build's log. Only the standard library is needed, so it starts before the venv exists.
PREBUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mqtt-agent-prebuild.XXXXXX")"
export MQTT_AGENT_PREBUILD="$PREBUILD_DIR"
prebuild_pid=""
# stop_prebuild: end the prebuild and everything it started (its own session: setsid below).
stop_prebuild() {
    [ -n "$prebuild_pid" ] || return 0
    if kill -0 "$prebuild_pid" 2>/dev/null; then
        echo "stopping the background prebuild (log: $PREBUILD_DIR/prebuild.log)"
        kill -TERM -- "-$prebuild_pid" 2>/dev/null || true
        sleep 2
    fi
    # Whatever is left of its session (a process that left the process group keeps the session).
    local left
    left="$(ps -o pid= -s "$prebuild_pid" 2>/dev/null | tr -d ' ' | tr '\n' ' ')"
    # shellcheck disable=SC2086 # a list of pids
    [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
    wait "$prebuild_pid" 2>/dev/null || true
    prebuild_pid=""
}
trap stop_prebuild EXIT
trap 'exit 130' INT TERM
echo "== cached roots and brokers: building in the background (log: $PREBUILD_DIR/prebuild.log)"
setsid nice -n 10 /usr/bin/python3 -m tests.support.prebuild --dir "$PREBUILD_DIR" \
    >"$PREBUILD_DIR/prebuild.log" 2>&1 </dev/null &
prebuild_pid=$!
# It holds the lock of every root it builds before the tests may ask for one.
for _ in $(seq 600); do
    [ -e "$PREBUILD_DIR/locked" ] || ! kill -0 "$prebuild_pid" 2>/dev/null && break
    sleep 0.1
done

# The Debian package starts a system-wide mosquitto on port 1883 where systemd runs; tests use their own.
make_venv "[test,systemd]"
echo "== ruff ($(elapsed))"; .venv/bin/ruff check agent tests scripts bench
echo "== mypy ($(elapsed))"; .venv/bin/mypy
echo "== pytest ($(elapsed))"
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
echo "== pytest done ($(elapsed)): exit $rc"
if [ "$rc" -ne 0 ]; then
    stop_prebuild
    exit "$rc"
fi
# Never ignored: the tests passed, and the prebuild must have too (it may still be building a root no
# selected test needed).
prebuild_rc=0
kill -0 "$prebuild_pid" 2>/dev/null && echo "== waiting for the background prebuild ($PREBUILD_DIR/prebuild.log)"
wait "$prebuild_pid" || prebuild_rc=$?
prebuild_pid=""
sed -n 's/^prebuild: /== prebuild: /p' "$PREBUILD_DIR/prebuild.log"
if [ "$prebuild_rc" -ne 0 ]; then
    echo "the background prebuild failed (exit $prebuild_rc); $PREBUILD_DIR:" >&2
    for failed in "$PREBUILD_DIR"/*.failed; do
        [ -e "$failed" ] && { echo "--- $failed"; tail -n 40 "$failed"; } >&2
    done
    tail -n 20 "$PREBUILD_DIR/prebuild.log" >&2
    exit 1
fi
rm -rf "$PREBUILD_DIR"
echo "== done ($(elapsed))"
