"""What each broker is expected to do in each interop scenario: the one source of truth.

The suite (test_interop.py) applies these expectations as marks: "pass" must pass, "xfail" is run
with xfail(strict=True) (an unexpected pass fails the run, so a stale entry is noticed), "n/a" is
skipped with its reason. The README's broker table is rendered from this matrix, and a unit test
(tests/unit/test_broker_table.py) fails when the README and the matrix disagree, so the table can
only say what the suite enforces.
"""

from __future__ import annotations

from typing import NamedTuple

BROKERS = ("mosquitto-2.0.11", "mosquitto-2.0.21", "rabbitmq-3.10", "rabbitmq-4.0", "aedes-1.2")
BROKER_TITLES = {
    "mosquitto-2.0.11": "mosquitto 2.0.11 (Debian 12)",
    "mosquitto-2.0.21": "mosquitto 2.0.21 (Debian 13)",
    "rabbitmq-3.10": "RabbitMQ 3.10 (Debian 12)",
    "rabbitmq-4.0": "RabbitMQ 4.0 (Debian 13)",
    "aedes-1.2": "aedes 1.2 (npm)",
}
SCENARIOS = ("ping", "offline_qos1", "duplicate_req_id", "duplicate_client_id", "broker_restart", "doctor",
             "v5_response_topic", "oversized_response", "wrong_protocol")
SCENARIO_TITLES = {
    "ping": "ping (request/response)",
    "offline_qos1": "QoS 1 command sent while the agent is stopped",
    "duplicate_req_id": "duplicate request id runs once",
    "duplicate_client_id": "duplicate client id is named",
    "broker_restart": "broker restart: serving again",
    "doctor": "`doctor` all fine",
    "v5_response_topic": "MQTT 5 response topic",
    "oversized_response": "oversized response becomes a 500",
    "wrong_protocol": "MQTT 5 config on a 3.1.1-only broker: hint",
}


class Expect(NamedTuple):
    outcome: str  # "pass", "xfail" or "n/a"
    reason: str = ""


PASS = Expect("pass")
V5_ONLY = Expect("n/a", "the broker speaks MQTT 3.1.1 only")
SPEAKS_V5 = Expect("n/a", "the broker speaks MQTT 5: a v5 config is right")
NEEDS_17B = "needs issue-17b: "

EXPECTED: dict[tuple[str, str], Expect] = {
    **{(b, s): PASS for b in BROKERS for s in SCENARIOS},
    **{(b, "v5_response_topic"): V5_ONLY for b in ("rabbitmq-3.10", "aedes-1.2")},
    **{(b, "oversized_response"): Expect("xfail", NEEDS_17B + "mqtt.max_message_bytes (point 1)") for b in BROKERS},
    **{(b, "wrong_protocol"): Expect("xfail", NEEDS_17B + "the mqtt.protocol hint (point 2)")
       for b in ("rabbitmq-3.10", "aedes-1.2")},
    **{(b, "wrong_protocol"): SPEAKS_V5 for b in ("mosquitto-2.0.11", "mosquitto-2.0.21", "rabbitmq-4.0")},
}


def expect(broker: str, scenario: str) -> Expect:
    return EXPECTED[(broker, scenario)]


def render_table() -> str:
    """The README's broker compatibility table (markdown)."""
    symbol = {"pass": "yes", "xfail": "no", "n/a": "n/a"}
    head = "| scenario | " + " | ".join(BROKER_TITLES[b] for b in BROKERS) + " |"
    rule = "|---|" + "---|" * len(BROKERS)
    rows = [head, rule]
    notes: list[str] = []
    for s in SCENARIOS:
        cells = []
        for b in BROKERS:
            e = expect(b, s)
            cell = symbol[e.outcome]
            if e.outcome == "xfail":
                notes.append(f"{BROKER_TITLES[b]}, {SCENARIO_TITLES[s]}: {e.reason}")
                cell += f" [{len(notes)}]"
            cells.append(cell)
        rows.append(f"| {SCENARIO_TITLES[s]} | " + " | ".join(cells) + " |")
    rows += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)] if notes else []
    return "\n".join(rows) + "\n"
