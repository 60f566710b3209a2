"""Composition root: builds every part from the config and wires them together, nothing else."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from agent import __version__
from agent.config import Config
from agent.dispatch import Dispatcher
from agent.errors import ConfigError
from agent.handlers import HandlerRegistry
from agent.handlers.registry import build_registry
from agent.outbox import Outbox
from agent.resilience import ConnectionMonitor
from agent.session import Session
from agent.store import CommandStore, ensure_private_dir
from agent.tls import build_context

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 60.0


class Agent:
    """The running agent. `run()` blocks until `stop_event` is set, then shuts down cleanly."""

    def __init__(
        self,
        cfg: Config,
        *,
        plugins: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self._plugins = plugins
        self._clock = clock
        self._started = clock()
        self.store: CommandStore | None = None
        self.registry: HandlerRegistry | None = None
        self.session: Session | None = None
        self.dispatcher: Dispatcher | None = None
        self.outbox: Outbox | None = None
        self.monitor: ConnectionMonitor | None = None

    def build(self) -> None:
        cfg = self.cfg
        ssl_context = build_context(cfg.tls) if cfg.tls.enabled else None
        try:
            ensure_private_dir(cfg.agent.state_dir)
            self.store = CommandStore(cfg.agent.state_dir / "commands.sqlite3")
            self.outbox = Outbox(cfg.agent.state_dir / "outbox.sqlite3", cfg.limits.max_outbox_messages,
                                 window=cfg.mqtt.max_inflight)
        except OSError as exc:
            raise ConfigError([f"agent.state_dir: cannot use {cfg.agent.state_dir}: {exc.strerror or exc}"]) from exc
        self.registry = build_registry(cfg.commands, self.status, plugins=self._plugins)
        dispatcher_box: list[Dispatcher] = []
        self.monitor = ConnectionMonitor(cfg.mqtt, cfg.reconnect, cfg.keepalive_tuning,
                                         state_dir=cfg.agent.state_dir)
        self.session = Session(
            cfg.mqtt,
            cfg.tls,
            cfg.reconnect,
            ssl_context=ssl_context,
            on_message=lambda msg: dispatcher_box[0].accept(msg),
            monitor=self.monitor,
            outbox=self.outbox,
        )
        self.dispatcher = Dispatcher(
            registry=self.registry,
            limits=cfg.limits,
            publisher=self.session,
            store=self.store,
            device_id=cfg.agent.device_id,
        )
        dispatcher_box.append(self.dispatcher)

    def status(self) -> dict[str, Any]:
        """Live facts for the `info` command."""
        out: dict[str, Any] = {"uptime_s": round(self._clock() - self._started, 3)}
        if self.session:
            st = self.session.state()
            out.update(
                connected=st.connected,
                broker=str(st.host) if st.host else None,
                protocol=st.protocol,
                keepalive_s=st.keepalive,
                client_id=self.session.client_id,
                connects=st.connects,
                reconnects=max(st.connects - 1, 0),
                connect_attempts=st.attempts,
                last_disconnect=st.last_end.kind if st.last_end else None,
                outbox=self.session.unacknowledged(),
            )
        if self.monitor:
            out["duplicate_client_id_suspected"] = self.monitor.classifier.suspecting_takeover
        if self.dispatcher:
            stats = self.dispatcher.stats
            out["commands"] = {
                "received": stats.received,
                "executed": stats.executed,
                "duplicates": stats.duplicates,
                "in_flight": self.dispatcher.in_flight,
                "by_status": {str(k): v for k, v in sorted(stats.by_status.items())},
                "rejected": dict(stats.rejected),
            }
        if self.registry is not None:
            out["available_commands"] = sorted(self.registry)
        return out

    def run(self, stop_event: threading.Event) -> int:
        self.build()
        assert self.session and self.dispatcher and self.store and self.registry is not None
        self.dispatcher.start()
        self.session.start()
        log.info("mqtt-agent %s started: device %s, brokers %s, subscription %s, commands: %s", __version__,
                 self.cfg.agent.device_id, ", ".join(str(h) for h in self.cfg.mqtt.hosts),
                 self.cfg.mqtt.command_topic, ", ".join(sorted(self.registry)))
        if self.cfg.tls.enabled and self.cfg.tls.insecure:
            log.warning("tls.insecure = true: the broker's host name is not verified (the chain still is); "
                        "prefer tls.server_name")
        if not self.cfg.tls.enabled:
            log.warning("tls.enabled = false: commands and responses travel unencrypted")
        while not stop_event.wait(HOUSEKEEPING_INTERVAL):
            self.housekeeping()
        self.shutdown()
        return 0

    def housekeeping(self) -> None:
        assert self.store is not None
        try:
            pruned = self.store.prune(self.cfg.limits.dedupe_retention)
            if pruned:
                log.debug("forgot %d finished commands older than limits.dedupe_retention", pruned)
        except Exception:
            log.exception("journal housekeeping failed")

    def shutdown(self) -> None:
        assert self.session and self.dispatcher and self.store
        grace = self.cfg.agent.shutdown_grace
        end = self._clock() + grace
        log.info("stopping: no new commands are started; waiting up to %g s for running ones", grace)
        self.dispatcher.stop_accepting()
        if not self.dispatcher.drain(grace):
            log.warning("%d command(s) still running after the %g s grace period; they are answered 500 at the "
                        "next start", self.dispatcher.in_flight, grace)
        if not self.session.flush(max(end - self._clock(), 1.0)):
            log.warning("%d response(s) not yet acknowledged by the broker at shutdown; the outbox keeps them "
                        "for the next start", self.session.unacknowledged())
        self.session.stop()
        self.dispatcher.close()
        if self.outbox is not None:
            self.outbox.close()
        self.store.close()
        log.info("stopped")
