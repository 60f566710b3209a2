"""The demo behind ./scripts/demo.sh: a throwaway CA, a local mosquitto with a mutual-TLS listener,
the agent with a config derived from etc/mqtt-agent.toml, and two commands sent with `mqtt-agent send`.
Leaves the agent running until Ctrl-C. Everything lives in ./demo-run/ (removed at the next run)."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.agentproc import AgentProcess, write_toml  # noqa: E402
from tests.support.mosquitto import BrokerOptions, Mosquitto, free_port  # noqa: E402
from tests.support.pki import make_demo_pki  # noqa: E402

DEVICE = "demo-gateway"


def derived_config(run: Path, broker: Mosquitto, pki_dir: Path) -> Path:
    """etc/mqtt-agent.toml with the broker, certificates and state directory of this demo."""
    with open(REPO / "etc" / "mqtt-agent.toml", "rb") as fh:
        cfg = tomllib.load(fh)
    commands = cfg.pop("commands", {})
    cfg["agent"].update(device_id=DEVICE, state_dir=str(run / "state"))
    cfg["mqtt"].update(hosts=[broker.address], client_id=DEVICE, password="", password_file="", username="")
    cfg["tls"].update(ca_file=str(pki_dir / "mqtt-agent-test-ca.pem"), cert_file=str(pki_dir / "device.pem"),
                      key_file=str(pki_dir / "device.key"))
    cfg["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    # The local API socket in demo-run/ too (the default is /run/mqtt-agent), open to this user's own group.
    cfg.setdefault("api", {}).update(socket=str(run / "api.sock"), group=grp.getgrgid(os.getgid()).gr_name)
    sections = {name: values for name, values in cfg.items()}
    for name, spec in commands.items():
        sections[f"commands.{name}"] = spec
    if not Path(commands.get("uptime", {}).get("argv", ["/usr/bin/uptime"])[0]).exists():
        sections.pop("commands.uptime", None)
        sections["commands.uptime"] = {"argv": ["/bin/cat", "/proc/uptime"], "timeout": 10.0}
    return write_toml(run / "mqtt-agent.toml", sections)


def send(config: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "agent", "send", "--config", str(config), *args]
    print(f"\n$ mqtt-agent send --config {config.relative_to(REPO)} {' '.join(args)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    print(proc.stdout + proc.stderr, end="")


def main() -> int:
    once = "--once" in sys.argv  # used by tests/test_demo.py: stop after the two commands
    run = REPO / "demo-run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(mode=0o700)
    print("== generating a throwaway CA, broker and device certificates in demo-run/pki")
    make_demo_pki(run / "pki", DEVICE)
    pki = run / "pki"
    broker = Mosquitto(run / "broker", BrokerOptions(cafile=pki / "mqtt-agent-test-ca.pem",
                                                    certfile=pki / "broker.pem", keyfile=pki / "broker.key"))
    broker.start()
    print(f"== mosquitto with a mutual-TLS listener on {broker.address}")
    config = derived_config(run, broker, pki)
    print(f"== agent config: {config.relative_to(REPO)} (derived from etc/mqtt-agent.toml)")
    agent = AgentProcess(config).start()
    try:
        agent.wait_for(r"subscribed to ", timeout=30)
        print("\n".join("   " + line for line in agent.lines))
        shown = agent.mark()
        send(config, "ping")
        send(config, "uptime")
        if once:
            agent.wait_for(r"command uptime req \w+ -> ", timeout=10)
            print("\n".join("   " + line for line in agent.lines[shown:]))
            return 0
        print(f"\n== the agent keeps running; in another shell try:\n"
              f"   .venv/bin/mqtt-agent send --config {config.relative_to(REPO)} info\n"
              f"   .venv/bin/mqtt-agent check-config --config {config.relative_to(REPO)}\n"
              "== Ctrl-C stops the agent and the broker. Agent log:")
        stop = False

        def on_int(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGTERM, on_int)
        while not stop and agent.proc and agent.proc.poll() is None:
            time.sleep(0.2)
            lines = agent.lines[shown:]
            shown += len(lines)
            for line in lines:
                print("   " + line)
    finally:
        rc = agent.stop()
        broker.stop()
        print(f"\n== agent stopped (exit {rc}), broker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
