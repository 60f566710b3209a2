"""Fixtures of the interop suite: one broker per kind, started once per module and kept across tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import PKI
from tests.support.brokers import Broker
from tests.support.brokers.kinds import UNAVAILABLE, make
from tests.system.interop.matrix import BROKERS, expect


@pytest.fixture(scope="module", params=BROKERS)
def interop_broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                   pki: PKI) -> Iterator[Broker]:
    kind: str = request.param
    why = UNAVAILABLE[kind]()
    if why:  # scripts/test.sh installs every broker: a missing one is a broken setup, not a skip
        pytest.fail(f"{kind}: {why}")
    broker = make(kind, tmp_path_factory.mktemp(kind), ca=pki.ca.cert_path, cert=pki.broker.cert,
                  key=pki.broker.key)
    broker.start()
    yield broker
    getattr(broker, "close", broker.stop)()


@pytest.fixture(autouse=True)
def _expectation(request: pytest.FixtureRequest) -> None:
    """Marks the test as the matrix says for this broker and scenario (see matrix.py)."""
    if "interop_broker" not in request.fixturenames:
        return
    scenario = request.node.originalname.removeprefix("test_")
    kind = request.node.callspec.params["interop_broker"]
    e = expect(kind, scenario)
    if e.outcome == "n/a":
        pytest.skip(f"{kind}: {e.reason}")
    if e.outcome == "xfail":
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{kind}: {e.reason}"))
