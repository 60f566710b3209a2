"""What the classifier says and decides (issue 17, points 1, 4 and 7), pure, with a fake clock:
"NAT likely" only for the pattern the tuner acts on; a broker that refuses the next CONNECT was
restarting; a poison message is not a takeover; a real MQTT 5 takeover (DISCONNECT 0x8E) is one."""

from __future__ import annotations

from paho.mqtt.client import DisconnectFlags
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import HostPort, KeepaliveTuningConfig, MqttConfig, ReconnectConfig, TlsConfig
from agent.connection.classify import (
    CONNECTION_LOST,
    IDLE_TIMEOUT,
    MESSAGE_REJECTED,
    NETWORK_ERROR,
    REFUSED,
    SERVER_DISCONNECT,
    SESSION_TAKEN_OVER,
    Classifier,
)
from agent.connection.events import ConnectionEnded, SessionTakeover
from agent.connection.monitor import ConnectionMonitor
from agent.connection.session import Session, _Conn
from tests.support.clock import FakeClock

HOST = HostPort("broker", 8883)
NAT_LIKELY = "a NAT or firewall idle limit is likely"




def lost(clock: FakeClock, uptime: float, idle: float, **kw: object) -> ConnectionEnded:
    start = clock.t - uptime
    fields: dict[str, object] = {"kind": CONNECTION_LOST, "reason": "connection lost (closed by the peer)",
                                 "reason_code": 0x80, "keepalive": 60, "session_present": True}
    fields.update(kw)
    return ConnectionEnded(host=HOST, attempt_started=start - 0.05, ended_at=clock.t, connected_at=start,
                           last_in=clock.t - idle, last_out=clock.t - idle, **fields)  # type: ignore[arg-type]


def refused(clock: FakeClock) -> ConnectionEnded:
    return ConnectionEnded(host=HOST, kind=REFUSED, reason="connection refused by broker:8883: nothing listens on "
                           "that port", attempt_started=clock.t - 0.01, ended_at=clock.t,
                           error="ConnectionRefusedError()")


# --- point 4: honest words ----------------------------------------------------------------------

def test_nat_is_named_likely_only_once_the_drops_make_the_pattern_the_tuner_acts_on():
    clock = FakeClock(1000.0)
    c = Classifier(nat_drops=3, clock=clock)
    reasons = []
    for _ in range(3):
        clock.t += 40
        verdict = c.classify(lost(clock, 31.0, 30.0))
        assert verdict.kind == IDLE_TIMEOUT  # the tuner counts these
        reasons.append(verdict.reason)
    assert NAT_LIKELY not in reasons[0] and "one drop does not say why" in reasons[0]
    assert "30.0 s without traffic" in reasons[0] and "closed by the peer" in reasons[0]
    assert "if it keeps happening at this idle time" in reasons[1]
    assert reasons[2].endswith(NAT_LIKELY) and "like 2 drop(s) before" in reasons[2]


def test_with_a_one_drop_tuner_the_first_drop_already_is_the_pattern():
    clock = FakeClock(1000.0)
    assert Classifier(nat_drops=1, clock=clock).classify(lost(clock, 31.0, 30.0)).reason.endswith(NAT_LIKELY)


def test_a_broker_that_refuses_the_next_connect_was_restarting_and_teaches_the_tuner_nothing():
    clock = FakeClock(1000.0)
    tuning = KeepaliveTuningConfig(drops=2, min=5)
    monitor = ConnectionMonitor(MqttConfig(hosts=(HOST,), client_id="dev-1"), ReconnectConfig(), tuning,
                                clock=clock, wall=clock)
    for _ in range(3):  # three broker restarts after ~30 s idle (systemctl restart mosquitto)
        clock.t += 40
        first = monitor.classify(lost(clock, 31.0, 30.0))
        assert NAT_LIKELY not in first.reason
        assert monitor.account(first) == []
        clock.t += 1
        then = monitor.classify(refused(clock))
        assert then.kind == REFUSED
        assert "the broker was restarting or stopping when it dropped the last connection" in then.reason
        assert monitor.account(then) == []  # no keepalive change
    assert monitor.tuner.current == 60
    restarts = [d for d in monitor.disconnects if d.get("uptime_s") is not None]
    assert [d["reason"] for d in restarts] == [NETWORK_ERROR] * 3
    assert all("restarting" in d["note"] for d in restarts)


