#!/usr/bin/env bash
# Run the benchmark on this machine: the agent against a minimal paho-mqtt responder on the same local
# mosquitto, in one run. Installs mosquitto (Debian package) and .venv if missing; takes a few minutes.
#   ./bench/run.sh               # full run; writes bench/results/latest.md and latest.json
#   ./bench/run.sh --quick       # smoke run with tiny counts (what CI runs), targets not judged; bench/work/smoke
#   ./bench/run.sh --help        # counts, fleet size, phases to skip, output directory
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v mosquitto >/dev/null; then
    echo "installing Debian package: mosquitto"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
fi
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv || { $SUDO apt-get install -y -qq python3-venv >/dev/null && "$PYTHON" -m venv .venv; }
    .venv/bin/pip install -q -e .
fi
exec .venv/bin/python -m bench "$@"
