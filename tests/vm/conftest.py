"""Fixtures of the real-kernel suite: one booted guest per session, a clean storage bed per test.

The guest is booted once per pytest session (booting costs seconds of TCG time) and every test leaves
it as it found it (`StorageBed.reset`). A host that cannot boot it fails the tests with the reason:
the suite is part of the default run and must not vanish silently.
"""

from __future__ import annotations

import time

import pytest
import vmtimings
from storagebed import StorageBed
from vmharness import Guest, GuestError, VmUnavailable, preflight, prepare_kernel, prepare_xen
from xldriver import CLI

TIMINGS: dict[str, float] = {}


def record(name: str, seconds: float) -> None:
    """A measured figure, printed at the end of the run (the issue asks for them)."""
    TIMINGS[name] = round(seconds, 2)


@pytest.fixture(scope="session")
def kernel_guest(tmp_path_factory):
    start = time.monotonic()
    try:
        preflight()
        kernel = prepare_kernel()
    except VmUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    record("kernel download+unpack (cached after the first run)", time.monotonic() - start)
    try:
        guest = Guest.boot(tmp_path_factory.mktemp("kernel-guest"), kernel)
    except (VmUnavailable, GuestError) as exc:
        pytest.fail(str(exc), pytrace=False)
    record("boot to guest agent (wall)", guest.boot_seconds)
    try:
        yield guest
    finally:
        guest.shutdown()


@pytest.fixture(scope="session")
def xen_guest(tmp_path_factory):
    """Xen 4.17 with the Debian kernel as dom0 (no domU: `xl block-attach 0` attaches to dom0)."""
    start = time.monotonic()
    try:
        preflight(xen=True)
        kernel, xen = prepare_kernel(), prepare_xen()
    except VmUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    record("xen hypervisor download+unpack", time.monotonic() - start)
    try:
        guest = Guest.boot(tmp_path_factory.mktemp("xen-guest"), kernel, xen=xen, memory_mib=2048)
    except (VmUnavailable, GuestError) as exc:
        pytest.fail(str(exc), pytrace=False)
    record("boot Xen + dom0 to guest agent (wall)", guest.boot_seconds)
    try:
        yield guest
    finally:
        guest.shutdown()


@pytest.fixture(scope="session")
def xen_storage(xen_guest):
    start = time.monotonic()
    bed = StorageBed(xen_guest)
    bed.setup()
    bed.setup_xen()
    record("dom0 setup: modules, udevd, iscsid, tgtd, xenstored", time.monotonic() - start)
    make_bitmap_store(bed)
    return bed


@pytest.fixture
def xen_bed(xen_storage, request):
    start = time.monotonic()
    yield xen_storage
    record(f"{request.node.name} (wall)", time.monotonic() - start)
    xen_storage.reset()


@pytest.fixture(scope="session")
def storage(kernel_guest):
    start = time.monotonic()
    bed = StorageBed(kernel_guest)
    bed.setup()
    record("guest setup: modules, udevd, iscsid, tgtd", time.monotonic() - start)
    make_bitmap_store(bed)
    return bed


def make_bitmap_store(bed: StorageBed) -> None:
    """What the package's iscsimple-bitmap-store.service does at boot: the bitmap files' RAM store, so
    that no test's first attach pays for it (test_vm_bitmap.py hides it and has its add make one)."""
    res = bed.guest.run([CLI, "bitmap-store"], timeout=120, check=False)
    assert res.rc == 0 and "ext4 on /dev/zram" in res.stdout, str(res)
    record("boot: iscsimple bitmap-store (zram + ext4 for the bitmap files)", res.seconds)


@pytest.fixture
def bed(storage, request):
    """The storage bed, reset after the test so tests do not see each other's arrays and sessions."""
    start = time.monotonic()
    yield storage
    record(f"{request.node.name} (wall)", time.monotonic() - start)
    storage.reset()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    bed = funcargs.get("bed") or funcargs.get("xen_bed")
    guest = bed.guest if bed is not None else None
    if report.failed and guest is not None:
        report.sections.append(("guest console (tail)", guest.console_tail(80)))
    two = funcargs.get("hosts")  # test_vm_twohost.py: both guests (a crashed one has none)
    if report.failed and two is not None:
        for host in (two.a, two.b):
            if host.guest is not None:
                report.sections.append((f"{host.name} console (tail)", host.guest.console_tail(60)))


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller prints (tests/conftest.py)
        workeroutput[vmtimings.WORKER_OUTPUT_KEY] = dict(TIMINGS)


def pytest_terminal_summary(terminalreporter):
    vmtimings.report(terminalreporter, TIMINGS)
