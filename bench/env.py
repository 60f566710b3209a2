"""The benchmark's world: a throwaway PKI, mosquitto brokers, agent configs and client contexts.

Reuses the test suite's support code (tests/support): the same CA, the same mosquitto setup
(`set_tcp_nodelay true`, mutual TLS on a free loopback port), the same TOML writer.
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path
from typing import Any

from bench.procs import Proc
from tests.support.agentproc import write_toml
from tests.support.mosquitto import BrokerOptions, Mosquitto, free_port
from tests.support.pki import TestCA


class BenchEnv:
    """Everything lives in `workdir`; brokers are stopped by close()."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = TestCA(workdir / "pki")
        self.broker_cert = self.ca.issue("localhost", sans=["localhost", "127.0.0.1"], server=True, filename="broker")
        self.device = self.ca.issue("bench-device", filename="device")
        self.app = self.ca.issue("bench-app", filename="app")
        self.brokers: list[Mosquitto] = []

    def broker(self, name: str, extra: list[str] | None = None) -> Mosquitto:
        opts = BrokerOptions(cafile=self.ca.cert_path, certfile=self.broker_cert.cert, keyfile=self.broker_cert.key,
                             persistence=False, extra=list(extra or []))
        broker = Mosquitto(self.dir / name, opts)
        self.brokers.append(broker)
        return broker.start()

    def app_context(self) -> ssl.SSLContext:
        """TLS context of the measuring side (the "application"), with its own client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        ctx.load_cert_chain(str(self.app.cert), str(self.app.key))
        return ctx

    def agent_config(self, name: str, broker: Mosquitto, *, metrics: bool = True,
                     overrides: dict[str, dict[str, Any]] | None = None) -> Path:
        """An agent config as an operator would write it: defaults except broker, identity and paths.

        Clean sessions, so that a responder that is not running does not collect the requests meant
        for the other one (agent and baseline take turns on the same topics).
        """
        sections: dict[str, dict[str, Any]] = {
            "agent": {"device_id": name, "state_dir": str(self.dir / f"state-{name}"), "shutdown_grace": 5.0},
            "mqtt": {"hosts": [broker.address], "client_id": name, "clean_session": True},
            "tls": {"ca_file": str(self.ca.cert_path), "cert_file": str(self.device.cert),
                    "key_file": str(self.device.key)},
            "metrics": {"listen": f"127.0.0.1:{free_port()}" if metrics else ""},
            "commands.true": {"argv": ["/bin/true"], "timeout": 10.0},
        }
        for section, values in (overrides or {}).items():
            sections.setdefault(section, {}).update(values)
        return write_toml(self.dir / f"{name}.toml", sections)

    def agent(self, name: str, broker: Mosquitto, *, metrics: bool = True, notify: bool = True,
              overrides: dict[str, dict[str, Any]] | None = None) -> Proc:
        return Proc.agent(name, self.agent_config(name, broker, metrics=metrics, overrides=overrides), self.dir,
                          notify=notify)

    def baseline(self, name: str, broker: Mosquitto, *, bare: bool = False) -> Proc:
        argv = [sys.executable, "-m", "bench.baseline", "--host", broker.host, "--port", str(broker.port),
                "--ca", str(self.ca.cert_path), "--cert", str(self.device.cert), "--key", str(self.device.key),
                "--client-id", name]
        if bare:
            argv.append("--bare")
        return Proc(name, argv, self.dir, notify=True)

    def close(self) -> None:
        for broker in self.brokers:
            broker.stop()
