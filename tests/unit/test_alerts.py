"""Alert rules and dashboard: promtool checks and unit tests pass, and everything they query is a metric the
agent really exports (names are an interface: a rename must break this test, not the dashboards)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import HostPort, TlsConfig
from agent.service.metrics import AgentMetrics, PublishMetrics
from agent.state.outbox import Outbox
from agent.state.store import StateStore

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "mqtt-agent.json"
METRIC_RE = re.compile(r"\bmqtt_agent_[a-z_]+\b")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed; run ./scripts/test.sh, which installs it (Debian: prometheus)")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def exported_series() -> set[str]:
    """Every sample name the agent exposes (a fresh registry; histograms with their _bucket/_sum/_count)."""
    registry = CollectorRegistry()
    state = StateStore(Path(tempfile.mkdtemp()))  # a real store: its families are read from it at scrape time
    metrics = AgentMetrics(protocol="3.1.1", configured_keepalive=60, tls=TlsConfig(enabled=False),
                           registry=registry, commands=["ping"], state=state,
                           publish=PublishMetrics(Outbox(None, 10), hono_errors=lambda: 0))
    metrics.commands.command_finished("ping", 200, 0.1)  # labelled families show up once used
    metrics.connection.connected(HostPort("b", 1), 60, False)
    names: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names.update(s.name for s in family.samples)
    state.close()
    # Computed at scrape time from files; present whenever TLS is configured.
    names.add("mqtt_agent_tls_certificate_expiry_timestamp_seconds")
    return names


def test_rules_check():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_rule_unit_tests_pass_and_cover_every_alert():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", (PROMETHEUS / "alerts.yml").read_text(), re.M))
    tested = set(re.findall(r"^\s+alertname: (\w+)$", (PROMETHEUS / "alerts_test.yml").read_text(), re.M))
    assert alerts == tested
    # ...and each one is shown firing at least once, not only silent.
    text = (PROMETHEUS / "alerts_test.yml").read_text()
    for alert in alerts:
        firing = re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels", text)
        assert firing, f"{alert} is never expected to fire"


def test_example_prometheus_config_is_valid():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_use_only_exported_metrics():
    used = set(METRIC_RE.findall((PROMETHEUS / "alerts.yml").read_text()))
    assert used and used <= exported_series(), used - exported_series()


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def test_dashboard_queries_only_exported_metrics_and_parse(tmp_path: Path):
    exprs = dashboard_exprs()
    used = {m for e in exprs for m in METRIC_RE.findall(e)}
    assert used <= exported_series(), used - exported_series()
    # Every metric family the agent exports appears on the dashboard.
    def family(name: str) -> str:
        return re.sub(r"_(bucket|sum|count)$", "", name)

    exported = {family(n) for n in exported_series() if not n.endswith("_created")}
    assert {family(n) for n in used} == exported
    # PromQL syntax: run the panel queries (Grafana variables filled in) through promtool as rules.
    subst = {"$__rate_interval": "5m", "$__range": "6h", "$job": "mqtt-agent", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(e for e in exprs if not e.startswith("label_values")):
        for var, val in subst.items():
            expr = expr.replace(var, val)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_layout():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "mqtt-agent"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dash["panels"]}
    for needed in ("Connection state", "Disconnects by reason", "Keepalive", "Command rate by command",
                   "Command latency", "Command errors and rejections", "Publish queue"):
        assert needed in titles
    # No two panels overlap on Grafana's 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
    # Panels use the dashboard's data source variable, so the JSON imports into any Grafana.
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
