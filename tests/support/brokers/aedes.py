"""aedes (npm) on Node, installed once into /var/cache/mqtt-agent-tests/aedes-<version>."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from tests.support.brokers import Broker
from tests.support.brokers.trixie import CACHE

AEDES_VERSION = "1.2.0"
INSTALL = CACHE / f"aedes-{AEDES_VERSION}"
SERVER = Path(__file__).with_name("aedes_server.mjs")


def unavailable() -> str | None:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install nodejs npm)"
    return None


def ensure_aedes() -> Path:
    """aedes.js of the cached install, `npm install`ed first if missing (seconds, once per machine)."""
    aedes_js = INSTALL / "node_modules/aedes/aedes.js"
    if (INSTALL / ".complete").exists():
        return aedes_js
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".aedes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (INSTALL / ".complete").exists():
            return aedes_js
        tmp = CACHE / f".aedes-{AEDES_VERSION}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                        f"aedes@{AEDES_VERSION}"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(INSTALL, ignore_errors=True)
        tmp.rename(INSTALL)
        return aedes_js


class Aedes(Broker):
    kind = "aedes-1.2"
    mqtt5 = False

    def __init__(self, workdir: Path, *, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, keepalive_limit: int | None = None, port: int | None = None) -> None:
        super().__init__(workdir, tls=cert is not None, port=port)
        self.tls_files = (ca, cert, key)
        self.keepalive_limit = keepalive_limit
        self.aedes_js = ensure_aedes()

    def command(self) -> tuple[list[str], dict[str, str]]:
        argv = ["node", str(SERVER), str(self.aedes_js), str(self.port)]
        if self.tls:
            argv += ["--tls", *(str(p) for p in self.tls_files)]
        if self.keepalive_limit is not None:
            argv += ["--keepalive-limit", str(self.keepalive_limit)]
        return argv, {}


if __name__ == "__main__":
    print(ensure_aedes())
