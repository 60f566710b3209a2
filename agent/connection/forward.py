"""[forward.local]: forward topics of the gateway's own MQTT broker upstream, through the agent's queue.

A second paho client connects to a local broker (the operator's mosquitto, plain TCP on loopback),
subscribes to the configured topic filters at QoS 1 with a persistent session (so the local broker
keeps what arrives while the agent restarts), and hands each message to a worker thread that puts it
in the same durable queue as the local API's (agent/state/outbox.py). The local PUBACK is sent only
after the message is on the agent's disk: a crash in between makes the local broker deliver it again.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import ForwardLocalConfig, ForwardRule, read_secret
from agent.logtext import untrusted
from agent.state.outbox import Outbox, QueueFull
from agent.state.publish import ApiError, PublishContext, _Options, build_message

log = logging.getLogger(__name__)

QUEUE_LIMIT = 1000  # received, not yet stored: bounds memory while the disk is slow
LOG_INTERVAL = 60.0


def _matches(topic_filter: str, topic: str) -> bool:
    f, t = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def rule_for(rules: tuple[ForwardRule, ...], topic: str) -> ForwardRule | None:
    for rule in rules:
        if _matches(rule.topic_filter, topic):
            return rule
    return None


class LocalForwarder:
    def __init__(self, cfg: ForwardLocalConfig, outbox: Outbox, ctx: PublishContext) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.ctx = ctx
        self.forwarded = 0
        self.refused = 0
        self._refused_logged_at: float | None = None
        self._work: queue.Queue[tuple[Any, ForwardRule] | None] = queue.Queue(QUEUE_LIMIT)
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, clean_session=False)
        self._client.manual_ack_set(True)
        if cfg.username:
            self._client.username_pw_set(cfg.username,
                                         read_secret(cfg.password_file) if cfg.password_file else None)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._worker = threading.Thread(target=self._run, name="forward-local", daemon=True)
        self._connected = False

    def start(self) -> None:
        assert self.cfg.host is not None
        self._worker.start()
        self._client.connect_async(self.cfg.host.host, self.cfg.host.port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._work.put(None)
        self._worker.join(5)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.error("forward.local: %s refused the connection: %s", self.cfg.host, reason)
            return
        self._connected = True
        log.info("forward.local: connected to %s; forwarding %s", self.cfg.host,
                 ", ".join(f"{r.topic_filter} -> {r.kind}" for r in self.cfg.rules))
        client.subscribe([(r.topic_filter, 1) for r in self.cfg.rules])

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected:
            log.warning("forward.local: lost the local broker %s (%s); reconnecting", self.cfg.host, reason)
        self._connected = False

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        rule = rule_for(self.cfg.rules, msg.topic)
        if rule is None or msg.retain:
            client.ack(msg.mid, msg.qos)
            return
        # Hand off (the network thread never waits for the disk); a full hand-off queue waits here,
        # which stops reading from the local broker: backpressure, not loss.
        self._work.put((msg, rule))

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            msg, rule = item
            try:
                qos = 1 if rule.kind == "event" else self.cfg.qos
                out = build_message(rule.kind, bytes(msg.payload), _Options(None, qos, None), None, self.ctx,
                                    time.time())
                self.outbox.admit([out])
                self.forwarded += 1
            except (ApiError, QueueFull, OSError, sqlite3.Error, RuntimeError) as exc:
                self.refused += 1
                now = time.monotonic()
                if self._refused_logged_at is None or now - self._refused_logged_at >= LOG_INTERVAL:
                    self._refused_logged_at = now
                    log.warning("forward.local: a message on %s was not forwarded (%s); %d so far",
                                untrusted(msg.topic, 200), exc, self.refused)
            except Exception:
                log.exception("forward.local: internal error forwarding a message on %s", untrusted(msg.topic, 200))
            if msg.qos:
                self._client.ack(msg.mid, msg.qos)
