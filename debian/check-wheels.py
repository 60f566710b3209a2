#!/usr/bin/python3
"""Check that the current directory holds exactly the wheels debian/vendor.txt pins, with their hashes.

Run by debian/rules (no network at build time): a wheel that is missing, extra or altered stops the build."""

import hashlib
import re
import sys
from pathlib import Path


def main(pins_file: str) -> int:
    want: dict[str, str] = {}
    for line in Path(pins_file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if line and not m:
            print(f"check-wheels: cannot read {pins_file}: {line!r}", file=sys.stderr)
            return 1
        if m:
            name = re.sub(r"[-_.]+", "_", m.group(1)).lower()
            want[f"{name}-{m.group(2)}"] = m.group(3)
    have = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(".").glob("*.whl")}
    ok = True
    for prefix, digest in want.items():
        found = [n for n in have if n.lower().startswith(prefix.lower() + "-")]
        if len(found) != 1:
            print(f"check-wheels: need one wheel {prefix}-*.whl, found {found} (run ./scripts/build-deb.sh)",
                  file=sys.stderr)
            ok = False
        elif have.pop(found[0]) != digest:
            print(f"check-wheels: {found[0]}: sha256 differs from {pins_file}", file=sys.stderr)
            ok = False
    for extra in have:
        print(f"check-wheels: {extra} is not pinned in {pins_file}", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
