#!/usr/bin/env bash
# Run the benchmark on this machine: the agent against a minimal paho-mqtt responder on the same local
# mosquitto, in one run. Installs mosquitto (Debian package) and .venv if missing; takes a few minutes.
#   ./bench/run.sh               # full run; writes bench/results/latest.md and latest.json
#   ./bench/run.sh --quick       # smoke run with tiny counts (what CI runs), targets not judged; bench/work/smoke
#   ./bench/run.sh --help        # counts, fleet size, phases to skip, output directory
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup-common.sh
. scripts/setup-common.sh

command -v mosquitto >/dev/null || apt_install mosquitto
[ -x .venv/bin/python ] || make_venv ""
exec .venv/bin/python -m bench "$@"
