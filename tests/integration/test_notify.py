"""sd_notify with the real agent process against a real AF_UNIX datagram socket set as NOTIFY_SOCKET:
READY, STATUS on disconnect/reconnect, WATCHDOG cadence, pings withheld while the network loop or the
dispatcher is wedged (for real: the agent's log output stops being drained), STOPPING on SIGTERM."""

from __future__ import annotations

import re
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.tools.send import send_command
from tests.support.mosquitto import free_port
from tests.support.notify import NotifySocket
from tests.support.outcomes import metric, wait_metric
from tests.support.wedge import PausableAgent

pytestmark = pytest.mark.integration

WATCHDOG_SEC = 5.0  # as if WatchdogSec=5: pings every 2.5 s, stall limit 3 s
ENV_WATCHDOG = {"WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1e6))}


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_ready_status_watchdog_and_stopping(broker, make_config, run_agent, notify_socket):
    cfg = make_config(broker, {"agent": {"log_level": "debug"}})
    agent = run_agent(cfg, env={"NOTIFY_SOCKET": notify_socket.env_value, **ENV_WATCHDOG})
    # No other signal tells which sd_notify path was taken (both deliver the same datagrams).
    agent.wait_for(r"sd_notify through systemd-python to /")
    ready = notify_socket.wait_for("READY", "^1$")
    # READY does not wait for the broker: it says what the agent is doing at that moment.
    assert re.match(rf"^(connecting to|connected to) {re.escape(broker.address)}", ready.get("STATUS"))
    connected = rf"^connected to {re.escape(broker.address)} \(MQTT 3\.1\.1, keepalive 30 s\)$"
    notify_socket.wait_for("STATUS", connected)

    # A broker outage: STATUS says so, and the agent stays healthy (pings go on) while it reconnects.
    mark = notify_socket.mark()
    broker.stop()
    down_at = time.monotonic()
    notify_socket.wait_for("STATUS", r"^reconnecting in \d+(\.\d)? s: \w+$", since=mark)
    time.sleep(2 * WATCHDOG_SEC / 2 + 0.5)
    broker.start()
    up_at = time.monotonic()
    notify_socket.wait_for("STATUS", connected, since=mark)
    assert notify_socket.pings(down_at, up_at), "watchdog pings stopped during a broker outage"

    time.sleep(WATCHDOG_SEC / 2)
    assert agent.stop() == 0
    stopping = notify_socket.wait_for("STOPPING", "^1$")
    assert stopping.get("STATUS").startswith("stopping: waiting up to 5 s")
    assert stopping.get("EXTEND_TIMEOUT_USEC") == str(int((5.0 + 10.0) * 1e6))

    pings = notify_socket.pings(ready.at, stopping.at)
    assert notify_socket.pings(0, ready.at) == [], "WATCHDOG=1 before READY=1"
    assert len(pings) >= 4
    # Cadence: half of WatchdogSec, never so late that systemd would have restarted a healthy agent,
    # and not a tight loop either.
    assert max(gaps(pings)) < WATCHDOG_SEC
    assert min(gaps(pings)) > WATCHDOG_SEC / 2 * 0.8
    assert pings[0] - ready.at < WATCHDOG_SEC / 2 + 1.0


def _wedge_run(tmp_path: Path, cfg_path: Path, notify: NotifySocket, port: int,
               trigger: list[str], problem: str) -> PausableAgent:
    agent = PausableAgent(cfg_path, env={"NOTIFY_SOCKET": notify.env_value, **ENV_WATCHDOG}).start()
    try:
        agent.wait_for(r"subscribed to ", timeout=20)
        notify.wait_for("WATCHDOG", "^1$")
        cfg = load_config(cfg_path)
        mark = notify.mark()
        agent.pause_and_fill()
        for name in trigger:
            send_command(cfg, name, timeout=0.5)  # published; the answer is stuck behind the wedge
        unhealthy = notify.wait_for("STATUS", f"^unhealthy: {problem}", since=mark, timeout=20)
        # The process is alive and serving (its metrics endpoint answers), only its health is gone:
        # pings are withheld by judgement, not because everything froze.
        assert metric(port, "mqtt_agent_connected") == 1
        time.sleep(WATCHDOG_SEC + 1)
        assert notify.pings(unhealthy.at, time.monotonic()) == []
        agent.resume()
        recovered = notify.wait_for("STATUS", "^connected to ", since=notify.index_of(unhealthy) + 1)
        first_after = notify.wait_for("WATCHDOG", "^1$", since=notify.index_of(unhealthy) + 1)
        before = notify.pings(0, unhealthy.at)
        # systemd (WatchdogSec=5) would have restarted the agent during this gap.
        assert first_after.at - before[-1] > WATCHDOG_SEC
        assert first_after.at - recovered.at < 2.0
        return agent
    except BaseException:
        print(agent.output[-5000:])
        agent.kill()
        raise


def test_pings_stop_when_the_network_loop_is_wedged(tmp_path, broker, make_config, notify_socket):
    port = free_port()
    cfg = make_config(broker, {"metrics": {"listen": f"127.0.0.1:{port}"}})
    # An unknown command makes the network thread log a warning: with the output pipe full, it blocks there.
    agent = _wedge_run(tmp_path, cfg, notify_socket, port, ["no-such-command"],
                       r"the MQTT network loop has not run for \d+ s")
    # The command stuck behind the wedge is handled once the loop runs again.
    wait_metric(port, "mqtt_agent_commands_rejected_total", 1, reason="unknown_command")
    assert agent.stop() == 0


def test_pings_stop_when_the_dispatcher_is_wedged(tmp_path, broker, make_config, notify_socket):
    port = free_port()
    cfg = make_config(broker, {"metrics": {"listen": f"127.0.0.1:{port}"}, "limits": {"max_concurrent_commands": 1},
                               "commands.true": {"argv": ["/bin/true"]}})
    # The only worker blocks logging its first result (an exec command's answer is an info line); the second
    # command waits with no worker to run it, while the network loop (which does not log for accepted
    # commands) stays healthy.
    agent = _wedge_run(tmp_path, cfg, notify_socket, port, ["true", "true"],
                       r"1 command\(s\) waiting with a worker free, none started for \d+ s")
    # Only the dispatcher was judged unhealthy, never the network loop.
    assert not [s for s in notify_socket.statuses() if "network loop has not run" in s]
    # Both commands ran once the worker could log again.
    assert wait_metric(port, "mqtt_agent_commands_total", 2, command="true", status="200") == 2
    assert agent.stop() == 0


def test_without_systemd_python_on_an_abstract_socket(tmp_path, broker, make_config, run_agent):
    # The agent must talk to systemd where systemd-python is absent: hide it behind a package that fails
    # to import, exactly as on a system without it, and use the abstract-namespace form of NOTIFY_SOCKET.
    shim = tmp_path / "no-systemd-python" / "systemd"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('systemd-python is not installed (test shim)')\n")
    notify = NotifySocket(tmp_path, abstract=True)
    try:
        assert notify.env_value.startswith("@")
        cfg = make_config(broker, {"agent": {"log_level": "debug"}})
        agent = run_agent(cfg, env={"NOTIFY_SOCKET": notify.env_value, **ENV_WATCHDOG, "PYTHONPATH": str(shim.parent)})
        agent.wait_for(r"sd_notify through a plain AF_UNIX socket to @")
        notify.wait_for("READY", "^1$")
        notify.wait_for("STATUS", f"^connected to {re.escape(broker.address)}")
        notify.wait_for("WATCHDOG", "^1$")
        agent.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "^1$")
        assert reloading.get("MONOTONIC_USEC").isdigit()
        assert agent.stop() == 0
        notify.wait_for("STOPPING", "^1$")
    finally:
        notify.close()


def test_watchdog_abort_leaves_every_thread_stack_in_the_log(broker, make_config, run_agent):
    # systemd's watchdog ends a wedged agent with SIGABRT (WatchdogSignal=): the journal must then show
    # where each thread was.
    # faulthandler walks the other threads' frames without locking them (its documented limitation), so on
    # a busy machine a dump can, rarely, crash half-way with SIGSEGV: allow up to three attempts.
    config = make_config(broker)
    for attempt in range(3):
        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))  # inherited: no core file in the checkout
        try:
            agent = run_agent(config)
        finally:
            resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
        rc = agent.stop(signal.SIGABRT)
        if rc == -signal.SIGSEGV and "Fatal Python error: Segmentation fault" in agent.output and attempt < 2:
            continue
        break
    assert rc == -signal.SIGABRT
    # Operator interface: faulthandler's dump in the journal is what the operator reads after a watchdog
    # abort. The network thread's frames are somewhere under agent/connection/ (which module may move).
    assert agent.count(r"^Thread 0x[0-9a-f]+ \(most recent call first\):$") >= 3
    assert agent.count(r'File ".*agent/connection/[\w/]+\.py", line \d+ in ') >= 1
