"""The hotplug's pieces on real captures: iscsiadm output, the kernel's sysfs and /dev of a real run."""

from __future__ import annotations

import os
import time

import pytest

from iscsimple.core.config import Config
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Attachment
from iscsimple.core.run import Deadline
from iscsimple.hotplug import mdadm
from iscsimple.hotplug.devices import (
    BlockDevice,
    DeviceError,
    active_md_array,
    by_path_links,
    mount_points,
    wait_for_lun,
)
from iscsimple.hotplug.iscsiadm import parse_node_records
from iscsimple.hotplug.session import replacement_timeout
from tests.fixturetree import KERNEL_CAPTURES

CAPTURED_IQN = "iqn.2026-11.test.local:disk1"


def test_node_record_of_the_real_iscsiadm():
    text = (KERNEL_CAPTURES / "iscsiadm_node_record.txt").read_text()
    [record] = parse_node_records(text)
    assert (record.target, record.portal, record.tpgt, record.replacement_timeout) == (
        CAPTURED_IQN,
        "127.0.0.1:3260",
        1,
        20,
    )


def test_discovery_lines_and_ipv6_portals():
    records = parse_node_records(
        "127.0.0.1:3260,1 iqn.2026-11.test.local:disk1\n[2001:db8::1]:3260,2 iqn.2026-11.test.local:disk2\n"
    )
    assert [(r.portal, r.tpgt, r.target) for r in records] == [
        ("127.0.0.1:3260", 1, "iqn.2026-11.test.local:disk1"),
        ("[2001:db8::1]:3260", 2, "iqn.2026-11.test.local:disk2"),
    ]
    record = parse_node_records("# BEGIN RECORD 2.1.8\nnode.name = x\nnode.conn[0].address = 2001:db8::1\n"
                                "node.conn[0].port = 3260\n# END RECORD\n")[0]  # fmt: skip
    assert record.portal == "[2001:db8::1]:3260"


def test_build_commands_are_exactly_the_documented_ones():
    assert mdadm.build_argv("/dev/md/vm1", "/dev/sda", None) == (
        [
            "mdadm",
            "--build",
            "/dev/md/vm1",
            "--level=1",
            "--raid-devices=2",
            "missing",
            "--write-mostly",
            "/dev/sda",
        ]
    )
    # No iSCSI leg: the local device is the source, in slot 0 as it would be after recovery.
    assert mdadm.build_argv("/dev/md/vm1", None, "/dev/vg0/vm1") == (
        ["mdadm", "--build", "/dev/md/vm1", "--level=1", "--raid-devices=2", "/dev/vg0/vm1", "missing"]
    )
    with pytest.raises(ValueError):
        mdadm.build_argv("/dev/md/vm1", None, None)


def test_names_dropin_is_what_mdadm_reads():
    assert str(mdadm.NAMES_DROPIN) == "/etc/mdadm/mdadm.conf.d/iscsimple.conf"
    assert "CREATE names=yes" in mdadm.NAMES_DROPIN_TEXT.splitlines()


def _attachment(label: str | None) -> Attachment:
    return Attachment(id=f"x-{label}", spec="s", lun=1, target="iqn.2001-04.com.example:t", label=label)


def test_replacement_timeout_policy():
    config = Config(replacement_timeout_mirrored=5, replacement_timeout_unmirrored=120)
    target = "iqn.2001-04.com.example:t"
    assert replacement_timeout(config, target, [_attachment("a"), _attachment("b")]) == (5, False)
    assert replacement_timeout(config, target, [_attachment(None)]) == (120, False)
    # Both kinds: the long one, a stall beats I/O errors for the unmirrored VM.
    assert replacement_timeout(config, target, [_attachment("a"), _attachment(None)]) == (120, True)
    override = Config(target_replacement_timeout={target: 30})
    assert replacement_timeout(override, target, [_attachment("a")]) == (30, False)


def test_physical_device_is_hex_like_block_common_sh():
    assert BlockDevice("/dev/md/x", "md127", 9, 127, None).xen_physical_device == "9:7f"
    assert BlockDevice("/dev/sdq", "sdq", 65, 0, None).xen_physical_device == "41:0"
    assert BlockDevice("/dev/md/x", "md_x", 9, 512, None).xen_physical_device == "9:200"


