"""Every broker kind of the interop suite by name: whether it can run here, and how to make one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.brokers import Broker, aedes, rabbitmq, trixie
from tests.support.brokers.mosquitto import HostMosquitto, TrixieMosquitto

KINDS = ("mosquitto-2.0.11", "mosquitto-2.0.21", "rabbitmq-3.10", "rabbitmq-4.0", "aedes-1.2")


def _mosquitto_host() -> str | None:
    import shutil

    return None if shutil.which("mosquitto") else "mosquitto is not installed (apt-get install mosquitto)"


UNAVAILABLE: dict[str, Callable[[], str | None]] = {
    "mosquitto-2.0.11": _mosquitto_host,
    "mosquitto-2.0.21": trixie.unavailable,
    "rabbitmq-3.10": rabbitmq.host_unavailable,
    "rabbitmq-4.0": trixie.unavailable,
    "aedes-1.2": aedes.unavailable,
}


def make(kind: str, workdir: Path, *, ca: Path, cert: Path, key: Path, **opts: Any) -> Broker:
    """An unstarted broker of this kind with a mutual-TLS listener made from these files."""
    tls = {"ca": ca, "cert": cert, "key": key}
    if kind == "mosquitto-2.0.11":
        return HostMosquitto(workdir, **tls, **opts)
    if kind == "mosquitto-2.0.21":
        return TrixieMosquitto(workdir, **tls, **opts)
    if kind == "rabbitmq-3.10":
        return rabbitmq.RabbitMQ(workdir, **tls, **opts)
    if kind == "rabbitmq-4.0":
        return rabbitmq.RabbitMQ(workdir, in_trixie=True, **tls, **opts)
    if kind == "aedes-1.2":
        return aedes.Aedes(workdir, **tls, **opts)
    raise ValueError(f"unknown broker kind {kind!r}; known: {', '.join(KINDS)}")
