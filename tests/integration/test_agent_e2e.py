"""The agent as operators run it: a real `mqtt-agent run` process, a real mosquitto with mutual TLS,
commands sent with `mqtt-agent send` (in-process) or raw MQTT clients, outcomes checked on the wire."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.mqttclient import TestClient
from tests.support.outcomes import info, metrics_on, script, send, wait_metric, wait_until


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_one_way_command_runs_and_nothing_is_published(broker, make_config, run_agent, tmp_path):
    marker = tmp_path / "ran"
    port, metrics = metrics_on()
    cfg = make_config(broker, {"commands.touch": {"argv": ["/usr/bin/touch", str(marker)]}, **metrics})
    run_agent(cfg)
    watcher = TestClient(cfg, subscribe="command///res/#")
    result = send(cfg, "touch", one_way=True)
    assert result.status is None and result.topic == "command///req//touch"
    wait_until(marker.exists)
    # Executed and counted as a 200, but no response published (one-way: no response topic).
    wait_metric(port, "mqtt_agent_commands_total", 1, command="touch", status="200")
    time.sleep(0.3)
    assert watcher.messages == []
    watcher.close()


def test_gateway_routes_a_command_for_a_child_device(broker, make_config, run_agent):
    cfg = make_config(broker, {"mqtt": {"command_topic": "command//+/req/#"}})
    run_agent(cfg)
    result = send(cfg, "ping", device="sensor-7")
    assert result.status == 200
    assert json.loads(result.body)["device_id"] == "sensor-7"
    assert result.topic.startswith("command//sensor-7/res/")


def test_sha1_client_certificate_needs_security_level_0(make_broker, make_config, run_agent, pki):
    sha1 = pki.ca.issue("dev-1", sha1=True, filename="device-sha1")
    broker = make_broker(extra=["ciphers DEFAULT:@SECLEVEL=0"])  # the broker must accept SHA1 too
    tls = {"cert_file": str(sha1.cert), "key_file": str(sha1.key)}
    bad = make_config(broker, {"tls": tls})
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(bad)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 78
    assert ("client certificate device-sha1.pem is signed with sha1WithRSAEncryption, which OpenSSL security "
            "level 2 rejects (ca md too weak): set tls.security_level = 0 or reissue the certificate with SHA-256"
            ) in proc.stderr
    good = make_config(broker, {"tls": {**tls, "security_level": 0}})
    run_agent(good)
    assert send(good, "ping").status == 200


def test_broker_name_mismatch_and_both_fixes(make_broker, make_config, run_agent, pki):
    named = pki.ca.issue("broker.test", sans=["broker.test"], server=True, filename="broker-test")
    broker = make_broker(server=named)
    agent = run_agent(make_config(broker), wait_subscribed=False)
    # Operator interface: the log line is the explanation a gateway operator reads (key and fix).
    line = agent.wait_for(r"TLS handshake with .* failed: .*")
    assert (f"host name verification failed: the broker certificate at {broker.address} is issued for "
            "broker.test, not for 127.0.0.1: set tls.server_name = \"broker.test\"") in line.group(0)
    assert "or, weaker, tls.insecure = true" in line.group(0)
    agent.stop()

    by_name = make_config(broker, {"tls": {"server_name": "broker.test"}})
    run_agent(by_name)
    assert send(by_name, "ping").status == 200

    insecure = make_config(broker, {"tls": {"insecure": True}})
    agent = run_agent(insecure)
    # Operator interface: the warning names the key that weakens verification.
    agent.wait_for(r"tls.insecure = true: the broker's host name is not verified")
    assert send(insecure, "ping").status == 200


def test_untrusted_broker_is_refused_with_the_reason(make_broker, make_config, run_agent, tmp_path):
    from tests.support.pki import TestCA

    rogue = TestCA(tmp_path / "rogue", "rogue CA")
    server = rogue.issue("localhost", sans=["127.0.0.1"], server=True, filename="rogue-broker")
    broker = make_broker(server=server)
    agent = run_agent(make_config(broker), wait_subscribed=False)
    # Operator interface: the explanation names the key (tls.ca_file) and the issuer found.
    line = agent.wait_for(r"TLS handshake with .* failed: .*").group(0)
    assert "is not signed by a CA in tls.ca_file" in line and "(issuer: CN=rogue CA)" in line


@pytest.fixture
def error_agent(broker, make_config, run_agent, tmp_path):
    plugins = tmp_path / "plugins"
    (plugins / "mqtt_agent_testplugins-1.0.dist-info").mkdir(parents=True)
    (plugins / "mqtt_agent_testplugins-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mqtt-agent-testplugins\nVersion: 1.0\n")
    (plugins / "mqtt_agent_testplugins-1.0.dist-info" / "entry_points.txt").write_text(
        "[mqtt_agent.handlers]\ncrash = mqtt_agent_testplugins:crash\nhang = mqtt_agent_testplugins:Hang\n")
    (plugins / "mqtt_agent_testplugins.py").write_text(textwrap.dedent("""
        import time
        from agent.protocol import Response

        class Crash:
            def handle(self, request):
                raise ValueError("plugin bug")

        class Hang:
            timeout = 0.5

            def handle(self, request):
                time.sleep(3)
                return Response.ok({})

        crash = Crash()
    """))
    cfg = make_config(broker, {
        "limits": {"max_concurrent_commands": 1, "max_queued_commands": 0, "max_payload_bytes": 100,
                   "max_command_age": 1.0},
        "commands.fail": {"argv": [script(tmp_path, "fail.sh", "echo 'no space left' >&2\nexit 4\n")]},
        "commands.slow": {"argv": ["/bin/sleep", "1.5"]},
        "commands.sleepy": {"argv": ["/bin/sleep", "10"], "timeout": 0.5},
    })
    env = {"PYTHONPATH": f"{plugins}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return cfg, run_agent(cfg, env=env)


def test_every_error_status_from_a_real_command(error_agent):
    cfg, agent = error_agent
    assert send(cfg, "ping", b"not json").status == 400
    r = send(cfg, "reboot-now")
    assert r.status == 404 and "unknown command 'reboot-now'" in json.loads(r.body)["error"]
    r = send(cfg, "ping", b"{" + b" " * 200 + b"}")
    assert r.status == 413 and "over limits.max_payload_bytes (100)" in json.loads(r.body)["error"]
    r = send(cfg, "fail")
    assert r.status == 500 and json.loads(r.body) == {
        "error": "command 'fail' exited with status 4", "exit_status": 4, "stderr": "no space left\n"}
    r = send(cfg, "crash")
    body = json.loads(r.body)
    assert r.status == 500 and body["error"] == "internal error in command 'crash'"
    agent.wait_for(rf"error id {body['error_id']}\): ValueError: plugin bug")
    r = send(cfg, "sleepy")
    assert r.status == 504
    assert json.loads(r.body)["error"] == "command 'sleepy' did not finish within 0.5 s; killed 1 process"
    r = send(cfg, "hang")
    assert r.status == 504 and json.loads(r.body)["error"] == "command 'hang' did not finish within 0.5 s"
    assert send(cfg, "ping").status == 200  # still serving after two timeouts

    # 429 and 410 need a busy worker: `slow` occupies the only one for 1.5 s.
    watcher = TestClient(cfg, subscribe="command///res/#")
    watcher.publish("command///req/busy/slow")
    time.sleep(0.3)
    watcher.publish("command///req/extra/ping")  # no queue room: 429 at once
    replies = {m.topic for m in watcher.wait(1)}
    assert replies == {"command///res/extra/429"}
    watcher.close()


def test_command_older_than_max_command_age_is_answered_410(broker, make_config, run_agent):
    cfg = make_config(broker, {"limits": {"max_concurrent_commands": 1, "max_command_age": 0.5},
                               "commands.slow": {"argv": ["/bin/sleep", "1.2"]},
                               "commands.quick": {"argv": ["/bin/true"]}})
    run_agent(cfg)
    watcher = TestClient(cfg, subscribe="command///res/#")
    watcher.publish("command///req/first/slow")
    # (not ping: an inline handler needs no worker, so it never waits behind a busy one)
    watcher.publish("command///req/second/quick")  # waits 1.2 s for the worker: too old by then
    topics = sorted(m.topic for m in watcher.wait(2))
    assert topics == ["command///res/first/200", "command///res/second/410"]
    body = json.loads(next(m.payload for m in watcher.messages if m.topic.endswith("/410")))
    assert "older than limits.max_command_age (0.5 s)" in body["error"]
    watcher.close()


def test_command_sent_while_the_agent_is_down_runs_exactly_once(broker, make_config, run_agent, tmp_path):
    counter = tmp_path / "count.log"
    cfg = make_config(broker, {"commands.count": {"argv": ["/bin/sh", "-c", f"echo run >> {counter}; echo ok"]}})
    first = run_agent(cfg)  # establishes the persistent session and its subscription
    assert first.stop() == 0
    watcher = TestClient(cfg, subscribe="command///res/#")
    sender = TestClient(cfg)
    sender.publish("command///req/offline-1/count")  # QoS 1, queued by the broker for the agent
    second = run_agent(cfg)
    assert [m.topic for m in watcher.wait(1)] == ["command///res/offline-1/200"]
    assert second.stop() == 0
    run_agent(cfg).stop()  # a further restart must not run it again
    assert count_lines(counter) == 1
    assert len(watcher.messages) == 1
    watcher.close()
    sender.close()


def test_same_req_id_twice_runs_once_and_is_answered_twice(broker, make_config, run_agent, tmp_path):
    counter = tmp_path / "count.log"
    cfg = make_config(broker, {"commands.count": {"argv": ["/bin/sh", "-c", f"echo run >> {counter}; echo ok"]}})
    agent = run_agent(cfg)
    a = send(cfg, "count", req_id="dup-1")
    b = send(cfg, "count", req_id="dup-1")
    assert (a.status, a.body) == (b.status, b.body) == (200, b"ok\n")
    assert count_lines(counter) == 1
    assert info(cfg)["commands"]["duplicates"] == 1  # answered from the journal, not run
    # The record survives a restart of the agent.
    agent.stop()
    run_agent(cfg)
    c = send(cfg, "count", req_id="dup-1")
    assert (c.status, c.body) == (200, b"ok\n")
    assert count_lines(counter) == 1


def test_mosquitto_rr_gets_the_response_through_mqtt5_response_topic(broker, make_config, run_agent, pki):
    cfg = make_config(broker, {"mqtt": {"protocol": "5"}})
    run_agent(cfg)
    proc = subprocess.run(
        ["mosquitto_rr", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "5", "--cafile", str(pki.ca.cert_path),
         "--cert", str(pki.device.cert), "--key", str(pki.device.key), "-t", "command///req/rr-1/ping",
         "-e", "replies/rr-1", "-m", '{"echo": "via rr"}', "-W", "10"],
        capture_output=True, text=True, timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["echo"] == "via rr"


def test_sigterm_lets_a_running_command_finish_and_answer(broker, make_config, run_agent, tmp_path):
    started = tmp_path / "started"
    cfg = make_config(broker, {"commands.work": {"argv": [script(tmp_path, "work.sh", f"""
        touch {started}
        sleep 1
        echo finished
    """)]}})
    agent = run_agent(cfg)
    watcher = TestClient(cfg, subscribe="command///res/#")
    watcher.publish("command///req/w1/work")
    wait_until(started.exists)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    msgs = watcher.wait(1)
    assert msgs[0].topic == "command///res/w1/200" and msgs[0].payload == b"finished\n"
    assert agent.stop() == 0  # a clean stop after the answer
    watcher.close()


def test_agent_killed_mid_command_answers_500_after_restart(broker, make_config, run_agent, tmp_path):
    started = tmp_path / "started"
    counter = tmp_path / "count.log"
    cfg = make_config(broker, {"commands.work": {"argv": [script(tmp_path, "work.sh", f"""
        echo run >> {counter}
        touch {started}
        sleep 5
    """)]}})
    agent = run_agent(cfg)
    watcher = TestClient(cfg, subscribe="command///res/#")
    watcher.publish("command///req/k1/work")
    wait_until(started.exists)
    agent.kill()
    run_agent(cfg)
    msg = watcher.wait(1)[0]
    assert msg.topic == "command///res/k1/500"
    assert "may or may not have taken effect" in json.loads(msg.payload)["error"]
    assert count_lines(counter) == 1
    watcher.close()


def test_refused_subscription_is_logged_and_retried(make_broker, make_config, run_agent, tmp_path):
    from tests.support.mosquitto import subscribe_acl

    broker = make_broker(extra=subscribe_acl(tmp_path / "acl", ["other/#"]))
    agent = run_agent(make_config(broker), wait_subscribed=False)
    # Operator interface: the refusal names the ACL, the client id and when it retries (2 s, then 4 s).
    line = agent.wait_for(r"the broker refused the subscription to command///req/# \(SUBACK 0x80").string
    assert "check the broker ACL for client dev-1; retrying in 2 s" in line
    agent.wait_for(r"retrying the subscription to command///req/#", timeout=10)
    agent.wait_for(r"SUBACK 0x80 .*retrying in 4 s", timeout=10)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_persistent_session_for_both_protocols(broker, make_config, run_agent, protocol):
    cfg = make_config(broker, {"mqtt": {"protocol": protocol}})
    run_agent(cfg).stop()
    sender = TestClient(cfg)
    sender.publish("command///req/queued-1/ping")
    watcher = TestClient(cfg, subscribe="command///res/#")
    run_agent(cfg)
    # Only a resumed session gets the command the broker queued while the agent was down.
    assert [m.topic for m in watcher.wait(1)] == ["command///res/queued-1/200"]
    sender.close()
    watcher.close()


def test_info_reports_connection_and_counts(broker, make_config, run_agent):
    cfg = make_config(broker, {"mqtt": {"keepalive": 25}})
    run_agent(cfg)
    send(cfg, "nope")
    body = json.loads(send(cfg, "info").body)
    assert body["broker"] == broker.address and body["protocol"] == "3.1.1" and body["keepalive_s"] == 25
    assert body["connected"] is True and body["connects"] == 1 and body["reconnects"] == 0
    assert body["commands"]["by_status"] == {"404": 1}
    assert body["available_commands"] == ["info", "ping"]
    assert body["agent_version"] and body["python"] and body["paho_mqtt"].startswith("2.")
