"""The cached-root builder (tests/support/roots.py) and the background prebuild (tests/support/prebuild.py):
a failed build is reported with its log, never left half-built, and a test waiting for a root waits
outside its timeout. A real debootstrap, pointed at a suite that does not exist so that it fails in
seconds; the cache is a temporary directory."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support import prebuild, roots

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def bogus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> roots.RootSpec:
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is not installed; run ./scripts/test.sh, which installs it")
    monkeypatch.setattr(roots, "CACHE", tmp_path / "cache")
    spec = roots.RootSpec("bogus-root", "no-such-suite", roots.HOST, ("procps",))
    monkeypatch.setitem(roots.ROOTS, "bogus", spec)
    return spec


def test_a_failed_prebuild_is_reported_to_the_test_that_needs_the_root(
        bogus: roots.RootSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "prebuild"
    assert prebuild.prebuild(out, names=["bogus"], npm=False) is False
    assert (out / "status").read_text() == "failed: bogus-root\n"
    failed = (out / "bogus-root.failed").read_text()
    assert "debootstrap failed" in failed and "no-such-suite" in failed
    assert "[bogus-root +0 s] debootstrap" in (out / "bogus-root.log").read_text()
    # Nothing half-built is left in the cache, not even the temporary directory.
    assert [p.name for p in roots.CACHE.iterdir()] == [".bogus-root.lock"]
    # A test asking for the root gets the prebuild's error and log, without building it again.
    monkeypatch.setenv(roots.PREBUILD_ENV, str(out))
    with pytest.raises(roots.RootError, match=r"background prebuild failed to build .*bogus-root"):
        roots.ensure(bogus)
    # Without a prebuild (a plain pytest run) the test builds it itself, and fails the same way.
    monkeypatch.delenv(roots.PREBUILD_ENV)
    with pytest.raises(roots.RootError, match="debootstrap failed"):
        roots.ensure(bogus)


def test_a_stale_temporary_root_of_a_killed_build_is_removed(bogus: roots.RootSpec) -> None:
    stale = roots.CACHE / f".{bogus.name}.building-12345-1"
    (stale / "etc").mkdir(parents=True)
    with pytest.raises(roots.RootError):
        roots.ensure(bogus)
    assert not stale.exists()


def test_a_test_waits_for_a_root_being_built_outside_its_timeout(tmp_path: Path) -> None:
    """A roots-marked test with a 2 s timeout whose root's lock is held for 6 s (a build elsewhere)
    passes: the wait (tests/conftest.py) happens before pytest-timeout starts counting."""
    cache = tmp_path / "cache"
    spec = roots.RootSpec("ready", "bookworm", roots.HOST, ())
    (cache / spec.name).mkdir(parents=True)
    (cache / spec.name / roots.KEY_FILE).write_text(spec.key())
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.support import roots
        roots.ROOTS["ready"] = roots.RootSpec("ready", "bookworm", roots.HOST, ())
        from tests.conftest import _roots_ready, pytest_runtest_protocol  # noqa: F401
        """))
    (suite / "test_waits.py").write_text(textwrap.dedent("""\
        import pytest
        from tests.support import roots

        @pytest.mark.timeout(2)
        @pytest.mark.roots("ready")
        def test_it():
            assert roots.ROOTS["ready"].valid()
        """))
    with open(cache / f".{spec.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                               cwd=suite, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={"PATH": "/usr/bin:/bin", "MQTT_AGENT_TEST_CACHE": str(cache)})
        time.sleep(6)
        assert run.poll() is None  # still waiting for the lock
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0, out
    assert "1 passed" in out
    assert time.monotonic() - started >= 6
