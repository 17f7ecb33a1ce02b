"""`iscsimple status` on real captured kernel states: the table and the JSON say what
core.snapshot derives (leg states, write-mostly, sync, session, local_only)."""

import json

import pytest
from fixturetree import register_capture_array

from iscsimple.cli.main import main
from iscsimple.core.paths import HostPaths
from iscsimple.core.stale import StaleRecord, StaleRecords

TARGET = "iqn.2026-11.test.local:disk1"


@pytest.fixture
def host(kernel_state_readonly, tmp_path):
    """run(state, *attachments) → (exit code, stdout, stderr) of `iscsimple status` on that state."""

    def args_for(state):
        root = kernel_state_readonly(state)
        for directory in ("run", "lib"):  # a --state/--records that does not exist is a typo (exit 2)
            (tmp_path / directory).mkdir(exist_ok=True)
        return [
            f"--path.sysfs={root / 'sys'}",
            f"--path.procfs={root / 'proc'}",
            f"--path.devfs={root / 'dev'}",
            f"--state={tmp_path / 'run'}",
            f"--records={tmp_path / 'lib'}",
            f"--config={tmp_path / 'iscsimple.toml'}",
        ]

    return args_for


def _register(tmp_path, **overrides):
    register_capture_array(tmp_path, state=tmp_path / "run", **overrides)


