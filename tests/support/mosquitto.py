"""A real mosquitto broker on a free loopback port, for tests, benchmarks and the demo.

mosquitto started as root drops to the `mosquitto` user unless its config says otherwise, and
then cannot read certificates in a private temp dir ("Unable to load CA certificates"), so the
config names the current user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.brokerproc import BrokerProcess, free_port, wait_port

__all__ = ["BrokerOptions", "Mosquitto", "free_port", "make_password_file", "mosquitto_config", "subscribe_acl",
           "wait_port"]


@dataclass
class BrokerOptions:
    """What the listener looks like. Without `certfile` it is plain TCP."""

    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    require_certificate: bool = True
    password_file: Path | None = None
    acl_file: Path | None = None
    nodelay: bool = True
    persistence: bool = True
    extra: list[str] = field(default_factory=list)


def mosquitto_config(o: BrokerOptions, host: str, port: int, directory: Path) -> str:
    """mosquitto.conf for one listener on host:port, persistence and log to stderr, as this user."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    lines = [
        f"user {user}",
        "per_listener_settings false",
        f"allow_anonymous {'false' if o.password_file else 'true'}",
        f"persistence {'true' if o.persistence else 'false'}",
        f"persistence_location {directory}/",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %H:%M:%S",
        "max_queued_messages 10000",
        f"set_tcp_nodelay {'true' if o.nodelay else 'false'}",
        f"listener {port} {host}",
    ]
    if o.certfile:
        lines += [
            f"cafile {o.cafile}",
            f"certfile {o.certfile}",
            f"keyfile {o.keyfile}",
            f"require_certificate {'true' if o.require_certificate else 'false'}",
        ]
    if o.password_file:
        lines.append(f"password_file {o.password_file}")
    if o.acl_file:
        lines.append(f"acl_file {o.acl_file}")
    lines += o.extra
    return "\n".join(lines) + "\n"


class Mosquitto(BrokerProcess):
    """Start/stop/kill/restart a mosquitto process; it keeps its port across restarts."""

    kind = "mosquitto"
    start_timeout = 10.0
    stop_timeout = 5.0

    def __init__(self, workdir: Path, options: BrokerOptions | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None) -> None:
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed (Debian: apt-get install mosquitto mosquitto-clients)")
        super().__init__(workdir, host=host, port=port, log_name="mosquitto.log")
        self.options = options or BrokerOptions()
        self.conf = self.dir / "mosquitto.conf"

    def prepare(self) -> None:
        self.conf.write_text(mosquitto_config(self.options, self.host, self.port, self.dir))

    def command(self) -> tuple[list[str], dict[str, str]]:
        return ["mosquitto", "-c", str(self.conf)], {}

    def start(self) -> Mosquitto:
        super().start()
        return self

    def __enter__(self) -> Mosquitto:
        return self.start()


def make_password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file, made with mosquitto_passwd."""
    path.unlink(missing_ok=True)
    for i, (user, password) in enumerate(users.items()):
        args = ["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(path), user, password]
        subprocess.run(args, check=True, capture_output=True)
    return path


DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
)


def subscribe_acl(directory: Path, allowed: list[str]) -> list[str]:
    """Config lines restricting what anonymous (certificate-only) clients may subscribe to.

    mosquitto 2.0's acl_file only filters deliveries and still grants every SUBSCRIBE; the dynamic
    security plugin shipped with the Debian package refuses it (SUBACK 0x80 in MQTT 3.1.1, 0x87 in 5).
    """
    import json

    plugin = next((p for p in DYNSEC_PLUGIN_PATHS if Path(p).exists()), None)
    if plugin is None:
        raise RuntimeError("mosquitto_dynamic_security.so not found (Debian package mosquitto)")
    config = {
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "limited"}]}],
        "roles": [{"rolename": "limited",
                   "acls": [{"acltype": "subscribePattern", "topic": t, "allow": True} for t in allowed]}],
        "anonymousGroup": "anonymous",
    }
    path = directory / "dynamic-security.json"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return [f"plugin {plugin}", f"plugin_opt_config_file {path}"]
