"""Scenario 2: two mirrored LUNs (two labels) and a plain LUN of one target, attached concurrently as xl
does for several disks: one session, three devices; removing them one by one logs out only after the last.

The state with the two arrays and the plain LUN is captured for the fast suite (tests/fixtures)."""

from __future__ import annotations

import pytest
from captures import save_capture
from conftest import record
from xldriver import Vbd, Xl

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:shared"
MIB = 8


def test_two_mirrors_and_a_plain_lun_share_one_session(bed, tmp_path):
    g, xl = bed.guest, Xl(bed)
    luns = {n: bed.make_disk(f"shared-lun{n}", MIB) for n in (1, 2, 3)}
    sums = {
        n: g.call("fill", path=dev, seed=f"shared-lun{n}", length=MIB << 20)["sha256"]
        for n, dev in luns.items()
    }
    locals_ = {"shared-a": bed.make_disk("shared-a", MIB), "shared-b": bed.make_disk("shared-b", MIB)}
    bed.export(IQN, luns)
    xl.configure(locals_)

    disks = {
        "add-a": (Vbd(2, 51712), f"lun1@{IQN}+shared-a", "xvda"),
        "add-b": (Vbd(2, 51728), f"lun2@{IQN}+shared-b", "xvdb"),
        "add-plain": (Vbd(3, 51712), f"lun3@{IQN}", "xvda"),
    }
    start = g.now()
    for name, (vbd, spec, vdev) in disks.items():
        xl.spawn_add(name, vbd, spec, vdev)
    results = {name: g.wait_proc(name, timeout=60) for name in disks}
    record(
        "shared session: three concurrent adds (wall in guest)",
        max(r["at"] for r in results.values()) - start,
    )
    logs = {name: g.read(f"/tmp/{name}.log") for name in disks}
    assert {name: r["rc"] for name, r in results.items()} == dict.fromkeys(disks, 0), logs

    # One session to the target; three devices: two arrays and the plain LUN.
    assert list(bed.sessions()) == [IQN]
    sd = {n: bed.lun_device(IQN, n)[5:] for n in (1, 2, 3)}
    for label, lun in (("shared-a", 1), ("shared-b", 2)):
        md = bed.md_name(label)
        assert md is not None
        legs = bed.md_legs(md)
        assert legs[sd[lun]] == "in_sync,write_mostly"
        assert locals_[label][5:] in legs
        keys = xl.keys(disks["add-a" if lun == 1 else "add-b"][0])
        assert keys["hotplug-status"] == "connected"
    plain = xl.keys(disks["add-plain"][0])
    assert plain["hotplug-status"] == "connected"
    major, minor = (int(x) for x in g.read(f"/sys/block/{sd[3]}/dev").strip().split(":"))
    assert plain["physical-device"] == f"{major:x}:{minor:x}"
    assert g.call("readlink", path=plain["physical-device-path"])["real"] == f"/dev/{sd[3]}"
    assert len(g.glob("/sys/block/md*")) == 2

    for label in ("shared-a", "shared-b"):
        bed.wait_in_sync(bed.md_name(label))
    assert g.call("sha256", path=locals_["shared-a"])["sha256"] == sums[1]
    assert g.call("sha256", path=locals_["shared-b"])["sha256"] == sums[2]
    assert g.call("sha256", path=f"/dev/{sd[3]}")["sha256"] == sums[3]
    save_capture(bed, "01_two_arrays_and_plain_lun_in_sync", tmp_path)

    # Remove one by one: the session stays while any LUN of the target is in use.
    for name in ("add-a", "add-plain"):
        removed = xl.remove(disks[name][0])
        assert removed.rc == 0, str(removed)
        assert list(bed.sessions()) == [IQN], f"logged out after removing {name} only"
        session = bed.session(IQN)
        assert g.read(session + "/state").strip() == "LOGGED_IN"
    assert bed.md_name("shared-a") is None and bed.md_name("shared-b") is not None
    save_capture(bed, "02_one_array_left", tmp_path)
    removed = xl.remove(disks["add-b"][0])
    assert removed.rc == 0, str(removed)
    assert bed.sessions() == {}
    assert g.glob("/sys/block/md*") == []