def _status(capsys, args, *extra):
    code = main(["status", *extra, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _table(out):
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["VM", "VBD", "LABEL", "MD"]
    return lines


# state → (iscsi leg cell, local leg cell, sync, session, flags)
EXPECTED = {
    "01": ("sda in_sync wm", "loop1 missing", "degraded", "LOGGED_IN", "UNPROTECTED"),
    "02": ("sda in_sync wm", "loop1 recovering", "6.3% recover", "LOGGED_IN", "UNPROTECTED"),
    "04": ("sda in_sync wm", "loop1 in_sync", "100%", "LOGGED_IN", "ok"),
    "05a": ("sda in_sync wm", "loop1 in_sync", "100%", "FAILED lun blocked", "LOCAL-ONLY"),
    "06": ("sda faulty wm", "loop1 in_sync", "degraded", "FREE lun transport-offline", "LOCAL-ONLY"),
    "08": ("sda missing", "loop1 in_sync", "degraded", "LOGGED_IN", "LOCAL-ONLY"),
    "09": ("sda recovering wm", "loop1 in_sync", "6.3% recover", "LOGGED_IN", "LOCAL-ONLY"),
}


@pytest.mark.parametrize("state", sorted(EXPECTED))
def test_table_on_captured_states(capsys, host, tmp_path, state):
    _register(tmp_path)
    iscsi, local, sync, session, flags = EXPECTED[state]
    code, out, err = _status(capsys, host(state))
    assert (code, err) == (0, "")
    row = _table(out)[1]
    assert row.startswith("web1")
    for cell in ("xvda", "test", "md127", iscsi, local, sync, session, flags):
        assert f"  {cell}" in row, f"{cell!r} not in {row!r}"


def test_local_only_says_what_to_do(capsys, host, tmp_path):
    _register(tmp_path)
    _, out, _ = _status(capsys, host("06"))
    assert "web1 test: runs on its local leg alone" in out
    assert "do not migrate, stop or move this VM" in out
    assert "IscsimpleArrayLocalOnly.md" in out


def test_effective_timeout_against_config(capsys, host, tmp_path):
    """The kernel's recovery_tmo (20 s in the capture) beside what the config asks for."""
    _register(tmp_path)
    _, out, _ = _status(capsys, host("04"))
    assert "  20s (config 5s)" in _table(out)[1]
    (tmp_path / "iscsimple.toml").write_text(f'[targets."{TARGET}"]\nreplacement_timeout = 20\n')
    _, out, _ = _status(capsys, host("04"))
    row = _table(out)[1]
    assert "  20s  " in row and "config" not in row


def test_mixed_target_wants_the_long_timeout(capsys, host, tmp_path):
    _register(tmp_path)
    _register(tmp_path, id="vbd-2-51712", spec=f"lun2@{TARGET}", lun=2, label=None, md_device=None,
              md_path=None, local_device=None, local_kernel_name=None, iscsi_device="sdb",
              domain_id=2, domain_name="db1")  # fmt: skip
    code, out, _ = _status(capsys, host("04"), "--json")
    assert code == 0
    disks = {d["id"]: d for d in json.loads(out)["disks"]}
    assert {d["session"]["replacement_timeout_configured"] for d in disks.values()} == {120}
    # LUN 2 does not exist in the capture: the plain disk is reported missing, not invented.
    plain = disks["vbd-2-51712"]
    assert (plain["label"], plain["iscsi"]["state"], plain["running"]) == (None, "missing", False)


def test_json(capsys, host, tmp_path):
    _register(tmp_path)
    StaleRecords(host_paths_for(tmp_path)).put(
        StaleRecord(
            "test", 1700000000.0, "md127", "web1", 1, TARGET, 1, "sda", "/dev/loop1", "iSCSI leg faulty"
        )
    )
    code, out, _ = _status(capsys, host("06"), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["errors"] == []
    (disk,) = data["disks"]
    assert disk["vm"] == "web1" and disk["label"] == "test" and disk["md_device"] == "md127"
    assert disk["iscsi"] == {
        "device": "sda",
        "state": "faulty",
        "write_mostly": True,
        "configured": True,
        "errors": 0,
    }
    assert disk["local"]["state"] == "in_sync" and disk["local"]["write_mostly"] is False
    assert disk["session"]["state"] == "FREE" and disk["session"]["replacement_timeout"] == 20
    assert disk["session"]["lun_state"] == "transport-offline"
    assert disk["local_only"] is True and disk["unprotected"] is False
    assert disk["stale_since"] == 1700000000.0
    assert disk["flags"] == ["LOCAL-ONLY", "ISCSI-STALE"]


def host_paths_for(tmp_path):
    return HostPaths(state=tmp_path / "run", records=tmp_path / "lib")


def test_missing_leg_on_purpose(capsys, host, tmp_path):
    _register(tmp_path, local_device=None, local_kernel_name=None, spec=f"lun1@{TARGET}+test")
    _, out, _ = _status(capsys, host("01"))
    row = _table(out)[1]
    assert "none (MISSING)" in row and "UNPROTECTED" in row
    assert "the local leg was left out (MISSING)" in out


def test_array_gone(capsys, host, tmp_path):
    _register(tmp_path)
    _, out, _ = _status(capsys, host("11"))
    assert "NOT-RUNNING" in _table(out)[1]
    assert f"run 'iscsimple detach lun1@{TARGET}+test' to clean up" in out


def test_nothing_attached(capsys, host):
    code, out, err = _status(capsys, host("04"))
    assert (code, out, err) == (0, "no iscsimple disks are attached on this host\n", "")


def test_unreadable_source_is_exit_1_with_the_table(capsys, host, tmp_path):
    _register(tmp_path)
    args = [a if not a.startswith("--path.sysfs=") else "--path.sysfs=/nonexistent-sysfs" for a in host("04")]
    (tmp_path / "lib").mkdir(exist_ok=True)
    (tmp_path / "lib" / "stale").write_text("not a directory")
    code, out, err = _status(capsys, args)
    assert code == 1
    assert out.startswith("VM ")
    assert "iscsimple status: could not read stale:" in err
    assert "Traceback" not in err


def test_unmirrored_disk_with_session_down(capsys, host, tmp_path):
    _register(tmp_path, id="vbd-2-51712", spec=f"lun1@{TARGET}", label=None, md_device=None, md_path=None,
              local_device=None, local_kernel_name=None, domain_id=2, domain_name="db1", vbd="xvdb")  # fmt: skip
    code, out, _ = _status(capsys, host("06"))
    assert code == 0
    row = _table(out)[1]
    assert row.startswith("db1") and "ISCSI-DOWN" in row and "  -  " in row
    assert "db1 lun1@" in out and "iSCSI session is FREE" in out
    code, out, _ = _status(capsys, host("04"))
    row = _table(out)[1]
    assert "sda in_sync" in row and row.endswith("ok")


def test_stale_record_of_a_stopped_vm_is_shown(capsys, host, tmp_path):
    """The VM is gone from the registry but its local leg holds the only good copy: say so."""
    StaleRecords(host_paths_for(tmp_path)).put(
        StaleRecord(
            "test", 1700000000.0, "md127", "web1", 1, TARGET, 1, "sda", "/dev/loop1", "iSCSI leg faulty"
        )
    )
    code, out, _ = _status(capsys, host("12"))
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == [
        "no iscsimple disks are attached on this host",
        "1 LABEL(s) hold writes their iSCSI copy lacks:",
    ]
    assert lines[3].startswith("test: since ") and "(web1)" in lines[3]
    assert "run 'iscsimple resolve test --keep local' on this host first" in lines[3]
    code, out, _ = _status(capsys, host("12"), "--json")
    (stale,) = json.loads(out)["stale"]
    assert (stale["label"], stale["vm"], stale["target"], stale["lun"]) == ("test", "web1", TARGET, 1)


def _stale(tmp_path):
    StaleRecords(host_paths_for(tmp_path)).put(
        StaleRecord(
            "test", 1700000000.0, "md127", "web1", 1, TARGET, 1, "sda", "/dev/loop1", "iSCSI leg faulty"
        )
    )


@pytest.mark.parametrize(
    ("state", "heal"),
    [
        ("06", "heal: waiting for the iSCSI session (now FREE); the agent re-adds the leg once it is back"),
        ("08", "heal: the session is back and the iSCSI leg is missing: the agent re-adds it after [heal]"),
        ("09", "heal: the iSCSI copy is being rebuilt from the local leg, 6% done"),
    ],
)
def test_a_stale_record_shows_with_its_heal_progress(capsys, host, tmp_path, state, heal):
    """What the runbooks promise: status shows the record (since when, which VM, why) and how far
    the heal is, also while the disk runs on its local leg alone."""
    _register(tmp_path)
    _stale(tmp_path)
    _, out, _ = _status(capsys, host(state))
    assert "ISCSI-STALE" in _table(out)[1]
    assert "web1 test: since " in out and "holds writes its iSCSI copy lacks (iSCSI leg faulty)" in out
    assert f"web1 test: {heal}" in out


def test_a_timeout_differing_from_the_config_is_explained(capsys, host, tmp_path):
    _register(tmp_path)
    _, out, _ = _status(capsys, host("04"))
    assert "  20s (config 5s)" in _table(out)[1]
    assert (
        f"web1 test: the session to {TARGET} queues I/O for 20 s on an outage (TIMEOUT column), the config "
        "asks for 5 s" in out
    )
    assert "the next such change applies it" in out
