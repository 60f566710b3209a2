"""The baseline: the least a paho-mqtt program can do to answer Hono-style commands.

    python -m bench.baseline --port 8883 --ca ca.pem --cert c.pem --key c.key [--bare]

Responder (default): subscribes to `command///req/#` (QoS 1), answers each request in `on_message`
on `command///res/REQ_ID/200` (QoS 1) with the same kind of JSON body the agent's `ping` sends,
runs `/bin/true` for the `true` command, and sets TCP_NODELAY. No journal, no worker pool, no
limits, no logging per command: everything the agent does on top of this is the agent's overhead.

`--bare`: connect with TLS and idle; the idle-memory baseline ("a bare connected paho client").

Prints `connected` and (responder) `subscribed` on stdout; stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

TOPIC = "command///req/#"


def response_for(topic: str, payload: bytes, started: float) -> tuple[str, bytes] | None:
    """The response topic and body for a request topic, or None if it is not a two-way request."""
    parts = topic.split("/")
    if len(parts) < 6 or parts[3] != "req" or not parts[4]:
        return None
    base = "/".join((parts[0], parts[1], parts[2], "res", parts[4]))
    name = "/".join(parts[5:])
    if name == "ping":
        try:
            data = json.loads(payload) if payload.strip() else None
        except ValueError:
            return f"{base}/400", b'{"error":"payload is not valid JSON"}'
        body: dict[str, Any] = {"device_id": "baseline", "uptime_s": round(time.monotonic() - started, 3),
                                "version": "baseline"}
        if isinstance(data, dict) and "echo" in data:
            body["echo"] = data["echo"]
        return f"{base}/200", json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    if name == "true":
        rc = subprocess.run(["/bin/true"], stdin=subprocess.DEVNULL, check=False).returncode
        return f"{base}/{200 if rc == 0 else 500}", b""
    return f"{base}/404", b'{"error":"unknown command"}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True, help="CA file that issued the broker certificate")
    parser.add_argument("--cert", required=True, help="client certificate (mutual TLS)")
    parser.add_argument("--key", required=True, help="its private key")
    parser.add_argument("--client-id", default="bench-baseline")
    parser.add_argument("--bare", action="store_true", help="connect and idle: no subscription, no answers")
    args = parser.parse_args(argv)

    started = time.monotonic()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv311,
                         clean_session=True)
    client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key)

    def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        print("connected", flush=True)
        if not args.bare:
            c.subscribe(TOPIC, qos=1)

    def on_subscribe(c: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        print("subscribed", flush=True)

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        answer = response_for(msg.topic, msg.payload, started)
        if answer is not None:
            c.publish(answer[0], answer[1], qos=1)

    client.on_socket_open = on_socket_open
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message

    def stop(signum: int, frame: Any) -> None:
        client.disconnect()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    client.connect(args.host, args.port, keepalive=60)
    client.loop_forever(retry_first_connection=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
