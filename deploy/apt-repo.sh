#!/usr/bin/env bash
# Build a signed apt repository for a fleet from mqtt-agent .deb files (apt-ftparchive + gpg).
#
#   deploy/apt-repo.sh --key KEY --out DIR DEB...   add the packages and (re)sign the repository in DIR
#   deploy/apt-repo.sh --new-key NAME --gnupghome GNUPGHOME   make a signing key first (ed25519)
#
# DIR is then served as static files (any web server, or file:// for a local mirror):
#   DIR/pool/main/m/mqtt-agent/*.deb
#   DIR/dists/SUITE/{InRelease,Release,Release.gpg}, DIR/dists/SUITE/main/binary-ARCH/Packages{,.gz}
#   DIR/mqtt-agent-archive-keyring.gpg     the public key gateways install (not secret)
# The package is Architecture: all, so it is listed for every architecture in --arch. The suite is
# "stable" by default: the same package serves Debian 12 and 13, so the gateways' sources line does
# not name a release. Packages already in the pool are kept (older versions stay installable with
# apt install mqtt-agent=VERSION); --prune keeps only the newest.
set -euo pipefail

OUT=""
KEY=""
NEW_KEY=""
SUITE=stable
ARCHS="amd64 arm64 armhf armel"
ORIGIN="mqtt-agent"
PRUNE=0
DEBS=()

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "apt-repo: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT="$2"; shift 2 ;;
        --key) [ $# -ge 2 ] || die "--key needs a key id or fingerprint (gpg --list-secret-keys)"; KEY="$2"; shift 2 ;;
        --new-key) [ $# -ge 2 ] || die "--new-key needs a name, e.g. 'Example Fleet apt signing key'"; NEW_KEY="$2"; shift 2 ;;
        --gnupghome) [ $# -ge 2 ] || die "--gnupghome needs a directory"; export GNUPGHOME="$2"; shift 2 ;;
        --suite) [ $# -ge 2 ] || die "--suite needs a name"; SUITE="$2"; shift 2 ;;
        --arch) [ $# -ge 2 ] || die "--arch needs a list, e.g. 'amd64 arm64 armhf'"; ARCHS="$2"; shift 2 ;;
        --origin) [ $# -ge 2 ] || die "--origin needs a name"; ORIGIN="$2"; shift 2 ;;
        --prune) PRUNE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option: $1 (try --help)" ;;
        *) DEBS+=("$1"); shift ;;
    esac
done

command -v gpg >/dev/null || die "gpg is missing (apt-get install gnupg)"

if [ -n "$NEW_KEY" ]; then
    [ -n "${GNUPGHOME:-}" ] || die "--new-key needs --gnupghome DIR (keep that directory safe: it holds the secret key)"
    mkdir -p "$GNUPGHOME" && chmod 0700 "$GNUPGHOME"
    # No passphrase so that CI can sign; protect GNUPGHOME instead (or add one with gpg --passwd).
    gpg --batch --quiet --passphrase '' --quick-generate-key "$NEW_KEY" ed25519 sign never
    fpr="$(gpg --batch --with-colons --list-secret-keys "$NEW_KEY" | awk -F: '$1 == "fpr" { print $10; exit }')"
    echo "apt-repo: created signing key $fpr in $GNUPGHOME"
    echo "$fpr"
    [ -n "$OUT" ] || exit 0
    KEY="${KEY:-$fpr}"
fi

[ -n "$OUT" ] || die "--out DIR is required"
[ -n "$KEY" ] || die "--key KEY is required (or --new-key NAME --gnupghome DIR)"
command -v apt-ftparchive >/dev/null || die "apt-ftparchive is missing (apt-get install apt-utils)"
gpg --batch --list-secret-keys "$KEY" >/dev/null 2>&1 || die "no secret key '$KEY' in ${GNUPGHOME:-~/.gnupg}"

pool="$OUT/pool/main/m/mqtt-agent"
mkdir -p "$pool"
for deb in "${DEBS[@]}"; do
    [ -f "$deb" ] || die "$deb: no such file"
    [ "$(dpkg-deb --field "$deb" Package)" = mqtt-agent ] || die "$deb is not an mqtt-agent package"
    [ "$(dpkg-deb --field "$deb" Architecture)" = all ] || die "$deb is not Architecture: all"
    install -m 0644 "$deb" "$pool/"
done
if [ "$PRUNE" -eq 1 ]; then
    newest="$(for f in "$pool"/*.deb; do dpkg-deb --field "$f" Version; done | sort -V | tail -n 1)"
    for f in "$pool"/*.deb; do
        [ "$(dpkg-deb --field "$f" Version)" = "$newest" ] || rm -f "$f"
    done
fi
ls "$pool"/*.deb >/dev/null 2>&1 || die "no packages: give .deb files (./scripts/build-deb.sh writes them into dist/)"

dists="$OUT/dists/$SUITE"
rm -rf "$dists"
for arch in $ARCHS; do
    dir="$dists/main/binary-$arch"
    mkdir -p "$dir"
    # Paths in Packages are relative to OUT (apt appends them to the sources line's URI).
    (cd "$OUT" && apt-ftparchive --arch "$arch" packages pool/main) >"$dir/Packages"
    gzip -9nk "$dir/Packages"
done
apt-ftparchive \
    -o "APT::FTPArchive::Release::Origin=$ORIGIN" \
    -o "APT::FTPArchive::Release::Label=$ORIGIN" \
    -o "APT::FTPArchive::Release::Suite=$SUITE" \
    -o "APT::FTPArchive::Release::Codename=$SUITE" \
    -o "APT::FTPArchive::Release::Architectures=$ARCHS" \
    -o "APT::FTPArchive::Release::Components=main" \
    -o "APT::FTPArchive::Release::Description=mqtt-agent for Debian 12 and 13 (all architectures)" \
    release "$dists" >"$OUT/Release.tmp"
mv "$OUT/Release.tmp" "$dists/Release"
gpg --batch --yes --quiet --local-user "$KEY" --digest-algo SHA512 --clearsign -o "$dists/InRelease" "$dists/Release"
gpg --batch --yes --quiet --local-user "$KEY" --digest-algo SHA512 --armor --detach-sign -o "$dists/Release.gpg" "$dists/Release"
gpg --batch --yes --export "$KEY" >"$OUT/mqtt-agent-archive-keyring.gpg"

echo "apt-repo: $OUT: $(cd "$pool" && printf '%s ' *.deb)signed by $KEY, suite $SUITE, architectures $ARCHS"
echo "apt-repo: on a gateway (with DIR served at URL):"
echo "  curl -fsSL URL/mqtt-agent-archive-keyring.gpg | sudo tee /usr/share/keyrings/mqtt-agent-archive-keyring.gpg >/dev/null"
echo "  echo 'deb [signed-by=/usr/share/keyrings/mqtt-agent-archive-keyring.gpg] URL $SUITE main' | sudo tee /etc/apt/sources.list.d/mqtt-agent.list"
echo "  sudo apt update && sudo apt install mqtt-agent"
