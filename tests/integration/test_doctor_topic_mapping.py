"""The doctor's topic-mapping probe against a real broker (issue 17, point 5): mosquitto keeps a '.' in
a topic, so the doctor adds nothing; RabbitMQ (which maps it to '/') is in the interop suite."""

from __future__ import annotations

from agent.config import load_config
from agent.tls.context import build_context
from agent.tools.doctor import run_doctor
from agent.tools.doctor import topic_mapping as tm


def test_mosquitto_keeps_dots_and_the_doctor_reports_no_mapping(broker, make_config):
    path = make_config(broker, {"commands": {"fw.update": {"argv": ["/bin/true"]}}})
    cfg = load_config(path)
    assert "fw.update" in cfg.commands
    host = cfg.mqtt.hosts[0]
    assert tm.probe_dot_mapping(cfg, host, build_context(cfg.tls), "dev-1-doctor-t1", 5.0) == tm.KEPT
    report = run_doctor(path, timeout=5.0, service_user=None)
    assert not [r for r in report.checks if r.target.endswith(" topics")]
    assert all(f.code != "dotted_command_names" for r in report.checks for f in r.findings)
    assert [r.status for r in report.checks if r.number == 8] == ["ok"]
