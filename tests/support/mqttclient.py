"""A plain MQTT client for tests: watch topics or publish raw requests, with the agent's TLS settings."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.connection.adapter import new_client
from agent.tls.context import build_context


class TestClient:
    """Connects with the certificates of an agent config (own client id) and records messages."""

    __test__ = False

    def __init__(self, config: Path, *, client_id: str | None = None, clean: bool = True,
                 subscribe: str | None = None, protocol: str | None = None) -> None:
        cfg = load_config(config)
        mqtt_cfg = replace(cfg.mqtt, clean_session=clean, protocol=protocol or cfg.mqtt.protocol)
        self.client = new_client(mqtt_cfg, client_id or f"test-{secrets.token_hex(4)}",
                                 build_context(cfg.tls) if cfg.tls.enabled else None)
        self.messages: list[Any] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self._topic = subscribe
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        host = cfg.mqtt.hosts[0]
        self.client.connect(host.host, host.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10), "test client could not connect"
        if subscribe:
            assert self._subscribed.wait(10), "test client could not subscribe"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._topic:
            client.subscribe(self._topic, qos=1)
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes = b"", qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(10)

    def wait(self, n: int, timeout: float = 10.0) -> list[Any]:
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {n} messages, got {[m.topic for m in self.messages]}")
                self._cond.wait(left)
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
