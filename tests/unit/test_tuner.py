"""Keepalive auto-tuning (pure, fake clocks) and the connection-state file."""

from __future__ import annotations

import json
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import HostPort, KeepaliveTuningConfig, MqttConfig, ReconnectConfig
from agent.connection.classify import (
    AUTH_FAILED,
    CONNECTION_LOST,
    IDLE_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    REFUSED,
    SERVER_DISCONNECT,
    SESSION_TAKEN_OVER,
    SHUTDOWN,
    TLS_ERROR,
)
from agent.connection.events import KeepaliveChanged, SessionTakeover
from agent.connection.monitor import ConnectionMonitor
from agent.connection.session import ConnectionEnded
from agent.connection.tuner import KeepaliveTuner, format_duration, safe_keepalive
from agent.state.connection_file import STATE_FILE, StateFile
from tests.support.clock import FakeClock

HOST = HostPort("broker", 8883)




def tuner(clock: FakeClock, configured: int = 60, **cfg: float) -> KeepaliveTuner:
    return KeepaliveTuner(KeepaliveTuningConfig(**cfg), configured, clock=clock, wall=clock)  # type: ignore[arg-type]


def test_three_idle_drops_converge_in_one_step_with_evidence():
    clock = FakeClock(10000.0)
    t = tuner(clock)
    assert t.idle_drop(25.4, 60) is None
    clock.t += 240
    assert t.idle_drop(27.9, 60) is None
    clock.t += 300
    change = t.idle_drop(26.1, 60)
    assert change is not None
    assert (change.old, change.new, change.direction) == (60, 19, "down")
    assert change.evidence == "keepalive 60 s -> 19 s: 3 drops in 9 min after 25-28 s idle"
    assert t.current == 19 and t.learned


@pytest.mark.parametrize(("limit", "keepalive"), [(4.0, 2), (10.0, 7), (30.0, 22), (300.0, 225), (2.5, 0)])
def test_safe_keepalive_stays_clearly_below_the_limit(limit, keepalive):
    assert safe_keepalive(limit) == keepalive


def test_drops_outside_the_window_do_not_count():
    clock = FakeClock(10000.0)
    t = tuner(clock, window=900.0)
    t.idle_drop(25.0, 60)
    clock.t += 500
    t.idle_drop(25.0, 60)
    clock.t += 500  # the first drop is now 1000 s old
    assert t.idle_drop(25.0, 60) is None
    clock.t += 100
    assert t.idle_drop(25.0, 60) is not None


def test_drops_provoked_by_our_own_ping_only_bound_the_limit_so_it_halves():
    clock = FakeClock(10000.0)
    t = tuner(clock)
    for _ in range(3):
        clock.t += 70
        change = t.idle_drop(60.2, 60)
    assert change is not None and change.new == 30
    assert "each when the keepalive PINGREQ went out; halving" in change.evidence


def test_never_below_min_and_warns_once_there(caplog):
    clock = FakeClock(10000.0)
    t = tuner(clock, min=10)
    changes = []
    for _ in range(9):
        clock.t += 10
        changes.append(t.idle_drop(5.0, t.current))
    assert [c.new for c in changes if c] == [10]
    assert t.current == 10
    assert sum("keepalive_tuning.min" in r.getMessage() for r in caplog.records) == 1


def test_disabled_tuning_never_changes_anything():
    clock = FakeClock(10000.0)
    t = tuner(clock, enabled=False)
    for _ in range(10):
        clock.t += 10
        assert t.idle_drop(5.0, 60) is None
    assert t.current == 60 and not t.probe_due()


def test_probe_after_a_quiet_day_goes_halfway_up_and_steps_back_on_a_drop():
    clock = FakeClock(10000.0)
    t = tuner(clock, probe_after=86400.0)
    for _ in range(3):
        clock.t += 30
        t.idle_drop(26.0, 60)
    assert t.current == 19
    clock.t += 86399
    assert not t.probe_due()
    clock.t += 2
    assert t.probe_due()
    up = t.probe()
    assert up is not None and (up.old, up.new, up.direction) == (19, 40, "up")
    assert up.evidence == "keepalive 19 s -> 40 s: no idle drop for 24 h; probing a longer keepalive"
    clock.t += 100
    back = t.idle_drop(26.3, 40)  # one drop is enough: the previous value is known to work
    assert back is not None and (back.new, back.direction) == (19, "down")
    assert "while probing" in back.evidence
    assert not t.probe_due()


