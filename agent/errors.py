"""The agent's few error types. Each carries the data an operator needs to act on it."""

from __future__ import annotations

from collections.abc import Sequence

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78  # sysexits EX_CONFIG: systemd's RestartPreventExitStatus=78 relies on it


class AgentError(Exception):
    """Base of every error the agent raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = EX_FAILURE


class ConfigError(AgentError):
    """The configuration is invalid. `problems` holds every problem found, each with its key path."""

    exit_code = EX_CONFIG

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        head = f"invalid configuration {source}" if source else "invalid configuration"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class TLSSetupError(AgentError):
    """TLS could not be set up or the handshake failed; the message names the cause and the remedy."""

    def __init__(self, message: str, *, remedy: str = "", detail: str = "") -> None:
        self.cause = message
        self.remedy = remedy
        self.detail = detail
        text = message if not remedy else f"{message}: {remedy}"
        super().__init__(text)
