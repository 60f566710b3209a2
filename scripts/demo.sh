#!/usr/bin/env bash
# One command, fresh Debian / Ubuntu / Raspberry Pi OS machine: install what is missing, make a
# throwaway CA, start a local mosquitto with a mutual-TLS listener, start the agent against it,
# send `ping` and an exec command with `mqtt-agent send`, and keep the agent running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v openssl >/dev/null || missing+=(openssl)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv || { $SUDO apt-get install -y -qq python3-venv >/dev/null && "$PYTHON" -m venv .venv; }
fi
.venv/bin/pip install -q -e .
exec .venv/bin/python scripts/demo.py
