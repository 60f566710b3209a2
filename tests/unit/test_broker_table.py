"""The README's broker compatibility table says what the interop suite enforces (matrix.py)."""

from __future__ import annotations

from tests.support.agentproc import REPO
from tests.system.interop.matrix import BROKERS, EXPECTED, SCENARIOS, readme_table, render_table


def test_readme_table_matches_the_interop_matrix() -> None:
    readme = (REPO / "README.md").read_text()
    assert readme_table(readme) == render_table(), (
        "README.md's broker table differs from tests/system/interop/matrix.py: "
        "run `python -m tests.system.interop.matrix --update`")


def test_every_broker_and_scenario_has_an_expectation_with_a_reason_unless_it_passes() -> None:
    assert set(EXPECTED) == {(b, s) for b in BROKERS for s in SCENARIOS}
    for key, e in EXPECTED.items():
        assert e.outcome in ("pass", "xfail", "n/a"), key
        assert (e.outcome == "pass") == (e.reason == ""), key