def test_a_probe_that_survives_becomes_the_good_value_and_the_next_goes_further():
    clock = FakeClock(10000.0)
    t = tuner(clock, probe_after=100.0, window=900.0, min=1)
    for _ in range(3):
        clock.t += 10
        t.idle_drop(8.0, 60)
    assert t.current == 6
    clock.t += 101
    assert t.probe().new == 33  # type: ignore[union-attr]
    t.connection_up_for(1000.0, 33)
    assert not t.probing
    clock.t += 101
    assert t.probe().new == 47  # type: ignore[union-attr]


def test_restore_clamps_to_the_current_config(tmp_path):
    clock = FakeClock(10000.0)
    t = tuner(clock, configured=60)
    for _ in range(3):
        clock.t += 10
        t.idle_drop(26.0, 60)
    saved = json.loads(json.dumps(t.to_dict()))
    again = tuner(clock, configured=60)
    assert "using the learned keepalive 19 s instead of 60 s" in (again.restore(saved) or "")
    assert again.current == 19
    lower_config = tuner(clock, configured=15)  # the operator lowered mqtt.keepalive below the learned value
    assert lower_config.restore(saved) is None and lower_config.current == 15
    raised_min = tuner(clock, configured=60, min=25)
    assert "clamped" in (raised_min.restore(saved) or "") and raised_min.current == 25
    for junk in (None, [], {"current": "x", "learned": True}, {"current": True, "learned": True},
                 {"current": 19, "learned": False}, {"current": -5, "learned": True}):
        fresh = tuner(clock)
        assert fresh.restore(junk) is None and fresh.current == 60


def test_state_file_is_atomic_private_and_tolerates_garbage(tmp_path, caplog):
    f = StateFile(tmp_path / STATE_FILE)
    assert f.load() == {}
    f.save({"keepalive": {"current": 20}})
    path = tmp_path / STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"version": 1, "keepalive": {"current": 20}}
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind
    for garbage in ("{not json", "[1, 2]", '{"version": 99}'):
        path.write_text(garbage)
        assert f.load() == {}
    assert sum("starting without the learned connection state" in r.getMessage() for r in caplog.records) == 3


def test_format_duration():
    assert [format_duration(s) for s in (9, 119, 540, 7199, 86400, 3 * 86400)] == ["9 s", "119 s", "9 min",
                                                                                  "120 min", "24 h", "3 d"]


# --- the monitor: persistence and the properties of the tuner inside it ------------------------

MQTT = MqttConfig(hosts=(HOST,), client_id="dev-1", keepalive=60)


def end(clock: FakeClock, kind: str, uptime: float, idle: float, keepalive: int,
        present: bool = True) -> ConnectionEnded:
    start = clock.t - uptime
    code = {KEEPALIVE_TIMEOUT: 0x8D, SESSION_TAKEN_OVER: 0x8E, SERVER_DISCONNECT: 0x8B}.get(kind, 0x80)
    return ConnectionEnded(host=HOST, kind=kind, reason="test", attempt_started=start, ended_at=clock.t,
                           connected_at=start, last_in=clock.t - idle, last_out=clock.t - idle, reason_code=code,
                           from_server=kind in (SESSION_TAKEN_OVER, SERVER_DISCONNECT), keepalive=keepalive,
                           session_present=present)


def test_monitor_persists_the_learned_keepalive_and_disconnects(tmp_path):
    clock = FakeClock(10000.0)
    tuning = KeepaliveTuningConfig(min=1)
    m = ConnectionMonitor(MQTT, ReconnectConfig(), tuning, state_dir=tmp_path, clock=clock, wall=clock)
    events = []
    for _ in range(3):
        clock.t += 6
        ended = m.classify(end(clock, CONNECTION_LOST, 4.0, 4.0, m.keepalive()))
        assert ended.kind == IDLE_TIMEOUT
        events += m.account(ended)
    assert events == [KeepaliveChanged(60, 2, "down", "keepalive 60 s -> 2 s: 3 drops in 12 s after 4.0 s idle")]
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert data["version"] == 1 and data["duplicate_client_id"] is None
    assert {k: data["keepalive"][k] for k in ("current", "configured", "learned")} == {
        "current": 2, "configured": 60, "learned": True}
    assert data["keepalive"]["last_idle_drop_at"] == clock.t
    assert [(d["reason"], d["idle_s"], d["uptime_s"], d["reason_code"]) for d in data["disconnects"]] == [
        (IDLE_TIMEOUT, 4.0, 4.0, 128)] * 3
    restarted = ConnectionMonitor(MQTT, ReconnectConfig(), tuning, state_dir=tmp_path, clock=clock, wall=clock)
    assert restarted.keepalive() == 2
    assert len(restarted.disconnects) == 3


