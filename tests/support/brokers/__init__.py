"""Real MQTT brokers of several kinds on free loopback ports, for the interop suite and issue 17's tests.

Every kind offers the same small interface (`Broker`): start, stop (clean), kill (SIGKILL), restart on
the same port, `address` for `mqtt.hosts`, and a few facts the scenarios branch on (`mqtt5`, `tls`).
Each process runs in its own session so a stop reaches its children (RabbitMQ's erl, epmd, ...).

    kind                  where it comes from                         TLS
    mosquitto-2.0.11      the host's Debian 12 package                mutual TLS
    mosquitto-2.0.21      Debian 13 package in a cached trixie root   mutual TLS
    rabbitmq-3.10         the host's Debian 12 package, MQTT plugin   mutual TLS
    rabbitmq-4.0          Debian 13 package in the trixie root        mutual TLS
    aedes-1.2             npm, cached, tests/support/brokers/aedes_server.mjs   mutual TLS
"""

from __future__ import annotations

from pathlib import Path

from tests.support.brokerproc import BrokerProcess, free_port, wait_port

__all__ = ["Broker", "free_port", "wait_port"]


class Broker(BrokerProcess):
    """One broker process (or process group) on 127.0.0.1, with the facts the interop scenarios branch on."""

    kind = "broker"
    mqtt5 = False  # speaks MQTT 5

    def __init__(self, workdir: Path, *, tls: bool = True, port: int | None = None) -> None:
        super().__init__(workdir, port=port)
        self.tls = tls

    def start(self) -> Broker:
        super().start()
        return self

    def __enter__(self) -> Broker:
        return self.start()
