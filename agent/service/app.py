"""Composition root: builds every part from the config and wires them together, nothing else."""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from agent import __version__
from agent.commands.dispatch import Dispatcher
from agent.commands.handlers import HandlerRegistry
from agent.commands.handlers.builtin import PingHandler
from agent.commands.handlers.registry import build_registry
from agent.commands.processes import REAPER, become_subreaper
from agent.config import Config, TlsConfig, credentials_in_use, load_config
from agent.connection.monitor import ConnectionMonitor
from agent.connection.session import Ack, Session
from agent.errors import AgentError, ConfigError, TLSSetupError
from agent.protocol import Inbound
from agent.renewal import has_renewed_pair
from agent.service.api import PublishApi
from agent.service.health import HealthCheck, LoopPhases, Verdict
from agent.service.hono_errors import HonoErrors
from agent.service.logs import set_level
from agent.service.metrics import AgentMetrics, MetricsServer, PublishMetrics
from agent.service.notify import Notifier, ServiceWatchdog, StatusLine, sender_from_environment, watchdog_interval
from agent.service.reload import ReloadOutcome, credentials_hint, fingerprint, plan_reload, secret_files
from agent.service.reload_verdict import answer_request
from agent.service.server import ApiServer
from agent.state.outbox import Outbox, PublishLimits
from agent.state.publish import PublishContext
from agent.state.store import StateStore, ensure_private_dir
from agent.tls.context import build_context
from agent.topics import error_filter
from agent.wakeup import WakeUp

if TYPE_CHECKING:
    from agent.renewal.rollover import Renewer

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 60.0
# How long READY=1 waits for the network thread to begin its first attempt (it never waits for the broker).
FIRST_ATTEMPT_WAIT = 5.0
# Time after agent.shutdown_grace to deliver responses and disconnect (systemd's stop timeout follows).
STOP_MARGIN = 10.0


