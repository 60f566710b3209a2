"""The environment an exec command (or any program the agent runs on its behalf) starts with.

The agent's own environment is inherited, minus what belongs to the agent's service alone:

- systemd's notification and watchdog socket (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID): a program that
  talks to it (systemctl, systemd-notify, sd_notify in a library) would send to the agent's socket, which
  systemd refuses with "reception only permitted for main PID" -- or, with NotifyAccess=all, believes;
- the credentials directory (CREDENTIALS_DIRECTORY), where the device's private key and passwords are;
- socket activation (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), the agent's invocation, journal stream and
  PIDs (INVOCATION_ID, JOURNAL_STREAM, MAINPID, MANAGERPID, SYSTEMD_EXEC_PID), and the trigger/monitor
  variables of OnFailure=/OnSuccess= units (MONITOR_*, TRIGGER_*): each describes the agent, not the
  command, and a program that reads it would act on the wrong process;
- any MQTT_AGENT_* the agent itself was given: these are set per request.

Kept: everything else (PATH, LANG, LC_*, TZ, HOME, USER, proxies and whatever a drop-in's Environment=
sets), so commands behave as they would in a shell of the service user. Then the command's
`[commands.NAME.env]` table is applied, then MQTT_AGENT_COMMAND / _REQ_ID / _DEVICE_ID (the agent's, last,
so that a command can trust them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

RESERVED_PREFIX = "MQTT_AGENT_"
REMOVED = frozenset({
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
    "CREDENTIALS_DIRECTORY",
    "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
    "INVOCATION_ID", "JOURNAL_STREAM", "MAINPID", "MANAGERPID", "SYSTEMD_EXEC_PID",
})
REMOVED_PREFIXES = ("MONITOR_", "TRIGGER_", RESERVED_PREFIX)


def is_removed(name: str) -> bool:
    """True for a variable commands never inherit from the agent."""
    return name in REMOVED or name.startswith(REMOVED_PREFIXES)


def clean_environment(
    base: Mapping[str, str] | None = None,
    *,
    extra: Iterable[tuple[str, str]] = (),
    agent_vars: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for a program the agent runs: `base` (default os.environ) without the agent's
    service variables, plus `extra` (operator-configured), plus `agent_vars` (MQTT_AGENT_*, set last)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not is_removed(k)}
    env.update(extra)
    if agent_vars:
        env.update(agent_vars)
    return env
