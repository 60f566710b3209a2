"""Command line: argument parsing, exit codes, logging setup. The work is done elsewhere."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, Config, load_config, render_config
from agent.errors import EX_CONFIG, EX_FAILURE, EX_OK, AgentError
from agent.service.logs import setup_logging

log = logging.getLogger("agent")

EX_TIMEOUT = 2

_CONFIG_HELP = (
    f"path of the TOML configuration (default: $MQTT_AGENT_CONFIG or {DEFAULT_CONFIG_PATH}); "
    "a commented example is etc/mqtt-agent.toml"
)

_EXIT_CODES = """exit codes:
  0   clean stop / success
  1   any other failure
  78  invalid configuration (sysexits EX_CONFIG; systemd does not restart on it)
"""


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", type=Path,
                   default=Path(os.environ.get("MQTT_AGENT_CONFIG", DEFAULT_CONFIG_PATH)), help=_CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqtt-agent",
        description="Device agent for Linux IoT gateways: keeps an MQTT session over TLS with a broker "
        "(Eclipse Hono, mosquitto, EMQX, HiveMQ), runs the commands it receives and answers them.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mqtt-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="run the agent in the foreground (systemd starts it this way)",
        description="Run the agent in the foreground until SIGTERM or SIGINT. On stop it takes no new "
        "commands, lets running ones finish within agent.shutdown_grace, publishes their responses and "
        "disconnects cleanly. Commands that arrive meanwhile are journalled in agent.state_dir and run at "
        "the next start. SIGHUP (systemctl reload) re-reads the configuration: an invalid file is rejected "
        "and the running one stays; new commands apply at once, new hosts, credentials or TLS files after "
        "one clean reconnect; the log names changes that need a restart. Under systemd (Type=notify) the "
        "agent reports READY/STATUS/RELOADING/STOPPING and sends watchdog pings only while healthy, and "
        "logs to the journal with fields such as MQTT_REASON, COMMAND and REQ_ID.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(run)
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     help="override agent.log_level from the config")

    check = sub.add_parser(
        "check-config",
        help="validate a configuration and print the effective one",
        description="Validate the configuration (every problem at once, each with its key path), load the "
        "TLS certificates exactly as the agent would, and print the effective configuration with defaults "
        "filled in and secrets redacted. Exit 0 if valid, 78 if not.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(check)
    check.add_argument("--quiet", "-q", action="store_true", help="print nothing when the config is valid")

    send = sub.add_parser(
        "send",
        help="send one command to the agent and print its response",
        description="Publish one command on the topic the agent subscribes to (mqtt.command_topic), as "
        "the broker would deliver it, and wait for the response. Uses the broker, credentials and "
        "certificates of the given config, with its own client id (CLIENT_ID-send-RANDOM), so it does not "
        "disturb the running agent. Prints the status on the first line and the body after it.",
        epilog="exit codes:\n  0  response status 2xx (or a one-way command was delivered)\n"
        "  1  response status 4xx/5xx, or the broker could not be reached\n"
        "  2  no response within --timeout\n"
        "  78 invalid configuration\n\n"
        "examples:\n  mqtt-agent send ping\n  mqtt-agent send --payload '{\"echo\": 1}' ping\n"
        "  mqtt-agent send --payload @firmware.json update\n  mqtt-agent send --device sensor-7 ping"
        "   (gateway: command//+/req/#)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(send)
    send.add_argument("name", metavar="COMMAND", help="command name, e.g. ping, info or a [commands.NAME]")
    send.add_argument("--device", metavar="ID",
                      help="device behind a gateway (fills the + in command//+/req/#)")
    send.add_argument("--payload", metavar="JSON|@FILE", default="",
                      help="request payload, sent verbatim; @FILE reads it from FILE (default: empty)")
    send.add_argument("--timeout", metavar="S", type=float, default=10.0,
                      help="seconds to wait for the response (default: 10)")
    send.add_argument("--req-id", metavar="ID", help="request id to use (default: random); "
                      "sending the same id twice shows the agent's duplicate handling")
    send.add_argument("--one-way", action="store_true",
                      help="send a one-way command (empty request id): it runs, nothing comes back")

    reload = sub.add_parser(
        "reload",
        help="make the running agent re-read its configuration; fail if it rejects the file",
        description="Ask the running agent to re-read its configuration (as SIGHUP does) and wait for its "
        "verdict: print what it applied, or why it rejected the file (the running configuration then stays). "
        "The unit's ExecReload= runs this, so `systemctl reload mqtt-agent` fails when the new file is "
        "rejected. It reads no configuration itself (the agent, which has the systemd credentials, judges "
        "it): request and verdict go through $RUNTIME_DIRECTORY, else agent.state_dir of --config.",
        epilog="exit codes:\n  0  the new configuration is in effect\n  1  it was rejected (or the agent "
        "could not be signalled)\n  2  no verdict within --timeout\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(reload)
    reload.add_argument("--pid", type=int, default=int(os.environ.get("MAINPID") or 0) or None,
                        help="the agent's process id (default: $MAINPID, which systemd sets for ExecReload=)")
    reload.add_argument("--timeout", metavar="S", type=_positive_seconds, default=20.0,
                        help="seconds to wait for the verdict (default: 20)")

    doctor = sub.add_parser(
        "doctor",
        help="diagnose why the gateway cannot connect, with cause and remedy for each problem",
        description="""Run ordered checks and print one line per check (ok / warn / FAIL); for each problem the
