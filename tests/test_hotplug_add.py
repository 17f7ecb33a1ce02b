"""block-iscsimple add/remove end to end against fake iscsiadm/mdadm/xenstore: the exact commands.

Each test runs the real console script as libxl does (argv add|remove, XENBUS_PATH in
the environment, the spec in xenstore) and checks the commands, in order, the xenstore
keys, the fake kernel state (sysfs, /dev) and the registry.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from iscsimple.core.registry import LEG_ISCSI, STATE_ATTACHED
from tests.fakes.harness import IQN, PORTAL, block_script, make_hotplug

RT = "node.session.timeo.replacement_timeout"
NODE = f"iscsiadm -m node -T {IQN}"
LOGIN = f"{NODE} -p {PORTAL} --login"
LOGOUT = f"{NODE} -p {PORTAL} --logout"
# A first login that iscsid gives up on within our login timeout (5 s in the harness's config).
LOGIN_SETTINGS = [
    f"{NODE} -p {PORTAL} -o update -n node.conn[0].timeo.login_timeout -v 1",
    f"{NODE} -p {PORTAL} -o update -n node.session.initial_login_retry_max -v 1",
]


@pytest.fixture
def hotplug(tmp_path):
    return make_hotplug(tmp_path)


def test_mirrored_disk_builds_from_iscsi_then_adds_the_local_leg(hotplug):
    hotplug.host.add_target(IQN, luns={1: 64 << 20})
    local = hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1", domid=7, name="web1")

    hotplug.add(vbd)

    local_shown = local.replace(str(hotplug.host.root), "")
    assert hotplug.command_lines() == [
        NODE,
        f"{NODE} -p {PORTAL} -o update -n {RT} -v 5",
        *LOGIN_SETTINGS,
        LOGIN,
        "mdadm --build /dev/md/vm1 --level=1 --raid-devices=2 missing --write-mostly /dev/sda",
        f"mdadm /dev/md/vm1 --add {local_shown}",
    ]
    # The fake kernel: one session whose recovery_tmo is the mirrored timeout, one array.
    arrays = hotplug.host.md_arrays()
    assert arrays == {
        "md127": {"state": "clean", "members": {"sda": "in_sync,write_mostly", "dm-0": "spare"}}
    }
    recovery_tmo = hotplug.host.sys / "class" / "iscsi_session" / "session1" / "recovery_tmo"
    assert recovery_tmo.read_text().strip() == "5"
    # xenstore as block-common.sh's write_dev leaves it: hex major:minor of the md device.
    assert hotplug.xs(vbd, "physical-device") == "9:7f"
    assert hotplug.xs(vbd, "physical-device-path") == str(hotplug.host.dev / "md" / "vm1")
    assert hotplug.xs(vbd, "hotplug-status") == "connected"
    assert hotplug.xs(vbd, "iscsimple-id") == vbd.attachment_id
    assert hotplug.xs(vbd, "hotplug-error") is None
    # The registry entry the agent and `iscsimple status` read.
    entry = hotplug.registry().get(vbd.attachment_id)
    assert entry.state == STATE_ATTACHED
    assert (entry.label, entry.lun, entry.target, entry.iscsi_device) == ("vm1", 1, IQN, "sda")
    assert (entry.md_device, entry.local_device, entry.local_kernel_name) == ("md127", local, "dm-0")
    assert (entry.domain_id, entry.domain_name, entry.write_mostly_leg) == (7, "web1", LEG_ISCSI)
    assert entry.portal == PORTAL and entry.we_logged_in and entry.replacement_timeout == 5
    assert entry.last.operation == "add" and entry.last.result == "success"

    assert hotplug.run("remove", vbd).returncode == 0
    assert hotplug.command_lines()[7:] == ["mdadm --stop /dev/md/vm1", LOGOUT]
    assert hotplug.host.md_arrays() == {}
    assert hotplug.host.session_targets() == []
    assert hotplug.registry().list() == []
    stats = hotplug.registry().read_stats()
    assert stats.totals == {"add": {"success": 1}, "remove": {"success": 1}}


def test_plain_lun_is_handed_to_xen_without_mdadm(hotplug):
    hotplug.host.add_target(IQN, luns={0: 32 << 20, 3: 16 << 20})
    vbd = hotplug.vbd(f"lun3@{IQN}")

    hotplug.add(vbd)

    # The node record's timeout (open-iscsi's default 120 s) is already the unmirrored one.
    assert hotplug.command_lines() == [NODE, *LOGIN_SETTINGS, LOGIN]
    sdb = os.stat(hotplug.host.dev / "sdb").st_rdev  # LUN 0 is sda, LUN 3 sdb
    assert hotplug.xs(vbd, "physical-device") == f"{os.major(sdb):x}:{os.minor(sdb):x}" == "f0:1"
    assert hotplug.xs(vbd, "physical-device-path") == str(hotplug.host.dev / "sdb")
    assert hotplug.host.md_arrays() == {}

    hotplug.run("remove", vbd)
    assert hotplug.command_lines()[4:] == [LOGOUT]


def test_missing_iscsi_leg_builds_from_the_local_device_alone_without_login(hotplug):
    local = hotplug.mirror("vm1")
    vbd = hotplug.vbd("MISSING+vm1")

    hotplug.add(vbd)

    local_shown = local.replace(str(hotplug.host.root), "")
    assert hotplug.command_lines() == [
        f"mdadm --build /dev/md/vm1 --level=1 --raid-devices=2 {local_shown} missing"
    ]
    assert hotplug.host.md_arrays()["md127"]["members"] == {"dm-0": "in_sync"}
    assert hotplug.host.session_targets() == []

    hotplug.run("remove", vbd)
    assert hotplug.command_lines()[1:] == ["mdadm --stop /dev/md/vm1"]


def test_missing_local_leg_builds_the_iscsi_leg_only(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.add_tab("vm1", "MISSING-until-the-lv-exists")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")

    hotplug.add(vbd)

    assert hotplug.command_lines()[-1] == (
        "mdadm --build /dev/md/vm1 --level=1 --raid-devices=2 missing --write-mostly /dev/sda"
    )
    assert not any("--add" in line for line in hotplug.command_lines())
    assert hotplug.host.md_arrays()["md127"]["members"] == {"sda": "in_sync,write_mostly"}


def test_both_legs_missing_is_refused_before_any_command(hotplug):
    hotplug.add_tab("vm1", "MISSING")
    vbd = hotplug.vbd("MISSING+vm1")

    result = hotplug.run("add", vbd)

    assert result.returncode == 1
    assert hotplug.command_lines() == []
    assert hotplug.xs(vbd, "hotplug-status") == "error"
    assert "both legs are MISSING" in hotplug.xs(vbd, "hotplug-error")


def test_unknown_target_is_discovered_through_the_configured_portal_adding_new_records_only(hotplug):
    hotplug.host.add_target(IQN, in_node_db=False)
    hotplug.mirror("vm1")

    hotplug.add(hotplug.vbd(f"lun1@{IQN}+vm1"))

    assert hotplug.command_lines()[:6] == [
        NODE,
        f"iscsiadm -m discovery -t sendtargets -p {PORTAL} -o new",
        f"{NODE} -p {PORTAL} -o update -n {RT} -v 5",
        *LOGIN_SETTINGS,
        LOGIN,
    ]


def test_known_target_is_not_rediscovered_and_right_settings_are_not_rewritten(hotplug):
    right = {"node.conn[0].timeo.login_timeout": "1", "node.session.initial_login_retry_max": "1"}
    hotplug.host.add_target(IQN, replacement_timeout=5, settings=right)
    hotplug.mirror("vm1")

    hotplug.add(hotplug.vbd(f"lun1@{IQN}+vm1"))

    assert hotplug.command_lines()[:2] == [NODE, LOGIN]
    assert not any("discovery" in line for line in hotplug.command_lines())


def test_second_lun_of_a_target_shares_the_session(hotplug):
    hotplug.host.add_target(IQN, luns={1: 64 << 20, 2: 64 << 20})
    hotplug.mirror("vm1")
    hotplug.mirror("vm2")
    first, second = hotplug.vbd(f"lun1@{IQN}+vm1"), hotplug.vbd(f"lun2@{IQN}+vm2", domid=2)

    hotplug.add(first)
    before = len(hotplug.command_lines())
    hotplug.add(second)

    # No iscsiadm at all for the second: the session is there with the right timeout.
    assert [line.split()[0] for line in hotplug.command_lines()[before:]] == ["mdadm", "mdadm"]
    assert hotplug.registry().get(second.attachment_id).we_logged_in is False

    hotplug.run("remove", first)
    assert hotplug.host.session_targets() == [IQN]  # still used by vm2
    assert not any("--logout" in line for line in hotplug.command_lines())
    hotplug.run("remove", second)
    assert hotplug.command_lines()[-1] == LOGOUT
    assert hotplug.host.session_targets() == []


def test_mixed_target_gets_the_long_timeout_and_returns_to_the_short_one(hotplug):
    hotplug.host.add_target(IQN, luns={1: 64 << 20, 2: 64 << 20})
    hotplug.mirror("vm1")
    mirrored, plain = hotplug.vbd(f"lun1@{IQN}+vm1"), hotplug.vbd(f"lun2@{IQN}", domid=2)
    recovery_tmo = hotplug.host.sys / "class" / "iscsi_session" / "session1" / "recovery_tmo"

    hotplug.add(mirrored)
    assert recovery_tmo.read_text().strip() == "5"
    result = hotplug.add(plain)
    # A stall is better than I/O errors for the unmirrored VM.
    assert recovery_tmo.read_text().strip() == "120"
    assert "unmirrored" in result.stderr
    assert hotplug.command_lines()[-1] == f"{NODE} -p {PORTAL} -o update -n {RT} -v 120"
    assert hotplug.registry().get(plain.attachment_id).replacement_timeout == 120

    hotplug.run("remove", plain)
    assert recovery_tmo.read_text().strip() == "5"
    assert hotplug.host.session_targets() == [IQN]


def test_per_target_timeout_overrides_both(hotplug):
    hotplug.set_config(
        f'[iscsi]\nportals = ["{PORTAL}"]\nreplacement_timeout_mirrored = 3\n[targets."{IQN}"]\nreplacement_timeout = 11\n'
    )
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")

    hotplug.add(hotplug.vbd(f"lun1@{IQN}+vm1"))

    assert f"{NODE} -p {PORTAL} -o update -n {RT} -v 11" in hotplug.command_lines()


def test_session_opened_by_someone_else_is_shared_and_left_logged_in(hotplug):
    hotplug.host.add_target(IQN)
    # The operator logged in by hand.
    login = ["iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL, "--login"]
    assert subprocess.run(login, env=hotplug.env, capture_output=True, timeout=30).returncode == 0
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")

    hotplug.add(vbd)
    hotplug.run("remove", vbd)

    assert sum("--login" in line for line in hotplug.command_lines()) == 1  # the operator's
    assert not any("--logout" in line for line in hotplug.command_lines())
    assert hotplug.host.session_targets() == [IQN]


def test_lun_mapped_after_login_is_found_by_a_rescan(hotplug):
    hotplug.host.add_target(IQN, luns={1: 64 << 20})
    hotplug.mirror("vm1")
    hotplug.mirror("vm2")
    hotplug.add(hotplug.vbd(f"lun1@{IQN}+vm1"))
    hotplug.host.add_lun(IQN, 2, 64 << 20)

    hotplug.add(hotplug.vbd(f"lun2@{IQN}+vm2"))

    assert "iscsiadm -m session -r 1 --rescan" in hotplug.command_lines()
    assert set(hotplug.host.md_arrays()) == {"md127", "md126"}


def test_lun_that_appears_late_is_waited_for(hotplug):
    hotplug.host.add_target(IQN, lun_delay=0.8)
    hotplug.mirror("vm1")

    result = hotplug.add(hotplug.vbd(f"lun1@{IQN}+vm1"))

    assert result.seconds > 0.8
    assert "md127" in hotplug.host.md_arrays()


def test_remove_is_idempotent(hotplug):
    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")
    hotplug.add(vbd)

    assert hotplug.run("remove", vbd).returncode == 0
    commands = len(hotplug.command_lines())
    second = hotplug.run("remove", vbd)

    assert second.returncode == 0
    assert len(hotplug.command_lines()) == commands  # nothing left to undo, nothing run
    assert hotplug.xs(vbd, "hotplug-error") is None


def test_remove_of_a_disk_never_added_succeeds_and_does_nothing(hotplug):
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")
    assert hotplug.run("remove", vbd).returncode == 0
    assert hotplug.command_lines() == []


def test_bad_invocations_exit_1_with_usage(hotplug):
    for argv, extra in (
        ([], {"XENBUS_PATH": "backend/vbd/1/1"}),
        (["online"], {"XENBUS_PATH": "x"}),
        (["add"], {}),
    ):
        env = {**hotplug.env, **extra}
        result = subprocess.run([*block_script(), *argv], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        assert "usage: block-iscsimple add|remove" in result.stderr


def test_file_backed_xenstore_as_the_real_kernel_test_bed_uses_it(hotplug, tmp_path):
    """ISCSIMPLE_XENSTORE_FILE: no xenstore-* at all, keys as given (relative to XENBUS_PATH's base)."""
    from iscsimple.core.xenstore import FileXenStore

    hotplug.host.add_target(IQN)
    hotplug.mirror("vm1")
    store = FileXenStore(tmp_path / "xenstore.json")
    store.write("backend/vbd/4/768/params", f"lun1@{IQN}+vm1")
    env = {**hotplug.env, "ISCSIMPLE_XENSTORE_FILE": str(store.path), "XENBUS_PATH": "backend/vbd/4/768"}

    added = subprocess.run([*block_script(), "add"], env=env, capture_output=True, text=True, timeout=120)

    assert added.returncode == 0, added.stderr
    assert store.read("backend/vbd/4/768/hotplug-status") == "connected"
    assert store.read("backend/vbd/4/768/physical-device") == "9:7f"
    assert hotplug.host.calls(("xenstore-read", "xenstore-write", "xenstore-rm")) == []
    removed = subprocess.run(
        [*block_script(), "remove"], env=env, capture_output=True, text=True, timeout=120
    )
    assert removed.returncode == 0, removed.stderr
    assert hotplug.host.md_arrays() == {} and hotplug.host.session_targets() == []


def test_what_add_leaves_reads_back_through_the_shared_host_snapshot(hotplug):
    """The fake kernel state and the registry, read by the same code as `status` and the agent."""
    from iscsimple.core.snapshot import HostSnapshot

    hotplug.host.add_target(IQN, luns={1: 64 << 20, 2: 64 << 20})
    hotplug.mirror("vm1")
    hotplug.add(hotplug.vbd(f"lun1@{IQN}+vm1", domid=3, name="web1"))
    hotplug.add(hotplug.vbd(f"lun2@{IQN}", domid=3, name="web1"))

    snapshot = HostSnapshot.read(hotplug.paths)

    assert snapshot.ok, snapshot.sources
    view = snapshot.array("vm1")
    assert (view.md.name, view.md.array_state, view.md.level) == ("md127", "clean", "raid1")
    # Built without metadata (mdadm --build): nothing reads this attribute but the test.
    assert (hotplug.paths.sysfs / "block" / "md127" / "md" / "metadata_version").read_text().strip() == "none"
    assert (view.iscsi.device, view.iscsi.state, view.iscsi.write_mostly) == ("sda", "in_sync", True)
    assert (view.local.device, view.local.state, view.local.write_mostly) == ("dm-0", "recovering", False)
    assert (
        view.session.state == "LOGGED_IN"
        and view.session.portal == PORTAL
        and view.session.recovery_tmo == 120
    )
    assert view.lun.block == "sda" and view.lun.state == "running"
    assert view.domain == "web1" and not view.local_only and view.unprotected  # recovering: not yet a mirror
    assert len(snapshot.attachments) == 2 and len(snapshot.iscsi.sessions) == 1
    assert snapshot.hotplug.totals == {"add": {"success": 2}}


def test_add_whose_start_up_ate_libxls_time_gives_up_cleanly_before_libxl_kills_it(hotplug, monkeypatch):
    # libxl SIGKILLs the script 40 s after its fork. Started 34 s late (a loaded dom0),
    # the add has 1 s left of its 35: it must fail with a sentence and leave nothing
    # behind, not be killed half-way through an attach.
    from iscsimple.hotplug import main as hotplug_main

    hotplug.host.add_target(IQN, luns={1: 64 << 20})
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")
    for key, value in {**hotplug.env, "XENBUS_PATH": vbd.xenbus_path, "ISCSIMPLE_NO_SYSLOG": "1"}.items():
        monkeypatch.setenv(key, value)
    assert hotplug_main.main(["add"], forked=time.monotonic() - 34.9) == 1
    assert "since libxl started the script" in (hotplug.xs(vbd, "hotplug-error") or "")
    assert hotplug.xs(vbd, "hotplug-status") == "error"
    assert not any("--login" in line or "mdadm" in line for line in hotplug.command_lines())
    assert hotplug.registry().list() == []