def test_monitor_records_a_takeover_and_the_duplicate_id(tmp_path):
    clock = FakeClock(10000.0)
    m = ConnectionMonitor(MQTT, ReconnectConfig(), KeepaliveTuningConfig(), state_dir=tmp_path, clock=clock,
                          wall=clock)
    events = m.account(m.classify(end(clock, SESSION_TAKEN_OVER, 3.0, 1.0, 60)))
    assert events == [SessionTakeover("dev-1")]
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert data["duplicate_client_id"] == {"client_id": "dev-1", "suspected_at": clock.t, "takeovers": 1}
    assert m.backoff.damped


NON_IDLE = (KEEPALIVE_TIMEOUT, SESSION_TAKEN_OVER, SERVER_DISCONNECT, AUTH_FAILED, TLS_ERROR, REFUSED, SHUTDOWN)
drop = st.tuples(
    st.sampled_from((CONNECTION_LOST, *NON_IDLE)),
    st.floats(0.0, 700.0),  # uptime
    st.floats(0.0, 1.0),  # idle as a share of the uptime
    st.booleans(),  # session present
    st.floats(0.1, 3000.0),  # time to the next event
)


@settings(max_examples=300, deadline=None)
@given(st.lists(drop, max_size=60), st.integers(1, 600), st.integers(1, 600))
def test_keepalive_stays_within_bounds_and_moves_only_on_idle_drops(drops, configured, minimum):
    """For any sequence of connection ends, the keepalive stays in [min, configured] and only an
    end classified idle_timeout changes it (downward)."""
    minimum = min(minimum, configured)
    mqtt = MqttConfig(hosts=(HOST,), client_id="dev-1", keepalive=configured)
    clock = FakeClock(10000.0)
    m = ConnectionMonitor(mqtt, ReconnectConfig(), KeepaliveTuningConfig(min=minimum, drops=2, window=3600.0),
                          clock=clock, wall=clock)
    for kind, uptime, idle_share, present, gap in drops:
        clock.t += gap
        before = m.keepalive()
        ended = m.classify(end(clock, kind, uptime, uptime * idle_share, before, present))
        m.account(ended)
        after = m.keepalive()
        assert minimum <= after <= configured
        if after != before:
            assert ended.kind == IDLE_TIMEOUT and after < before


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NON_IDLE), st.floats(0.0, 700.0), st.floats(0.1, 3000.0)), max_size=60))
def test_non_idle_causes_never_tune(drops):
    clock = FakeClock(10000.0)
    m = ConnectionMonitor(MQTT, ReconnectConfig(), KeepaliveTuningConfig(min=1, drops=1), clock=clock, wall=clock)
    for kind, uptime, gap in drops:
        clock.t += gap
        m.account(m.classify(end(clock, kind, uptime, uptime / 2, 60)))
        assert m.keepalive() == 60


def test_tuning_min_defaults_below_a_short_keepalive_but_an_explicit_one_is_checked():
    from agent.config import parse_config
    from agent.errors import ConfigError

    base = {"agent": {"device_id": "dev-1"}, "mqtt": {"hosts": ["broker:8883"], "keepalive": 5},
            "tls": {"enabled": False}}
    assert parse_config(base).keepalive_tuning.min == 5
    assert parse_config({**base, "mqtt": {"hosts": ["b:1"], "keepalive": 60}}).keepalive_tuning.min == 10
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "keepalive_tuning": {"min": 6}})
    assert err.value.problems == ["keepalive_tuning.min: must not exceed mqtt.keepalive (5), got 6"]


def test_a_saved_duplicate_id_is_cleared_only_by_a_long_stable_connection(tmp_path):
    clock = FakeClock(10000.0)
    reconnect = ReconnectConfig(max_delay=120.0)
    m = ConnectionMonitor(MQTT, reconnect, KeepaliveTuningConfig(), state_dir=tmp_path, clock=clock, wall=clock)
    m.account(m.classify(end(clock, SESSION_TAKEN_OVER, 3.0, 1.0, 60)))
    restarted = ConnectionMonitor(MQTT, reconnect, KeepaliveTuningConfig(), state_dir=tmp_path, clock=clock,
                                  wall=clock)
    assert restarted.duplicate is not None  # doctor still sees it after a restart
    restarted.connection_up_for(100.0, 60)
    assert json.loads((tmp_path / STATE_FILE).read_text())["duplicate_client_id"] is not None
    restarted.connection_up_for(240.0, 60)  # twice max_delay: the other client is gone
    assert restarted.duplicate is None
    assert json.loads((tmp_path / STATE_FILE).read_text())["duplicate_client_id"] is None
