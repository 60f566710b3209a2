"""mosquitto: the host's 2.0.11 (tests/support/mosquitto.py) and Debian 13's 2.0.21 in the trixie root."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.brokers import Broker, trixie
from tests.support.mosquitto import BrokerOptions, Mosquitto, mosquitto_config


class HostMosquitto(Broker):
    """Debian 12's mosquitto 2.0.11, with the config of the existing fixture (tests/support/mosquitto.py)."""

    kind = "mosquitto-2.0.11"
    mqtt5 = True
    stop_timeout = Mosquitto.stop_timeout

    def __init__(self, workdir: Path, *, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, extra: list[str] | None = None, port: int | None = None) -> None:
        super().__init__(workdir, tls=cert is not None, port=port)
        self.options = BrokerOptions(cafile=ca, certfile=cert, keyfile=key, extra=extra or [])
        self.conf = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"

    def prepare(self) -> None:
        self.conf.write_text(mosquitto_config(self.options, self.host, self.port, self.dir))

    def command(self) -> tuple[list[str], dict[str, str]]:
        return ["mosquitto", "-c", str(self.conf)], {}


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
