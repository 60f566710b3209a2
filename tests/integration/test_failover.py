"""Failover between brokers in mqtt.hosts (issue 17, point 8): after the host the agent is on dies, the
next host is tried at once, not after the backoff built up against the dead one."""

from __future__ import annotations

import time

from agent.config import load_config
from agent.errors import AgentError
from agent.tools.send import send_command
from tests.support.outcomes import info

# The target is 5 s from a node's loss to serving again on loopback with default settings (typically
# about 2 s here: the reconnect delay of up to 2 s, one refused connect, a failover delay of <= 1 s).
# The bound has a margin for a loaded 2-core box; the old behaviour (backoff carried over) took 6-11 s.
BOUND = 8.0


def test_losing_the_first_broker_serves_again_from_the_second_within_seconds(make_broker, make_config,
                                                                              run_agent):
    first, second = make_broker(), make_broker()
    # reconnect: None drops the fixture's short test delays: the default policy (min 1 s, max 120 s) is measured.
    cfg = make_config(first, {"mqtt": {"hosts": [first.address, second.address]}, "reconnect": None})
    agent = run_agent(cfg)
    assert send_command(load_config(cfg), "ping", timeout=10).status == 200
    # Up for a while, as in a fleet: this connection ends by the broker's loss, not by a flap.
    time.sleep(1.0)
    first.kill()
    lost = time.monotonic()
    answered_at = None
    cfg_loaded = load_config(cfg)
    while time.monotonic() - lost < 30:
        try:
            result = send_command(cfg_loaded, "ping", timeout=0.5)
        except AgentError:
            result = None
        if result is not None and result.status == 200:
            answered_at = time.monotonic()
            break
    assert answered_at is not None, agent.output
    assert info(cfg)["broker"] == second.address  # served by the second broker now
    took = answered_at - lost
    print(f"served again {took:.2f} s after the loss")
    assert took <= BOUND, f"serving again took {took:.1f} s after the first broker's loss"
