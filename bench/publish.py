"""Benchmark of telemetry from local apps: app -> local API -> agent -> broker, beside a bare publisher.

    python -m bench.publish            # full run, 3 rounds (~2-3 minutes); bench/results/publish.md and .json
    python -m bench.publish --quick    # smoke run with tiny counts; bench/work/publish-smoke

In one run, on one mutual-TLS mosquitto, with one subscriber counting arrivals (QoS 1):
- bare: a paho client in its own process publishing QoS 1 telemetry as fast as its in-flight window
  (100) allows: the baseline, no disk, nothing survives a crash;
- single: CLIENTS apps, each its own process (as the sensor readers and flows on a gateway are), each
  POSTing one message per request with http.client on a kept-alive connection to /v1/telemetry, the
  next one only after the previous 202 (every 202 waits for the durable write; concurrent requests share
  an fsync);
- batch: one app POSTing batches of 100 to /v1/telemetry/batch.
Each round runs the three in turn (one agent, one broker for the whole run); every figure is the median
over the rounds (the raw rounds are in the JSON, each with the machine's load average).
Throughput is messages / (first request -> last message at the subscriber). Latency is per request,
to its 202. Bytes written to the state disk per message: the agent's write_bytes (/proc/PID/io) over
the run divided by the messages (WAL frames, checkpoints and deletions after the PUBACK included).
Agent CPU per message: the agent's utime + stime (/proc/PID/stat) over the run divided by the messages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.env import BenchEnv
from bench.report import percentile
from tests.support.agentproc import AgentProcess
from tests.support.api import wait_socket
from tests.support.mosquitto import Mosquitto

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = b'{"sensor":"temp-1","value":21.5,"unit":"C","ts":1764547200}'
CLIENTS = 8
TARGET_SINGLE = 2000.0  # msg/s
TARGET_BATCH_RATIO = 0.5  # x bare


class Counter:
    """Subscriber that counts arrivals on one topic filter (QoS 1)."""

    def __init__(self, env: BenchEnv, broker: Mosquitto, topic: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")
        self.client.tls_set_context(env.app_context())
        self.client.max_inflight_messages_set(1000)
        self.count = 0
        self.last = 0.0
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._ready.wait(10), "subscriber could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.count += 1
            self.last = time.monotonic()
            self._cond.notify_all()

    def wait(self, n: int, timeout: float) -> float:
        end = time.monotonic() + timeout
        with self._cond:
            while self.count < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"only {self.count} of {n} messages arrived within {timeout:g} s")
                self._cond.wait(min(left, 0.5))
            return self.last

    def reset(self) -> None:
        with self._cond:
            self.count = 0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bare_publisher(args: argparse.Namespace) -> int:
    """The baseline, in its own process: QoS 1 publishes, 100 in flight, until every PUBACK is in."""
    import ssl

    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare")
    client.tls_set_context(ctx)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    acked = threading.Event()
    left = [args.count]

    def on_publish(*_: Any) -> None:
        left[0] -= 1
        if left[0] == 0:
            acked.set()

    client.on_publish = on_publish
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    time.sleep(0.5)
    print("start", flush=True)
    for _ in range(args.count):
        client.publish("telemetry", PAYLOAD, qos=1)
    acked.wait(300)
    client.disconnect()
    client.loop_stop()
    return 0


def run_bare(env: BenchEnv, broker: Mosquitto, counter: Counter, n: int) -> dict[str, Any]:
    counter.reset()
    proc = subprocess.Popen([sys.executable, "-m", "bench.publish", "--bare-publisher", "--host", broker.host,
                             "--port", str(broker.port), "--ca", str(env.ca.cert_path), "--cert", str(env.app.cert),
                             "--key", str(env.app.key), "--count", str(n)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "start"
    start = time.monotonic()
    last = counter.wait(n, 300)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime  # its whole life: connecting and TLS included
    return {"messages": n, "seconds": round(last - start, 3), "msg_per_s": round(n / (last - start), 1),
            "cpu_us_per_msg": round(cpu / n * 1e6, 1)}


def _write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def app(args: argparse.Namespace) -> int:
    """One app, in its own process: connect, say "ready", wait for "go" on stdin, then POST `count`
    bodies one after the other on one kept-alive connection; print the latencies (s) as JSON."""
    from agent.tools.publish import _UnixConnection

    body = PAYLOAD if args.batch == 1 else (PAYLOAD + b"\n") * args.batch
    target = "/v1/telemetry" if args.batch == 1 else "/v1/telemetry/batch"
    conn = _UnixConnection(args.app, 30)
    conn.connect()
    print("ready", flush=True)
    sys.stdin.readline()
    latencies: list[float] = []
    try:
        for _ in range(args.count):
            t0 = time.perf_counter()
            conn.request("POST", target, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            latencies.append(time.perf_counter() - t0)
            if resp.status != 202:
                raise RuntimeError(f"{target}: {resp.status}")
    finally:
        conn.close()
    print(json.dumps(latencies), flush=True)
    return 0


def run_api(agent_pid: int, sock: Path, counter: Counter, n: int, *, batch: int, clients: int) -> dict[str, Any]:
    counter.reset()
    requests = n // batch // clients
    apps = [subprocess.Popen([sys.executable, "-m", "bench.publish", "--app", str(sock), "--count", str(requests),
                              "--batch", str(batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=REPO) for _ in range(clients)]
    try:
        for a in apps:
            assert a.stdout is not None and a.stdout.readline().strip() == "ready"
        total = requests * batch * clients
        written, cpu = _write_bytes(agent_pid), _cpu_seconds(agent_pid)
        start = time.monotonic()
        for a in apps:
            assert a.stdin is not None
            a.stdin.write("go\n")
            a.stdin.flush()
        latencies: list[float] = []
        for a in apps:
            assert a.stdout is not None
            latencies += json.loads(a.stdout.readline())
            if a.wait(60) != 0:
                raise RuntimeError("an app failed")
        last = counter.wait(total, 300)
        cpu = _cpu_seconds(agent_pid) - cpu
        time.sleep(1.0)  # the deletions after the PUBACKs are written in batches
        written = _write_bytes(agent_pid) - written
    finally:
        for a in apps:
            if a.poll() is None:
                a.kill()
                a.wait()
    secs = last - start
    lat_ms = [v * 1000 for v in latencies]
    return {"messages": total, "requests": len(latencies), "clients": clients, "batch": batch,
            "seconds": round(secs, 3), "msg_per_s": round(total / secs, 1),
            "latency_p50_ms": round(percentile(lat_ms, 50), 2), "latency_p99_ms": round(percentile(lat_ms, 99), 2),
            "state_bytes_written_per_msg": round(written / total, 1),
            "agent_cpu_us_per_msg": round(cpu / total * 1e6, 1)}


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over rounds (the middle value; for an even count the lower middle)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = sorted(r[key] for r in runs)
        out[key] = values[(len(values) - 1) // 2]
    return out


def render(res: dict[str, Any]) -> str:
    bare, single, batch = res["bare"], res["single"], res["batch"]
    ratio = batch["msg_per_s"] / bare["msg_per_s"] if bare["msg_per_s"] else 0.0
    lines = [
        "# Telemetry through the local API (bench/publish.py)",
        "",
        f"Run {res['when']} on {res['machine']}; payload {len(PAYLOAD)} bytes, QoS 1, mutual TLS, one mosquitto, "
        "one subscriber counting arrivals. Bare = a paho publisher in its own process (no disk, 100 in flight). "
        f"Medians over {len(res['rounds'])} round(s) (bare, single, batch in turn each round); load average at "
        f"the end of each round: {', '.join(str(r['load_average']) for r in res['rounds'])}.",
        "",
        "| path | messages | msg/s | vs bare | p50 to 202 | p99 to 202 | state disk bytes/msg | CPU us/msg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| bare paho publisher | {bare['messages']} | {bare['msg_per_s']:.0f} | 1.00 | - | - | 0 | "
        f"{bare.get('cpu_us_per_msg', '-')} |",
        f"| API, single messages ({single['clients']} apps) | {single['messages']} | {single['msg_per_s']:.0f} | "
        f"{single['msg_per_s'] / bare['msg_per_s']:.2f} | {single['latency_p50_ms']} ms | "
        f"{single['latency_p99_ms']} ms | {single['state_bytes_written_per_msg']:.0f} | "
        f"{single['agent_cpu_us_per_msg']} |",
        f"| API, batches of {batch['batch']} | {batch['messages']} | {batch['msg_per_s']:.0f} | {ratio:.2f} | "
        f"{batch['latency_p50_ms']} ms | {batch['latency_p99_ms']} ms | {batch['state_bytes_written_per_msg']:.0f} | "
        f"{batch['agent_cpu_us_per_msg']} |",
        "",
    ]
    if res["judged"]:
        lines += [f"Targets: single >= {TARGET_SINGLE:.0f} msg/s: "
                  f"{'met' if single['msg_per_s'] >= TARGET_SINGLE else 'NOT met'}; batches >= "
                  f"{TARGET_BATCH_RATIO} x bare: {'met' if ratio >= TARGET_BATCH_RATIO else 'NOT met'}.", ""]
    else:
        lines += ["Smoke run: counts too small to judge the targets.", ""]
    lines += ["Latency to 202 includes the durable write (group commit: concurrent requests share an fsync). "
              "Bytes per message are what the agent wrote to the state disk (/proc/PID/io write_bytes): the row "
              "in the WAL, its share of checkpoints and of the deletion after the PUBACK. CPU: the agent's "
              "(utime + stime) per message; for bare, the publisher's whole process.", "",
              f"Apps: {single['clients']} processes, each POSTing one message per request on a kept-alive "
              "connection and waiting for its 202 before the next; batches: one app.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run with tiny counts")
    p.add_argument("--out", type=Path, help="where publish.md/publish.json go (default bench/results, "
                   "or bench/work/publish-smoke with --quick)")
    p.add_argument("--count", type=int, default=0, help="messages per path and round (default 20000; --quick 400)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (bare, single, batch each); medians are "
                   "reported (default 3; --quick 1)")
    p.add_argument("--clients", type=int, default=CLIENTS, help=f"concurrent apps posting single messages "
                   f"(default {CLIENTS})")
    p.add_argument("--bare-publisher", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--app", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    for name in ("--host", "--port", "--ca", "--cert", "--key"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.app:
        return app(args)
    if args.bare_publisher:
        args.port = int(args.port)
        return bare_publisher(args)
    n = args.count or (400 if args.quick else 20000)
    out = args.out or (REPO / "bench" / "work" / "publish-smoke" if args.quick else REPO / "bench" / "results")
    work = Path(tempfile.mkdtemp(prefix="bpub", dir="/tmp"))
    env = BenchEnv(work)
    procs: list[AgentProcess] = []
    try:
        broker = env.broker("broker")
        counter = Counter(env, broker, "telemetry/#")
        res: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}",
                               "judged": not args.quick}
        sock = work / "api.sock"
        cfg = env.agent_config("bench-pub", broker, metrics=False, overrides={
            "api": {"socket": str(sock)}, "publish": {"max_batch": 1000}})
        agent = AgentProcess(cfg).start()
        procs.append(agent)
        agent.wait_for("subscribed to ", timeout=30)
        wait_socket(sock)
        assert agent.proc is not None
        rounds = 1 if args.quick else args.rounds
        res["rounds"] = []
        for r in range(rounds):
            # Bare and agent take turns within a round, so each ratio compares the same minute of the machine.
            one: dict[str, Any] = {"bare": run_bare(env, broker, counter, n)}
            one["single"] = run_api(agent.proc.pid, sock, counter, n // 2 if args.quick else n, batch=1,
                                    clients=args.clients)
            one["batch"] = run_api(agent.proc.pid, sock, counter, n, batch=100, clients=1)
            one["load_average"] = round(os.getloadavg()[0], 2)
            print(f"round {r + 1}/{rounds}: {one}", flush=True)
            res["rounds"].append(one)
        for path in ("bare", "single", "batch"):
            res[path] = _medians([one[path] for one in res["rounds"]])
        counter.close()
    finally:
        for a in procs:
            a.stop()
        env.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "publish.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "publish.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
