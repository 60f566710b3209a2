"""Prometheus metrics: observers of the session and the dispatcher, and the HTTP exporter.

Metric names are an interface (deploy/prometheus/alerts.yml and deploy/grafana/mqtt-agent.json use
them); docs/metrics.md lists them. Label values stay bounded: disconnect reasons, rejection reasons and
keepalive directions come from fixed sets (anything else is counted as "other"), and command names
the agent does not serve are folded into one value, "_unknown" (real names cannot start with "_").
"""

from __future__ import annotations

import logging
import platform
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent import __version__, paho_version
from agent.commands.dispatch import DispatchObserver
from agent.config import HostPort, TlsConfig
from agent.connection.events import ConnectionEnded, SessionListener
from agent.state.poison import SET_ASIDE_REASONS
from agent.tls.certs import certificate_expiries

log = logging.getLogger(__name__)

# The disconnect classifier's reasons (ConnectionEnded.kind). Pre-initialised so dashboards see zeros.
DISCONNECT_REASONS = (
    "idle_timeout", "keepalive_timeout", "session_taken_over", "server_disconnect", "auth_failed",
    "tls_error", "refused", "network_error", "shutdown", "message_rejected",
)
REJECT_REASONS = ("malformed_topic", "payload_too_large", "unknown_command", "queue_full", "expired", "journal_error")
KEEPALIVE_DIRECTIONS = ("down", "up")
OTHER = "other"
UNKNOWN_COMMAND = "_unknown"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _bounded(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER



class ConnectionMetrics(SessionListener):
    """Connection, keepalive, takeover and outbox metrics, fed by the session's listener events.

    The events arrive on the network thread; updates are counter increments and a few assignments.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        protocol: str,
        configured_keepalive: int,
        keepalive_floor: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.protocol = protocol
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._connected = False
        self._offline_total = 0.0
        self._offline_since: float | None = clock()  # offline until the first CONNACK
        self._broker: tuple[str, str] | None = None
        self.connects = Counter("mqtt_agent_connects", "Successful connections (CONNACK accepted)",
                                registry=registry)
        self.disconnects = Counter("mqtt_agent_disconnects", "Connections or connection attempts that ended, "
                                   "by the disconnect classifier's reason", ["reason"], registry=registry)
        for reason in (*DISCONNECT_REASONS, OTHER):
            self.disconnects.labels(reason)
        self.reconnect_attempts = Counter("mqtt_agent_reconnect_attempts", "Connection attempts after the first one",
                                          registry=registry)
        self.last_connect = Gauge("mqtt_agent_last_connect_timestamp_seconds",
                                  "Unix time of the last successful connection (0: never)", registry=registry)
        self.broker_info = Gauge("mqtt_agent_broker_info", "The broker of the current (or last) connection: 1",
                                 ["host", "protocol"], registry=registry)
        self.keepalive = Gauge("mqtt_agent_keepalive_seconds", "Keepalive of the current (or last) connection",
                               registry=registry)
        self.keepalive.set(configured_keepalive)
        self.keepalive_configured = Gauge("mqtt_agent_keepalive_configured_seconds",
                                          "mqtt.keepalive from the configuration (the tuner's upper bound)",
                                          registry=registry)
        self.keepalive_configured.set(configured_keepalive)
        self.keepalive_floor = Gauge("mqtt_agent_keepalive_min_seconds",
                                     "keepalive_tuning.min: the tuner never goes below it (the configured value "
                                     "if tuning is off)", registry=registry)
        self.keepalive_floor.set(configured_keepalive if keepalive_floor is None else keepalive_floor)
        self.keepalive_adjustments = Counter("mqtt_agent_keepalive_adjustments",
                                             "Keepalive changes made by the tuner, by direction", ["direction"],
                                             registry=registry)
        for direction in KEEPALIVE_DIRECTIONS:
            self.keepalive_adjustments.labels(direction)
        self.takeovers = Counter("mqtt_agent_session_takeovers",
                                 "Times another client with this client id took the session over", registry=registry)
        self.outbox = Gauge("mqtt_agent_outbox_messages", "Responses waiting in the persistent outbox",
                            registry=registry)
        self.outbox_dropped_total = Counter("mqtt_agent_outbox_dropped",
                                            "Responses dropped because the outbox was full", registry=registry)
        self.set_aside = Counter("mqtt_agent_messages_set_aside",
                                 "Messages not sent as they were, by reason: too_large (over mqtt.max_message_bytes "
                                 "or the broker's Maximum Packet Size; a response is answered 500 instead), poison "
                                 "(the broker closed the connection each time it was sent)", ["reason"],
                                 registry=registry)
        for reason in (*SET_ASIDE_REASONS, OTHER):
            self.set_aside.labels(reason)
        registry.register(self)

    # --- computed at scrape time (prometheus_client Collector protocol) -----------------------

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            connected = self._connected
            offline = self._offline_total
            if self._offline_since is not None:
                offline += max(self._clock() - self._offline_since, 0.0)
        yield GaugeMetricFamily("mqtt_agent_connected", "1 while connected to a broker, else 0",
                                value=1.0 if connected else 0.0)
        yield CounterMetricFamily("mqtt_agent_offline_seconds", "Seconds spent without a broker connection "
                                  "since the agent started", value=offline)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("mqtt_agent_connected", "")
        yield CounterMetricFamily("mqtt_agent_offline_seconds", "")

    # --- SessionListener -------------------------------------------------------------------------

    def connecting(self, host: HostPort, attempt: int) -> None:
        if attempt > 1:
            self.reconnect_attempts.inc()

    def connected(self, host: HostPort, keepalive: int, session_present: bool) -> None:
        with self._lock:
            self._connected = True
            if self._offline_since is not None:
                self._offline_total += max(self._clock() - self._offline_since, 0.0)
                self._offline_since = None
            previous, self._broker = self._broker, (str(host), self.protocol)
        self.connects.inc()
        self.last_connect.set(self._wall())
        self.keepalive.set(keepalive)
        if previous is not None and previous != self._broker:
            try:
                self.broker_info.remove(*previous)
            except KeyError:
                pass
        self.broker_info.labels(*self._broker).set(1)

    def connection_ended(self, ended: ConnectionEnded) -> None:
        with self._lock:
            if self._connected:
                self._connected = False
                self._offline_since = self._clock()
        self.disconnects.labels(_bounded(ended.kind, DISCONNECT_REASONS)).inc()

    def keepalive_changed(self, old: int, new: int, direction: str, evidence: str) -> None:
        self.keepalive_adjustments.labels(_bounded(direction, KEEPALIVE_DIRECTIONS)).inc()

    def session_takeover(self, client_id: str) -> None:
        self.takeovers.inc()

    def outbox_changed(self, size: int) -> None:
        self.outbox.set(size)

    def outbox_dropped(self, count: int) -> None:
        self.outbox_dropped_total.inc(count)

    def message_set_aside(self, reason: str) -> None:
        self.set_aside.labels(_bounded(reason, SET_ASIDE_REASONS)).inc()


class CommandMetrics(DispatchObserver):
    """Command counters and latency, fed by the dispatcher's observer hooks (worker threads)."""

    def __init__(self, registry: CollectorRegistry, commands: Iterable[str] = (),
                 in_flight: Callable[[], int] | None = None) -> None:
        self._known = frozenset(commands)
        self.total = Counter("mqtt_agent_commands", "Commands answered, by command and response status",
                             ["command", "status"], registry=registry)
        self.duration = Histogram("mqtt_agent_command_duration_seconds", "Time from a command's start to its "
                                  "response, by command", ["command"], buckets=DURATION_BUCKETS, registry=registry)
        self.in_flight = Gauge("mqtt_agent_commands_in_flight", "Commands running now", registry=registry)
        if in_flight is not None:
            self.in_flight.set_function(lambda: float(in_flight()))
        self.rejected = Counter("mqtt_agent_commands_rejected", "Commands refused before running, by reason",
                                ["reason"], registry=registry)
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        for reason in (*REJECT_REASONS, OTHER):
            self.rejected.labels(reason)

    def set_commands(self, commands: Iterable[str]) -> None:
        """The command names the agent serves (after a reload too); others count as "_unknown"."""
        self._known = frozenset(commands)

    def label(self, command: str) -> str:
        return command if command in self._known else UNKNOWN_COMMAND

    def command_finished(self, command: str, status: int, seconds: float) -> None:
        name = self.label(command)
        # labels() takes a lock and builds a key on every call: keep the children (bounded: known commands
        # x statuses seen) on the hot path of every command.
        children = self._children.get((name, status))
        if children is None:
            children = self._children[(name, status)] = (self.total.labels(name, str(status)),
                                                          self.duration.labels(name))
        children[0].inc()
        children[1].observe(max(seconds, 0.0))

    def command_rejected(self, command: str, reason: str, status: int | None = None) -> None:
        self.rejected.labels(_bounded(reason, REJECT_REASONS)).inc()
        if status is not None:
            # A rejection answered with a response (404, 413, 429, 503) is an answered command too, so that
            # `sum by (status) (mqtt_agent_commands_total)` counts every response the agent publishes.
            # No duration sample: nothing ran.
            self.total.labels(self.label(command), str(status)).inc()


class CertificateExpiry:
    """mqtt_agent_tls_certificate_expiry_timestamp_seconds{certificate="client"|"ca"}, read from the
    files at scrape time (a renewed certificate shows without a restart). "ca" is the earliest expiry
    in tls.ca_file. Files are re-parsed only when they change."""

    def __init__(self, registry: CollectorRegistry, tls: TlsConfig) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[Path, bool], tuple[tuple[int, int], float | None]] = {}
        self.tls = tls
        registry.register(self)

    def _expiry(self, path: Path, first_only: bool) -> float | None:
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get((path, first_only))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        expiries = certificate_expiries(path)
        if first_only:
            expiries = expiries[:1]  # the client certificate comes first; a chain may follow it
        value = min(expiries) if expiries else None
        with self._lock:
            self._cache[(path, first_only)] = (stamp, value)
        return value

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("mqtt_agent_tls_certificate_expiry_timestamp_seconds",
                                   "Unix time at which a TLS certificate expires", labels=["certificate"])
        tls = self.tls
        if tls.enabled:
            for label, path in (("client", tls.cert_file), ("ca", tls.ca_file)):
                value = self._expiry(path, first_only=label == "client") if path is not None else None
                if value is not None:
                    family.add_metric([label], value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("mqtt_agent_tls_certificate_expiry_timestamp_seconds", "", labels=["certificate"])


class StateMetrics:
    """The state store's health, read from the store at scrape time (no locks, plain attributes)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected live: the store may not exist when the registry is built in tests

    def collect(self) -> Iterator[Metric]:
        st = self._store
        yield GaugeMetricFamily("mqtt_agent_state_bytes", "Size of the state store on disk (database and WAL)",
                                value=st.size_bytes)
        yield GaugeMetricFamily("mqtt_agent_state_max_bytes", "limits.max_state_bytes: the state store's bound",
                                value=st.max_bytes)
        rec = CounterMetricFamily("mqtt_agent_state_recovered", "Times the state store was set aside and started "
                                  "fresh (corrupt at start, removed or replaced while running)", labels=["reason"])
        for reason in ("corrupt", "replaced"):
            rec.add_metric([reason], st.recovered.get(reason, 0))
        yield rec
        yield CounterMetricFamily("mqtt_agent_state_fsyncs", "Durable commits of the state store (one fsync each)",
                                  value=st.fsyncs)
        yield CounterMetricFamily("mqtt_agent_state_pruned", "Finished commands forgotten to stay within "
                                  "limits.max_state_bytes", value=st.pruned_total)
RENEWAL_RESULTS = ("success", "signer_failed", "rejected", "probe_failed", "rolled_back")


class RenewalMetrics:
    """mqtt_agent_tls_renewals_total{result} and mqtt_agent_tls_renewal_next_timestamp_seconds.

    Every result starts at 0, so an alert on increase() sees the first failure."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.renewals = Counter("mqtt_agent_tls_renewals", "Certificate renewal attempts by outcome: success, "
                                "signer_failed, rejected (failed the chain check), probe_failed (the broker refused "
                                "the new pair), rolled_back (switched back after the switch)", ["result"],
                                registry=registry)
        for result in RENEWAL_RESULTS:
            self.renewals.labels(result)
        self.next = Gauge("mqtt_agent_tls_renewal_next_timestamp_seconds",
                          "Unix time of the next certificate renewal attempt", registry=registry)
        self.next.set(float("nan"))  # until a renewer says otherwise (renewal off: stays NaN)

    def result(self, result: str) -> None:
        self.renewals.labels(_bounded(result, RENEWAL_RESULTS)).inc()

    def next_at(self, when: float | None) -> None:
        self.next.set(when if when is not None else float("nan"))


