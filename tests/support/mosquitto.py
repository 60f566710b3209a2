"""A real mosquitto broker on a free loopback port, for tests, benchmarks and the demo.

mosquitto started as root drops to the `mosquitto` user unless its config says otherwise, and
then cannot read certificates in a private temp dir ("Unable to load CA certificates"), so the
config names the current user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.02)
    return False


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


class Mosquitto:
    """Start/stop/kill/restart a mosquitto process; it keeps its port across restarts."""

    def __init__(self, workdir: Path, options: BrokerOptions | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None) -> None:
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed (Debian: apt-get install mosquitto mosquitto-clients)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.options = options or BrokerOptions()
        self.host = host
        self.port = port or free_port(host)
        self.conf = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _config(self) -> str:
        o = self.options
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [
            f"user {user}",
            "per_listener_settings false",
            f"allow_anonymous {'false' if o.password_file else 'true'}",
            f"persistence {'true' if o.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
            "max_queued_messages 10000",
            f"set_tcp_nodelay {'true' if o.nodelay else 'false'}",
            f"listener {self.port} {self.host}",
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

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.conf.write_text(self._config())
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        if not wait_port(self.host, self.port, timeout):
            self.stop()
            raise RuntimeError(f"mosquitto did not start on {self.address}:\n{self.log_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no persistence save."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
