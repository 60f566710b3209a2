"""The benchmark harness (bench/): its pure parts exactly, and a smoke run with tiny counts.

No timing is asserted anywhere: speed and memory targets live in the benchmark's own report.
The smoke run asserts that every phase ran against the real processes and wrote its results.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.baseline import response_for
from bench.fleet import NEW_CLIENT, SUBSCRIBED, affordable_fleet
from bench.loadgen import parse_response, request_topic
from bench.procs import NotifySocket, cpu_seconds, rss_kib
from bench.scenarios import Params
from bench.wire import PUBACK, PUBLISH, WireError, connect_packet, packet, parse_packets, publish_packet


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted on purpose
    assert report.percentile(values, 50) == 50.0
    assert report.percentile(values, 99) == 99.0
    assert report.percentile(values, 100) == 100.0
    assert report.percentile(values, 0) == 1.0
    assert report.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        report.percentile([], 50)


def test_median_ignores_missing_rounds() -> None:
    assert report.median([3.0, None, 1.0, 2.0]) == 2.0
    assert report.median([None]) is None
    assert report.median([]) is None


@pytest.mark.parametrize(("times", "peak"), [
    ([], 0),
    ([5.0], 1),
    ([0.1] * 100, 100),
    ([0.0, 0.5, 0.99, 1.0, 1.5], 3),
    ([i * 0.25 for i in range(40)], 4),
    ([0.0, 2.0, 4.0], 1),
])
def test_peak_rate_counts_events_in_any_one_second_window(times: list[float], peak: int) -> None:
    assert report.peak_rate(times, 1.0) == peak


def test_per_second_bins_start_at_the_origin() -> None:
    assert report.per_second([10.2, 10.9, 11.0, 13.5, 9.0], 10.0) == [2, 1, 0, 1]
    assert report.per_second([1.0], 5.0) == []


def _results(agent_p50: float) -> dict[str, Any]:
    return {
        "params": {"window": 64},
        "commands": {
            "agent": {"ping_p50_ms": [agent_p50, 0.9, 0.7], "ping_p99_ms": [2.0], "throughput_per_s": [2100.0],
                      "exec_p50_ms": [2.0], "exec_p99_ms": [3.0], "start_ready_s": [0.4],
                      "start_subscribed_s": [0.4], "start_first_answer_s": [0.45], "ready_source": "log"},
            "baseline": {"ping_p50_ms": [0.5], "ping_p99_ms": [0.8], "throughput_per_s": [3000.0],
                         "exec_p50_ms": [1.5], "exec_p99_ms": [2.0], "start_subscribed_s": [0.2],
                         "start_first_answer_s": [0.25]},
        },
        "idle": {"seconds": 60.0, "agent": {"rss_kib": 30 * 1024, "cpu_percent": 0.1},
                 "baseline": {"rss_kib": 24 * 1024, "cpu_percent": 0.05},
                 "bare": {"rss_kib": 24 * 1024, "cpu_percent": 0.04}},
        "memory": {"commands": 20000,
                   "agent": {"rss_idle_kib": 30 * 1024, "rss_half_kib": 31 * 1024, "rss_after_kib": 33 * 1024}},
        "reconnect": {"agent": {"after_up_s": [1.5, 1.2], "after_down_s": [1.6, 1.3]},
                      "baseline": {"after_up_s": [1.0], "after_down_s": [1.1]}},
    }


def test_figures_take_medians_and_judge_each_target() -> None:
    rows = {f.key: f for f in report.figures(_results(0.8), judge=True)}
    p50 = rows["ping_p50_ms"]
    assert (p50.agent, p50.baseline) == (0.8, 0.5)
    assert p50.ratio == pytest.approx(1.6)
    assert p50.met is False  # 1.6 x baseline > 1.5 x
    assert rows["ping_p99_ms"].met is False  # 2.0 > 2 x 0.8
    assert rows["throughput_per_s"].met is True  # 2,100/s >= 2,000 and >= 0.6 x 3,000
    assert rows["idle_rss_mib"].baseline == 24.0
    assert rows["idle_rss_mib"].met is True  # 30 <= 1.3 x 24
    assert rows["rss_growth_mib"].agent == 3.0
    assert rows["rss_growth_mib"].met is False  # 3 MiB > 2 MB
    assert rows["rss_growth_second_half_mib"].agent == 2.0
    assert rows["idle_cpu_percent"].met is True
    assert rows["start_ready_s"].label.startswith("start → subscribed")  # no READY=1: labelled as the log line
    assert rows["start_first_answer_s"].met is True
    assert rows["reconnect_after_up_s"].agent == pytest.approx(1.35)
    assert rows["exec_p50_ms"].met is None  # informational, no target


def test_targets_are_not_judged_on_a_smoke_run() -> None:
    assert all(f.met is None for f in report.figures(_results(0.6), judge=False))


def test_ready_row_names_sd_notify_when_ready_was_received() -> None:
    results = _results(0.6)
    results["commands"]["agent"]["ready_source"] = "sd_notify"
    rows = {f.key: f for f in report.figures(results, judge=True)}
    assert rows["start_ready_s"].label == "start → READY=1 (sd_notify)"


def test_markdown_has_every_measured_figure_and_the_fleet() -> None:
    results = _results(0.6)
    results["fleet"] = [
        {"jitter": True, "agents": 100, "back": 100, "all_back_after_up_s": 14.9, "all_back_after_down_s": 20.0,
         "peak_connects_per_s": 23, "connects": 100, "per_second": [23, 15, 62]},
        {"jitter": False, "agents": 100, "back": 100, "all_back_after_up_s": 1.26, "all_back_after_down_s": 6.4,
         "peak_connects_per_s": 100, "connects": 100, "per_second": [6, 94]},
    ]
    run = {"machine": {"cpu": "Test CPU", "cores": 2}, "params": Params().as_dict(), "judged": True,
           "results": results, "figures": report.figures_json(report.figures(results, judge=True)),
           "notes": ["a note"]}
    md = report.render_markdown(run)
    assert "Test CPU, 2 cores" in md
    assert "| `ping` round trip, sequential, p50 | ms | 0.700 | 0.500 | 1.40 | ≤ 1.5 x baseline | yes |" in md
    assert "| resident memory growth over 20,000 commands" in md and "| **no** |" in md
    assert "| on | 100/100 | 14.9 s | 20.0 s | 23 | 100 | 23 15 62 |" in md
    assert "| off | 100/100 | 1.26 s | 6.40 s | 100 | 100 | 6 94 |" in md
    assert md.rstrip().endswith("- a note")


def test_write_puts_json_and_markdown_side_by_side(tmp_path: Path) -> None:
    run = {"params": {}, "results": {}, "figures": [], "judged": False}
    json_path, md_path = report.write(run, tmp_path / "out")
    assert json.loads(json_path.read_text()) == run
    assert md_path.read_text().startswith("# mqtt-agent benchmark results")


def test_packets_parse_back_and_a_partial_packet_waits() -> None:
    buf = bytearray(publish_packet("command///req/1/ping", b"{}", 7) + packet(PUBACK, 0, b"\x00\x07") + b"\x30")
    out = parse_packets(buf)
    assert out == [(PUBLISH, 0x02, b"\x00\x14command///req/1/ping\x00\x07{}"), (PUBACK, 0, b"\x00\x07")]
    assert buf == bytearray(b"\x30")


def test_remaining_length_over_127_takes_two_bytes() -> None:
    big = publish_packet("t", b"x" * 300, 1)
    assert big[1] & 0x80
    [(kind, _, body)] = parse_packets(bytearray(big))
    assert kind == PUBLISH and body == b"\x00\x01t\x00\x01" + b"x" * 300


def test_connect_packet_is_mqtt_311_clean_session_without_keepalive() -> None:
    [(kind, _, body)] = parse_packets(bytearray(connect_packet("bench")))
    assert kind == 1
    assert body == b"\x00\x04MQTT\x04\x02\x00\x00\x00\x05bench"


def test_malformed_remaining_length_is_an_error() -> None:
    with pytest.raises(WireError):
        parse_packets(bytearray(b"\x30\xff\xff\xff\xff\x01"))


def test_response_topics_parse() -> None:
    assert request_topic("abc", "ping") == "command///req/abc/ping"
    assert parse_response("command///res/abc/200") == ("abc", 200)
    assert parse_response("command///res/abc/x") is None
    assert parse_response("command///req/abc/ping") is None


def test_baseline_answers_like_the_agent() -> None:
    started = time.monotonic()
    topic, body = response_for("command///req/abc/ping", b'{"echo": 5}', started) or ("", b"")
    assert topic == "command///res/abc/200"
    data = json.loads(body)
    assert data["echo"] == 5 and set(data) == {"device_id", "echo", "uptime_s", "version"}
    assert response_for("command///req/abc/true", b"", started) == ("command///res/abc/200", b"")
    assert response_for("command///req/abc/nope", b"", started) == ("command///res/abc/404",
                                                                    b'{"error":"unknown command"}')
    assert response_for("command///req/abc/ping", b"{", started) == ("command///res/abc/400",
                                                                     b'{"error":"payload is not valid JSON"}')
    assert response_for("command///req//ping", b"", started) is None  # one-way: no answer


def test_notify_socket_records_when_ready_arrived(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "n.sock")
    try:
        assert notify.ready_at is None
        before = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendto(b"READY=1\nSTATUS=connected to broker", str(notify.path))
        end = time.monotonic() + 5
        while notify.ready_at is None and time.monotonic() < end:
            time.sleep(0.01)
        assert notify.ready_at is not None and notify.ready_at >= before
        assert "STATUS=connected to broker" in notify.first_seen
    finally:
        notify.close()
    assert not (tmp_path / "n.sock").exists()


def test_proc_readings_of_this_process() -> None:
    assert rss_kib(os.getpid()) > 1024
    used = cpu_seconds(os.getpid())
    sum(i * i for i in range(200000))
    assert cpu_seconds(os.getpid()) >= used > 0


def test_fleet_patterns_match_mosquitto_2_log_lines() -> None:
    sub = SUBSCRIBED.match("21:17:29: fleet-jitter-000 1 command///req/#")
    assert sub is not None and sub.group(1) == "fleet-jitter-000"
    assert SUBSCRIBED.match("21:17:29: Sending SUBACK to fleet-jitter-000") is None
    new = NEW_CLIENT.search("21:17:29: New client connected from 127.0.0.1:38289 as fleet-jitter-000 (p2, c1, k60).")
    assert new is not None and new.group(1) == "fleet-jitter-000"
    assert NEW_CLIENT.search("21:17:29: New client connected from 127.0.0.1:38289 as bench-loader (p2, c1, k0).") \
        is None


def test_fleet_is_scaled_to_memory_with_a_note() -> None:
    assert affordable_fleet(2) == (2, "")
    n, note = affordable_fleet(10**7)
    assert 2 <= n < 10**7
    assert "scaled down from 10000000" in note

