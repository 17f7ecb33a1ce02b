"""core.iscsi against every captured kernel state and generated sysfs trees."""

from __future__ import annotations

import os
import shutil

import pytest
from fixturetree import STATES, FakeLun, write_iscsi_session

from iscsimple.core import iscsi as iscsi_module
from iscsimple.core.iscsi import IscsiSession, ScsiLun, find_lun_block, read_iscsi_sessions

TARGET = "iqn.2026-11.test.local:disk1"

# state: (session state, connection state, LUN 1 SCSI state, LUN 1 dev); the connection state is
# what the capture holds, not read (nothing uses it).
EXPECTED = {
    "01_built_degraded": ("LOGGED_IN", "up", "running", "8:0"),
    "02_recovering_a": ("LOGGED_IN", "up", "running", "8:0"),
    "03_recovering_b": ("LOGGED_IN", "up", "running", "8:0"),
    "04_in_sync": ("LOGGED_IN", "up", "running", "8:0"),
    # No /proc/partitions was captured in the 05 states: sda's major:minor is unknown there.
    "05a_outage_session_failed": ("FAILED", "failed", "blocked", None),
    "05b_outage_io_blocked_md_not_yet_degraded": ("FAILED", "failed", "blocked", None),
    "06_outage_after_io_leg_faulty": ("FREE", "failed", "transport-offline", "8:0"),
    "07_target_back_session_relogged": ("LOGGED_IN", "up", "running", "8:0"),
    "08_iscsi_leg_removed": ("LOGGED_IN", "up", "running", "8:0"),
    "09_recovering_local_to_iscsi": ("LOGGED_IN", "up", "running", "8:0"),
    "10_in_sync_again": ("LOGGED_IN", "up", "running", "8:0"),
    "11_stopped": ("LOGGED_IN", "up", "running", "8:0"),
}


def test_every_capture_has_an_expectation():
    assert set(EXPECTED) | {"12_logged_out"} == set(STATES)


@pytest.mark.parametrize("state", sorted(EXPECTED))
def test_captured_state(kernel_state_readonly, state):
    session_state, _connection_state, lun_state, dev = EXPECTED[state]
    result = read_iscsi_sessions(kernel_state_readonly(state) / "sys")
    assert result.errors == []
    assert result.sessions == [
        IscsiSession(
            sid=1,
            name="session1",
            target=TARGET,
            state=session_state,
            recovery_tmo=20,
            host="host0",
            portal_address="127.0.0.1",
            portal_port=3260,
            luns=(ScsiLun(hctl="0:0:0:1", lun=1, state=lun_state, block="sda", dev=dev),),
        )
    ]
    assert result.sessions[0].portal == "127.0.0.1:3260"


def test_logged_out_state_has_no_sessions(kernel_state_readonly):
    result = read_iscsi_sessions(kernel_state_readonly("12") / "sys")
    assert (result.sessions, result.errors) == ([], [])


def test_no_iscsi_module_no_sessions(tmp_path):
    result = read_iscsi_sessions(tmp_path)
    assert (result.sessions, result.errors) == ([], [])


@pytest.mark.parametrize("state", ["04", "06"])
def test_find_lun_block_in_captures(kernel_state_readonly, state):
    sysfs = kernel_state_readonly(state) / "sys"
    [(session, lun)] = find_lun_block(sysfs, TARGET, 1)
    assert (session.name, lun.block, lun.hctl) == ("session1", "sda", "0:0:0:1")
    assert find_lun_block(sysfs, TARGET, 0) == []  # LUN 0 is the target's controller, no disk
    assert find_lun_block(sysfs, "iqn.2026-11.test.local:other", 1) == []


def test_find_lun_block_logged_out(kernel_state_readonly):
    assert find_lun_block(kernel_state_readonly("12") / "sys", TARGET, 1) == []


# --- generated trees ---------------------------------------------------------------------------


