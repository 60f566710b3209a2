"""Gateway pairs: two real agents in one MQTT 5 shared subscription group on a real mosquitto (2.0.11 on
Debian 12), commands from a raw client, outcomes counted on the wire, in an exec ledger, in the broker's
log and in each member's metrics.

What a pair guarantees (docs/connection.md, "Gateway pairs"): each command is delivered to one member;
within a member the journal dedupes redeliveries; mosquitto 2.0 never hands a dead member's commands to
the other member (MQTT 5 section 4.8.2 allows either), so with a persistent session nothing runs twice
and the dead member's share waits for it, and with session_expiry = 0 the survivor serves everything
published after the death, and what the broker had sent the dead member unacknowledged is gone.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from tests.support.agentproc import AgentProcess
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.mqttclient import TestClient
from tests.support.outcomes import metric, wait_until

GROUP = "site-a"
MEMBERS = ("gw-a", "gw-b")
COMMANDS = 200


def ledger_command(ledger: Path, member: str) -> dict[str, Any]:
    """An exec command that appends `REQ_ID member` to a shared ledger (one short O_APPEND write per
    execution, so lines never interleave) and answers with the member's name."""
    script = f'printf "%s {member}\\n" "$MQTT_AGENT_REQ_ID" >> {ledger}; printf {member}'
    return {"argv": ["/bin/sh", "-c", script], "timeout": 10.0}


def pair_config(make_config: Callable[..., Path], broker: Mosquitto, ledger: Path, member: str,
                **mqtt: Any) -> tuple[Path, int]:
    port = free_port()
    cfg = make_config(broker, {
        "agent": {"device_id": member},
        "mqtt": {"protocol": "5", "client_id": member, "shared_group": GROUP, **mqtt},
        "commands.ledger": ledger_command(ledger, member),
        # Room for a member's whole share at once (the broker hands it over faster than /bin/sh runs): the
        # tests count where commands ran, not how the queue limit answers 429 (tests/test_dispatch.py does).
        "limits": {"max_queued_commands": COMMANDS},
        "metrics": {"listen": f"127.0.0.1:{port}"},
    }, name=member)
    return cfg, port


def executions(ledger: Path) -> Counter[tuple[str, str]]:
    """(req id, member) -> times the handler ran there."""
    if not ledger.exists():
        return Counter()
    return Counter(tuple(line.split()) for line in ledger.read_text().splitlines())  # type: ignore[misc]


def answers(client: TestClient) -> Counter[str]:
    """req id -> responses seen on command///res/REQ_ID/STATUS."""
    return Counter(m.topic.split("/")[4] for m in list(client.messages))


def statuses(client: TestClient) -> Counter[str]:
    return Counter(m.topic.split("/")[5] for m in list(client.messages))


def served_by(client: TestClient) -> dict[str, str]:
    return {m.topic.split("/")[4]: m.payload.decode() for m in list(client.messages) if m.topic.endswith("/200")}


def publish_all(client: TestClient, ids: list[str], pause: float = 0.0) -> None:
    for rid in ids:
        client.publish(f"command///req/{rid}/ledger", rid.encode())
        if pause:
            time.sleep(pause)


def broker_sent(broker: Mosquitto, member: str) -> set[str]:
    """Request ids mosquitto (log_type all) logged as sent to `member`, first sends and resends alike."""
    rx = re.compile(rf"Sending PUBLISH to {re.escape(member)} \(d\d, q1, r0, m\d+, 'command///req/([^/']+)/ledger'")
    return set(rx.findall(broker.log_text()))


def start_pair(make_broker: Callable[..., Mosquitto], make_config: Callable[..., Path],
               run_agent: Callable[..., AgentProcess], tmp_path: Path, **mqtt: Any
               ) -> tuple[Mosquitto, Path, dict[str, tuple[Path, int, AgentProcess]], TestClient]:
    broker = make_broker(extra=["log_type all"])
    ledger = tmp_path / "ledger"
    members = {}
    for member in MEMBERS:
        cfg, port = pair_config(make_config, broker, ledger, member, **mqtt)
        proc = run_agent(cfg)
        members[member] = (cfg, port, proc)
    for _, _, proc in members.values():
        proc.wait_for(rf"subscribed to \$share/{GROUP}/command///req/#")
    client = TestClient(members["gw-a"][0], subscribe="command///res/#", protocol="5")
    return broker, ledger, members, client


def test_two_members_split_200_commands_and_each_is_answered_once(make_broker, make_config, run_agent, tmp_path):
    broker, ledger, members, client = start_pair(make_broker, make_config, run_agent, tmp_path)
    ids = [f"r{i}" for i in range(COMMANDS)]
    publish_all(client, ids)
    client.wait(COMMANDS, timeout=60)
    time.sleep(0.5)  # a second answer to anything would arrive by now
    assert answers(client) == Counter({rid: 1 for rid in ids})
    assert statuses(client) == Counter({"200": COMMANDS})
    ran = executions(ledger)
    assert sorted(rid for rid, _ in ran) == sorted(ids) and set(ran.values()) == {1}
    by_member = Counter(member for _, member in ran)
    assert set(by_member) == set(MEMBERS), f"one member served nothing: {by_member}"
    # The response body names the member that ran it: the ledger and the wire agree.
    assert served_by(client) == {rid: member for rid, member in ran}
    # And so does the broker: it sent each command to one member only.
    for member in MEMBERS:
        assert broker_sent(broker, member) == {rid for rid, m in ran if m == member}
    # Each member's own counter holds its share; the info metric names the group for a join.
    for member, (_, port, _) in members.items():
        assert metric(port, "mqtt_agent_shared_group_info", group=GROUP) == 1.0
        assert metric(port, "mqtt_agent_commands_total", command="ledger", status="200") == by_member[member]
    client.close()


