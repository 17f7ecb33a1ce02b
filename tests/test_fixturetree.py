"""The materialised fake roots look like the real kernel's: links relative and resolvable."""

from __future__ import annotations

import os

import pytest
from fixturetree import KERNEL_CAPTURES, STATES, materialize, state_dir


def test_states_are_all_found():
    assert KERNEL_CAPTURES.is_dir(), f"the real kernel captures are missing: {KERNEL_CAPTURES}"
    assert len(STATES) == 13
    assert STATES[0] == "01_built_degraded" and STATES[-1] == "12_logged_out"


def test_state_by_prefix_and_ambiguity():
    assert state_dir("06") == KERNEL_CAPTURES / "06_outage_after_io_leg_faulty"
    with pytest.raises(ValueError, match="no unique"):
        state_dir("05")  # 05a and 05b


def test_state_06_tree(tmp_path):
    root = materialize("06", tmp_path)
    sys = root / "sys"
    # md127 lives under devices/virtual like in the kernel, reached through relative links.
    assert os.readlink(sys / "block" / "md127") == "../devices/virtual/block/md127"
    assert (
        sys / "block" / "md127" / "md" / "dev-sda" / "state"
    ).read_text() == "faulty,write_mostly,write_error\n"
    assert os.readlink(sys / "block" / "md127" / "md" / "rd0") == "dev-loop1"
    assert (sys / "block" / "md127" / "md" / "dev-sda" / "block" / "dev").read_text() == "8:0\n"
    assert (sys / "block" / "md127" / "md" / "dev-loop1" / "block" / "dev").read_text() == "7:1\n"
    session = sys / "class" / "iscsi_session" / "session1"
    assert os.readlink(session) == "../../devices/platform/host0/session1/iscsi_session/session1"
    assert (session / "device" / "target0:0:0" / "0:0:0:1" / "state").read_text() == "transport-offline\n"
    assert os.path.realpath(sys / "block" / "sda") == os.path.realpath(
        session / "device" / "target0:0:0" / "0:0:0:1" / "block" / "sda"
    )
    assert (sys / "class" / "block" / "sda" / "size").read_text() == "131072\n"
    assert (sys / "class" / "iscsi_host" / "host0" / "device" / "scsi_host" / "host0" / "state").is_file()
    assert (root / "proc" / "mdstat").read_text().startswith("Personalities : [raid1]")
    assert os.readlink(root / "dev" / "md" / "test") == "../md127"
    assert not list(sys.rglob(".ls-la"))
    # Every link is relative: a tree can be moved or copied.
    assert all(not os.readlink(p).startswith("/") for p in root.rglob("*") if p.is_symlink())


def test_state_without_sys_capture(tmp_path):
    root = materialize("12", tmp_path)
    assert not (root / "sys" / "class" / "iscsi_session").exists()
    assert (root / "sys" / "block" / "loop1" / "dev").read_text() == "7:1\n"
    assert not (root / "sys" / "block" / "sda").exists()


def test_state_without_partitions_has_no_invented_dev(tmp_path):
    root = materialize("05a", tmp_path)
    assert (root / "sys" / "block" / "sda").is_dir()
    assert not (root / "sys" / "block" / "sda" / "dev").exists()
    assert not (root / "proc" / "partitions").exists()
