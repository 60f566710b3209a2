"""TOML configuration -> frozen dataclasses.

Validation collects every problem at once, each prefixed with its dotted key path
(`tls.security_level: must be 0..5, got 7`). Unknown keys are errors with a did-you-mean.
Nothing downstream sees the raw TOML dictionary.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import shutil
import stat
import sys
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

from agent.environment import RESERVED_PREFIX, is_removed
from agent.errors import ConfigError
from agent.topics import check_shared_group, shared_filter

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9/3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_CONFIG_PATH = Path("/etc/mqtt-agent/mqtt-agent.toml")
BUILTIN_COMMANDS = frozenset({"ping", "info", "cert.csr", "cert.install"})
COMMAND_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Characters that would break an MQTT topic segment or a client id used in one.
_TOPIC_UNSAFE = re.compile(r"[/+#\x00]")
# MQTT strings (client id, topics, user name, password) are length-prefixed with 2 bytes: at most 65535
# bytes of UTF-8. The agent's own limits are far lower, so that a typo (a pasted file) is caught here and
# not by `run` retrying forever: a device id is one topic level, and with "-doctor-XXXXXX" a client id.
MQTT_STRING_MAX = 65535
MAX_ID_BYTES = 256
MAX_HOST_BYTES = 253  # a DNS name
# Keys whose values are never printed, whatever their type (in errors, check-config, doctor, the log).
SECRET_KEY_PATHS = frozenset({"mqtt.password"})
# [commands.NAME.env]: bounded, and names a POSIX shell can use.
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_ENV_ENTRIES = 64
MAX_ENV_VALUE_BYTES = 32768


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path = Path("/var/lib/mqtt-agent")
    log_level: str = "info"
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class MqttConfig:
    hosts: tuple[HostPort, ...]
    client_id: str
    protocol: str = "3.1.1"
    keepalive: int = 60
    clean_session: bool = False
    session_expiry: int = 86400
    username: str | None = None
    password_file: Path | None = None
    password: str | None = field(default=None, repr=False)
    qos: int = 1
    command_topic: str = "command///req/#"
    connect_timeout: float = 10.0
    max_inflight: int = 100
    shared_group: str | None = None  # MQTT 5 shared subscription group (gateway pairs), see docs/connection.md
    # Largest PUBLISH packet the agent sends; None: the broker's MQTT 5 Maximum Packet Size if announced,
    # else unlimited (Eclipse Hono announces nothing and closes the connection above 2048 bytes).
    max_message_bytes: int | None = None

    @property
    def is_v5(self) -> bool:
        return self.protocol == "5"

    @property
    def subscription(self) -> str:
        """The filter the agent subscribes to: the command topic, or its shared form in a group."""
        return shared_filter(self.shared_group, self.command_topic) if self.shared_group else self.command_topic


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password_file: Path | None = None
    security_level: int = 2
    server_name: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class LimitsConfig:
    max_concurrent_commands: int = 4
    max_queued_commands: int = 64
    max_payload_bytes: int = 65536
    command_timeout: float = 30.0
    max_command_age: float = 300.0
    dedupe_retention: float = 86400.0
    max_outbox_messages: int = 10000
    # The state store (agent.state_dir/state.sqlite3): oldest finished commands are forgotten past this size.
    max_state_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class CommandSpec:
    """An exec command: argv run directly (never through a shell), payload on stdin.

    `env`: the `[commands.NAME.env]` table, added to the command's clean environment (see
    agent.environment); values are not printed anywhere (they may be tokens)."""

    name: str
    argv: tuple[str, ...]
    timeout: float
    max_output_bytes: int = 65536
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class ReconnectConfig:
    min_delay: float = 1.0
    max_delay: float = 120.0
    stable_after: float = 60.0
    jitter: bool = True


@dataclass(frozen=True)
class KeepaliveTuningConfig:
    enabled: bool = True
    drops: int = 3
    window: float = 900.0
    min: int = 10
    probe_after: float = 86400.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9883"

    @property
    def endpoint(self) -> HostPort | None:
        if not self.listen:
            return None
        return parse_host_port(self.listen, default_port=None)


DEFAULT_API_SOCKET = Path("/run/mqtt-agent/api.sock")
PUBLISH_KINDS = ("telemetry", "event")


@dataclass(frozen=True)
class ApiConfig:
    """The local HTTP API on a Unix socket (telemetry and events from the gateway's own apps)."""

    socket: Path | None = DEFAULT_API_SOCKET  # None: no API
    group: str = "mqtt-agent-apps"  # may publish (socket mode 0660); nobody else
    max_body_bytes: int = 1024 * 1024  # one request (a batch); a single message is bounded by the MQTT limit
    max_connections: int = 64
    timeout: float = 10.0  # s for a whole request (headers and body): a slow client gives up its slot


@dataclass(frozen=True)
class PublishConfig:
    """Bounds and policies of the telemetry/event queue (the state store's outbound queue)."""

    max_messages: int = 100_000
    max_bytes: int = 32 * 1024 * 1024
    max_age: float = 7 * 86400.0  # s; older messages are dropped before sending
    hono_errors: bool = False  # subscribe to Hono's error topic (error///#, gateway error//+/#)
    max_batch: int = 1000  # messages in one /v1/telemetry/batch request


@dataclass(frozen=True)
class ForwardRule:
    topic_filter: str  # a local MQTT topic filter, e.g. sensors/#
    kind: str  # telemetry | event


@dataclass(frozen=True)
class ForwardLocalConfig:
    """[forward.local]: forward topics of a local broker (the gateway's own mosquitto) upstream."""

    host: HostPort | None = None  # None: not configured
    client_id: str = ""
    username: str | None = None
    password_file: Path | None = None
    rules: tuple[ForwardRule, ...] = ()
    qos: int = 1  # telemetry sent upstream at this QoS (events always 1)

    @property
    def enabled(self) -> bool:
        return self.host is not None and bool(self.rules)


@dataclass(frozen=True)
class RenewalConfig:
    """[renewal]: when and how the client certificate is renewed (agent/renewal/). Off without a signer."""

    enabled: bool = False
    signer: str = ""  # "exec" | "command" | "" (none)
    command: tuple[str, ...] = ()
    timeout: float = 120.0
    at: float = 0.66
    before: float = 30 * 86400.0
    keep_previous: float = 7 * 86400.0
    retry_min: float = 300.0
    retry_max: float = 6 * 3600.0
    check_interval: float = 60.0
    probe_timeout: float = 10.0


@dataclass(frozen=True)
class Config:
    agent: AgentConfig
    mqtt: MqttConfig
    tls: TlsConfig
    limits: LimitsConfig
    commands: Mapping[str, CommandSpec]
    reconnect: ReconnectConfig
    keepalive_tuning: KeepaliveTuningConfig
    metrics: MetricsConfig
    source: Path | None = None
    api: ApiConfig = field(default_factory=ApiConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    forward_local: ForwardLocalConfig = field(default_factory=ForwardLocalConfig)
    renewal: RenewalConfig = RenewalConfig()


# --- parsing helpers -------------------------------------------------------------------------

_MISSING: Any = object()


class _Default:
    """`DEFAULT` as a parser's default: the value is the dataclass field's default (defaults live once)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


def schema_default(schema: type, name: str) -> Any:
    """The default of field `name` of dataclass `schema`, as TOML would spell it (a path as a string)."""
    for f in fields(schema):
        if f.name == name:
            if f.default is MISSING:
                raise KeyError(f"{schema.__name__}.{name} has no default")
            return str(f.default) if isinstance(f.default, Path) else f.default
    raise KeyError(f"{schema.__name__} has no field {name!r}")
T = TypeVar("T")


def is_ip_address(text: str) -> bool:
    """True for an IPv4 or IPv6 address literal (not a host name)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_host_port(text: str, default_port: int | None) -> HostPort:
    """Parse `host:port`, `[v6]:port` or (with a default port) a bare host. Raises ValueError."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if any(ch.isspace() for ch in text):
        raise ValueError(f"must not contain whitespace, got {_excerpt(text)}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {_excerpt(text)}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected ':port' after ']' in {_excerpt(text)}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text:
            raise ValueError(f"empty port in {_excerpt(text)}: write host:port, or leave out the ':'")
    elif text.count(":") > 1:
        raise ValueError(f"IPv6 address {_excerpt(text)} must be written as [address]:port")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"missing host in {_excerpt(text)}")
    if "\x00" in host or len(host.encode("utf-8")) > MAX_HOST_BYTES:
        raise ValueError(f"host must be at most {MAX_HOST_BYTES} bytes without NUL, got {len(host.encode())} bytes")
    if text.startswith("[") and rest == ":":
        raise ValueError(f"empty port in {_excerpt(text)}: write [address]:port, or leave out the ':'")
    if not port_text:
        if default_port is None:
            raise ValueError(f"missing port in {_excerpt(text)} (write host:port)")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1..65535, got {_excerpt(port_text)}")
    return HostPort(host, int(port_text))


def _excerpt(value: object, limit: int = 80) -> str:
    """repr(value), cut short: a config error quotes the value, not a pasted file."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text)} chars]"


def check_mqtt_string(value: str, max_bytes: int = MQTT_STRING_MAX, *, secret: bool = False) -> str | None:
    """What makes `value` unusable as an MQTT UTF-8 string (no NUL; at most `max_bytes` bytes), or None."""
    size = len(value.encode("utf-8", "surrogatepass"))
    shown = "" if secret else f": {_excerpt(value)}"
    if "\x00" in value:
        return f"must not contain NUL characters{shown}"
    if size > max_bytes:
        return f"must be at most {max_bytes} bytes (UTF-8), got {size} bytes{shown}"
    return None


def _type_name(value: object) -> str:
    names = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


def _describe_unreadable(path: Path) -> str | None:
    """Why `path` cannot be read by this process, in words; None if it can."""
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = path.parent
        if not parent.exists():
            return f"{path} does not exist (nor does its directory {parent})"
        return f"{path} does not exist"
    except PermissionError:
        return f"{path} cannot be reached: permission denied on a parent directory"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory, expected a file"
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        return (
            f"{path} is not readable: permission denied (owner {owner}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}; the agent runs as uid {os.geteuid()})"
        )
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    return None


class _Table:
    """Reads one TOML table, remembering which keys were consumed and collecting problems."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: list[str], base_dir: Path,
                 schema: type | None = None) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.base_dir = base_dir
        self.schema = schema  # the dataclass this table becomes: where DEFAULT looks its defaults up
        self.known: list[str] = []

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name)}: {message}")

    def _get(self, name: str, default: Any, kinds: tuple[type, ...], expected: str) -> Any:
        self.known.append(name)
        if default is DEFAULT:
            assert self.schema is not None, f"{self.key(name)}: DEFAULT needs the table's schema"
            default = schema_default(self.schema, name)
        if name not in self.data:
            if default is _MISSING:
                self.error(name, "is required")
                return None
            return default
        value = self.data[name]
        # bool is a subclass of int: refuse `keepalive = true`.
        if isinstance(value, bool) and bool not in kinds:
            shown = "(value not shown: it is a secret)" if self.key(name) in SECRET_KEY_PATHS else str(value).lower()
            self.error(name, f"must be {expected}, got boolean {shown}")
            return None
        if not isinstance(value, kinds):
            if self.key(name) in SECRET_KEY_PATHS:
                # Never the value of a secret, not even a mistyped one: this message reaches the journal.
                self.error(name, f"must be {expected}, got {_type_name(value)} (value not shown: it is a secret)")
            else:
                self.error(name, f"must be {expected}, got {_type_name(value)} {_excerpt(value)}")
            return None
        return value

    def string(self, name: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(name, default, (str,), "a string")
        if isinstance(value, str) and choices and value not in choices:
            self.error(name, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
            return None
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        return self._get(name, default, (bool,), "true or false")

    def integer(self, name: str, default: Any, lo: int, hi: int) -> Any:
        value = self._get(name, default, (int,), "an integer")
        if isinstance(value, int) and not lo <= value <= hi:
            self.error(name, f"must be {lo}..{hi}, got {value}")
            return None
        return value

    def number(self, name: str, default: Any, lo: float, hi: float) -> Any:
        value = self._get(name, default, (int, float), "a number")
        if isinstance(value, (int, float)) and not lo <= value <= hi:
            self.error(name, f"must be {lo:g}..{hi:g}, got {value:g}")
            return None
        return float(value) if value is not None else None

    def string_list(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default, (list,), "an array of strings")
        if not isinstance(value, list):
            return value
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.error(f"{name}[{i}]", f"must be a string, got {_type_name(item)} {_excerpt(item)}")
                return None
        return value

    def file(self, name: str, default: Any = None) -> Path | None:
        """An optional path to a file that must exist and be readable. Relative to the config file."""
        value = self.string(name, default if default is not None else "")
        if not value:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        why = _describe_unreadable(path)
        if why:
            self.error(name, why)
            return None
        return path

    def new_file(self, name: str) -> Path | None:
        """An optional path that need not exist yet (enroll makes it). Relative to the config file."""
        value = self.string(name, "")
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def table(self, name: str, schema: type | None = None) -> _Table:
        self.known.append(name)
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            self.error(name, f"must be a table ([{self.key(name)}]), got {_type_name(value)}")
            value = {}
        return _Table(value, self.key(name), self.problems, self.base_dir, schema)

    def finish(self) -> None:
        for name in self.data:
            if name in self.known:
                continue
            import difflib  # only when there is a mistake to explain

            hint = difflib.get_close_matches(name, self.known, n=1, cutoff=0.6)
            where = f"[{self.path}]" if self.path else "the top level"
            msg = f"unknown key in {where}"
            if hint:
                msg += f"; did you mean {self.key(hint[0])!r}?"
            else:
                msg += f" (known: {', '.join(sorted(self.known))})"
            self.error(name, msg)


def _valid(value: T | None, check: Callable[[T], str | None], table: _Table, name: str) -> T | None:
    if value is None:
        return None
    problem = check(value)
    if problem:
        table.error(name, problem)
        return None
    return value


def check_device_id(value: str) -> str | None:
    """A device id or client id: one MQTT topic level (gateway topics, the doctor's probe topic)."""
    if not value:
        return "must not be empty"
    if _TOPIC_UNSAFE.search(value):
        return f"must not contain '/', '+', '#' or NUL (it is used in MQTT topics), got {_excerpt(value)}"
    return check_mqtt_string(value, MAX_ID_BYTES)


def check_command_topic(value: str) -> str | None:
    """The subscription must be one of the Hono command forms; returns a problem or None."""
    parts = value.split("/")
    forms = "'command///req/#', 'command//+/req/#' (gateway), 'command/TENANT/DEVICE/req/#' or 'c///q/#'"
    problem = check_mqtt_string(value, 1024)
    if problem:
        return problem
    if len(parts) != 5 or parts[0] not in ("command", "c") or parts[3] not in ("req", "q") or parts[4] != "#":
        return f"must be a Hono command subscription such as {forms}, got {value!r}"
    for segment in parts[1:3]:
        if segment != "+" and ("+" in segment or "#" in segment):
            return f"wildcards must fill a whole segment, got {value!r}"
    if parts[1] == "+":
        return f"the tenant segment cannot be a wildcard, got {value!r}"
    return None


# --- sections --------------------------------------------------------------------------------


def _agent(t: _Table) -> AgentConfig | None:
    device_id = _valid(t.string("device_id"), check_device_id, t, "device_id")
    state_dir_text = t.string("state_dir", DEFAULT)
    state_dir = None
    if isinstance(state_dir_text, str):
        if not state_dir_text:
            t.error("state_dir", "must not be empty")
        else:
            state_dir = Path(state_dir_text).expanduser()
            if not state_dir.is_absolute():
                state_dir = t.base_dir / state_dir
            try:
                if state_dir.exists() and not state_dir.is_dir():
                    t.error("state_dir", f"{state_dir} exists and is not a directory")
                    state_dir = None
            except OSError as exc:  # e.g. a parent directory the agent's user cannot enter
                t.error("state_dir", f"{state_dir} cannot be reached: {exc.strerror or exc}")
                state_dir = None
    log_level = t.string("log_level", DEFAULT, choices=("debug", "info", "warning", "error"))
    grace = t.number("shutdown_grace", DEFAULT, 0.0, 3600.0)
    t.finish()
    if device_id is None or state_dir is None or log_level is None or grace is None:
        return None
    return AgentConfig(device_id=device_id, state_dir=state_dir, log_level=log_level, shutdown_grace=grace)


def _mqtt(t: _Table, device_id: str | None, tls_enabled: bool) -> MqttConfig | None:
    default_port = 8883 if tls_enabled else 1883
    raw_hosts = t.string_list("hosts")
    hosts: list[HostPort] = []
    if isinstance(raw_hosts, list):
        if not raw_hosts:
            t.error("hosts", "must list at least one broker as \"host:port\"")
        for i, text in enumerate(raw_hosts):
            try:
                hosts.append(parse_host_port(text, default_port))
            except ValueError as exc:
                t.error(f"hosts[{i}]", str(exc))
    client_id = t.string("client_id", device_id or "")
    if isinstance(client_id, str) and not client_id:
        t.error("client_id", "must not be empty")
        client_id = None
    elif "client_id" in t.data:  # the default is agent.device_id, checked there
        client_id = _valid(client_id, check_device_id, t, "client_id")
    protocol = t.string("protocol", DEFAULT, choices=("3.1.1", "5"))
    keepalive = t.integer("keepalive", DEFAULT, 1, 65535)
    clean_session = t.boolean("clean_session", DEFAULT)
    session_expiry = t.integer("session_expiry", DEFAULT, 0, 0xFFFFFFFF)
    username = _valid(t.string("username", ""), check_mqtt_string, t, "username")
    password = _valid(t.string("password", ""), lambda v: check_mqtt_string(v, secret=True), t, "password")
    password_file = t.file("password_file")
    if password and password_file:
        t.error("password", "set either mqtt.password or mqtt.password_file, not both")
    if (password or password_file) and not username:
        t.error("username", "is required when a password is configured")
    qos = t.integer("qos", DEFAULT, 0, 1)
    command_topic = _valid(t.string("command_topic", DEFAULT), check_command_topic, t, "command_topic")
    connect_timeout = t.number("connect_timeout", DEFAULT, 0.5, 300.0)
    max_inflight = t.integer("max_inflight", DEFAULT, 1, 65535)
    # "" means no group, as for the other optional strings (username = "" in etc/mqtt-agent.toml).
    shared_group = _valid(t.string("shared_group", "") or None, check_shared_group, t, "shared_group")
    if shared_group and protocol == "3.1.1":
        # An MQTT 3.1.1 broker either refuses $share/... or takes it as an ordinary topic that nobody
        # publishes to: the agent would be subscribed and never receive a command.
        t.error("shared_group", f"needs MQTT 5 (shared subscriptions do not exist in MQTT 3.1.1): set "
                f"mqtt.protocol = \"5\" or remove mqtt.shared_group (got {shared_group!r})")
        shared_group = None
    max_message_bytes = t.integer("max_message_bytes", 0, 0, 268_435_455)  # 0: the broker's limit, if announced
    if isinstance(max_message_bytes, int) and 0 < max_message_bytes < 128:
        t.error("max_message_bytes", f"must be 0 (the broker's announced limit, else none) or at least 128, got "
                                     f"{max_message_bytes}")
    t.finish()
    values = (client_id, protocol, keepalive, clean_session, session_expiry, qos, command_topic, connect_timeout)
    if not hosts or len(hosts) != len(raw_hosts or []) or None in values or max_inflight is None:
        return None
    if shared_group is None and t.data.get("shared_group"):
        return None
    assert command_topic is not None
    return MqttConfig(
        hosts=tuple(hosts),
        client_id=client_id,
        protocol=protocol,
        keepalive=keepalive,
        clean_session=clean_session,
        session_expiry=session_expiry,
        username=username or None,
        password_file=password_file,
        password=password or None,
        qos=qos,
        command_topic=command_topic,
        connect_timeout=connect_timeout,
        max_inflight=max_inflight,
        shared_group=shared_group,
        max_message_bytes=max_message_bytes or None,
    )


def _tls(t: _Table) -> TlsConfig | None:
    enabled = t.boolean("enabled", DEFAULT)
    ca_file = t.file("ca_file")
    cert_file = t.file("cert_file")
    key_file = t.file("key_file")
    key_password_file = t.file("key_password_file")
    security_level = t.integer("security_level", DEFAULT, 0, 5)
    server_name = t.string("server_name", DEFAULT)
    insecure = t.boolean("insecure", DEFAULT)
    raw = t.data
    if bool(raw.get("cert_file")) != bool(raw.get("key_file")):
        missing = "key_file" if raw.get("cert_file") else "cert_file"
        t.error(missing, "is required when tls.cert_file or tls.key_file is set (mutual TLS needs both)")
    if raw.get("key_password_file") and not raw.get("key_file"):
        t.error("key_password_file", "is set but tls.key_file is not")
    if enabled is False and any(raw.get(k) for k in ("ca_file", "cert_file", "key_file", "server_name")):
        t.error("enabled", "is false, but TLS files or server_name are set: remove them or set tls.enabled = true")
    if isinstance(server_name, str) and server_name and insecure:
        t.error("insecure", "set tls.server_name or tls.insecure, not both (server_name keeps the check, use it)")
    t.finish()
    if None in (enabled, security_level, server_name, insecure):
        return None
    if any(raw.get(k) and v is None for k, v in (("ca_file", ca_file), ("cert_file", cert_file),
                                                  ("key_file", key_file), ("key_password_file", key_password_file))):
        return None
    return TlsConfig(
        enabled=enabled,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        key_password_file=key_password_file,
        security_level=security_level,
        server_name=server_name,
        insecure=insecure,
    )


def _limits(t: _Table) -> LimitsConfig | None:
    values = dict(
        max_concurrent_commands=t.integer("max_concurrent_commands", DEFAULT, 1, 256),
        max_queued_commands=t.integer("max_queued_commands", DEFAULT, 0, 100000),
        max_payload_bytes=t.integer("max_payload_bytes", DEFAULT, 1, 268435455),
        command_timeout=t.number("command_timeout", DEFAULT, 0.1, 86400.0),
        max_command_age=t.number("max_command_age", DEFAULT, 0.0, 31536000.0),
        dedupe_retention=t.number("dedupe_retention", DEFAULT, 60.0, 31536000.0),
        max_outbox_messages=t.integer("max_outbox_messages", DEFAULT, 1, 10000000),
        max_state_bytes=t.integer("max_state_bytes", DEFAULT, 1024 * 1024, 1 << 40),
    )
    t.finish()
    if None in values.values():
        return None
    return LimitsConfig(**values)


def _commands(t: _Table, default_timeout: float) -> dict[str, CommandSpec] | None:
    specs: dict[str, CommandSpec] = {}
    ok = True
    for name in list(t.data):
        sub = t.table(name, CommandSpec)
        if not COMMAND_NAME_RE.match(name):
            t.error(name, "command names may use letters, digits, '_', '.', '-' (1-64 characters)")
            ok = False
        elif name in BUILTIN_COMMANDS:
            t.error(name, f"{name!r} is a built-in command and cannot be redefined")
            ok = False
        argv = sub.string_list("argv")
        timeout = sub.number("timeout", default_timeout, 0.1, 86400.0)
        max_output = sub.integer("max_output_bytes", DEFAULT, 1, 268435455)
        env = _command_env(sub)
        sub.finish()
        if isinstance(argv, list):
            if not argv or not argv[0]:
                sub.error("argv", "must name a program: argv = [\"/path/to/program\", \"arg\", ...]")
                argv = None
            elif "/" in argv[0]:
                prog = Path(argv[0])
                if not prog.is_absolute():
                    sub.error("argv", f"program path {argv[0]!r} must be absolute or a bare name found in PATH")
                    argv = None
                elif not (prog.is_file() and os.access(prog, os.X_OK)):
                    sub.error("argv", f"{prog} does not exist or is not executable")
                    argv = None
            elif shutil.which(argv[0]) is None:
                sub.error("argv", f"program {argv[0]!r} is not found in PATH; give its absolute path")
                argv = None
        if argv is None or timeout is None or max_output is None or env is None:
            ok = False
            continue
        specs[name] = CommandSpec(name=name, argv=tuple(argv), timeout=timeout, max_output_bytes=max_output,
                                  env=env)
    return specs if ok else None


def _command_env(sub: _Table) -> tuple[tuple[str, str], ...] | None:
    """[commands.NAME.env]: extra environment variables for the command. Values are never printed."""
    env = sub.table("env")
    ok = True
    out: list[tuple[str, str]] = []
    if len(env.data) > MAX_ENV_ENTRIES:
        env.problems.append(f"{env.path}: at most {MAX_ENV_ENTRIES} variables, got {len(env.data)}")
        return None
    for key, value in env.data.items():
        env.known.append(key)
        if not ENV_NAME_RE.match(key):
            env.error(key, "variable names use letters, digits and '_', not starting with a digit (1-128)")
            ok = False
        elif key.startswith(RESERVED_PREFIX):
            env.error(key, f"{RESERVED_PREFIX}* variables are set by the agent for each request")
            ok = False
        elif is_removed(key):
            env.error(key, "is the agent's own systemd or credential variable, which commands never get "
                           "(docs/systemd.md, 'Exec commands')")
            ok = False
        elif not isinstance(value, str):
            env.error(key, f"must be a string, got {_type_name(value)} (write \"...\"; value not shown)")
            ok = False
        elif "\x00" in value or len(value.encode("utf-8", "surrogatepass")) > MAX_ENV_VALUE_BYTES:
            env.error(key, f"must be at most {MAX_ENV_VALUE_BYTES} bytes without NUL (value not shown)")
            ok = False
        else:
            out.append((key, value))
    return tuple(out) if ok else None


def _reconnect(t: _Table) -> ReconnectConfig | None:
    min_delay = t.number("min_delay", DEFAULT, 0.01, 3600.0)
    max_delay = t.number("max_delay", DEFAULT, 0.01, 86400.0)
    stable_after = t.number("stable_after", DEFAULT, 0.0, 86400.0)
    jitter = t.boolean("jitter", DEFAULT)
    t.finish()
    if min_delay is not None and max_delay is not None and max_delay < min_delay:
        t.error("max_delay", f"must be >= reconnect.min_delay ({min_delay:g}), got {max_delay:g}")
        return None
    if None in (min_delay, max_delay, stable_after, jitter):
        return None
    return ReconnectConfig(min_delay=min_delay, max_delay=max_delay, stable_after=stable_after, jitter=jitter)


def _tuning(t: _Table, keepalive: int | None) -> KeepaliveTuningConfig | None:
    enabled = t.boolean("enabled", DEFAULT)
    drops = t.integer("drops", DEFAULT, 1, 100)
    window = t.number("window", DEFAULT, 1.0, 604800.0)
    # The default floor follows a short mqtt.keepalive down; only an explicit min above it is an error.
    default_min = min(10, keepalive) if keepalive is not None else 10
    minimum = t.integer("min", default_min, 1, 65535)
    probe_after = t.number("probe_after", DEFAULT, 1.0, 31536000.0)
    t.finish()
    if minimum is not None and keepalive is not None and minimum > keepalive:
        t.error("min", f"must not exceed mqtt.keepalive ({keepalive}), got {minimum}")
        return None
    if None in (enabled, drops, window, minimum, probe_after):
        return None
    return KeepaliveTuningConfig(enabled=enabled, drops=drops, window=window, min=minimum, probe_after=probe_after)


def _metrics(t: _Table) -> MetricsConfig | None:
    listen = t.string("listen", DEFAULT)
    t.finish()
    if isinstance(listen, str) and listen:
        try:
            parse_host_port(listen, default_port=None)
        except ValueError as exc:
            t.error("listen", f"{exc} (use \"127.0.0.1:9883\", or \"\" to disable)")
            return None
    return None if listen is None else MetricsConfig(listen=listen)


def _api(t: _Table) -> ApiConfig | None:
    text = t.string("socket", DEFAULT)
    group = t.string("group", DEFAULT)
    max_body = t.integer("max_body_bytes", DEFAULT, 1024, 256 * 1024 * 1024)
    max_conn = t.integer("max_connections", DEFAULT, 1, 4096)
    timeout = t.number("timeout", DEFAULT, 0.1, 3600.0)
    t.finish()
    path: Path | None = None
    if isinstance(text, str) and text:
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = t.base_dir / path
        if len(os.fsencode(str(path))) > 107:
            t.error("socket", f"{path} is longer than a Unix socket path may be (107 bytes); choose a shorter one")
            return None
    if None in (text, group, max_body, max_conn, timeout):
        return None
    return ApiConfig(socket=path, group=group, max_body_bytes=max_body, max_connections=max_conn, timeout=timeout)


def _publish(t: _Table) -> PublishConfig | None:
    values = dict(
        max_messages=t.integer("max_messages", DEFAULT, 1, 100_000_000),
        max_bytes=t.integer("max_bytes", DEFAULT, 1024, 1 << 40),
        max_age=t.number("max_age", DEFAULT, 1.0, 366 * 86400.0),
        hono_errors=t.boolean("hono_errors", DEFAULT),
        max_batch=t.integer("max_batch", DEFAULT, 1, 100_000),
    )
    t.finish()
    if None in values.values():
        return None
    return PublishConfig(**values)


def check_topic_filter(value: str) -> str | None:
    if not value or "\x00" in value:
        return f"must be a non-empty MQTT topic filter, got {value!r}"
    parts = value.split("/")
    for i, part in enumerate(parts):
        if "#" in part and (part != "#" or i != len(parts) - 1):
            return f"'#' must be the last whole segment, got {value!r}"
        if "+" in part and part != "+":
            return f"'+' must fill a whole segment, got {value!r}"
    return None


def _forward(t: _Table) -> ForwardLocalConfig | None:
    local = t.table("local", ForwardLocalConfig)
    t.finish()
    host_text = local.string("host", "")
    client_id = local.string("client_id", DEFAULT)
    username = local.string("username", "")
    password_file = local.file("password_file")
    qos = local.integer("qos", DEFAULT, 0, 1)
    topics = local.table("topics")
    rules: list[ForwardRule] = []
    for name, kind in topics.data.items():
        topics.known.append(name)
        problem = check_topic_filter(name)
        if problem:
            topics.error(name, problem)
        elif kind not in PUBLISH_KINDS:
            topics.error(name, f"must be \"telemetry\" or \"event\", got {kind!r}")
        else:
            rules.append(ForwardRule(name, kind))
    local.finish()
    host: HostPort | None = None
    if isinstance(host_text, str) and host_text:
        try:
            host = parse_host_port(host_text, default_port=1883)
        except ValueError as exc:
            local.error("host", str(exc))
            return None
        if not rules:
            local.error("topics", "name at least one local topic filter to forward, e.g. \"sensors/#\" = \"telemetry\"")
            return None
    if None in (host_text, client_id, username, qos):
        return None
    return ForwardLocalConfig(host=host, client_id=client_id or "", username=username or None,
                              password_file=password_file, rules=tuple(rules), qos=qos)
def _program(t: _Table, name: str, argv: list[str] | None) -> list[str] | None:
    """An argv whose program exists and is executable (absolute path or found in PATH)."""
    if argv is None:
        return None
    if not argv or not argv[0]:
        t.error(name, "must name a program: [\"/path/to/program\", \"arg\", ...]")
        return None
    if "/" in argv[0]:
        prog = Path(argv[0])
        if not prog.is_absolute():
            t.error(name, f"program path {argv[0]!r} must be absolute or a bare name found in PATH")
            return None
        if not (prog.is_file() and os.access(prog, os.X_OK)):
            t.error(name, f"{prog} does not exist or is not executable")
            return None
    elif shutil.which(argv[0]) is None:
        t.error(name, f"program {argv[0]!r} is not found in PATH; give its absolute path")
        return None
    return argv


def _renewal(t: _Table, tls: TlsConfig | None) -> RenewalConfig | None:
    signer = t.string("signer", DEFAULT, choices=("", "exec", "command"))
    enabled = t.boolean("enabled", bool(signer))
    command = t.string_list("command", DEFAULT)
    if signer == "exec" or (isinstance(command, list) and command):
        command = _program(t, "command", command)
    timeout = t.number("timeout", DEFAULT, 1.0, 3600.0)
    at = t.number("at", DEFAULT, 0.05, 0.99)
    before = t.number("before", DEFAULT, 0.0, 3650 * 86400.0)
    keep_previous = t.number("keep_previous", DEFAULT, 0.0, 3650 * 86400.0)
    retry_min = t.number("retry_min", DEFAULT, 1.0, 86400.0)
    retry_max = t.number("retry_max", DEFAULT, 1.0, 7 * 86400.0)
    check_interval = t.number("check_interval", DEFAULT, 0.2, 3600.0)
    probe_timeout = t.number("probe_timeout", DEFAULT, 0.5, 300.0)
    t.finish()
    if enabled and not signer:
        t.error("enabled", "is true but renewal.signer is not set: set signer = \"exec\" (with renewal.command) "
                "or \"command\" (cert.csr / cert.install over MQTT)")
        return None
    if enabled and tls is not None and not (tls.enabled and tls.cert_file and tls.key_file and tls.ca_file):
        t.error("enabled", "renewal needs mutual TLS with a CA: set tls.cert_file, tls.key_file and tls.ca_file "
                "(the renewed certificate is checked against tls.ca_file), or renewal.enabled = false")
        return None
    if retry_min is not None and retry_max is not None and retry_max < retry_min:
        t.error("retry_max", f"must be >= renewal.retry_min ({retry_min:g}), got {retry_max:g}")
        return None
    values = (signer, enabled, command, timeout, at, before, keep_previous, retry_min, retry_max, check_interval,
              probe_timeout)
    if None in values:
        return None
    return RenewalConfig(enabled=enabled, signer=signer, command=tuple(command), timeout=timeout, at=at,
                         before=before, keep_previous=keep_previous, retry_min=retry_min, retry_max=retry_max,
                         check_interval=check_interval, probe_timeout=probe_timeout)


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate a decoded TOML document. Raises ConfigError listing every problem."""
    problems: list[str] = []
    base_dir = source.parent if source else Path.cwd()
    root = _Table(data, "", problems, base_dir)
    agent = _agent(root.table("agent", AgentConfig))
    tls = _tls(root.table("tls", TlsConfig))
    raw_tls = data.get("tls")
    tls_enabled = tls.enabled if tls else not (isinstance(raw_tls, dict) and raw_tls.get("enabled") is False)
    mqtt = _mqtt(root.table("mqtt", MqttConfig), agent.device_id if agent else None, tls_enabled)
    limits = _limits(root.table("limits", LimitsConfig))
    commands = _commands(root.table("commands"), limits.command_timeout if limits else 30.0)
    reconnect = _reconnect(root.table("reconnect", ReconnectConfig))
    tuning = _tuning(root.table("keepalive_tuning", KeepaliveTuningConfig), mqtt.keepalive if mqtt else None)
    metrics = _metrics(root.table("metrics", MetricsConfig))
    api = _api(root.table("api", ApiConfig))
    publish = _publish(root.table("publish", PublishConfig))
    forward = _forward(root.table("forward"))
    renewal = _renewal(root.table("renewal", RenewalConfig), tls)
    root.finish()
    if mqtt and tls and mqtt.password and not tls.enabled:
        problems.append("mqtt.password: would be sent in clear text because tls.enabled = false")
    if problems:
        raise ConfigError(problems, str(source) if source else "")
    assert agent and mqtt and tls and limits and commands is not None and reconnect and tuning and metrics
    assert api and publish and forward and renewal is not None
    if forward.host is not None and not forward.client_id:
        forward = replace(forward, client_id=f"{mqtt.client_id}-forward")
    return Config(agent, mqtt, tls, limits, commands, reconnect, tuning, metrics, source, renewal=renewal,
                  api=api, publish=publish, forward_local=forward)


# Secret files a systemd unit hands over as credentials (LoadCredential=KEY:PATH, see docs/systemd.md):
# when the config sets KEY, $CREDENTIALS_DIRECTORY/KEY is used in place of the path it names, so the
# original can stay readable by root only. `run` and `check-config` resolve them the same way.
CREDENTIAL_KEYS = ("tls.key_file", "tls.key_password_file", "mqtt.password_file")
# What the unit's SetCredential= fallback holds when the source file does not exist: "not provided".
CREDENTIAL_UNSET = b"mqtt-agent:unset"


def credentials_in_use(cfg: Config, credentials_dir: str | None) -> dict[str, Path]:
    """{config key: path} of the secrets in `cfg` that come from systemd credentials (files in
    `credentials_dir`, systemd's $CREDENTIALS_DIRECTORY)."""
    if not credentials_dir:
        return {}
    found = {}
    for key in CREDENTIAL_KEYS:
        section, name = key.split(".", 1)
        path = getattr(getattr(cfg, section), name, None)
        if path is not None and str(path).startswith(credentials_dir.rstrip("/") + "/"):
            found[key] = path
    return found


def credential_overrides(credentials_dir: str | Path | None) -> dict[str, Path]:
    """{config key: credential file} for the secrets systemd passed in `credentials_dir`."""
    if not credentials_dir:
        return {}
    found: dict[str, Path] = {}
    for key in CREDENTIAL_KEYS:
        path = Path(credentials_dir) / key
        try:
            data = path.read_bytes().strip()
        except FileNotFoundError:
            continue
        except OSError:
            found[key] = path  # validation will say why it cannot be read
            continue
        if data and data != CREDENTIAL_UNSET:
            found[key] = path
    return found


def apply_credentials(data: Mapping[str, Any], overrides: Mapping[str, Path]) -> dict[str, Any]:
    """`data` with each configured secret path replaced by its credential (unset keys stay unset)."""
    out = dict(data)
    for key, path in overrides.items():
        section, name = key.split(".", 1)
        table = out.get(section)
        if isinstance(table, dict) and table.get(name):
            out[section] = {**table, name: str(path)}
    return out


def load_config(path: str | Path, credentials_dir: str | Path | None = None) -> Config:
    """Read and validate the TOML file at `path`. Raises ConfigError.

    `credentials_dir` defaults to $CREDENTIALS_DIRECTORY (set by systemd for LoadCredential=)."""
    if credentials_dir is None:
        credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    path = Path(path)
    data = read_toml(path)
    data = apply_credentials(data, credential_overrides(credentials_dir))
    return parse_config(data, path.resolve())


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file at `path` as a dict; every way it can fail is a ConfigError naming the file.

    The one reader of the config file: load_config validates what it returns; read_identity reads only the
    identity files for enroll (the key and certificate need not exist yet)."""
    why = _describe_unreadable(path)
    if why:
        raise ConfigError([f"config file {why}"], str(path))
    try:
        with open(path, "rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not valid UTF-8: {exc}"], str(path)) from exc
    return data


@dataclass(frozen=True)
class Identity:
    """The device's identity files as the config names them, before they exist: what `enroll` makes."""

    device_id: str | None
    cert_file: Path
    key_file: Path
    ca_file: Path | None
    key_password_file: Path | None
    security_level: int


def read_identity(path: Path) -> Identity:
    """agent.device_id and the [tls] files of the config at `path`, with load_config's types, defaults and
    path resolution, but without requiring the key and certificate to exist (making them is enroll's point).
    Other sections are not validated here: `check-config` does that. Raises ConfigError listing every problem.
    """
    data = read_toml(path)
    problems: list[str] = []
    root = _Table(data, "", problems, path.resolve().parent)
    agent, tls = root.table("agent", AgentConfig), root.table("tls", TlsConfig)
    raw_id = agent.string("device_id", "")
    device_id = _valid(raw_id, check_device_id, agent, "device_id") if raw_id else None  # --device-id may give it
    if tls.boolean("enabled", DEFAULT) is False:
        tls.error("enabled", "is false; a device certificate is only used with TLS")
    level = tls.integer("security_level", DEFAULT, 0, 5)
    files = {name: tls.new_file(name) for name in ("cert_file", "key_file", "ca_file", "key_password_file")}
    for name in ("cert_file", "key_file"):
        if files[name] is None and isinstance(tls.data.get(name, ""), str):
            tls.error(name, "is not set; enroll writes the device key and CSR next to tls.cert_file and "
                            "tls.key_file (e.g. /etc/mqtt-agent/device.pem and device.key)")
    cert_file, key_file = files["cert_file"], files["key_file"]
    if cert_file is not None and cert_file == key_file:
        tls.error("key_file", "must differ from tls.cert_file")
    if problems:
        raise ConfigError(problems, str(path))
    assert cert_file is not None and key_file is not None and isinstance(level, int)
    return Identity(device_id=device_id, cert_file=cert_file, key_file=key_file, ca_file=files["ca_file"],
                    key_password_file=files["key_password_file"], security_level=level)


def read_secret(path: Path) -> str:
    """Read a one-line secret file (password, key passphrase), without the trailing newline."""
    return path.read_text(encoding="utf-8").rstrip("\r\n")


# --- rendering (check-config) ----------------------------------------------------------------

# Keys whose value is never printed, whatever its type: check-config shows that they are set, not what.
SECRET_KEYS = frozenset({"password"})
REDACTED = "<redacted>"


def _plain(value: object) -> object:
    """A config value as TOML can hold it (paths and hosts as strings, tuples as arrays)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, HostPort):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if getattr(value, f.name) is not None}
    return str(value)


def _table(section: object, skip: frozenset[str] = frozenset()) -> tuple[dict[str, object], list[str]]:
    """(the section's set values, the names of those not set); secrets redacted."""
    values: dict[str, object] = {}
    unset: list[str] = []
    for f in fields(section):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        value = getattr(section, f.name)
        if value is None:
            unset.append(f.name)
        else:
            values[f.name] = REDACTED if f.name in SECRET_KEYS else _plain(value)
    return values, unset


def render_config(cfg: Config) -> str:
    """The effective configuration as TOML, defaults filled in and secrets redacted.

    Generated from the dataclasses, so a new key shows up here without being listed twice.
    """
    import tomli_w  # only the commands that write TOML need it

    parts: list[str] = []

    def emit(title: tuple[str, ...], values: dict[str, object], unset: list[str]) -> None:
        nested: dict[str, object] = values
        for name in reversed(title):  # a command named "fw.update" is one key, not two tables
            nested = {name: nested}
        text = tomli_w.dumps(nested).rstrip("\n")
        parts.append("\n".join([text, *(f"# {key} is not set" for key in unset)]) + "\n")

    for f in fields(cfg):
        section = getattr(cfg, f.name)
        if f.name == "source":
            continue
        if f.name == "commands":
            for spec in section.values():
                emit(("commands", spec.name), *_table(spec, skip=frozenset({"name", "env"})))
                if spec.env:  # names only: a value may be a token
                    emit(("commands", spec.name, "env"), {k: REDACTED for k, _ in spec.env}, [])
            continue
        if f.name == "forward_local":
            if section.host is not None:  # not configured: no section at all
                emit(("forward", "local"), *_table(section, skip=frozenset({"rules"})))
                emit(("forward", "local", "topics"), {r.topic_filter: r.kind for r in section.rules}, [])
            continue
        values, unset = _table(section)
        if f.name == "api" and section.socket is None:  # "" disables the API (unset would mean the default)
            values["socket"] = ""
            unset.remove("socket")
        emit((f.name,), values, unset)
    return "\n".join(parts)