def kill_under_load(broker: Mosquitto, ledger: Path, members: dict[str, tuple[Path, int, AgentProcess]],
                    client: TestClient) -> tuple[list[str], set[str]]:
    """Publish COMMANDS commands paced over ~1-3 s; SIGKILL gw-a once it has run 20 of them.
    Returns (ids, what the broker had sent gw-a when it died)."""
    ids = [f"r{i}" for i in range(COMMANDS)]
    publisher = threading.Thread(target=publish_all, args=(client, ids, 0.005), daemon=True)
    publisher.start()
    wait_until(lambda: sum(1 for _, m in executions(ledger) if m == "gw-a") >= 20, 30, "gw-a ran 20 commands")
    members["gw-a"][2].kill()
    before = broker_sent(broker, "gw-a")
    # The kernel resets the killed process's connection: the broker notices at once.
    wait_until(lambda: re.search(r"Client gw-a .*(closed its connection|disconnected)", broker.log_text())
               is not None, 10, "the broker saw gw-a go")
    publisher.join(60)
    assert not publisher.is_alive()
    assert len(before) < len(ids), "gw-a was killed after the load ended"
    return ids, before


def test_sigkilled_member_with_a_persistent_session_keeps_its_share_and_nothing_runs_twice(
        make_broker, make_config, run_agent, tmp_path):
    broker, ledger, members, client = start_pair(make_broker, make_config, run_agent, tmp_path)
    ids, sent_to_a_before_kill = kill_under_load(broker, ledger, members, client)
    sent_to_b = broker_sent(broker, "gw-b")
    wait_until(lambda: set(answers(client)) >= sent_to_b, 30, "gw-b answered all it was sent")
    time.sleep(0.5)
    # mosquitto 2.0.11 goes on handing gw-a every other command while gw-a is gone (its session persists):
    # the survivor serves its own share only, gw-a's share waits in gw-a's session and journal.
    waiting = set(ids) - set(answers(client))
    assert waiting, "expected gw-a's share to wait for gw-a (mosquitto 2.0.11 queues it in gw-a's session)"
    assert not waiting & sent_to_b
    assert not waiting & {rid for rid, member in executions(ledger) if member == "gw-b"}
    # gw-a, restarted as systemd would, serves what waited for it: from the broker's queue, and from its
    # journal what it had taken before the kill.
    proc = AgentProcess(members["gw-a"][0]).start()
    try:
        wait_until(lambda: set(answers(client)) >= set(ids), 60, "every command answered")
        time.sleep(0.5)
        ran = executions(ledger)
        twice = {rid for rid, n in Counter(rid for rid, _ in ran).items() if n > 1}
        assert twice == set(), f"ran twice: {sorted(twice)}"
        assert {rid for rid in ids if (rid, "gw-a") in ran and (rid, "gw-b") in ran} == set()
        # Every command ran, except those gw-a was running when it was killed: answered 500 ("interrupted")
        # at its restart, never run again; at most limits.max_concurrent_commands (4) of them.
        not_run = set(ids) - {rid for rid, _ in ran}
        interrupted = {m.topic.split("/")[4] for m in client.messages if m.topic.endswith("/500")}
        assert not_run <= interrupted, f"answered but not run: {sorted(not_run - interrupted)}"
        assert interrupted <= sent_to_a_before_kill and len(interrupted) <= 4
        assert set(statuses(client)) <= {"200", "500"}
        # Responses: at least once each. What gw-a had in flight when it died comes back to it after the
        # restart (the broker redelivers what gw-a had not acknowledged, the outbox resends what the broker
        # had not acknowledged): answered again from the journal, with the same answer, never run again.
        repeated = {rid for rid, n in answers(client).items() if n > 1}
        assert repeated <= sent_to_a_before_kill
        for rid in repeated:
            copies = {(m.topic, bytes(m.payload)) for m in client.messages if m.topic.split("/")[4] == rid}
            assert len(copies) == 1, f"{rid} was answered differently: {copies}"
        print(f"persistent session: gw-b served {len(sent_to_b)}, {len(waiting)} waited for gw-a's restart; "
              f"interrupted {len(interrupted)}, answered twice {len(repeated)}, ran twice 0")
    finally:
        proc.stop()
        client.close()