PUBLISH_KINDS = ("telemetry", "event")
PUBLISH_DROP_REASONS = ("queue_full", "ttl", "max_age")


class PublishMetrics:
    """Telemetry and events from the local API and [forward.local], read from the outbox at scrape time."""

    def __init__(self, outbox: Any, wall: Callable[[], float] = time.time,
                 hono_errors: Callable[[], int] | None = None) -> None:
        self._outbox = outbox
        self._wall = wall
        self._hono_errors = hono_errors

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        box = self._outbox
        accepted = CounterMetricFamily("mqtt_agent_publish_accepted", "Telemetry messages and events accepted "
                                       "(durable in the queue: answered 202)", labels=["kind"])
        sent = CounterMetricFamily("mqtt_agent_publish_sent", "Telemetry messages and events the broker "
                                   "acknowledged (QoS 0: handed to the connection)", labels=["kind"])
        for kind in PUBLISH_KINDS:
            accepted.add_metric([kind], box.accepted.get(kind, 0))
            sent.add_metric([kind], box.sent.get(kind, 0))
        dropped = CounterMetricFamily("mqtt_agent_publish_dropped", "Accepted telemetry messages and events that "
                                      "were not sent: queue_full (the oldest telemetry made room), ttl, max_age",
                                      labels=["kind", "reason"])
        for kind in PUBLISH_KINDS:
            for reason in PUBLISH_DROP_REASONS:
                dropped.add_metric([kind, reason], box.dropped.get((kind, reason), 0))
        yield accepted
        yield sent
        yield dropped
        count, size, oldest = box.publish_stats()
        yield GaugeMetricFamily("mqtt_agent_publish_queue_messages", "Telemetry messages and events not yet "
                                "acknowledged by the broker", value=count)
        yield GaugeMetricFamily("mqtt_agent_publish_queue_bytes", "Bytes (payload and topic) of those messages",
                                value=size)
        yield GaugeMetricFamily("mqtt_agent_publish_queue_oldest_age_seconds", "Age of the oldest of them "
                                "(0 when the queue is empty)",
                                value=max(0.0, self._wall() - oldest) if oldest is not None else 0.0)
        if self._hono_errors is not None:
            yield CounterMetricFamily("mqtt_agent_publish_hono_errors", "Error messages Eclipse Hono sent on its "
                                      "error topic (publish.hono_errors = true)", value=self._hono_errors())