class Agent:
    """The running agent. `run()` blocks until `stop_event` is set, then shuts down cleanly."""

    def __init__(
        self,
        cfg: Config,
        *,
        plugins: Any = None,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        log_level_override: str | None = None,
    ) -> None:
        self.cfg = cfg
        self._plugins = plugins
        self._clock = clock
        self._started = clock()
        self._log_level_override = log_level_override
        self.store: StateStore | None = None
        self.registry: HandlerRegistry | None = None
        self.session: Session | None = None
        self.dispatcher: Dispatcher | None = None
        self.notifier = notifier if notifier is not None else Notifier(sender_from_environment())
        self.metrics: AgentMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.status_line: StatusLine | None = None
        self.phases: LoopPhases | None = None
        self.watchdog: ServiceWatchdog | None = None
        self._ping = PingHandler(clock)
        self._files = fingerprint(secret_files(cfg))
        self._health_check: HealthCheck | None = None
        self._wake = WakeUp()
        self._reload_requested = False  # set by SIGHUP's handler: a plain flag, no lock (see agent/wakeup.py)
        self._signals: collections.deque[tuple[str, bool]] = collections.deque()  # appended by signal handlers
        self.outbox: Outbox | None = None
        self.monitor: ConnectionMonitor | None = None
        self.api: PublishApi | None = None
        self.api_server: ApiServer | None = None
        self.forwarder: Any = None
        self.hono_errors = HonoErrors(clock=clock)
        self.subreaper = False
        self.renewer: Renewer | None = None

    def build(self) -> None:
        cfg = self.cfg
        try:
            ensure_private_dir(cfg.agent.state_dir)
        except OSError as exc:
            raise ConfigError([f"agent.state_dir: cannot use {cfg.agent.state_dir}: {exc.strerror or exc}"]) from exc
        # The newest valid pair: a renewed one in agent.state_dir/tls if present and good, else the configured one.
        if cfg.tls.enabled and cfg.tls.cert_file and (cfg.renewal.enabled or has_renewed_pair(cfg.agent.state_dir)):
            from agent.renewal.rollover import Renewer
            from agent.renewal.store import PairStore

            self.renewer = Renewer(cfg, PairStore(cfg.agent.state_dir / "tls"), switch=self._switch_pair)
        tls_in_use = self.renewer.tls_in_use() if self.renewer else cfg.tls
        ssl_context = build_context(tls_in_use) if cfg.tls.enabled else None
        try:
            self.store = StateStore(cfg.agent.state_dir, max_bytes=cfg.limits.max_state_bytes)
            pub = cfg.publish
            self.outbox = Outbox(self.store, cfg.limits.max_outbox_messages, window=cfg.mqtt.max_inflight,
                                 limits=PublishLimits(pub.max_messages, pub.max_bytes, pub.max_age))
        except (OSError, sqlite3.Error) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError([f"agent.state_dir: cannot use {cfg.agent.state_dir}: {reason}"]) from exc
        self.registry = build_registry(cfg.commands, self.status, plugins=self._plugins, ping=self._ping,
                                       builtins=self._renewal_commands())
        protocol = "5" if cfg.mqtt.is_v5 else "3.1.1"
        tuning = cfg.keepalive_tuning
        self.metrics = AgentMetrics(protocol=protocol, configured_keepalive=cfg.mqtt.keepalive, tls=tls_in_use,
                                    keepalive_floor=tuning.min if tuning.enabled else None,
                                    commands=self.registry,
                                    in_flight=lambda: self.dispatcher.in_flight if self.dispatcher else 0,
                                    state=self.store, shared_group=cfg.mqtt.shared_group,
                                    publish=PublishMetrics(self.outbox, hono_errors=lambda: self.hono_errors.count))
        interval = watchdog_interval()
        self.watchdog = ServiceWatchdog(self.notifier, self._connection_status, self._health, interval=interval)
        self.status_line = StatusLine(protocol, cfg.mqtt.keepalive, on_change=self.watchdog.poke)
        self.phases = LoopPhases(cfg.mqtt.connect_timeout)
        self.monitor = ConnectionMonitor(cfg.mqtt, cfg.reconnect, cfg.keepalive_tuning,
                                         state_dir=cfg.agent.state_dir)
        self.dispatcher = Dispatcher(
            registry=self.registry,
            limits=cfg.limits,
            responder=self.outbox,
            store=self.store,
            device_id=cfg.agent.device_id,
            observer=self.metrics.commands,
        )
        self.session = Session(
            cfg.mqtt,
            cfg.tls,
            monitor=self.monitor,
            ssl_context=ssl_context,
            on_message=self._on_message,
            listeners=[self.metrics.connection, self.status_line, self.phases,
                       *([self.renewer] if self.renewer else [])],
            outbox=self.outbox,
            topics=[cfg.mqtt.subscription, *([error_filter(cfg.mqtt.command_topic)] if cfg.publish.hono_errors
                                              else [])],
            on_ack_delay=self.metrics.ack_delay.observe,
        )
        self.store.set_callback_scope(self.session.writes_together)  # a commit's PUBACKs and responses: one write
        self.api = PublishApi(self.outbox, PublishContext(
            command_topic=cfg.mqtt.command_topic, v5=cfg.mqtt.is_v5,
            max_message_bytes=lambda: (self.session.max_message_bytes() if self.session is not None
                                       else self.cfg.mqtt.max_message_bytes),
            max_batch=cfg.publish.max_batch, wall=time.time), self.api_status)
        if cfg.api.socket is not None:
            self.api_server = ApiServer(cfg.api, self.api, commit=self.api.commit)
        if cfg.forward_local.enabled:
            from agent.connection.forward import LocalForwarder

            self.forwarder = LocalForwarder(cfg.forward_local, self.outbox, self.api.ctx)
        self._health_check = HealthCheck(self.session, self.dispatcher, self.phases, lambda: self.registry or {},
                                         stall_limit=ServiceWatchdog.stall_limit(interval))

    def _on_message(self, msg: Inbound, ack: Ack) -> None:
        """Commands go to the dispatcher; Hono's error messages (publish.hono_errors) to their counter."""
        if self.cfg.publish.hono_errors and self.hono_errors.wants(msg):
            self.hono_errors.accept(msg, ack)
            return
        self.dispatcher.accept(msg, ack)  # type: ignore[union-attr]

    def api_status(self) -> dict[str, Any]:
        """GET /v1/status: the link, the queue, the broker and the device."""
        out: dict[str, Any] = {"device_id": self.cfg.agent.device_id, "connected": False, "broker": None}
        if self.session is not None:
            st = self.session.state()
            out.update(connected=st.connected, broker=str(st.host) if st.host else None, protocol=st.protocol)
        if self.outbox is not None:
            count, size, oldest = self.outbox.publish_stats()
            out["queue"] = {"messages": count, "bytes": size,
                            "oldest_age_s": round(max(0.0, time.time() - oldest), 3) if oldest else 0.0,
                            "max_messages": self.cfg.publish.max_messages, "max_bytes": self.cfg.publish.max_bytes,
                            "accepted": dict(self.outbox.accepted), "sent": dict(self.outbox.sent),
                            "dropped": {f"{k}/{r}": n for (k, r), n in sorted(self.outbox.dropped.items())}}
        return out

    def _start_api(self) -> None:
        if self.api_server is None:
            return
        try:
            self.api_server.start()
        except OSError as exc:
            # Commands matter more than the local API: keep running; apps get "unreachable" (exit 2).
            log.error("api.socket: the local API is disabled until the next start: %s", exc.strerror or exc)
            self.api_server = None
            return
        if self.api_server.path is not None:
            log.info("local API on %s (group %s)", self.api_server.path, self.cfg.api.group)
        else:
            log.info("local API on the socket systemd passed (mqtt-agent.socket)")
    def _renewal_commands(self) -> dict[str, Any]:
        """cert.csr and cert.install, when the backend signs through the command channel."""
        if self.renewer is None or not self.cfg.renewal.enabled or self.cfg.renewal.signer != "command":
            return {}
        from agent.renewal.handlers import CertCsrHandler, CertInstallHandler

        return {"cert.csr": CertCsrHandler(self.renewer), "cert.install": CertInstallHandler(self.renewer)}

    def _switch_pair(self, tls: TlsConfig, reason: str) -> None:
        """The renewer chose another certificate pair: one clean reconnect with it (renewal thread or handler)."""
        if self.session is None or self.metrics is None:
            return
        try:
            ctx = build_context(tls)
        except AgentError as exc:
            log.error("certificate pair %s cannot be loaded, the session keeps its current one: %s", tls.cert_file, exc)
            return
        self.metrics.certificates.tls = tls
        self.session.reconfigure(self.cfg.mqtt, tls, ctx, reason)

    def _connection_status(self) -> str:
        return self.status_line.text if self.status_line else "starting"

    def _health(self) -> Verdict:
        if self._health_check is None:
            return Verdict(True)
        return self._health_check()

    def request_reload(self) -> None:
        """Re-read the configuration soon (SIGHUP). Safe to call from a signal handler."""
        self._reload_requested = True
        self._wake.set()

    def wake(self) -> None:
        """Make the main loop look at its stop event now (called from the signal handler)."""
        self._wake.set()

    def note_signal(self, name: str, *, again: bool) -> None:
        """A signal arrived (from its handler: no lock, no logging there); logged by the main thread."""
        self._signals.append((name, again))

    def _log_signals(self) -> None:
        while self._signals:
            name, again = self._signals.popleft()
            if again:
                log.warning("received %s again while stopping; still waiting for running commands", name)
            else:
                log.info("received %s", name)

    def status(self) -> dict[str, Any]:
        """Live facts for the `info` command."""
        out: dict[str, Any] = {"uptime_s": round(self._clock() - self._started, 3)}
        if self.watchdog is not None:
            out["status"] = self.watchdog.current_status()
        if self.session:
            st = self.session.state()
            out.update(
                connected=st.connected,
                broker=str(st.host) if st.host else None,
                protocol=st.protocol,
                keepalive_s=st.keepalive,
                keepalive_set_by_broker=st.keepalive_set_by_broker,
                max_message_bytes=st.max_message_bytes,
                client_id=self.session.client_id,
                connects=st.connects,
                reconnects=max(st.connects - 1, 0),
                connect_attempts=st.attempts,
                last_disconnect=st.last_end.kind if st.last_end else None,
                outbox=self.session.unacknowledged(),
            )
            if self.cfg.mqtt.shared_group:
                out["shared_group"] = self.cfg.mqtt.shared_group
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
        if self.renewer is not None:
            out["tls_certificate"] = self.renewer.describe()
        return out

    def _start_metrics(self) -> None:
        assert self.metrics is not None
        endpoint = self.cfg.metrics.endpoint
        if endpoint is None:
            return
        server = MetricsServer(endpoint, self.metrics.registry)
        try:
            server.start()
        except OSError as exc:
            # Remote management matters more than metrics: keep running; the absent target alerts.
            log.error("metrics are disabled until the next start: %s", exc.strerror or exc)
            return
        self.metrics_server = server
        log.info("metrics on http://%s/metrics", endpoint)

    def _credentials_in_use(self) -> dict[str, Path]:
        """{config key: path} of the secrets that come from systemd credentials."""
        return credentials_in_use(self.cfg, os.environ.get("CREDENTIALS_DIRECTORY"))

    def _log_credentials(self) -> None:
        for key, path in self._credentials_in_use().items():
            log.info("%s: using the systemd credential %s", key, path)

    def run(self, stop_event: threading.Event) -> int:
        self.build()
        assert self.session and self.dispatcher and self.store and self.registry is not None
        assert self.phases and self.watchdog
        self._log_credentials()
        # Whatever an exec command starts stays the agent's to kill and to reap (agent.commands.processes).
        self.subreaper = become_subreaper()
        REAPER.start()
        self._start_metrics()
        self.dispatcher.start()
        self.session.start()
        self._start_api()
        if self.forwarder is not None:
            self.forwarder.start()
        if self.renewer is not None:
            self.renewer.attach_metrics(self.metrics.renewal if self.metrics else None)
            pair = self.renewer.pair
            if pair is not None:
                log.info("TLS client certificate in use: %s pair %s (serial %x), valid until %s", pair.source,
                         pair.cert_file, pair.serial, f"{pair.not_after:%Y-%m-%d %H:%M} UTC")
            if self.renewer.enabled:
                self.renewer.start()
        # READY=1 means initialised, not connected: boot never waits for the network.
        self.phases.first_attempt.wait(FIRST_ATTEMPT_WAIT)
        self.notifier.ready(self._connection_status())
        self.watchdog.start()
        log.info("mqtt-agent %s started: device %s, brokers %s, subscription %s, commands: %s", __version__,
                 self.cfg.agent.device_id, ", ".join(str(h) for h in self.cfg.mqtt.hosts),
                 self.cfg.mqtt.subscription, ", ".join(sorted(self.registry)))
        if self.cfg.tls.enabled and self.cfg.tls.insecure:
            log.warning("tls.insecure = true: the broker's host name is not verified (the chain still is); "
                        "prefer tls.server_name")
        if not self.cfg.tls.enabled:
            log.warning("tls.enabled = false: commands and responses travel unencrypted")
        next_housekeeping = self._clock() + HOUSEKEEPING_INTERVAL
        while not stop_event.is_set():
            # Signal handlers set _wake; the timeout bounds the delay when only stop_event is set.
            self._wake.wait(min(max(next_housekeeping - self._clock(), 0.0), 1.0))
            self._log_signals()
            if stop_event.is_set():
                break
            if self._reload_requested:
                self._reload_requested = False
                answer_request(self.cfg.agent.state_dir, self.reload)
            if self._clock() >= next_housekeeping:
                self.housekeeping()
                next_housekeeping = self._clock() + HOUSEKEEPING_INTERVAL
        self.shutdown()
        return 0

    def reload(self) -> ReloadOutcome:
        """Re-read and validate the configuration file and apply what can change while running.

        An invalid file changes nothing. New commands apply without a reconnect; new hosts, credentials
        or TLS files make one clean reconnect; what needs a restart is logged as such."""
        assert self.watchdog is not None
        source = self.cfg.source
        self.notifier.reloading()
        self.watchdog.set_phase("reloading the configuration")
        try:
            outcome = self._reload(source)
        except Exception as exc:  # a reload must never take the running agent down
            log.exception("configuration reload failed; the running configuration stays in effect")
            outcome = ReloadOutcome(False, f"internal error: {exc}")
        finally:
            self.watchdog.set_phase("")
            self.notifier.ready(self.watchdog.current_status())
        return outcome

    def _reload(self, source: Path | None) -> ReloadOutcome:
        assert self.session and self.dispatcher and self.metrics
        if source is None:
            log.error("configuration reload: the agent was not started from a file; nothing to re-read")
            return ReloadOutcome(False, "no configuration file")
        log.info("reloading the configuration from %s", source)
        try:
            new = load_config(source)
            tls_in_use = self.renewer.tls_for(new) if self.renewer else new.tls
            ssl_context = build_context(tls_in_use) if new.tls.enabled else None
        except AgentError as exc:
            problems = list(getattr(exc, "problems", []) or [str(exc)])
            hint = credentials_hint(problems, isinstance(exc, TLSSetupError), self._credentials_in_use())
            log.error("configuration reload rejected, the running configuration stays in effect: %s%s", exc, hint)
            return ReloadOutcome(False, f"rejected, the running configuration stays in effect: {exc}{hint}",
                                 problems=problems)
        files = fingerprint(secret_files(new))
        plan = plan_reload(self.cfg, new, self._files, files)
        eff = plan.effective
        done: list[str] = []
        if self.renewer is not None:
            self.renewer.reconfigure(eff)
        if plan.commands_differ:
            registry = build_registry(eff.commands, self.status, plugins=self._plugins, ping=self._ping,
                                      builtins=self._renewal_commands())
            self.dispatcher.set_registry(registry)
            self.registry = registry
            self.metrics.commands.set_commands(registry)
            done.append(f"commands {plan.commands_summary()} (no reconnect)")
        if plan.live:
            self.dispatcher.limits = eff.limits
            set_level(self._log_level_override or eff.agent.log_level)
            done.append(f"applied {', '.join(plan.live)}")
        if plan.reconnect:
            reason = "; ".join(plan.reconnect)
            self.metrics.certificates.tls = tls_in_use
            self.session.reconfigure(eff.mqtt, tls_in_use, ssl_context, f"configuration reloaded: {reason}")
            done.append(f"reconnecting: {reason}")
        if plan.restart_needed:
            log.warning("configuration reload: %s changed but take(s) effect only after a restart "
                        "(systemctl restart mqtt-agent); the running agent keeps the old value(s)",
                        ", ".join(plan.restart_needed))
        self.cfg = eff
        self._files = files
        message = "; ".join(done) if done else "nothing that applies live changed"
        log.info("configuration reloaded: %s", message)
        return ReloadOutcome(True, message, plan)

    def housekeeping(self) -> None:
        assert self.store is not None
        try:
            self.store.housekeeping(self.cfg.limits.dedupe_retention, self.cfg.limits.max_state_bytes)
        except Exception:
            log.exception("journal housekeeping failed")

    def shutdown(self) -> None:
        assert self.session and self.dispatcher and self.store and self.watchdog
        self._log_signals()
        grace = self.cfg.agent.shutdown_grace
        end = self._clock() + grace
        status = f"stopping: waiting up to {grace:g} s for {self.dispatcher.in_flight} running command(s)"
        self.notifier.stopping(status, needs=grace + STOP_MARGIN)
        self.watchdog.set_phase(status)
        log.info("stopping: no new commands are started; waiting up to %g s for running ones", grace)
        self.dispatcher.stop_accepting()
        if self.api is not None:
            self.api.stopping = True  # 503 from here on; what was answered 202 is in the store
        if self.forwarder is not None:
            self.forwarder.stop()
        if not self.dispatcher.drain(grace):
            log.warning("%d command(s) still running after the %g s grace period; they are answered 500 at the "
                        "next start", self.dispatcher.in_flight, grace)
        self._log_signals()  # one that came again while the commands ran
        if not self.session.flush(max(end - self._clock(), 1.0)):
            log.warning("%d response(s) not yet acknowledged by the broker at shutdown; the outbox keeps them "
                        "for the next start", self.session.unacknowledged())
        # The watchdog judges a live network loop: stop it before the loop ends on purpose.
        self.watchdog.stop()
        if self.renewer is not None:
            self.renewer.stop()
        REAPER.stop()
        self.session.stop()
        self.dispatcher.close()
        if self.api_server is not None:
            self.api_server.stop()
        if self.outbox is not None:
            self.outbox.close()
        self.store.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("stopped")
