"""RabbitMQ's '.'-to-'/' mapping as the doctor sees it (issue 17, point 5), pure."""

from __future__ import annotations

from agent.tools.doctor import topic_mapping as tm


def test_the_topic_a_probe_comes_back_on_tells_the_mapping():
    sub, published, mapped = tm.probe_topics("ab12")
    assert sub == "mqtt-agent-doctor/ab12/#" and published.endswith("/dot.probe") and mapped.endswith("/dot/probe")
    assert tm.classify(published, mapped, [published]) == tm.KEPT
    assert tm.classify(published, mapped, ["other", mapped]) == tm.MAPPED
    assert tm.classify(published, mapped, []) == tm.UNKNOWN


def test_rabbitmq_gets_a_warning_for_each_dotted_command_and_a_note_on_request_ids():
    res = tm.assess(tm.MAPPED, "rabbit:1883", ["fw.update", "reboot", "net.scan"])
    assert res is not None and res.status == "warn"
    (finding,) = res.findings
    assert finding.code == "dotted_command_names"
    assert "fw.update, net.scan arrive as fw/update, net/scan" in finding.cause
    assert any("request ids must not contain '.'" in n for n in res.notes)
    plain = tm.assess(tm.MAPPED, "rabbit:1883", ["reboot"])
    assert plain is not None and plain.findings == () and plain.notes


def test_a_broker_that_keeps_dots_or_says_nothing_gets_no_result():
    assert tm.assess(tm.KEPT, "m:1883", ["fw.update"]) is None
    assert tm.assess(tm.UNKNOWN, "m:1883", ["fw.update"]) is None