# -- a real kernel's tree ---------------------------------------------------------------------------


def _paths(root) -> HostPaths:
    return HostPaths(procfs=root / "proc", sysfs=root / "sys", devfs=root / "dev")


def _device_node(root, name: str) -> None:
    """The node udev would have made (from sysfs's dev); stat only, never opened."""
    major, minor = (int(x) for x in (root / "sys" / "class" / "block" / name / "dev").read_text().split(":"))
    os.mknod(root / "dev" / name, 0o600 | 0o060000, os.makedev(major, minor))


def test_lun_found_on_the_captured_kernel_state_with_its_by_path_link(kernel_state):
    root = kernel_state("01")
    _device_node(root, "sda")
    paths = _paths(root)

    session, device = wait_for_lun(paths, CAPTURED_IQN, 1, 1.0, Deadline(5))

    assert (session.sid, session.state, session.portal) == (1, "LOGGED_IN", "127.0.0.1:3260")
    assert (device.name, device.path, device.size_bytes) == ("sda", str(root / "dev" / "sda"), 64 << 20)
    assert [p.name for p in by_path_links(paths, CAPTURED_IQN, 1)] == [
        f"ip-127.0.0.1:3260-iscsi-{CAPTURED_IQN}-lun-1"
    ]


def test_lun_disagreeing_with_its_by_path_link_is_refused(kernel_state):
    root = kernel_state("01")
    _device_node(root, "sda")
    link = by_path_links(_paths(root), CAPTURED_IQN, 1)[0]
    _device_node(root, "loop0")  # an existing disk that is not the LUN
    link.unlink()
    link.symlink_to("../../loop0")

    with pytest.raises(DeviceError, match="points to loop0; refusing to guess"):
        wait_for_lun(_paths(root), CAPTURED_IQN, 1, 0.5, Deadline(5))


def test_dangling_by_path_link_of_a_gone_disk_is_ignored(kernel_state):
    root = kernel_state("01")
    _device_node(root, "sda")
    link = by_path_links(_paths(root), CAPTURED_IQN, 1)[0]
    link.unlink()
    link.symlink_to("../../sdz")  # the disk of an earlier session, udev has not removed the link yet

    _, device = wait_for_lun(_paths(root), CAPTURED_IQN, 1, 0.5, Deadline(5))

    assert device.name == "sda"


def test_lun_of_a_failed_session_is_not_used(kernel_state):
    root = kernel_state("05a")  # target killed: session FAILED

    with pytest.raises(DeviceError, match="session 1 is FAILED"):
        wait_for_lun(_paths(root), CAPTURED_IQN, 1, 0.3, Deadline(5))


def test_running_array_found_through_dev_md_label(kernel_state):
    built = _paths(kernel_state("01"))
    assert active_md_array(built, "test") == "md127"
    assert active_md_array(built, "other") is None
    assert active_md_array(_paths(kernel_state("06")), "test") == "md127"  # degraded, still running
    assert active_md_array(_paths(kernel_state("11")), "test") is None  # stopped


@pytest.mark.parametrize("kind", ["missing", "directory", "garbage"])
def test_an_array_whose_state_cannot_be_read_is_never_taken_for_stopped(kernel_state, kind):
    """md127 is there (md/ exists) but md/array_state cannot be read: active_md_array said None
    ("not running"), so `resolve --keep iscsi` cleared a record under a running VM and an attach
    went on to build over it. Unknown is running."""
    root = kernel_state("04")
    state = root / "sys" / "devices" / "virtual" / "block" / "md127" / "md" / "array_state"
    state.unlink()
    if kind == "directory":
        state.mkdir()
    elif kind == "garbage":
        state.write_bytes(b"\xff\x00\x01")
    assert active_md_array(_paths(root), "test") == "md127"
    assert active_md_array(_paths(kernel_state("11")), "test") is None  # stopped: still stopped


