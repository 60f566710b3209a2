#!/usr/bin/env bash
# One command, fresh Debian / Ubuntu / Raspberry Pi OS machine: install what is missing, make a
# throwaway CA, start a local mosquitto with a mutual-TLS listener, start the agent against it,
# send `ping` and an exec command with `mqtt-agent send`, and keep the agent running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup-common.sh
. scripts/setup-common.sh

missing=()
command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v openssl >/dev/null || missing+=(openssl)
apt_install "${missing[@]}"
make_venv ""
exec .venv/bin/python scripts/demo.py
