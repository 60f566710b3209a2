"""The renewal core without a broker: policy arithmetic, the pair store's switch steps and crash states,
and the state machine with a fake probe and fake session events."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import HostPort, parse_config
from agent.connection.events import ConnectionEnded
from agent.renewal import policy
from agent.renewal.rollover import WATCH_FAILURES, Renewer
from agent.renewal.store import ACTIVE, PENDING, PENDING_KEY, PREVIOUS, REJECTED, PairStore, select_pair
from agent.service.metrics import RenewalMetrics
from tests.support.pki import TestCA, sign_csr

UTC = datetime.timezone.utc
DAY = 86400.0


# --- policy ---------------------------------------------------------------------------------------

def test_due_at_takes_the_earlier_of_lifetime_share_and_before_expiry() -> None:
    nb, na = 0.0, 365 * DAY
    # 0.66 of a year is day 240.9; 30 days before expiry is day 335: the share comes first.
    due = policy.due_at(nb, na, "gw-1", at=0.66, before=30 * DAY)
    offset = policy.device_offset("gw-1") * policy.SPREAD * na
    assert due == pytest.approx(0.66 * na - offset)
    # A 40-day certificate: 30 days before expiry (day 10) comes before 0.66 (day 26.4).
    assert policy.due_at(0, 40 * DAY, "gw-1", at=0.66, before=30 * DAY) == pytest.approx(
        10 * DAY - policy.device_offset("gw-1") * policy.SPREAD * 40 * DAY)


def test_devices_enrolled_together_renew_spread_over_the_window() -> None:
    dues = sorted(policy.due_at(0, 365 * DAY, f"gw-{i:04d}", at=0.66, before=30 * DAY) for i in range(1000))
    window = policy.SPREAD * 365 * DAY
    assert dues[-1] - dues[0] > 0.9 * window  # spread over (almost) the whole window, not one minute
    per_hour: dict[int, int] = {}
    for d in dues:
        per_hour[int(d // 3600)] = per_hour.get(int(d // 3600), 0) + 1
    assert max(per_hour.values()) < 20
    # Stable: the same device always gets the same offset.
    assert policy.device_offset("gw-0001") == policy.device_offset("gw-0001")


@given(nb=st.floats(0, 1e9), life=st.floats(0, 1e9), at=st.floats(0.05, 0.99), before=st.floats(0, 1e9),
       device=st.text(min_size=1, max_size=20))
def test_due_is_never_before_issue_nor_after_expiry(nb: float, life: float, at: float, before: float,
                                                   device: str) -> None:
    due = policy.due_at(nb, nb + life, device, at=at, before=before)
    assert nb <= due <= nb + life + 1e-6 * max(1.0, nb + life)


def test_retry_delay_doubles_up_to_the_cap() -> None:
    assert [policy.retry_delay(n, 300, 3600) for n in range(0, 7)] == [0, 300, 600, 1200, 2400, 3600, 3600]
    assert policy.retry_delay(10_000, 1, 10) == 10


# --- the store and the state machine --------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


class FakeSigner:
    """Signs CSRs with the test CA, in process (the exec path is covered by the integration tests)."""

    def __init__(self, ca: TestCA) -> None:
        self.ca = ca

    def __call__(self, csr_pem: bytes) -> bytes:
        return sign_csr(self.ca, csr_pem)


def make(tmp_path: Path, ca: TestCA, verdicts: list[tuple[str, str]], wall: list[float] | None = None,
         **renewal: object) -> tuple[Renewer, list[str], RenewalMetrics]:
    from prometheus_client import CollectorRegistry

    device = ca.issue("dev-1", filename=f"dev-{tmp_path.name}")
    cfg = parse_config({
        "agent": {"device_id": "dev-1", "state_dir": str(tmp_path / "state")},
        "mqtt": {"hosts": ["127.0.0.1:1"]},
        "tls": {"ca_file": str(ca.cert_path), "cert_file": str(device.cert), "key_file": str(device.key)},
        "renewal": {"signer": "command", **renewal},
    })
    switches: list[str] = []
    metrics = RenewalMetrics(CollectorRegistry())
    clock = wall or [datetime.datetime.now(UTC).timestamp()]
    renewer = Renewer(cfg, PairStore(tmp_path / "state" / "tls"), metrics=metrics, wall=lambda: clock[0],
                      switch=lambda tls, reason: switches.append(f"{tls.cert_file.name}: {reason}"),  # type: ignore[union-attr]
                      probe=lambda tls: verdicts.pop(0))
    return renewer, switches, metrics


def count(metrics: RenewalMetrics, result: str) -> float:
    return metrics.renewals.labels(result)._value.get()


def test_install_probe_switch_then_rollback_when_the_broker_keeps_dropping(tmp_path: Path, ca: TestCA) -> None:
    renewer, switches, metrics = make(tmp_path, ca, [("ok", "accepted"), ("refused", "bad certificate")])
    store = renewer.store
    assert renewer.pair is not None and renewer.pair.source == "configured"
    csr = renewer.make_csr()
    assert (store.path(PENDING_KEY).stat().st_mode & 0o777) == 0o600
    renewer.install(FakeSigner(ca)(csr))
    assert switches == ["active.pem: renewed client certificate"]
    assert renewer.pair.source == "renewed" and not store.exists(PENDING) and not store.exists(PENDING_KEY)
    assert count(metrics, "success") == 1
    host = HostPort("127.0.0.1", 1)
    for _ in range(WATCH_FAILURES):  # the broker drops each connection within a second
        renewer.connected(host, 30, False)
        renewer.connection_ended(ConnectionEnded(host, "server_disconnect", "bye", 0.0, 1.0, connected_at=0.5))
    renewer.tick()
    assert switches[-1].endswith("rolled back the renewed client certificate")
    assert renewer.pair.source == "configured"
    assert store.exists(REJECTED) and not store.exists(ACTIVE)
    assert count(metrics, "rolled_back") == 1
    assert renewer.state["last_failure"]["result"] == "rolled_back"


def test_a_broker_that_is_only_down_does_not_roll_back(tmp_path: Path, ca: TestCA) -> None:
    renewer, switches, _ = make(tmp_path, ca, [("ok", "accepted"), ("unreachable", "tcp")])
    renewer.install(FakeSigner(ca)(renewer.make_csr()))
    host = HostPort("127.0.0.1", 1)
    for _ in range(WATCH_FAILURES):
        renewer.connection_ended(ConnectionEnded(host, "network_error", "refused", 0.0, 1.0))
    renewer.tick()
    assert len(switches) == 1 and renewer.pair is not None and renewer.pair.source == "renewed"


def test_refused_probe_switches_nothing_and_backs_off(tmp_path: Path, ca: TestCA) -> None:
    renewer, switches, metrics = make(tmp_path, ca, [("refused", "bad certificate")], retry_min=100.0)
    from agent.renewal.rollover import RenewalError

    with pytest.raises(RenewalError, match="refused"):
        renewer.install(FakeSigner(ca)(renewer.make_csr()))
    assert switches == [] and renewer.pair.source == "configured"  # type: ignore[union-attr]
    assert renewer.state["failures"] == 1 and renewer.state["next_attempt"] > renewer._wall() + 99
    assert count(metrics, "probe_failed") == 1 and renewer.store.exists(REJECTED)


def test_no_broker_reachable_keeps_the_pair_pending_for_the_next_try(tmp_path: Path, ca: TestCA) -> None:
    renewer, switches, _ = make(tmp_path, ca, [("unreachable", "tcp"), ("ok", "accepted")])
    from agent.renewal.rollover import RenewalError

    with pytest.raises(RenewalError, match="stays pending"):
        renewer.install(FakeSigner(ca)(renewer.make_csr()))
    assert renewer.store.exists(PENDING)
    # A restart while pending: a new Renewer on the same state finds the pending pair and switches to it.
    renewer.state["next_attempt"] = 0.0
    renewer.store.write_state(renewer.state)
    again = Renewer(renewer.cfg, renewer.store, probe=lambda tls: ("ok", "accepted"),
                    switch=lambda tls, reason: switches.append(reason))
    again.tick()
    assert switches == ["renewed client certificate"] and again.pair is not None and again.pair.source == "renewed"


def test_the_previous_pair_is_kept_for_keep_previous_then_removed(tmp_path: Path, ca: TestCA) -> None:
    clock = [datetime.datetime.now(UTC).timestamp()]
    renewer, _, _ = make(tmp_path, ca, [("ok", "1"), ("ok", "2")], wall=clock, keep_previous=3600.0)
    renewer.install(FakeSigner(ca)(renewer.make_csr()))
    renewer.state["watch"] = None
    renewer.install(FakeSigner(ca)(renewer.make_csr()))
    assert renewer.store.exists(PREVIOUS)
    renewer.state["watch"] = None
    clock[0] += 3000
    renewer.tick()
    assert renewer.store.exists(PREVIOUS)
    clock[0] += 700
    renewer.tick()
    assert not renewer.store.exists(PREVIOUS)


@pytest.mark.parametrize("step", range(3))
def test_a_crash_at_any_step_of_a_switch_leaves_a_usable_pair(tmp_path: Path, ca: TestCA, step: int) -> None:
    """promote() is renames; stopping after any of them must select a valid pair (never a half-written one)."""
    renewer, _, _ = make(tmp_path, ca, [("ok", "1"), ("ok", "2")])
    renewer.install(FakeSigner(ca)(renewer.make_csr()))  # active = renewed #1
    renewer.accept_chain(FakeSigner(ca)(renewer.make_csr()), "test")  # pending = renewed #2
    store = renewer.store
    if step >= 1:
        store.path(ACTIVE).replace(store.path(PREVIOUS))
    if step >= 2:
        store.path(PENDING).replace(store.path(ACTIVE))
    now = datetime.datetime.now(UTC)
    pair = select_pair(store, renewer.cfg.tls, "dev-1", now)
    assert pair is not None
    from agent.tls.context import build_context

    build_context(pair.tls(renewer.cfg.tls))  # OpenSSL loads it: certificate and key belong together


def test_a_torn_pair_file_is_skipped_for_the_configured_one(tmp_path: Path, ca: TestCA) -> None:
    renewer, _, _ = make(tmp_path, ca, [("ok", "1")])
    renewer.install(FakeSigner(ca)(renewer.make_csr()))
    active = renewer.store.path(ACTIVE)
    active.write_bytes(active.read_bytes()[: len(active.read_bytes()) // 2])
    pair = select_pair(renewer.store, renewer.cfg.tls, "dev-1", datetime.datetime.now(UTC))
    assert pair is not None and pair.source == "configured"


def test_requests_not_due_force_and_the_command_signer(tmp_path: Path, ca: TestCA) -> None:
    """What `mqtt-agent renew` gets back, through the request file the renewal thread reads."""
    from agent.renewal.store import REQUEST

    renewer, switches, _ = make(tmp_path, ca, [])
    store = renewer.store
    store.ensure()
    store.path(REQUEST).write_text("renew\n")
    renewer.tick()
    answer = renewer.state["last_request"]
    # signer = "command": the backend drives renewal; the request is answered, not left lying around.
    assert answer["result"] == "waiting" and "cert.csr" in answer["message"]
    assert not store.exists(REQUEST) and switches == []


def test_a_request_is_answered_when_renewal_is_off(tmp_path: Path, ca: TestCA) -> None:
    from agent.renewal.store import REQUEST

    renewer, _, _ = make(tmp_path, ca, [], enabled=False)
    renewer.store.ensure()
    renewer.store.path(REQUEST).write_text("force\n")
    renewer.tick()
    assert renewer.state["last_request"]["result"] == "disabled"
    assert renewer.next_due() is None