def test_the_first_drop_of_a_takeover_is_not_called_a_nat():
    """MQTT 3.1.1 takeover: drops at varying uptimes, reconnects at once; the first one is idle-like."""
    clock = FakeClock(1000.0)
    c = Classifier(clock=clock)
    clock.t += 20
    first = c.classify(lost(clock, 12.0, 6.0))
    assert NAT_LIKELY not in first.reason and "another client with this client id" in first.reason


# --- point 1: a poison message is not a takeover ---------------------------------------------------

def test_drops_right_after_an_unacknowledged_message_are_message_rejected_never_a_takeover():
    clock = FakeClock(1000.0)
    c = Classifier(clock=clock)
    suspect = "a 49152-byte message to 'command///res/r1/200', sent 0.0 s before and not acknowledged"
    for uptime in (0.1, 0.4, 0.05, 0.9, 0.2):  # short-lived, reconnect at once, session kept: the takeover shape
        clock.t += 1.0
        verdict = c.classify(lost(clock, uptime, 0.0, message_suspect=suspect))
        assert verdict.kind == MESSAGE_REJECTED
        assert suspect in verdict.reason and "mqtt.max_message_bytes" in verdict.reason
    assert not c.suspecting_takeover and c.takeovers == 0
    # MQTT 5: mosquitto says "Packet too large" in a DISCONNECT
    clock.t += 1.0
    v5 = c.classify(lost(clock, 0.1, 0.0, kind=SERVER_DISCONNECT, reason_code=0x95, from_server=True,
                         message_suspect=suspect))
    assert v5.kind == MESSAGE_REJECTED


# --- point 7: a real MQTT 5 takeover -----------------------------------------------------------------

def _session(clock: FakeClock) -> Session:
    cfg = MqttConfig(hosts=(HOST,), client_id="dev-1", protocol="5")
    monitor = ConnectionMonitor(cfg, ReconnectConfig(), KeepaliveTuningConfig(enabled=False, min=1), clock=clock,
                                wall=clock)
    return Session(cfg, TlsConfig(enabled=False), monitor=monitor, ssl_context=None, on_message=lambda m: None,
                   clock=clock, wall=clock)


def test_disconnect_0x8e_from_the_broker_is_a_declared_takeover_at_the_first_drop():
    clock = FakeClock(1000.0)
    session = _session(clock)
    conn = session._conn = _Conn(HOST, clock.t - 5, 60, connected_at=clock.t - 4.5, session_present=True)
    reason = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)
    session._handle_disconnect(session._client, None, DisconnectFlags(True), reason, None)
    session._handle_disconnect(session._client, None, DisconnectFlags(False), reason, None)  # paho repeats it
    assert conn.ended is not None
    assert conn.ended.kind == SESSION_TAKEN_OVER and conn.ended.from_server and conn.ended.reason_code == 0x8E
    monitor = session.monitor
    ended = monitor.classify(conn.ended)
    assert ended.kind == SESSION_TAKEN_OVER and "Session taken over" in ended.reason
    events = monitor.account(ended)
    assert SessionTakeover("dev-1") in events
    assert monitor.backoff.damped and monitor.duplicate is not None
    assert monitor.tuner.current == 60  # a takeover never shortens the keepalive


def test_a_0x8e_takeover_with_an_unacknowledged_message_stays_a_takeover():
    clock = FakeClock(1000.0)
    c = Classifier(clock=clock)
    clock.t += 5
    verdict = c.classify(lost(clock, 3.0, 0.0, kind=SESSION_TAKEN_OVER, reason_code=0x8E, from_server=True,
                              message_suspect="a 10-byte message"))
    assert verdict.kind == SESSION_TAKEN_OVER and verdict.declared_takeover


def test_other_server_disconnects_are_not_takeovers():
    clock = FakeClock(1000.0)
    session = _session(clock)
    conn = session._conn = _Conn(HOST, clock.t - 5, 60, connected_at=clock.t - 4.5)
    session._handle_disconnect(session._client, None, DisconnectFlags(True),
                               ReasonCode(PacketTypes.DISCONNECT, identifier=0x8B), None)
    assert conn.ended is not None and conn.ended.kind == SERVER_DISCONNECT
