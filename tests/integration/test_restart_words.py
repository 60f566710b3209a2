"""A broker restart after an idle spell (issue 17, point 4): logged as what it was, not as a NAT."""

from __future__ import annotations

import json
import time

from agent.config import load_config
from agent.tools.send import send_command
from tests.support.outcomes import metrics_on, wait_metric


def test_a_broker_restart_after_idle_is_not_called_a_nat(broker, make_config, run_agent):
    port, metrics = metrics_on()
    cfg = make_config(broker, {"reconnect": {"min_delay": 0.2, "max_delay": 2.0}, **metrics})
    agent = run_agent(cfg)
    time.sleep(2.5)  # idle: no traffic for longer than any silence this link carried
    mark = agent.mark()
    broker.stop()
    wait_metric(port, "mqtt_agent_disconnects_total", 1, timeout=10, reason="refused")  # a refused attempt
    broker.start()
    agent.wait_for(r"subscribed to ", since=mark, timeout=15)  # synchronisation: no other signal
    # Operator interface: the explanation of the drop is what this issue is about (a restart, not a NAT).
    assert "NAT or firewall idle limit is likely" not in agent.output
    agent.wait_for(r"the broker was restarting or stopping when it dropped the last connection", since=mark,
                   timeout=1)
    state = json.loads((load_config(cfg).agent.state_dir / "connection-state.json").read_text())
    drop = next(d for d in state["disconnects"] if d.get("uptime_s") is not None)
    assert drop["reason"] == "network_error" and "restarting" in drop["note"]
    assert state["keepalive"]["current"] == 30  # nothing learned from a restart
    assert send_command(load_config(cfg), "ping", timeout=10).status == 200
