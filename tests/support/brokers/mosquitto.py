"""mosquitto: the host's 2.0.11 (tests/support/mosquitto.py) and Debian 13's 2.0.21 in the trixie root."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.brokers import Broker, trixie
from tests.support.mosquitto import BrokerOptions, Mosquitto


class HostMosquitto(Broker):
    """Debian 12's mosquitto 2.0.11, through the existing fixture class."""

    kind = "mosquitto-2.0.11"
    mqtt5 = True

    def __init__(self, workdir: Path, *, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, extra: list[str] | None = None, port: int | None = None) -> None:
        super().__init__(workdir, tls=cert is not None, port=port)
        self.inner = Mosquitto(workdir, BrokerOptions(cafile=ca, certfile=cert, keyfile=key, extra=extra or []),
                               port=self.port)
        self.log_path = self.inner.log_path

    def start(self) -> Broker:
        self.inner.start()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.inner.stop()

    def kill(self) -> None:
        self.inner.kill()


class TrixieMosquitto(Broker):
    """Debian 13's mosquitto 2.0.21, run with chroot in the cached trixie root; its workdir is /t inside."""

    kind = "mosquitto-2.0.21"
    mqtt5 = True

    def __init__(self, workdir: Path, *, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, extra: list[str] | None = None, port: int | None = None) -> None:
        super().__init__(workdir, tls=cert is not None, port=port)
        self.root = trixie.ensure_root()
        self.extra = extra or []
        if cert is not None:
            assert ca and key
            for src, name in ((ca, "ca.pem"), (cert, "broker.pem"), (key, "broker.key")):
                shutil.copy(src, self.dir / name)

    def prepare(self) -> None:
        lines = ["user root", "per_listener_settings false", "allow_anonymous true", "persistence true",
                 "persistence_location /t/", "log_dest stderr", "log_type all", "connection_messages true",
                 "log_timestamp_format %H:%M:%S", "max_queued_messages 10000", "set_tcp_nodelay true",
                 f"listener {self.port} {self.host}"]
        if self.tls:
            lines += ["cafile /t/ca.pem", "certfile /t/broker.pem", "keyfile /t/broker.key",
                      "require_certificate true"]
        (self.dir / "mosquitto.conf").write_text("\n".join(lines + self.extra) + "\n")

    def command(self) -> tuple[list[str], dict[str, str]]:
        return trixie.chroot_command(["/usr/sbin/mosquitto", "-c", "/t/mosquitto.conf"], {self.dir: "/t"},
                                     root=self.root), {}
