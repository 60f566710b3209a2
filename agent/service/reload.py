"""What a configuration reload (SIGHUP) changes, and how: a pure comparison of two configs.

Applied live:
  [commands]                          the handler table is swapped; no reconnect
  [limits] (but max_concurrent_commands), agent.log_level, agent.shutdown_grace
Applied with one clean reconnect:
  mqtt.hosts, mqtt.username, mqtt.password(_file), [tls], and any change in the content of the files
  they name (a renewed certificate or key, a new password)
Everything else (agent.device_id, agent.state_dir, the rest of [mqtt], [reconnect], [keepalive_tuning],
[metrics], limits.max_concurrent_commands, and sections added later) needs a restart: the plan says so,
and the running agent keeps the old values, so that `effective` describes what actually runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import CommandSpec, Config

LIVE_FIELDS: Mapping[str, frozenset[str]] = {
    "agent": frozenset({"log_level", "shutdown_grace"}),
    "limits": frozenset({"max_queued_commands", "max_payload_bytes", "command_timeout", "max_command_age",
                         "dedupe_retention"}),
}
RECONNECT_FIELDS: Mapping[str, frozenset[str]] = {
    "mqtt": frozenset({"hosts", "username", "password", "password_file"}),
}
RECONNECT_SECTIONS = frozenset({"tls"})
NOT_COMPARED = frozenset({"source", "commands"})


@dataclass(frozen=True)
class ReloadPlan:
    effective: Config
    reconnect: tuple[str, ...] = ()  # why a reconnect is needed (empty: none)
    live: tuple[str, ...] = ()  # dotted keys applied without a reconnect
    restart_needed: tuple[str, ...] = ()  # dotted keys that changed but apply only at the next start
    commands_added: tuple[str, ...] = ()
    commands_removed: tuple[str, ...] = ()
    commands_changed: tuple[str, ...] = ()

    @property
    def commands_differ(self) -> bool:
        return bool(self.commands_added or self.commands_removed or self.commands_changed)

    @property
    def changed(self) -> bool:
        return bool(self.reconnect or self.live or self.restart_needed or self.commands_differ)

    def commands_summary(self) -> str:
        """'added a, b; removed c' for the log line of a reload that changed [commands]."""
        return "; ".join(f"{what} {', '.join(names)}" for what, names in (
            ("added", self.commands_added), ("removed", self.commands_removed),
            ("changed", self.commands_changed)) if names)


def credentials_hint(problems: list[str], tls_failure: bool, from_credentials: Iterable[str]) -> str:
    """Words for a rejected reload when a secret comes from systemd credentials, which systemd copies only
    when the service starts -- only where it explains something: a problem with such a key, or a TLS
    setup failure while the key is one (a new certificate for a key systemd has not copied yet); not,
    say, a mistyped mqtt.keepalive next to it."""
    keys = [key for key in from_credentials
            if any(p.startswith((f"{key}:", f"{key} ")) for p in problems) or (tls_failure and key.startswith("tls."))]
    if not keys:
        return ""
    return (f" ({', '.join(keys)} come(s) from systemd credentials, which systemd copies only when the service "
            "starts: after replacing a key or password, run systemctl restart mqtt-agent)")


def secret_files(cfg: Config) -> tuple[Path, ...]:
    """The files whose content the session depends on: certificates, key, passphrase, password."""
    paths = (cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.key_password_file,
             cfg.mqtt.password_file)
    return tuple(p for p in paths if p is not None)


def fingerprint(paths: tuple[Path, ...]) -> str:
    """A digest of the files' contents (kept in memory only; it reveals nothing of a key)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            digest.update(f"unreadable:{exc.errno}".encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _diff_commands(old: Mapping[str, CommandSpec], new: Mapping[str, CommandSpec]) -> tuple[tuple[str, ...], ...]:
    added = tuple(sorted(set(new) - set(old)))
    removed = tuple(sorted(set(old) - set(new)))
    changed = tuple(sorted(n for n in set(old) & set(new) if old[n] != new[n]))
    return added, removed, changed


def plan_reload(old: Config, new: Config, old_files: str = "", new_files: str = "") -> ReloadPlan:
    """Compare the running config with a freshly validated one. `old_files`/`new_files`: fingerprints
    of the secret files (see `fingerprint`), so that renewed certificates count as a TLS change."""
    reconnect: list[str] = []
    live: list[str] = []
    restart: list[str] = []
    sections: dict[str, Any] = {}
    for sec in dataclasses.fields(Config):
        name = sec.name
        if name in NOT_COMPARED:
            continue
        old_sec, new_sec = getattr(old, name), getattr(new, name)
        if not dataclasses.is_dataclass(old_sec):
            if old_sec != new_sec:
                restart.append(name)
            sections[name] = old_sec
            continue
        kept: dict[str, Any] = {}
        for f in dataclasses.fields(old_sec):
            before, after = getattr(old_sec, f.name), getattr(new_sec, f.name)
            if before == after:
                continue
            key = f"{name}.{f.name}"
            if name in RECONNECT_SECTIONS or f.name in RECONNECT_FIELDS.get(name, ()):
                reconnect.append(f"{key} changed")
            elif f.name in LIVE_FIELDS.get(name, ()):
                live.append(key)
            else:
                restart.append(key)
                kept[f.name] = before
        sections[name] = dataclasses.replace(new_sec, **kept) if kept else new_sec
    if old_files != new_files and not reconnect:
        reconnect.append("the content of the TLS or password files changed")
    added, removed, changed = _diff_commands(old.commands, new.commands)
    effective = dataclasses.replace(new, **sections)
    return ReloadPlan(
        effective=effective,
        reconnect=tuple(reconnect),
        live=tuple(live),
        restart_needed=tuple(restart),
        commands_added=added,
        commands_removed=removed,
        commands_changed=changed,
    )


@dataclass
class ReloadOutcome:
    """What a reload did, for the log and for tests."""

    ok: bool
    message: str
    plan: ReloadPlan | None = None
    problems: list[str] = field(default_factory=list)
