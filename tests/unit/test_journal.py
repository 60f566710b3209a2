"""Logging to the journal: records arrive on a real AF_UNIX datagram socket in journald's native format,
with the structured fields and syslog priorities; readable stderr lines elsewhere; no secrets.

The real agent under a journal stream is tests/integration/test_journal.py."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.commands.dispatch import Dispatcher
from agent.config import LimitsConfig
from agent.protocol import Inbound
from agent.service.logs import (
    JournalHandler,
    encode_journal_fields,
    journal_stream_matches,
    setup_logging,
    structured_fields,
    syslog_priority,
)
from agent.state.store import OutMessage, StateStore
from tests.support.journal import Journal, decode


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sock")
    yield j
    j.sock.close()


@pytest.fixture
def journal_logger(journal: Journal) -> Iterator[logging.Logger]:
    handler = JournalHandler(journal.path)
    logger = logging.getLogger("agent.test-journal")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger
    logger.removeHandler(handler)
    handler.close()


@pytest.mark.parametrize(("level", "priority"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2),
])
def test_priorities(level, priority):
    assert syslog_priority(level) == priority


def test_record_with_fields_reaches_the_journal(journal, journal_logger):
    journal_logger.warning("connection to %s ended: %s", "broker:8883", "idle timeout",
                           extra={"MQTT_REASON": "idle_timeout", "MQTT_RC": None, "KEEPALIVE": 20,
                                  "lowercase": "ignored", "_PID": "spoofed", "PRIORITY": "0"})
    got = journal.receive()
    assert got["MESSAGE"] == "connection to broker:8883 ended: idle timeout"
    assert got["PRIORITY"] == "4"  # an `extra` cannot override the priority
    assert got["MQTT_REASON"] == "idle_timeout"
    assert got["KEEPALIVE"] == "20"
    assert got["SYSLOG_IDENTIFIER"] == "mqtt-agent"
    assert got["LOGGER"] == "agent.test-journal"
    assert got["CODE_FUNC"] == "test_record_with_fields_reaches_the_journal"
    assert "MQTT_RC" not in got  # None is left out
    assert "lowercase" not in got and "_PID" not in got  # not journal fields / reserved for journald


def test_multiline_message_uses_the_binary_safe_form(journal, journal_logger):
    try:
        raise ValueError("boom")
    except ValueError:
        journal_logger.exception("handler failed")
    got = journal.receive()
    assert got["PRIORITY"] == "3"
    assert got["MESSAGE"].startswith("handler failed\nTraceback (most recent call last):")
    assert got["MESSAGE"].endswith("ValueError: boom")


def test_encoding_round_trip():
    fields = {"MESSAGE": "a\nb=c", "COMMAND": "ping", "EMPTY": ""}
    assert decode(encode_journal_fields(fields)) == fields


def test_real_dispatcher_log_fields(journal, tmp_path):
    """A rejected command, through the real dispatcher: COMMAND, REQ_ID and STATUS become journal fields."""
    handler = setup_logging("info", journal=True, journal_socket=journal.path)
    published: list[tuple[str, bytes]] = []

    class Responder:
        def adopt(self, messages: list[OutMessage]) -> None:
            published.extend((m.topic, m.payload) for m in messages)

        def put_volatile(self, msg: OutMessage) -> None:
            published.append((msg.topic, msg.payload))

    store = StateStore(tmp_path / "state")
    try:
        assert isinstance(handler, JournalHandler)
        dispatcher = Dispatcher(registry={}, limits=LimitsConfig(), responder=Responder(), store=store,
                                device_id="dev-1")
        secret_payload = b'{"password": "hunter2"}'
        dispatcher.accept(Inbound(topic="command///req/r-42/reboot", payload=secret_payload))
        got = journal.receive()
        store.enqueue_wait([])  # a barrier: the rejection's callback has run
    finally:
        store.close()
        setup_logging("info", journal=False)
    assert (got["COMMAND"], got["REQ_ID"], got["STATUS"], got["PRIORITY"]) == ("reboot", "r-42", "404", "4")
    assert got["MESSAGE"].startswith("command reboot (req r-42) rejected with 404: unknown command 'reboot'")
    assert b"hunter2" not in encode_journal_fields(got)
    assert published and published[0][0] == "command///res/r-42/404"


def test_fallback_to_stderr_with_priority_prefix_when_journald_is_gone(tmp_path):
    stream = io.StringIO()
    handler = JournalHandler(tmp_path / "no-journal.sock", fallback=stream)
    record = logging.LogRecord("agent.connection.session", logging.ERROR, __file__, 1, "TLS handshake failed",
                               None, None)
    handler.emit(record)
    handler.close()
    assert stream.getvalue() == "<3>agent.connection.session: TLS handshake failed\n"


def test_journal_stream_detection(tmp_path):
    with open(tmp_path / "stream", "w") as fh:
        st = os.fstat(fh.fileno())
        assert journal_stream_matches({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fh)
        assert not journal_stream_matches({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fh)
        assert not journal_stream_matches({"JOURNAL_STREAM": "garbage"}, fh)
        assert not journal_stream_matches({}, fh)


def test_setup_logging_chooses_stderr_without_journal_stream(tmp_path):
    handler = setup_logging("warning", env={}, journal_socket=tmp_path / "journal.sock")
    try:
        assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
        assert logging.getLogger().level == logging.WARNING
    finally:
        setup_logging("info", journal=False)


def test_setup_logging_chooses_the_journal_when_stderr_is_the_journal_stream(journal, monkeypatch, tmp_path):
    with open(tmp_path / "stderr", "w") as fake_stderr:
        st = os.fstat(fake_stderr.fileno())
        monkeypatch.setattr(sys, "stderr", fake_stderr)
        handler = setup_logging("info", env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                                journal_socket=journal.path)
        try:
            assert isinstance(handler, JournalHandler)
            logging.getLogger("agent.x").info("hello", extra={"COMMAND": "ping"})
            got = journal.receive()
        finally:
            setup_logging("info", journal=False)
    assert (got["MESSAGE"], got["COMMAND"], got["PRIORITY"]) == ("hello", "ping", "6")


def test_structured_fields_only_take_upper_case_keys():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.REQ_ID = "abc"
    record.STATUS = 200
    record.Mixed = "no"
    assert structured_fields(record) == {"REQ_ID": "abc", "STATUS": "200"}
