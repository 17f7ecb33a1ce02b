"""exporter.health: stalled syncs are found from deadlines, not by looking at every syncing array
on every refresh, and a full re-read neither resets nor loses a stall's clock."""

from __future__ import annotations

from unittest import mock

import pytest

from iscsimple.core.snapshot import Changes, HostSnapshot
from iscsimple.exporter.health import HealthChecker
from iscsimple.exporter.simhost import SimulatedHost

TARGET = "iqn.2003-01.org.example:filer"
LABELS = [f"vm{i}-disk" for i in range(40)]


@pytest.fixture
def host(tmp_path):
    host = SimulatedHost(tmp_path / "host")
    with host.batch():
        for i, label in enumerate(LABELS):
            host.attach(label, f"vm{i}", TARGET, i + 1)
            host.advance_resync(label, 0.25)
    return host


def md_of(snapshot: HostSnapshot, label: str) -> str:
    return snapshot.array(label).md.name


def test_a_stall_comes_at_its_deadline_and_a_move_restarts_the_clock(host):
    now = [0.0]
    checker = HealthChecker(stall_after=60, clock=lambda: now[0])
    snapshot = HostSnapshot.read(host.paths)
    assert checker.observe(snapshot).stalled == frozenset()
    now[0] = 30
    host.advance_resync(LABELS[0], 0.5)
    snapshot = snapshot.update(host.paths, Changes(md=frozenset({md_of(snapshot, LABELS[0])})))
    assert checker.observe(snapshot).stalled == frozenset()
    now[0] = 59.9
    snapshot = snapshot.update(host.paths)
    assert checker.observe(snapshot).stalled == frozenset()
    now[0] = 60
    snapshot = snapshot.update(host.paths)
    assert checker.observe(snapshot).stalled == frozenset(LABELS[1:])
    now[0] = 70  # a full re-read (the sweep) keeps both clocks
    snapshot = HostSnapshot.read(host.paths)
    assert checker.observe(snapshot).stalled == frozenset(LABELS[1:])
    now[0] = 90
    snapshot = snapshot.update(host.paths)
    assert checker.observe(snapshot).stalled == frozenset(LABELS)
    host.finish_resync(LABELS[1])  # ended: no longer stalled
    host.advance_resync(LABELS[2], 0.3)  # moved: no longer stalled, a new clock
    names = frozenset(md_of(snapshot, label) for label in LABELS[1:3])
    snapshot = snapshot.update(host.paths, Changes(md=names))
    report = checker.observe(snapshot)
    assert LABELS[1] not in report.stalled and LABELS[2] not in report.stalled
    now[0] = 149.9
    snapshot = snapshot.update(host.paths)
    assert LABELS[2] not in checker.observe(snapshot).stalled
    now[0] = 150
    snapshot = snapshot.update(host.paths)
    assert LABELS[2] in checker.observe(snapshot).stalled
    assert LABELS[1] not in checker.observe(snapshot).stalled


def test_a_refresh_with_nothing_due_looks_at_no_syncing_array(host):
    now = [0.0]
    checker = HealthChecker(stall_after=60, clock=lambda: now[0])
    snapshot = HostSnapshot.read(host.paths)
    checker.observe(snapshot)
    looked = []
    original = HostSnapshot.by_id

    def by_id(self, key):
        looked.append(key)
        return original(self, key)

    with mock.patch.object(HostSnapshot, "by_id", by_id):
        for t in (10, 20, 30):
            now[0] = t
            snapshot = snapshot.update(host.paths)
            assert checker.observe(snapshot).stalled == frozenset()
    assert looked == []
    with mock.patch.object(HostSnapshot, "by_id", by_id):
        now[0] = 60
        snapshot = snapshot.update(host.paths)
        assert len(checker.observe(snapshot).stalled) == len(LABELS)
    assert len(looked) == len(LABELS)  # each due deadline once


def test_a_sync_that_moves_every_refresh_keeps_one_deadline(host):
    """Thousands of syncs moving every poll for the whole stall window must not pile up one
    deadline per move (memory grows with arrays, not with refreshes)."""
    now = [0.0]
    checker = HealthChecker(stall_after=60, clock=lambda: now[0])
    snapshot = HostSnapshot.read(host.paths)
    checker.observe(snapshot)
    names = frozenset(md_of(snapshot, label) for label in LABELS)
    for step in range(1, 30):
        now[0] = step * 10.0
        for label in LABELS:
            host.advance_resync(label, 0.25 + step / 100)
        snapshot = snapshot.update(host.paths, Changes(md=names))
        assert checker.observe(snapshot).stalled == frozenset()
        assert len(checker._deadlines) == len(LABELS)
    now[0] = 290 + 60  # the last move was at 290
    snapshot = snapshot.update(host.paths)
    assert checker.observe(snapshot).stalled == frozenset(LABELS)
