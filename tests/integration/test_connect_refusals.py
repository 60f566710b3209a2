"""MQTT 5 against a broker that speaks only 3.1.1 (issue 17, point 2): RabbitMQ 3.10 closes the socket
after the CONNECT, amqtt never answers. `send` and `run` report the connection failure as such and name
mqtt.protocol = "3.1.1". The listeners here reproduce those two behaviours on loopback (the brokers
themselves are in the interop suite)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from agent.config import load_config
from agent.errors import AgentError
from agent.tools.send import send_command
from tests.support.outcomes import metrics_on, scrape, wait_metric

FIX = 'set mqtt.protocol = "3.1.1"'


class Listener:
    """Accepts MQTT connections, reads the CONNECT, then closes (`close=True`) or stays silent."""

    def __init__(self, close: bool) -> None:
        self.close_after_connect = close
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.connects = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(5)
            try:
                if conn.recv(1)[:1] == b"\x10":  # CONNECT
                    self.connects += 1
            except OSError:
                pass
            if self.close_after_connect:
                conn.close()
            else:
                self.held.append(conn)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2)
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def listener(request) -> Iterator[Listener]:
    srv = Listener(close=request.param)
    yield srv
    srv.stop()


def config(make_config, port: int, protocol: str, metrics: dict | None = None, **mqtt: object):
    return make_config(None, {"mqtt": {"hosts": [f"127.0.0.1:{port}"], "protocol": protocol, **mqtt},
                              "tls": {"enabled": False, "ca_file": None, "cert_file": None, "key_file": None},
                              **(metrics or {})})


@pytest.mark.parametrize(("listener", "words"), [(True, "the connection closed before the broker's CONNACK"),
                                                 (False, "no CONNACK from 127.0.0.1:")], indirect=["listener"])
def test_send_reports_the_connection_failure_and_names_the_protocol(listener, words, make_config):
    cfg = config(make_config, listener.port, "5", connect_timeout=1.0)
    with pytest.raises(AgentError) as err:
        send_command(load_config(cfg), "ping", timeout=5)
    assert words in str(err.value) and str(err.value).endswith(FIX)
    assert listener.connects >= 1


@pytest.mark.parametrize("listener", [True], indirect=True)
def test_send_on_311_does_not_blame_the_protocol(listener, make_config):
    cfg = config(make_config, listener.port, "3.1.1")
    with pytest.raises(AgentError) as err:
        send_command(load_config(cfg), "ping", timeout=5)
    assert "closed before the broker's CONNACK" in str(err.value) and FIX not in str(err.value)


@pytest.mark.parametrize("listener", [True], indirect=True)
def test_run_logs_the_protocol_fix(listener, make_config, run_agent):
    port, metrics = metrics_on()
    agent = run_agent(config(make_config, listener.port, "5", metrics), wait_subscribed=False)
    # Operator interface: the log line is the explanation and names the fix (mqtt.protocol).
    line = agent.wait_for(r"network_error: the connection closed before the broker's CONNACK.*", timeout=15)
    assert line.group(0).rstrip().endswith(FIX), line.group(0)
    # Classified as a network error, never as a takeover or an idle limit.
    assert wait_metric(port, "mqtt_agent_disconnects_total", 1, reason="network_error") >= 1
    samples = scrape(port)
    for reason in ("session_taken_over", "idle_timeout"):
        assert samples[("mqtt_agent_disconnects_total", (("reason", reason),))] == 0