class AgentMetrics:
    """Every metric of the agent in one registry (injected in tests)."""

    def __init__(
        self,
        *,
        protocol: str,
        configured_keepalive: int,
        tls: TlsConfig,
        keepalive_floor: int | None = None,
        commands: Iterable[str] = (),
        in_flight: Callable[[], int] | None = None,
        state: Any = None,
        publish: PublishMetrics | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        shared_group: str | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.connection = ConnectionMetrics(self.registry, protocol=protocol, configured_keepalive=configured_keepalive,
                                            keepalive_floor=keepalive_floor, clock=clock, wall=wall)
        self.commands = CommandMetrics(self.registry, commands, in_flight)
        self.certificates = CertificateExpiry(self.registry, tls)
        if state is not None:
            self.registry.register(StateMetrics(state))
        if publish is not None:
            self.registry.register(publish)
        # Eclipse Hono releases a command it has no PUBACK for after about 1 s.
        self.ack_delay = Histogram("mqtt_agent_command_ack_delay_seconds", "Time from a command's receipt to its "
                                   "PUBACK (sent once its journal row is on disk)",
                                   buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
                                   registry=self.registry)
        self.renewal = RenewalMetrics(self.registry)
        build = Gauge("mqtt_agent_build_info", "Versions of the agent, Python and paho-mqtt: 1",
                      ["version", "python", "paho"], registry=self.registry)
        build.labels(__version__, platform.python_version(), paho_version()).set(1)
        if shared_group:
            # Each member counts only the commands it served (mqtt_agent_commands_total); this label lets a
            # query add up or compare the members of one group: `* on(instance) group_left(group)`.
            shared = Gauge("mqtt_agent_shared_group_info", "The MQTT 5 shared subscription group this agent "
                           "serves commands in (mqtt.shared_group): 1", ["group"], registry=self.registry)
            shared.labels(shared_group).set(1)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the journal


class MetricsServer:
    """The /metrics HTTP endpoint on [metrics] listen, served from a daemon thread."""

    def __init__(self, endpoint: HostPort, registry: CollectorRegistry) -> None:
        self.endpoint = endpoint
        self.registry = registry
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve. Raises OSError (e.g. address in use) with the endpoint in the message."""
        server_cls = type("_BoundServer", (_Server,), {
            "address_family": socket.AF_INET6 if ":" in self.endpoint.host else socket.AF_INET,
        })
        try:
            self._httpd = make_server(self.endpoint.host, self.endpoint.port, make_wsgi_app(self.registry),
                                      server_class=server_cls, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.endpoint} (metrics.listen): "
                                     f"{exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