def test_sessions_sorted_numerically_with_many_luns(tmp_path):
    for sid in (10, 2, 1):
        write_iscsi_session(
            tmp_path,
            sid,
            f"iqn.2026-11.example:t{sid}",
            [FakeLun(lun, block=f"sd{sid}x{lun}", dev=f"8:{sid * 16 + lun}") for lun in (12, 0, 3)],
        )
    result = read_iscsi_sessions(tmp_path)
    assert result.errors == []
    assert [s.name for s in result.sessions] == ["session1", "session2", "session10"]
    s10 = result.sessions[2]
    assert (s10.sid, s10.host, s10.target) == (10, "host9", "iqn.2026-11.example:t10")
    assert [lun.lun for lun in s10.luns] == [0, 3, 12]
    assert s10.lun(12) == ScsiLun(hctl="9:0:0:12", lun=12, state="running", block="sd10x12", dev="8:172")
    assert s10.lun(7) is None


def test_ipv6_portal_in_brackets(tmp_path):
    write_iscsi_session(tmp_path, 1, "iqn.2026-11.example:v6", address="fd00::10", port=3261)
    [session] = read_iscsi_sessions(tmp_path).sessions
    assert session.portal == "[fd00::10]:3261"


def test_lun_without_disk_and_big_lun_numbers(tmp_path):
    write_iscsi_session(
        tmp_path,
        1,
        "iqn.2026-11.example:t",
        [FakeLun(0, block=None), FakeLun(16383, block="sdq", dev="65:0", state="offline")],
    )
    [session] = read_iscsi_sessions(tmp_path).sessions
    assert session.lun(0) == ScsiLun(hctl="0:0:0:0", lun=0, state="running", block=None, dev=None)
    assert session.lun(16383).state == "offline"
    [(found, lun)] = find_lun_block(tmp_path, "iqn.2026-11.example:t", 16383)
    assert (found.sid, lun.block, lun.dev) == (1, "sdq", "65:0")
    assert find_lun_block(tmp_path, "iqn.2026-11.example:t", 0) == []


def test_two_portals_to_one_target_both_found(tmp_path):
    write_iscsi_session(tmp_path, 1, "iqn.2026-11.example:t", [FakeLun(1, block="sda")], address="192.0.2.1")
    write_iscsi_session(
        tmp_path, 2, "iqn.2026-11.example:t", [FakeLun(1, block="sdb", dev="8:16")], address="192.0.2.2"
    )
    found = find_lun_block(tmp_path, "iqn.2026-11.example:t", 1)
    assert [(s.portal, lun.block) for s, lun in found] == [
        ("192.0.2.1:3260", "sda"),
        ("192.0.2.2:3260", "sdb"),
    ]


def test_missing_and_garbage_attributes(tmp_path):
    session = write_iscsi_session(tmp_path, 1, "iqn.2026-11.example:t", [FakeLun(1)])
    attrs = session / "iscsi_session" / "session1"
    (attrs / "recovery_tmo").write_text("soon\n")
    (attrs / "state").unlink()
    write_iscsi_session(tmp_path, 2, "iqn.2026-11.example:u")
    result = read_iscsi_sessions(tmp_path)
    s1, s2 = result.sessions
    assert (s1.state, s1.recovery_tmo, s1.lun(1).block) == (None, None, "sda")
    assert sorted(result.errors) == sorted(
        [f"{attrs / 'recovery_tmo'}: cannot parse 'soon'", f"{attrs / 'state'}: missing"]
    )
    assert s2.state == "LOGGED_IN"


def deny_open(monkeypatch, denied) -> None:
    """os.open refuses `denied` (whether opened by path or relative to a directory descriptor)."""
    real_open = os.open

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):
        opened = path if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        if os.path.realpath(opened) == os.path.realpath(denied):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake_open)


def test_unreadable_attribute(tmp_path, monkeypatch):
    session = write_iscsi_session(tmp_path, 1, "iqn.2026-11.example:t", [FakeLun(1)])
    denied = str(session / "target0:0:0" / "0:0:0:1" / "state")
    deny_open(monkeypatch, denied)
    result = read_iscsi_sessions(tmp_path)
    assert result.sessions[0].lun(1).state is None
    assert result.errors == [f"{denied}: unreadable: Permission denied"]


