"""Issue 17, point 8: the loss of the RabbitMQ 4.0 cluster node the agent is on.

Three nodes on one machine, MQTT sessions on quorum queues (see RabbitMQCluster for the settings and
what happens without them). With mqtt.hosts naming all three and otherwise default reconnect
settings, the node the agent is connected to is SIGKILLed while QoS 1 commands keep arriving through
another node. Every command the broker acknowledged must run exactly once and be answered; the agent
must be serving again within a bounded time (the measured figure is printed; the issue's target on
loopback is <= 5 s, asserted loosely so a loaded CI box does not flake).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import PKI
from tests.support.agentproc import AgentProcess
from tests.support.brokers import trixie
from tests.support.brokers.rabbitmq import RabbitMQCluster
from tests.support.mqttclient import TestClient
from tests.support.outcomes import info

pytestmark = [pytest.mark.timeout(240), pytest.mark.roots("trixie")]  # RabbitMQ 4.0

COMMANDS = 120
INTERVAL = 0.05  # s between publishes: the kill lands while commands are in flight
KILL_AFTER = 30  # commands published before the node dies
SERVING_BOUND = 30.0  # s; generous against a loaded box (measured on loopback: see the printed figure)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[RabbitMQCluster]:
    why = trixie.unavailable()
    if why:
        pytest.fail(why)
    c = RabbitMQCluster(tmp_path_factory.mktemp("cluster"), ca=pki.ca.cert_path, cert=pki.broker.cert,
                        key=pki.broker.key)
    with c:
        yield c


def test_point8_node_loss_moves_the_agent_and_loses_or_doubles_no_command(
        cluster: RabbitMQCluster, make_config: Callable[..., Path], run_agent: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    counter = tmp_path / "runs.txt"
    cfg = make_config(None, {
        "mqtt": {"hosts": cluster.addresses, "keepalive": None},
        "reconnect": None,  # the defaults: the target is for default settings
        "commands.count": {"argv": ["/bin/sh", "-c", f'echo "$MQTT_AGENT_REQ_ID" >> {counter}']},
    }, name="agent")
    agent = run_agent(cfg)
    doomed = cluster.node_on(info(cfg)["broker"])  # the node the agent is connected to
    other = next(a for a in cluster.addresses if a != doomed.address)
    side = make_config(None, {"mqtt": {"hosts": [other]}}, name="side")
    watcher = TestClient(side, subscribe="command///res/#")
    sender = TestClient(side)

    rids = [f"c{i:03d}" for i in range(COMMANDS)]
    killed_at: list[float] = []
    publish_errors: list[Any] = []

    def publish_all() -> None:
        for i, rid in enumerate(rids):
            if i == KILL_AFTER:
                killed_at.append(time.monotonic())
                threading.Thread(target=doomed.kill, daemon=True).start()
            try:
                sender.publish(f"command///req/{rid}/count")  # waits for the broker's PUBACK
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                publish_errors.append((rid, exc))
            time.sleep(INTERVAL)

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    publisher.join(120)
    assert not publisher.is_alive() and not publish_errors, publish_errors
    deadline = time.monotonic() + 90
    while len({m.topic.split("/")[4] for m in watcher.messages}) < COMMANDS and time.monotonic() < deadline:
        time.sleep(0.2)
    messages = list(watcher.messages)

    answered = collections.Counter(m.topic.split("/")[4] for m in messages)  # command///res/<rid>/<status>
    statuses = {m.topic.split("/")[5] for m in messages}
    executed = collections.Counter(counter.read_text().split())
    assert set(executed) == set(rids), sorted(set(rids) - set(executed))  # nothing lost
    assert [r for r, n in executed.items() if n != 1] == []  # nothing run twice
    assert set(answered) == set(rids) and statuses == {"200"}

    now = info(side)  # through a surviving node
    assert now["broker"] in cluster.addresses and now["broker"] != doomed.address, now  # on a surviving node now
    assert now["connects"] >= 2, now
    # Serving again: the first response published by the agent after the kill, as the watcher saw it.
    first_after = min(m.timestamp for m in messages if m.timestamp > killed_at[0])
    serving_again = first_after - killed_at[0]
    print(f"point 8: serving again {serving_again:.2f} s after the node was killed; "
          f"{COMMANDS} commands, each run once")
    assert serving_again < SERVING_BOUND, agent.output
    watcher.close()
    sender.close()
