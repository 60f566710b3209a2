"""Shared fixtures: a throwaway PKI, real mosquitto brokers, agent configs and agent processes."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.agentproc import AgentProcess, write_toml
from tests.support.mosquitto import BrokerOptions, Mosquitto
from tests.support.pki import Issued, TestCA

DEVICE_ID = "dev-1"


class PKI:
    """The session's CA with a broker certificate (localhost, 127.0.0.1, ::1) and a device certificate."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = TestCA(directory)
        self.broker = self.ca.issue("localhost", sans=["localhost", "127.0.0.1", "::1"], server=True,
                                    filename="broker")
        self.device = self.ca.issue(DEVICE_ID, filename="device")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def _needs_mosquitto() -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed; run ./scripts/test.sh, which installs it")


@pytest.fixture
def make_broker(tmp_path: Path, pki: PKI) -> Iterator[Callable[..., Mosquitto]]:
    """Factory: make_broker(tls=True, **BrokerOptions fields) -> a started Mosquitto."""
    _needs_mosquitto()
    started: list[Mosquitto] = []

    def make(tls: bool = True, host: str = "127.0.0.1", server: Issued | None = None, **opts: Any) -> Mosquitto:
        if tls:
            srv = server or pki.broker
            opts.setdefault("cafile", pki.ca.cert_path)
            opts.setdefault("certfile", srv.cert)
            opts.setdefault("keyfile", srv.key)
        broker = Mosquitto(tmp_path / f"broker{len(started)}", BrokerOptions(**opts), host=host)
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(make_broker: Callable[..., Mosquitto]) -> Mosquitto:
    """A mosquitto with one mutual-TLS listener on 127.0.0.1."""
    return make_broker()


def merge(base: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in overrides.items():
        if values is None:
            out.pop(section, None)
            continue
        out.setdefault(section, {}).update(values)
        for key in [k for k, v in out[section].items() if v is None]:
            del out[section][key]
    return out


_SHORT_DIRS: list[Path] = []


def short_dir() -> Path:
    """One short temporary directory per test session, for Unix sockets."""
    if not _SHORT_DIRS:
        import atexit
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="ma-", dir="/tmp"))
        path.chmod(0o755)
        atexit.register(shutil.rmtree, path, True)
        _SHORT_DIRS.append(path)
    return _SHORT_DIRS[0]


@pytest.fixture
def make_config(tmp_path: Path, pki: PKI) -> Callable[..., Path]:
    """Factory: make_config(broker, {"mqtt": {"keepalive": 5}}, name="agent") -> path of a TOML config.

    A value of None removes the key (or, for a section, the whole section).
    """
    counter = [0]
    import tempfile

    sockets = Path(tempfile.mkdtemp(dir=short_dir()))
    sockets.chmod(0o755)

    def make(broker: Mosquitto | None, overrides: dict[str, dict[str, Any]] | None = None,
             name: str | None = None) -> Path:
        counter[0] += 1
        name = name or f"agent{counter[0]}"
        base: dict[str, dict[str, Any]] = {
            "agent": {"device_id": DEVICE_ID, "state_dir": str(tmp_path / f"state-{name}"), "shutdown_grace": 5.0},
            "mqtt": {"hosts": [broker.address if broker else "127.0.0.1:1"], "keepalive": 30},
            "tls": {"ca_file": str(pki.ca.cert_path), "cert_file": str(pki.device.cert),
                    "key_file": str(pki.device.key)},
            "reconnect": {"min_delay": 0.2, "max_delay": 2.0},
            "metrics": {"listen": ""},
            # A short directory: a Unix socket path is limited to 107 bytes, pytest's tmp_path may be longer.
            "api": {"socket": str(sockets / f"{name}.sock")},
        }
        return write_toml(tmp_path / f"{name}.toml", merge(base, overrides or {}))

    return make


@pytest.fixture
def run_agent(request: pytest.FixtureRequest) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: run_agent(config_path, wait_subscribed=True) -> a running AgentProcess (stopped at teardown)."""
    procs: list[AgentProcess] = []

    def run(config: Path, wait_subscribed: bool = True, **kwargs: Any) -> AgentProcess:
        proc = AgentProcess(config, **kwargs).start()
        procs.append(proc)
        if wait_subscribed:
            proc.wait_for(r"subscribed to ", timeout=20)
        return proc

    yield run
    for proc in procs:
        proc.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for i, proc in enumerate(procs):
            print(f"--- agent {i} log ---\n{proc.output}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


TIERS = ("unit", "integration", "system")


def _tier(item: pytest.Item) -> str:
    parts = Path(str(item.fspath)).parts
    return parts[parts.index("tests") + 1] if "tests" in parts[:-1] else ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The folder is the tier: tests/integration -> `integration`, tests/system (and its subfolders) ->
    `system` (select with -m). Tiers run fastest first, and last of all the tests that need a cached
    root (marked `roots`): on a fresh machine scripts/test.sh builds those in the background meanwhile.
    The sort is stable, so tests keep their order (and module fixtures their grouping) otherwise."""
    for item in items:
        tier = _tier(item)
        if tier in ("integration", "system"):
            item.add_marker(getattr(pytest.mark, tier))
    rank = {tier: i for i, tier in enumerate(TIERS)}
    items.sort(key=lambda item: (rank.get(_tier(item), 0), item.get_closest_marker("roots") is not None))


_ROOT_ERROR = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """A test marked roots("trixie", ...) first waits for those cached roots (tests/support/roots.py):
    for the background prebuild to finish them, or builds them here. Outside the test's timeout (this
    wrapper runs before pytest-timeout's), so a fresh build is not a hung test; a failed build fails
    the test at setup with the build's log."""
    marker = item.get_closest_marker("roots")
    if marker is not None:
        from tests.support import prebuild, roots

        try:
            prebuild.wait_for(marker.args)
        except (roots.RootError, OSError, subprocess.SubprocessError) as exc:
            item.stash[_ROOT_ERROR] = str(exc)
    return (yield)



@pytest.fixture(autouse=True)
def _roots_ready(request: pytest.FixtureRequest) -> None:
    """Fails a test whose roots could not be built (see pytest_runtest_protocol)."""
    error = request.node.stash.get(_ROOT_ERROR, None)
    if error is not None:
        pytest.fail(f"a cached root this test needs could not be built:\n{error}", pytrace=False)