cause and the exact remedy (the config key to set or the command to run). When a check fails, the
checks that depend on it are skipped.

   1 config        the same validation as check-config
   2 files         CA, certificate, key: readable, key permissions, key matches the certificate
   3 certificates  signature algorithm vs tls.security_level, validity vs the clock, broker name
   4 dns           each host in mqtt.hosts resolves
   5 tcp           connect; refused / timed out / unreachable told apart
   6 tls           the handshake exactly as the agent does it; on failure, retries with relaxed
                   settings pinpoint the cause, and the broker's certificate chain is shown
   7 mqtt_connect  CONNACK in words (MQTT 3.1.1 and 5)
   8 subscribe     SUBACK for mqtt.command_topic, then a delivery probe (with mqtt.shared_group:
                   a shared subscription in a group of the doctor's own, never the agents' group)
   9 history       disconnects, learned keepalive, duplicate client id (from agent.state_dir)
  10 local         clock, free space in agent.state_dir, the [metrics] listen port

Safe next to the running service: it never changes config or files, and it never connects with
the production client id (that would kick the service off the broker): it uses
CLIENT_ID-doctor-RANDOM and says so. Retries with relaxed TLS settings never send the password.
Details and the --json schema: docs/doctor.md.""",
        epilog="exit codes:\n  0  nothing failed (warnings allowed)\n  1  at least one check failed\n\n"
        "examples:\n  mqtt-agent doctor\n  mqtt-agent doctor --config /etc/mqtt-agent/mqtt-agent.toml --timeout 15"
        "\n  mqtt-agent doctor --json | jq '.checks[] | select(.status == \"fail\")'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(doctor)
    doctor.add_argument("--json", action="store_true",
                        help="print a machine-readable report (schema in docs/doctor.md) instead of text")
    doctor.add_argument("--timeout", metavar="S", type=_positive_seconds, default=5.0,
                        help="seconds each network step may take: DNS, TCP, TLS, CONNACK, SUBACK, delivery "
                        "(default: 5)")

    enroll = sub.add_parser(
        "enroll",
        help="create the device key and CSR, or install the signed certificate",
        description="Create this device's private key (mode 0600, owned by the service user) and a "
        "certificate signing request with the device id as CN and SAN, at the paths in [tls] of the config "
        "(key: tls.key_file; CSR: tls.cert_file with the suffix .csr). The key never leaves the device: only "
        "the CSR goes to the fleet CA. An existing key is kept unless --force. Works before the certificate "
        "exists (only agent.device_id and [tls] are read). With --install-cert, check that the signed "
        "certificate belongs to the key, chains to the CA (tls.ca_file or --ca), is valid and usable for TLS "
        "client authentication, then install it atomically at tls.cert_file.",
        epilog="exit codes:\n  0  done (also when nothing needed to change)\n  1  failure (the message says why)\n"
        "  78 invalid configuration\n\n"
        "examples:\n  sudo mqtt-agent enroll                        # key + CSR for agent.device_id\n"
        "  sudo mqtt-agent enroll --device-id gw-0042 --key-type rsa\n"
        "  sudo mqtt-agent enroll --install-cert /tmp/device.pem\n"
        "  sudo mqtt-agent enroll --install-cert chain.pem --ca fleet-ca.pem  # device CA differs from broker CA",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(enroll)
    enroll.add_argument("--device-id", metavar="ID", help="CN/SAN of the CSR (default: agent.device_id)")
    enroll.add_argument("--key-type", choices=("ec", "rsa"), default=None,
                        help="ec: EC P-256 (default); rsa: RSA 2048, for brokers or CAs without EC support")
    enroll.add_argument("--force", action="store_true",
                        help="replace an existing key with a new one (the device then needs a new certificate)")
    enroll.add_argument("--owner", metavar="USER",
                        help="account that owns the key (default as root: mqtt-agent, the service user)")
    enroll.add_argument("--install-cert", metavar="FILE", type=Path,
                        help="check the signed certificate FILE (PEM, optionally followed by intermediates) and "
                        "install it at tls.cert_file")
    enroll.add_argument("--ca", metavar="FILE", type=Path,
                        help="with --install-cert: CA certificate(s) the device certificate must chain to "
                        "(default: tls.ca_file)")
    renew = sub.add_parser(
        "renew",
        help="renew the TLS client certificate now (asks the running agent)",
        description="Ask the running agent to renew its client certificate now instead of when [renewal] says "
        "it is due: a new key is made on the device, its CSR signed by renewal.signer, the certificate checked "
        "against the key and tls.ca_file, proven with a probe CONNECT (its own client id) and only then switched "
        "to with one reconnect. Without --force nothing happens while the certificate is not due yet; the "
        "retry backoff after a failure is skipped either way. The outcome is printed when the agent has "
        "recorded it. Details: docs/renewal.md.",
        epilog="exit codes:\n  0  renewed (or not due, or waiting for the backend with signer = \"command\")\n"
        "  1  the renewal failed (the message says why), or renewal is off\n"
        "  2  no outcome within --timeout (is the agent running?)\n  78 invalid configuration\n\n"
        "examples:\n  sudo mqtt-agent renew\n  sudo mqtt-agent renew --force",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(renew)
    renew.add_argument("--force", action="store_true", help="renew even if the certificate is not due yet")
    renew.add_argument("--timeout", metavar="S", type=float, default=None,
                       help="seconds to wait for the outcome (default: enough for renewal.timeout and the probes)")
    _add_publish(sub)
    return parser


def _add_publish(sub: Any) -> None:
    pub = sub.add_parser(
        "publish",
        help="publish one telemetry message or event through the running agent",
        description="Hand one telemetry message or event to the running agent through its local API "
        "([api] socket; only that key is read from the config). The agent stores it durably and sends it "
        "upstream over its own session, after reconnects and restarts too; 'accepted' means it is on the "
        "agent's disk. The user needs to be in the socket's group ([api] group, default mqtt-agent-apps).",
        epilog="exit codes:\n  0  accepted (durable in the agent's queue)\n"
        "  1  refused, with the reason (400 bad request, 413 too large, 507 queue full, 503 stopping)\n"
        "  2  the agent is not reachable (not running, or no permission on the socket)\n\n"
        "examples:\n  mqtt-agent publish telemetry --payload '{\"temp\": 21.5}'\n"
        "  mqtt-agent publish event --ttl 3600 --payload @alarm.json\n"
        "  sensor-read | mqtt-agent publish telemetry --device child-7 --payload -\n"
        "  curl --unix-socket /run/mqtt-agent/api.sock --data-binary '{\"t\":1}' http://agent/v1/telemetry",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(pub)
    pub.add_argument("kind", choices=("telemetry", "event"), help="telemetry (QoS 0 or 1) or event (QoS 1)")
    pub.add_argument("--device", metavar="ID", help="a device behind the gateway (topic telemetry//ID)")
    pub.add_argument("--qos", type=int, choices=(0, 1), help="telemetry QoS (default 1; events are always 1)")
    pub.add_argument("--content-type", metavar="T", default="application/json",
                     help="content type passed upstream (default: application/json)")
    pub.add_argument("--ttl", metavar="S", type=_positive_seconds,
                     help="drop the message if not delivered within S seconds (events: Hono's hono-ttl)")
    pub.add_argument("--payload", metavar="JSON|@FILE|-", default="-",
                     help="the payload, verbatim; @FILE reads a file, - standard input (default)")


def _cmd_publish(args: argparse.Namespace) -> int:
    from agent.tools.publish import EX_UNREACHABLE, publish, read_payload

    try:
        payload = read_payload(args.payload)
    except OSError as exc:
        print(f"mqtt-agent publish: cannot read the payload: {exc.strerror or exc}", file=sys.stderr)
        return EX_UNREACHABLE
    return publish(args.config, args.kind, payload, device=args.device, qos=args.qos,
                   content_type=args.content_type or None, ttl=args.ttl)


def _cmd_renew(args: argparse.Namespace) -> int:
    from agent.tools.renew import default_timeout, request_renewal

    cfg = load_config(args.config)
    outcome = request_renewal(cfg, force=args.force, timeout=args.timeout or default_timeout(cfg))
    if outcome.result is None:
        print(f"mqtt-agent renew: {outcome.message}", file=sys.stderr)
        return EX_TIMEOUT
    stream = sys.stdout if outcome.ok else sys.stderr
    print(f"{outcome.result}: {outcome.message}", file=stream)
    return EX_OK if outcome.ok else EX_FAILURE


def _cmd_check_config(args: argparse.Namespace) -> int:
    from agent.tls.context import build_context

    cfg = load_config(args.config)
    if cfg.tls.enabled:
        build_context(cfg.tls)
    if not args.quiet:
        print(f"# {args.config}: valid")
        print(f"# {_pair_in_use(cfg)}")
        print(render_config(cfg), end="")
    if cfg.tls.enabled and cfg.tls.insecure:
        print("warning: tls.insecure = true skips the broker host-name check; prefer tls.server_name",
              file=sys.stderr)
    return EX_OK


def _pair_in_use(cfg: Config) -> str:
    """Which certificate pair `run` would use, for check-config."""
    import datetime

    from agent.renewal.store import PairStore, select_pair

    if not (cfg.tls.enabled and cfg.tls.cert_file):
        return "TLS client certificate: none configured"
    now = datetime.datetime.now(datetime.timezone.utc)
    pair = select_pair(PairStore(cfg.agent.state_dir / "tls"), cfg.tls, cfg.agent.device_id, now)
    if pair is None:
        return f"TLS client certificate: {cfg.tls.cert_file} does not pass the chain check (mqtt-agent doctor says why)"
    return (f"TLS client certificate in use: {pair.source} pair {pair.cert_file}, serial {pair.serial:x}, "
            f"valid until {pair.not_after:%Y-%m-%d %H:%M} UTC")


def _cmd_send(args: argparse.Namespace) -> int:
    from agent.tools.send import send_command

    cfg = load_config(args.config)
    payload_arg: str = args.payload
    if payload_arg.startswith("@"):
        try:
            payload = Path(payload_arg[1:]).read_bytes()
        except OSError as exc:
            print(f"mqtt-agent send: cannot read payload file {payload_arg[1:]}: {exc.strerror}", file=sys.stderr)
            return EX_FAILURE
    else:
        payload = payload_arg.encode()
    result = send_command(cfg, args.name, payload, device=args.device, timeout=args.timeout,
                          req_id=args.req_id, one_way=args.one_way)
    if args.one_way:
        print(f"one-way command {args.name} delivered to the broker on {result.topic}; no response is sent")
        return EX_OK
    if result.status is None:
        print(f"mqtt-agent send: no response to {result.topic} within {args.timeout:g} s "
              "(is the agent running and connected to the same broker?)", file=sys.stderr)
        return EX_TIMEOUT
    print(result.status)
    body = result.body.decode("utf-8", "replace")
    if body:
        print(body)
    return EX_OK if 200 <= result.status < 300 else EX_FAILURE


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 600 seconds, got {text}")
    return value


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from agent.tools.doctor import render_text, run_doctor

    report = run_doctor(args.config, timeout=args.timeout)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print(render_text(report), end="")
    return report.exit_code

def _state_dir_of(config: Path) -> Path:
    """agent.state_dir from the raw file, without validating it (judging the file is the agent's job)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.9/3.10
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

    try:
        with open(config, "rb") as fh:
            agent_table = tomllib.load(fh).get("agent", {})
        value = agent_table.get("state_dir") if isinstance(agent_table, dict) else None
    except (OSError, ValueError):
        value = None
    path = Path(value if isinstance(value, str) and value else "/var/lib/mqtt-agent").expanduser()
    return path if path.is_absolute() else config.resolve().parent / path


def _cmd_reload(args: argparse.Namespace) -> int:
    from agent.service.reload_verdict import EX_NO_VERDICT, EX_REJECTED, request_reload, verdict_dir

    if not args.pid:
        print("mqtt-agent reload: no agent process given (--pid, or $MAINPID under systemd)", file=sys.stderr)
        return EX_FAILURE
    where = verdict_dir(_state_dir_of(args.config))
    try:
        verdict = request_reload(args.pid, where, args.timeout)
    except OSError as exc:
        print(f"mqtt-agent reload: cannot ask process {args.pid} to reload ({where}): {exc.strerror or exc}",
              file=sys.stderr)
        return EX_FAILURE
    if verdict is None:
        print(f"mqtt-agent reload: no verdict from process {args.pid} within {args.timeout:g} s; see "
              "journalctl -u mqtt-agent", file=sys.stderr)
        return EX_NO_VERDICT
    if verdict.ok:
        print(f"configuration reloaded: {verdict.message}")
        return EX_OK
    print(f"mqtt-agent reload: {verdict.message}", file=sys.stderr)
    return EX_REJECTED


def _cmd_enroll(args: argparse.Namespace) -> int:
    from agent.tools import enroll as provision

    paths = provision.read_enroll_paths(args.config)
    if args.install_cert is not None:
        if args.force or args.key_type or args.owner:
            raise provision.EnrollError("--force, --key-type and --owner apply to making the key, "
                                        "not to --install-cert")
        installed = provision.install_certificate(paths, args.install_cert, ca_file=args.ca, device_id=args.device_id)
        print(provision.install_report(installed), end="")
        return EX_OK
    if args.ca is not None:
        raise provision.EnrollError("--ca is used with --install-cert")
    owner = provision.resolve_owner(args.owner)
    result = provision.enroll(paths, device_id=args.device_id, key_type=args.key_type, force=args.force, owner=owner)
    print(provision.enroll_report(result), end="")
    return EX_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.service.app import Agent

    cfg = load_config(args.config)
    setup_logging(args.log_level or cfg.agent.log_level)
    # When systemd's watchdog gives up on a wedged agent it sends SIGABRT: the stacks of all threads then
    # go to stderr (the journal), showing where it was stuck.
    faulthandler.enable(all_threads=True)
    stop = threading.Event()
    agent = Agent(cfg, log_level_override=args.log_level)

    # The handlers run in the main thread between two of its bytecodes, wherever it is: they take no lock
    # (no logging, no Event.wait/clear partner): the agent logs the signal itself (Agent.note_signal).
    def on_signal(signum: int, frame: FrameType | None) -> None:
        agent.note_signal(signal.Signals(signum).name, again=stop.is_set())
        stop.set()  # the main thread only reads this Event (is_set takes no lock)
        agent.wake()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        agent.request_reload()  # the main loop re-reads the file; nothing else is safe in a signal handler

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    return agent.run(stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        setup_logging("warning")
    handlers = {
        "run": _cmd_run,
        "check-config": _cmd_check_config,
        "send": _cmd_send,
        "doctor": _cmd_doctor,
        "enroll": _cmd_enroll,
        "publish": _cmd_publish,
        "reload": _cmd_reload,
        "renew": _cmd_renew,
    }
    try:
        return handlers[args.command](args)
    except AgentError as exc:
        prefix = "mqtt-agent" if args.command == "run" else f"mqtt-agent {args.command}"
        print(f"{prefix}: {exc}", file=sys.stderr)
        return exc.exit_code if exc.exit_code in (EX_CONFIG, EX_FAILURE) else EX_FAILURE
    except KeyboardInterrupt:
        return EX_FAILURE
