"""What mosquitto does with a shared subscription member that dies while its session persists: the facts
docs/connection.md ("Gateway pairs") states, measured on Debian 12's mosquitto 2.0.11 (the host) and on
Debian 13's 2.0.21 (from the cached trixie root, tests/support/brokers/trixie.py). Raw paho clients, no agent: this pins
the broker's behaviour, so a broker update that changes it fails here and the documentation gets
revisited.

Member A takes its share and never acknowledges it (as if it died before its PUBACK), then its socket
closes without DISCONNECT; ten more commands follow; then A's client id connects again.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.brokers import trixie
from tests.support.mosquitto import free_port, wait_port


@pytest.fixture(params=["host", pytest.param("trixie", marks=pytest.mark.roots("trixie"))])
def broker_port(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    """A plain-TCP mosquitto on loopback, from the host or from Debian 13's root (chroot, own mount ns)."""
    port = free_port()
    conf = f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
    if request.param == "host":
        if shutil.which("mosquitto") is None:
            pytest.fail("mosquitto is not installed; run ./scripts/test.sh, which installs it")
        (tmp_path / "m.conf").write_text(conf)
        argv = ["mosquitto", "-c", str(tmp_path / "m.conf")]
    else:
        why = trixie.unavailable()
        if why:  # scripts/test.sh provides all of it: a missing piece is a broken setup, not a skip
            pytest.fail(why)
        (tmp_path / "m.conf").write_text(conf)
        # The root is a shared cache: the test's directory is bound over its /t in a private mount namespace.
        argv = trixie.chroot_command(["/usr/sbin/mosquitto", "-c", "/t/m.conf"], {tmp_path: "/t"},
                                     root=trixie.ensure_root())
    log = open(tmp_path / "broker.log", "wb")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    log.close()
    try:
        assert wait_port("127.0.0.1", port), (tmp_path / "broker.log").read_text()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class Member:
    """A shared-subscription member with its own persistent (or expiring) MQTT 5 session."""

    def __init__(self, port: int, client_id: str, expiry: int, *, ack: bool = True, subscribe: bool = True) -> None:
        self.got: list[str] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.manual_ack_set(not ack)  # never acknowledging is what a death before the PUBACK leaves
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = expiry
        self.client.connect("127.0.0.1", port, 30, clean_start=False, properties=props)
        self.client.loop_start()
        if subscribe:
            self.client.subscribe("$share/g/t/#", qos=1)
            assert subscribed.wait(5)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.got.append(msg.payload.decode())
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> list[str]:
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.got) < n and time.monotonic() < end:
                self._cond.wait(0.1)
            return list(self.got)

    def die(self) -> None:
        """Close the socket without DISCONNECT, as a SIGKILLed process's kernel does."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_pair(port: int, expiry: int, back_after: float) -> tuple[list[str], list[str], list[str]]:
    """(A before its death, B in all, A's client id after it connects again) for 10 + 10 commands."""
    a = Member(port, "member-a", expiry, ack=False)
    b = Member(port, "member-b", expiry)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="publisher", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    for i in range(10):
        pub.publish(f"t/{i}", str(i), qos=1).wait_for_publish(5)
    before = a.wait(5)
    assert len(b.wait(5)) == 5
    a.die()
    time.sleep(0.3)  # the broker reads the reset
    for i in range(10, 20):
        pub.publish(f"t/{i}", str(i), qos=1).wait_for_publish(5)
    time.sleep(back_after)
    b_got = b.wait(15 if expiry == 0 else 10, timeout=3)
    a2 = Member(port, "member-a", expiry, subscribe=False)
    a2_got = a2.wait(10, timeout=2)
    for c in (a2, b):
        c.close()
    pub.disconnect()
    pub.loop_stop()
    return before, b_got, a2_got


EVEN = [str(i) for i in range(0, 20, 2)]
ODD = [str(i) for i in range(1, 20, 2)]


def test_a_persistent_session_keeps_the_dead_members_share_until_it_returns(broker_port: int) -> None:
    before, b_got, back = run_pair(broker_port, expiry=3600, back_after=0.3)
    assert before == EVEN[:5]
    # Round robin goes on including the dead member: the survivor gets its half only...
    assert b_got == ODD
    # ...and the returning member gets what it had not acknowledged plus every other command since.
    assert back == EVEN


def test_session_expiry_0_leaves_the_rest_to_the_survivor_and_loses_the_unacknowledged(broker_port: int) -> None:
    before, b_got, back = run_pair(broker_port, expiry=0, back_after=0.3)
    assert before == EVEN[:5]
    assert b_got == ODD[:5] + [str(i) for i in range(10, 20)]
    assert back == []  # never redistributed to the survivor: gone with the session


def test_an_expired_session_takes_its_queued_share_with_it(broker_port: int) -> None:
    before, b_got, back = run_pair(broker_port, expiry=1, back_after=2.5)
    assert before == EVEN[:5]
    assert b_got == ODD
    assert back == []