def test_session_logged_out_while_reading_is_skipped_silently(tmp_path, monkeypatch):
    write_iscsi_session(tmp_path, 1, "iqn.2026-11.example:t")
    gone = write_iscsi_session(tmp_path, 2, "iqn.2026-11.example:u")
    real_read = iscsi_module._read_session

    def logout_session2_first(sysfs, class_dir, name, errors, *rest):
        if name == "session2":  # iscsiadm --logout between the listing and the read
            shutil.rmtree(gone)
        return real_read(sysfs, class_dir, name, errors, *rest)

    monkeypatch.setattr(iscsi_module, "_read_session", logout_session2_first)
    result = read_iscsi_sessions(tmp_path)
    assert [s.name for s in result.sessions] == ["session1"]
    assert result.errors == []


def test_one_broken_session_never_hides_the_others(tmp_path):
    write_iscsi_session(tmp_path, 1, "iqn.2026-11.example:t")
    broken = write_iscsi_session(tmp_path, 2, "iqn.2026-11.example:u")
    write_iscsi_session(tmp_path, 3, "iqn.2026-11.example:v")
    attrs = broken / "iscsi_session" / "session2"
    (attrs / "targetname").unlink()
    (attrs / "targetname").mkdir()  # unreadable even for root
    result = read_iscsi_sessions(tmp_path)
    assert [s.target for s in result.sessions] == ["iqn.2026-11.example:t", "", "iqn.2026-11.example:v"]
    assert len(result.errors) == 1 and result.errors[0].startswith(f"{attrs / 'targetname'}: unreadable")


def test_non_session_entries_ignored(tmp_path):
    write_iscsi_session(tmp_path, 1, "iqn.2026-11.example:t")
    (tmp_path / "class" / "iscsi_session" / "uevent").write_text("")
    assert [s.sid for s in read_iscsi_sessions(tmp_path).sessions] == [1]


def test_each_session_file_is_opened_once_and_no_device_is_opened(kernel_state_readonly, monkeypatch):
    sysfs = kernel_state_readonly("04") / "sys"
    opened: list[str] = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *, dir_fd=None):
        where = path if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        opened.append(os.path.realpath(where))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", recording_open)
    [session] = read_iscsi_sessions(sysfs).sessions
    monkeypatch.undo()
    assert session.lun(1).dev == "8:0"
    assert len(opened) == len(set(opened))
    assert all(p.startswith(os.path.realpath(sysfs) + "/") for p in opened)
    # The session's directory, 3 session attributes, the connection's directory and its 2
    # attributes, then for its one LUN the state and the disk's dev (the target's directory and
    # the LUN's block/ are listed by path): bounded work per session on every full read.
    assert len(opened) == 1 + 3 + 1 + 2 + 2
    assert not any(os.path.basename(p) in ("sda", "tpgt") for p in opened)


def test_session_whose_class_link_went_away_is_skipped_silently(tmp_path):
    write_iscsi_session(tmp_path, 1, "iqn.2026-11.example:t")
    write_iscsi_session(tmp_path, 2, "iqn.2026-11.example:u")
    names = ["session1", "session2", "session3"]  # a listing taken before session3's logout
    parts = iscsi_module.read_iscsi_session_parts(tmp_path, names)
    assert [name for name, (s, _) in parts.items() if s is not None] == ["session1", "session2"]
    assert parts["session3"] == (None, [])


def test_unreadable_connection_is_an_error_not_a_missing_portal(tmp_path, monkeypatch):
    session = write_iscsi_session(tmp_path, 1, "iqn.2026-11.example:t", [FakeLun(1)])
    [conn] = [p.name for p in session.iterdir() if p.name.startswith("connection")]
    denied = session / conn / "iscsi_connection" / conn
    deny_open(monkeypatch, denied)
    result = read_iscsi_sessions(tmp_path)
    assert result.sessions[0].portal is None
    assert result.errors == [f"{denied}: unreadable: Permission denied"]
