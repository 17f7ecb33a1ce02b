"""Shared pytest fixtures. Keep each small; module-specific helpers live next to their tests."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import vmtimings
from fixturetree import materialize


@pytest.fixture(autouse=True)
def _root_logger_as_found():
    """Entry points run in-process add handlers on sys.stderr, which pytest swaps per test.

    Left behind, such a handler writes to a closed capture stream later and a later test sees
    logging's own "--- Logging error ---" traceback: give every test the root logger it found.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def kernel_state(tmp_path: Path) -> Callable[[str], Path]:
    """Factory: kernel_state("06") materialises that captured state and returns the fake root
    (with root/sys, root/proc/mdstat, root/dev)."""

    def make(name: str) -> Path:
        return materialize(name, tmp_path / "root" / name)

    return make


@pytest.fixture(scope="session")
def kernel_state_readonly(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Like kernel_state, but each state is materialised once per session and shared:
    for tests that only read the tree (file creation is slow on some disks)."""
    base = tmp_path_factory.mktemp("kernel-states")
    roots: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in roots:
            roots[name] = materialize(name, base / f"{len(roots)}-{name}")
        return roots[name]

    return get


@pytest.fixture(scope="session")
def deb() -> Path:
    """The package scripts/build-deb makes (lintian included), built once per session;
    ISCSIMPLE_DEB=PATH uses one built already. Used by tests/test_debian_package.py and tests/vm."""
    from iscsimple import __version__

    given = os.environ.get("ISCSIMPLE_DEB")
    if given:
        return Path(given).resolve()
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [str(repo / "scripts" / "build-deb")], capture_output=True, text=True, timeout=900, cwd=repo
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "lintian: no errors or warnings" in r.stdout
    return repo / "dist" / f"iscsimple_{__version__}_all.deb"


# With pytest-xdist (scripts/test's first phase runs `-n auto --dist loadgroup`; any run may
# pass -n), tests that share one expensive or exclusive resource stay on one worker, in order:
# the real-kernel guests (booted once per session), the real Prometheus/Alertmanager runs, and
# the .deb build (which writes dist/). Everything else spreads over the workers.
# The scheduler below picks the group by path: it sees only node ids, and `xdist_group` marks no
# longer reach it (xdist 3.8 appends the group to Item._nodeid, which pytest 9 no longer reads;
# the .deb was built on both workers at once). Collection checks each test's marker against it.
SERIAL_GROUPS = {"vm": "tests/vm/", "e2e": "tests/e2e/", "deb": "tests/test_debian_package.py"}


def serial_group(nodeid: str) -> str | None:
    return next((group for group, path in SERIAL_GROUPS.items() if nodeid.startswith(path)), None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        marked = [group for group in SERIAL_GROUPS if item.get_closest_marker(group) is not None]
        if marked and serial_group(item.nodeid) != marked[0]:  # vm's .deb test is also marked deb
            raise pytest.UsageError(
                f"{item.nodeid} is marked {marked[0]} but lies outside {SERIAL_GROUPS[marked[0]]}: move it "
                "there or add its path to SERIAL_GROUPS in tests/conftest.py, so xdist keeps it with its group"
            )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class SerialGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return serial_group(nodeid) or super()._split_scope(nodeid)

    return SerialGroupScheduling(config, log)


WORKER_TIMINGS: dict[str, float] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist: gather the real-kernel figures each worker measured (tests/vm/conftest.py)."""
    WORKER_TIMINGS.update(getattr(node, "workeroutput", {}).get(vmtimings.WORKER_OUTPUT_KEY, {}))


def pytest_terminal_summary(terminalreporter):
    vmtimings.report(terminalreporter, WORKER_TIMINGS)