def test_mount_points_from_mountinfo(tmp_path):
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mountinfo").write_text(
        "22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg0-root rw\n"
        "40 22 253:3 / /srv/data rw,relatime shared:20 - xfs /dev/mapper/vg0-data rw\n"
        "41 22 0:45 / /run rw - tmpfs tmpfs rw\n"
    )
    paths = HostPaths(procfs=tmp_path / "proc")
    assert mount_points(paths, BlockDevice("/dev/vg0/data", "dm-3", 253, 3, None)) == ["/srv/data"]
    assert mount_points(paths, BlockDevice("/dev/vg0/x", "dm-4", 253, 4, None)) == []


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo"])
def test_mount_points_unreadable_is_never_not_mounted(tmp_path, kind):
    """The local leg is overwritten by the build: an unreadable mountinfo returned [] ("not
    mounted"), so a mounted device could be taken; now the attach is refused naming the file."""
    mountinfo = tmp_path / "proc" / "self" / "mountinfo"
    mountinfo.parent.mkdir(parents=True)
    if kind == "directory":
        mountinfo.mkdir()
    elif kind == "fifo":
        os.mkfifo(mountinfo)
    paths = HostPaths(procfs=tmp_path / "proc")
    with pytest.raises(DeviceError, match=f"cannot tell whether /dev/vg0/data is mounted: {mountinfo}"):
        mount_points(paths, BlockDevice("/dev/vg0/data", "dm-3", 253, 3, None))


def test_first_login_settings_make_iscsid_give_up_before_we_kill_iscsiadm():
    from iscsimple.hotplug.session import node_settings

    settings = dict(node_settings(Config(login_timeout=15), 5))
    assert settings["node.session.timeo.replacement_timeout"] == "5"
    attempt, retries = (
        int(settings["node.conn[0].timeo.login_timeout"]),
        int(settings["node.session.initial_login_retry_max"]),
    )
    # Two attempts plus iscsid's reopen delay (a few seconds) fit in the 15 s iscsiadm may take.
    assert (retries + 1) * attempt + 3 < 15
    record = parse_node_records((KERNEL_CAPTURES / "iscsiadm_node_record.txt").read_text())[0]
    assert record.setting("node.conn[0].timeo.login_timeout") == "15"  # open-iscsi's default: too long
    assert record.setting("node.session.initial_login_retry_max") == "8"


def _paths(tmp_path) -> HostPaths:
    return HostPaths(
        *(tmp_path / n for n in ("proc", "sys", "dev", "state", "records", "tab", "cfg", "locks"))
    )


def test_login_that_finds_a_session_opened_meanwhile_does_not_claim_it(tmp_path, monkeypatch):
    """iscsiadm says the session exists (someone logged in between our look and our login): not ours, so
    the last remove leaves it; but a marker of an earlier, killed login of ours stays."""
    from iscsimple.core.registry import Registry
    from iscsimple.hotplug import iscsiadm, session

    paths = _paths(tmp_path)
    record = parse_node_records("192.0.2.1:3260,1 iqn.2001-04.com.example:s\n")
    assert record
    monkeypatch.setattr(iscsiadm, "node_records", lambda target, deadline: record)
    monkeypatch.setattr(iscsiadm, "set_node_setting", lambda *a: None)
    monkeypatch.setattr(session, "target_sessions", lambda paths, target: [])
    seen_marker = []

    def login(target, portal, timeout, deadline):
        seen_marker.append(session.read_marker(paths, target))
        return False  # ERR_SESS_EXISTS

    monkeypatch.setattr(iscsiadm, "login", login)
    target = "iqn.2001-04.com.example:s"
    result = session.ensure(paths, Config(), Registry(paths), target, Deadline(10))
    assert not result.logged_in
    assert seen_marker[0] is not None and seen_marker[0].pending(time.time())  # on disk before the login
    assert session.read_marker(paths, target) is None

    session.mark_opening(paths, target, "192.0.2.1:3260", 5)  # a killed add's login
    session.ensure(paths, Config(), Registry(paths), target, Deadline(10))
    assert session.read_marker(paths, target) is not None


@pytest.mark.parametrize("text", ["", "null", "[]", '{"login_until": "x"}', '{"login_until": 1e999}'])
def test_an_unreadable_session_marker_still_means_ours_and_never_waits(tmp_path, text):
    from iscsimple.hotplug import session

    paths = _paths(tmp_path)
    (paths.state / "sessions").mkdir(parents=True)
    (paths.state / "sessions" / "iqn.2001-04.com.example:s.json").write_text(text)
    marker = session.read_marker(paths, "iqn.2001-04.com.example:s")
    assert marker is not None and not marker.pending(time.time())
