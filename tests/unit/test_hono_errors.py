"""Hono's error messages (agent/service/hono_errors.py): every one acknowledged and counted, at most ten
log lines a minute, none taken for a command."""

from __future__ import annotations

import json
import logging

import pytest

from agent.protocol import Inbound
from agent.service.hono_errors import LOGS_PER_MINUTE, HonoErrors
from tests.support.clock import FakeClock


def error(code: int) -> Inbound:
    return Inbound("error//child-7/r1/413", json.dumps({"code": code, "message": "too big\n" * 50}).encode())


def test_every_error_is_acknowledged_and_counted_and_the_log_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(1000.0)
    errors, acks = HonoErrors(clock=clock), []
    with caplog.at_level(logging.WARNING, logger="agent.service.hono_errors"):
        for _ in range(25):
            errors.accept(error(413), lambda: acks.append(1))
        assert len(caplog.records) == LOGS_PER_MINUTE
        clock.advance(60.0)  # a minute later the log has room again
        errors.accept(error(413), lambda: acks.append(1))
    assert errors.count == 26 and len(acks) == 26
    assert len(caplog.records) == LOGS_PER_MINUTE + 1
    line = caplog.records[0].getMessage()
    assert "device='child-7'" in line and "code='413'" in line and "\n" not in line
    assert caplog.records[0].HONO_ERROR == "413"


def test_only_the_error_topic_is_taken() -> None:
    assert HonoErrors.wants(error(413))
    assert not HonoErrors.wants(Inbound("command///req/r1/ping", b""))