def test_sigkilled_member_without_a_session_leaves_the_rest_to_the_survivor(
        make_broker, make_config, run_agent, tmp_path):
    broker, ledger, members, client = start_pair(make_broker, make_config, run_agent, tmp_path, session_expiry=0)
    ids, _ = kill_under_load(broker, ledger, members, client)
    # With session_expiry = 0 the broker ends gw-a's session, subscription included, when the connection
    # drops: from then on everything goes to gw-b.
    log = broker.log_text()
    gone = re.search(r"Client gw-a .*(closed its connection|disconnected)", log)
    assert gone is not None
    assert "Sending PUBLISH to gw-a" not in log[gone.end():], "the broker sent gw-a commands after it was gone"
    sent_to_a, sent_to_b = broker_sent(broker, "gw-a"), broker_sent(broker, "gw-b")
    assert not sent_to_a & sent_to_b, "a command reached both members"
    assert len(sent_to_b) > COMMANDS // 2, "the survivor did not take over"
    # mosquitto 2.0.11 may route a command to the dying member in the instant between the end of its
    # connection and the end of its session, and then discard it with the session: received, sent to no one.
    nowhere = set(ids) - sent_to_a - sent_to_b
    wait_until(lambda: set(answers(client)) >= sent_to_b, 30, "gw-b answered all it was sent")
    assert all(served_by(client)[rid] == "gw-b" for rid in sent_to_b)
    time.sleep(0.5)
    # What the broker had handed gw-a, mosquitto 2.0.11 never hands to gw-b (MQTT 5 section 4.8.2 allows
    # either): what gw-a had journalled waits in its journal for its next start; what it had not yet
    # acknowledged is gone with its session.
    unanswered = set(ids) - set(answers(client))
    assert unanswered <= sent_to_a | nowhere
    journalled = journal_keys(members["gw-a"][0])
    lost = {rid for rid in unanswered if f"//{rid}" not in journalled}
    assert nowhere <= lost
    # Bounded by the broker's in-flight window to one client (mosquitto max_inflight_messages, default 20)
    # and the instant of the death.
    assert len(lost) <= 20 + 2
    proc = AgentProcess(members["gw-a"][0]).start()
    try:
        wait_until(lambda: set(answers(client)) >= set(ids) - lost, 30, "gw-a answered what it had journalled")
        time.sleep(0.5)
        assert set(ids) - set(answers(client)) == lost
        ran = executions(ledger)
        assert set(Counter(rid for rid, _ in ran).values()) == {1}, "something ran twice"
        print(f"session_expiry 0: gw-b served {len(sent_to_b)}, gw-a was sent {len(sent_to_a)} "
              f"({len(unanswered - lost)} of them waited in its journal), {len(lost)} lost with its session "
              f"({len(nowhere)} of them sent to no one), "
              f"ran twice 0")
    finally:
        proc.stop()
        client.close()


def journal_keys(cfg: Path) -> set[str]:
    """TENANT/DEVICE/REQ_ID of the dedupe keys (TENANT/DEVICE/REQ_ID/COMMAND) in a member's command journal."""
    from agent.config import load_config

    state = load_config(cfg).agent.state_dir
    out = subprocess.run([sys.executable, "-c", (
        "import sqlite3,sys; db=sqlite3.connect(sys.argv[1]); "
        "print('\\n'.join(r[0] for r in db.execute('select key from commands')))"),
        str(state / "state.sqlite3")], capture_output=True, text=True, check=True)
    return {key.rsplit("/", 1)[0] for key in out.stdout.split()}


def test_mqtt_311_with_shared_group_is_a_config_error_naming_the_key(make_config, tmp_path):
    cfg = make_config(None, {"mqtt": {"protocol": "3.1.1", "shared_group": GROUP}})
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 78
    assert ("mqtt.shared_group: needs MQTT 5 (shared subscriptions do not exist in MQTT 3.1.1): set "
            "mqtt.protocol = \"5\" or remove mqtt.shared_group (got 'site-a')") in proc.stderr


def test_doctor_checks_the_shared_subscription_without_joining_the_agents_group(
        make_broker, make_config, run_agent, tmp_path):
    from agent.tools.doctor import run_doctor

    broker, ledger, members, client = start_pair(make_broker, make_config, run_agent, tmp_path)
    report = run_doctor(members["gw-a"][0], timeout=5.0, service_user=None)
    (check,) = [c for c in report.checks if c.number == 8]
    assert check.status == "ok", check
    subscription = f"$share/{GROUP}.{report.probe_client_id}/command///req/#"
    assert check.details["subscription"] == subscription
    assert check.details["suback"] == 1 and check.details["delivery"] == "delivered"
    assert check.summary.startswith(f"shared subscription {subscription} granted QoS 1 (SUBACK 0x01)")
    # What the broker saw: the doctor subscribed in a group of its own, never in the agents' group, so
    # it cannot have taken a member's command.
    subscribes = re.findall(rf"^\S+ {re.escape(report.probe_client_id)} 1 (\S+)$", broker.log_text(), re.M)
    assert subscribes == [subscription]
    # The members still serve every command.
    ids = [f"d{i}" for i in range(10)]
    publish_all(client, ids)
    client.wait(len(ids), timeout=30)
    assert set(answers(client)) == set(ids) and {m for _, m in executions(ledger)} <= set(MEMBERS)
    client.close()
