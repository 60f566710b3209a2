"""Config validation: every problem at once, each with its dotted key path and an exact message."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from agent.config import (
    TlsConfig,
    load_config,
    parse_config,
    parse_host_port,
    read_identity,
    render_config,
    schema_default,
)
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def minimal(tmp_path: Path, **sections: dict) -> dict:
    data: dict = {
        "agent": {"device_id": "dev-1", "state_dir": str(tmp_path / "state")},
        "mqtt": {"hosts": ["broker.example:8883"]},
        "tls": {},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def problems(data: dict, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path / "agent.toml")
    return info.value.problems


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = parse_config(minimal(tmp_path), tmp_path / "agent.toml")
    assert cfg.mqtt.client_id == "dev-1"
    assert cfg.mqtt.hosts[0].port == 8883
    assert cfg.mqtt.protocol == "3.1.1"
    assert cfg.mqtt.keepalive == 60
    assert cfg.mqtt.clean_session is False
    assert cfg.mqtt.qos == 1
    assert cfg.mqtt.command_topic == "command///req/#"
    assert cfg.tls.enabled is True and cfg.tls.security_level == 2 and cfg.tls.insecure is False
    assert cfg.metrics.listen == "127.0.0.1:9883"
    assert cfg.reconnect.min_delay == 1.0 and cfg.reconnect.max_delay == 120.0 and cfg.reconnect.stable_after == 60.0
    assert cfg.keepalive_tuning.drops == 3 and cfg.keepalive_tuning.min == 10
    assert cfg.keepalive_tuning.window == 900.0 and cfg.keepalive_tuning.probe_after == 86400.0


def test_plain_tcp_defaults_to_port_1883(tmp_path: Path) -> None:
    cfg = parse_config(minimal(tmp_path, mqtt={"hosts": ["a", "[::1]", "b:1999"]}, tls={"enabled": False}))
    assert [(h.host, h.port) for h in cfg.mqtt.hosts] == [("a", 1883), ("::1", 1883), ("b", 1999)]
    assert [str(h) for h in cfg.mqtt.hosts] == ["a:1883", "[::1]:1883", "b:1999"]


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"agent": {"device_id": ""}}, "agent.device_id: must not be empty"),
        ({"agent": {"device_id": "a/b"}},
         "agent.device_id: must not contain '/', '+', '#' or NUL (it is used in MQTT topics), got 'a/b'"),
        ({"mqtt": {"keepalive": "60"}}, "mqtt.keepalive: must be an integer, got string '60'"),
        ({"mqtt": {"keepalive": 0}}, "mqtt.keepalive: must be 1..65535, got 0"),
        ({"mqtt": {"keepalive": True}}, "mqtt.keepalive: must be an integer, got boolean true"),
        ({"mqtt": {"protocol": "5.0"}}, "mqtt.protocol: must be one of '3.1.1', '5', got '5.0'"),
        ({"mqtt": {"hosts": []}}, 'mqtt.hosts: must list at least one broker as "host:port"'),
        ({"mqtt": {"hosts": ["broker:99999"]}}, "mqtt.hosts[0]: port must be 1..65535, got '99999'"),
        ({"mqtt": {"hosts": ["::1:8883"]}}, "mqtt.hosts[0]: IPv6 address '::1:8883' must be written as [address]:port"),
        ({"mqtt": {"hosts": "broker:8883"}}, "mqtt.hosts: must be an array of strings, got string 'broker:8883'"),
        ({"mqtt": {"qos": 2}}, "mqtt.qos: must be 0..1, got 2"),
        ({"mqtt": {"keepalve": 30}}, "mqtt.keepalve: unknown key in [mqtt]; did you mean 'mqtt.keepalive'?"),
        ({"tls": {"security_level": 7}}, "tls.security_level: must be 0..5, got 7"),
        ({"tls": {"server_name": "broker.test", "insecure": True}},
         "tls.insecure: set tls.server_name or tls.insecure, not both (server_name keeps the check, use it)"),
        ({"mqtt": {"command_topic": "devices/+/cmd"}},
         "mqtt.command_topic: must be a Hono command subscription such as 'command///req/#', 'command//+/req/#' "
         "(gateway), 'command/TENANT/DEVICE/req/#' or 'c///q/#', got 'devices/+/cmd'"),
        ({"limits": {"command_timeout": -1}}, "limits.command_timeout: must be 0.1..86400, got -1"),
        ({"reconnect": {"min_delay": 10, "max_delay": 5}},
         "reconnect.max_delay: must be >= reconnect.min_delay (10), got 5"),
        ({"keepalive_tuning": {"min": 90}}, "keepalive_tuning.min: must not exceed mqtt.keepalive (60), got 90"),
        ({"metrics": {"listen": "9883"}},
         "metrics.listen: missing port in '9883' (write host:port) (use \"127.0.0.1:9883\", or \"\" to disable)"),
        ({"mqtt": {"password": "secret"}}, "mqtt.username: is required when a password is configured"),
        ({"commands": {"ping": {"argv": ["/bin/true"]}}},
         "commands.ping: 'ping' is a built-in command and cannot be redefined"),
        ({"commands": {"reboot": {"argv": []}}},
         'commands.reboot.argv: must name a program: argv = ["/path/to/program", "arg", ...]'),
        ({"commands": {"x": {"argv": ["no-such-program-xyz"]}}},
         "commands.x.argv: program 'no-such-program-xyz' is not found in PATH; give its absolute path"),
        ({"commands": {"x": {"argv": ["/bin/true"], "timout": 3}}},
         "commands.x.timout: unknown key in [commands.x]; did you mean 'commands.x.timeout'?"),
        ({"agnet": {}}, "agnet: unknown key in the top level; did you mean 'agent'?"),
    ],
)
def test_each_mistake_has_an_exact_message(tmp_path: Path, sections: dict, expected: str) -> None:
    assert expected in problems(minimal(tmp_path, **sections), tmp_path)


def test_missing_device_id_and_hosts_are_reported_together(tmp_path: Path) -> None:
    found = problems({"agent": {}, "mqtt": {}}, tmp_path)
    assert "agent.device_id: is required" in found
    assert "mqtt.hosts: is required" in found


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = minimal(tmp_path, mqtt={"keepalive": 0, "qos": 5}, tls={"security_level": 9}, limits={"foo": 1})
    found = problems(data, tmp_path)
    assert len(found) == 4, found
    assert found[0].startswith("tls.security_level")  # sections are validated in a fixed order


def test_missing_files_are_named_with_the_reason(tmp_path: Path) -> None:
    found = problems(minimal(tmp_path, tls={"ca_file": "certs/ca.pem", "cert_file": str(tmp_path)}), tmp_path)
    assert f"tls.ca_file: {tmp_path}/certs/ca.pem does not exist (nor does its directory {tmp_path}/certs)" in found
    assert f"tls.cert_file: {tmp_path} is a directory, expected a file" in found
    assert "tls.key_file: is required when tls.cert_file or tls.key_file is set (mutual TLS needs both)" in found


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged uid")
def test_unreadable_file_says_permission_denied_with_owner_and_mode(tmp_path: Path) -> None:
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="mqtt-agent-perm-", dir="/tmp"))  # traversable by nobody
    shared.chmod(0o755)
    key = shared / "device.key"
    key.write_text("secret")
    key.chmod(0o600)
    tmp_path = shared
    pid = os.fork()
    if pid == 0:  # child: drop to nobody and validate
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                parse_config(minimal(tmp_path, tls={"cert_file": str(key), "key_file": str(key)}), tmp_path / "a")
                os._exit(2)
            except ConfigError as exc:
                expected = (f"tls.key_file: {key} is not readable: permission denied (owner root, mode 0600; "
                            "the agent runs as uid 65534)")
                os._exit(0 if expected in exc.problems else 3)
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    key.unlink()
    shared.rmdir()
    assert os.waitstatus_to_exitcode(status) == 0


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[agent]\ndevice_id = "x"\n[mqtt\nhosts = []\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.exit_code == 78
    assert "not valid TOML" in str(info.value) and "line 3" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.problems == [f"config file {tmp_path}/nope.toml does not exist"]


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    cfg = parse_config(minimal(tmp_path, tls={"ca_file": "ca.pem"}), tmp_path / "agent.toml")
    assert cfg.tls.ca_file == tmp_path / "ca.pem"


def test_example_config_covers_every_key_with_a_comment() -> None:
    """etc/mqtt-agent.toml shows every key the validator knows, each with a one-line comment."""
    text = (REPO / "etc" / "mqtt-agent.toml").read_text()
    rendered = render_config(parse_config(minimal(Path("/tmp"), tls={"enabled": False})))
    known = {line.split(" = ")[0].lstrip("# ").split(" ")[0] for line in rendered.splitlines()
             if " = " in line or line.startswith("# ")}
    keys_in_example = set()
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            keys_in_example.add(line.split("=")[0].strip())
            assert "#" in line.split("=", 1)[1], f"no comment on: {line}"
    missing = {k for k in known if k and not k.startswith("[")} - keys_in_example
    assert not missing, f"keys missing from etc/mqtt-agent.toml: {sorted(missing)}"


def test_render_redacts_the_password_and_round_trips(tmp_path: Path) -> None:
    data = minimal(tmp_path, mqtt={"username": "u", "password": "hunter2"})
    text = render_config(parse_config(data))
    assert "hunter2" not in text
    assert 'password = "<redacted>"' in text
    back = tomllib.loads(text)
    assert back["mqtt"]["hosts"] == ["broker.example:8883"] and back["mqtt"]["password"] == "<redacted>"


def test_parse_host_port_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="missing host"):
        parse_host_port(":80", 1)
    with pytest.raises(ValueError, match="unclosed"):
        parse_host_port("[::1:80", 1)
    assert parse_host_port("[fe80::1]:8883", None).host == "fe80::1"


def test_key_permission_bits_are_not_a_config_error(tmp_path: Path) -> None:
    """A group-readable key is a doctor warning, not a reason to refuse to start."""
    key = tmp_path / "k.pem"
    key.write_text("x")
    key.chmod(stat.S_IRUSR | stat.S_IRGRP)
    cfg = parse_config(minimal(tmp_path, tls={"cert_file": str(key), "key_file": str(key)}))
    assert cfg.tls.key_file == key


def test_render_is_valid_toml_that_parses_back_to_the_same_config(tmp_path: Path) -> None:
    """Values with quotes, backslashes and newlines survive (the hand-written writer produced invalid TOML)."""
    data = minimal(tmp_path, tls={"enabled": False})
    data["commands"] = {"odd": {"argv": ["/bin/echo", 'a "quoted"\nline', "back\\slash"], "timeout": 5},
                        "fw.update": {"argv": ["/bin/true"]}}
    cfg = parse_config(data)
    assert parse_config(tomllib.loads(render_config(cfg))) == cfg


# Keys etc/mqtt-agent.toml shows with an example value instead of the default.
EXAMPLE_VALUES = {"agent.device_id", "mqtt.hosts", "mqtt.client_id", "tls.ca_file", "tls.cert_file", "tls.key_file"}


def test_example_config_shows_the_defaults_of_the_dataclasses() -> None:
    """Defaults live once, in the dataclasses: the parsers read them there (DEFAULT), and the example config
    shows the same values (a key whose default is None shows as "" or 0, meaning none)."""
    from agent.config import (
        AgentConfig,
        ApiConfig,
        KeepaliveTuningConfig,
        LimitsConfig,
        MetricsConfig,
        MqttConfig,
        PublishConfig,
        ReconnectConfig,
        RenewalConfig,
        TlsConfig,
        schema_default,
    )

    sections = {"agent": AgentConfig, "mqtt": MqttConfig, "tls": TlsConfig, "limits": LimitsConfig,
                "reconnect": ReconnectConfig, "keepalive_tuning": KeepaliveTuningConfig, "metrics": MetricsConfig,
                "api": ApiConfig, "publish": PublishConfig, "renewal": RenewalConfig}
    example = tomllib.loads((REPO / "etc" / "mqtt-agent.toml").read_text())
    checked, wrong = 0, []
    for section, schema in sections.items():
        for key, value in example.get(section, {}).items():
            if f"{section}.{key}" in EXAMPLE_VALUES or isinstance(value, dict):
                continue
            try:
                want = schema_default(schema, key)
            except KeyError:
                continue  # a derived default (e.g. keepalive_tuning.min), explained in the comment
            want = list(want) if isinstance(want, tuple) else want
            checked += 1
            if not (value == want or (want is None and value in ("", 0))):
                wrong.append(f"{section}.{key} = {value!r}, default {want!r}")
    assert checked > 40 and wrong == []


def test_an_empty_section_parses_to_the_dataclass_defaults(tmp_path: Path) -> None:
    from agent.config import LimitsConfig, MetricsConfig, PublishConfig, ReconnectConfig

    cfg = parse_config(minimal(tmp_path, tls={"enabled": False}))
    assert cfg.limits == LimitsConfig() and cfg.reconnect == ReconnectConfig()
    assert cfg.metrics == MetricsConfig() and cfg.publish == PublishConfig()


# --- read_identity: what enroll reads, before the key and certificate exist ---------------------------


def _identity_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        read_identity(path)
    return info.value.problems


def test_identity_uses_the_configs_rules_without_requiring_the_files(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\ndevice_id = "gw-9"\n[tls]\ncert_file = "pki/d.pem"\nkey_file = "/abs/d.key"\n')
    ident = read_identity(cfg)
    assert ident.device_id == "gw-9"
    assert ident.cert_file == tmp_path / "pki/d.pem"  # relative to the config's directory, like load_config
    assert ident.key_file == Path("/abs/d.key")
    assert ident.ca_file is None and ident.key_password_file is None
    assert ident.security_level == schema_default(TlsConfig, "security_level")  # the one default


def test_identity_problems_read_like_load_configs(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\ndevice_id = "a/b"\n[tls]\nsecurity_level = true\ncert_file = 5\nkey_file = "k"\n')
    found = _identity_problems(cfg)
    full = problems({"agent": {"device_id": "a/b"}, "tls": {"security_level": True, "cert_file": 5}}, tmp_path)
    for key in ("agent.device_id", "tls.security_level", "tls.cert_file"):
        mine = [p for p in found if p.startswith(key + ":")]
        theirs = [p for p in full if p.startswith(key + ":")]
        assert mine and mine == theirs, key  # one set of rules: the same words for the same mistake


def test_identity_needs_both_files_and_tls(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[tls]\nenabled = false\ncert_file = "same.pem"\nkey_file = "same.pem"\n')
    assert _identity_problems(cfg) == ["tls.enabled: is false; a device certificate is only used with TLS",
                                       "tls.key_file: must differ from tls.cert_file"]
    cfg.write_text("[agent]\n")
    assert [p.split(";")[0] for p in _identity_problems(cfg)] == ["tls.cert_file: is not set",
                                                                   "tls.key_file: is not set"]
