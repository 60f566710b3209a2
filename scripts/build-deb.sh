#!/usr/bin/env bash
# Build the Debian package of mqtt-agent on Debian 12 (or 13): ./scripts/build-deb.sh
#
#   ./scripts/build-deb.sh                      dist/mqtt-agent_<version>_all.deb, then lintian
#   ./scripts/build-deb.sh --version 0.1.0+b1   the same sources with another package version
#                                               (a new debian/changelog entry in the build copy only)
#   ./scripts/build-deb.sh --out DIR --no-lintian --no-apt
#
# Installs its build dependencies from Debian (debhelper, dh-python, lintian, python3-pip for the
# download) unless --no-apt, fetches the pure-Python wheels debian/vendor.txt pins (hash-checked; kept
# in a cache so a rebuild is offline), builds with dpkg-buildpackage in a clean copy of the checkout,
# and runs lintian (errors fail the build; warnings are printed). One Architecture: all package
# serves amd64, arm64, armhf and armel.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR="$(pwd)"

OUT="$ROOT_DIR/dist"
VERSION=""
LINTIAN=1
USE_APT=1
WHEEL_CACHE="${MQTT_AGENT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mqtt-agent/wheels}"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "build-deb: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --version) [ $# -ge 2 ] || die "--version needs a value"; VERSION="$2"; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT="$2"; shift 2 ;;
        --no-lintian) LINTIAN=0; shift ;;
        --no-apt) USE_APT=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option: $1 (try --help)" ;;
    esac
done
case "$OUT" in /*) ;; *) OUT="$ROOT_DIR/$OUT" ;; esac

# --- build dependencies from Debian ---------------------------------------------------------------
if [ "$USE_APT" -eq 1 ]; then
    # shellcheck source=scripts/setup-common.sh
    . scripts/setup-common.sh
    need=()
    for pkg in debhelper dh-python python3-all fakeroot dpkg-dev python3-pip; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
    if [ "$LINTIAN" -eq 1 ] && ! command -v lintian >/dev/null; then need+=(lintian); fi
    apt_install "${need[@]}"
fi
command -v dpkg-buildpackage >/dev/null || die "dpkg-buildpackage is missing (apt-get install dpkg-dev debhelper dh-python)"

# --- the pinned wheels ----------------------------------------------------------------------------
mkdir -p "$WHEEL_CACHE"
if ! (cd "$WHEEL_CACHE" && python3 "$ROOT_DIR/debian/check-wheels.py" "$ROOT_DIR/debian/vendor.txt") 2>/dev/null; then
    rm -f "$WHEEL_CACHE"/*.whl
    python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is needed once to fetch the wheels (apt-get install python3-pip)"
    echo "build-deb: downloading the pinned wheels (debian/vendor.txt) into $WHEEL_CACHE"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --require-hashes -r debian/vendor.txt -d "$WHEEL_CACHE"
    (cd "$WHEEL_CACHE" && python3 "$ROOT_DIR/debian/check-wheels.py" "$ROOT_DIR/debian/vendor.txt")
fi

# --- build in a clean copy ------------------------------------------------------------------------
agent_version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' agent/__init__.py)"
deb_version="$(dpkg-parsechangelog -S Version)"
[ -n "$agent_version" ] || die "cannot read __version__ from agent/__init__.py"
if [ -z "$VERSION" ] && [ "$deb_version" != "$agent_version" ]; then
    die "debian/changelog is at $deb_version but agent/__init__.py at $agent_version: add a changelog entry"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
src="$work/mqtt-agent"
mkdir -p "$src"
# Only what the package is built from (no .venv, no dist/, no caches).
cp -r agent debian etc systemd pyproject.toml README.md "$src/"
mkdir -p "$src/deploy" && cp -r deploy/polkit "$src/deploy/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$src/debian/vendor-wheels"
mkdir -p "$src/debian/vendor-wheels"
cp "$WHEEL_CACHE"/*.whl "$src/debian/vendor-wheels/"
if [ -n "$VERSION" ]; then
    {
        printf 'mqtt-agent (%s) bookworm; urgency=medium\n\n  * Rebuild of %s as %s.\n\n' "$VERSION" "$deb_version" "$VERSION"
        printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -S Maintainer)" "$(date -R)"
        cat debian/changelog
    } >"$src/debian/changelog"
fi
version="$(cd "$src" && dpkg-parsechangelog -S Version)"

echo "build-deb: building mqtt-agent $version"
(cd "$src" && dpkg-buildpackage --build=binary --no-sign -rfakeroot >"$work/build.log" 2>&1) || {
    tail -40 "$work/build.log" >&2; die "dpkg-buildpackage failed (log above)"; }
deb="$work/mqtt-agent_${version}_all.deb"
[ -f "$deb" ] || die "dpkg-buildpackage wrote no $deb"
mkdir -p "$OUT"
cp "$deb" "$OUT/"
echo "build-deb: wrote $OUT/$(basename "$deb")"

if [ "$LINTIAN" -eq 1 ]; then
    # Errors fail the build; each accepted warning is overridden with its reason in
    # debian/mqtt-agent.lintian-overrides.
    lintian --fail-on error --display-level '>=warning' --info "$OUT/$(basename "$deb")"
    echo "build-deb: lintian: no errors"
fi
