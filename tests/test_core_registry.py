"""Registry, stale records and atomic writes."""

import json
import multiprocessing
import os

import pytest

from iscsimple.core.atomic import write_atomic
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Attachment, OperationResult, Registry, attachment_id_for_xenbus
from iscsimple.core.stale import StaleRecord, StaleRecords


@pytest.fixture
def paths(tmp_path):
    return HostPaths(state=tmp_path / "run", records=tmp_path / "lib")


def test_xenbus_path_to_id():
    assert attachment_id_for_xenbus("backend/vbd/0/51728") == "vbd-0-51728"
    assert attachment_id_for_xenbus("/local/domain/0/backend/vbd/7/2050") == "vbd-7-2050"


def test_put_get_list_remove(paths):
    reg = Registry(paths)
    a = Attachment(
        id="vbd-3-51713",
        spec="lun1@iqn.2001-04.com.example:s+vm1",
        lun=1,
        target="iqn.2001-04.com.example:s",
        label="vm1",
    )
    reg.put(a)
    b = reg.put(
        Attachment(
            id="vbd-4-51713",
            spec="iqn.2001-04.com.example:s",
            lun=0,
            target="iqn.2001-04.com.example:s",
            label=None,
        )
    )
    got = reg.get("vbd-3-51713")
    assert got.label == "vm1" and got.lun == 1 and got.created == a.created
    assert [x.id for x in reg.list()] == ["vbd-3-51713", "vbd-4-51713"]
    assert reg.by_label("vm1").id == "vbd-3-51713"
    assert [x.id for x in reg.using_target("iqn.2001-04.com.example:s", exclude=b.id)] == ["vbd-3-51713"]
    assert reg.remove("vbd-3-51713") is True
    assert reg.remove("vbd-3-51713") is False
    assert reg.get("vbd-3-51713") is None


def test_last_result_round_trips(paths):
    reg = Registry(paths)
    reg.put(
        Attachment(
            id="x",
            spec="s",
            lun=0,
            target=None,
            label="l",
            last=OperationResult("add", "failure", 1.5, 10.0, "boom"),
        )
    )
    assert reg.get("x").last == OperationResult("add", "failure", 1.5, 10.0, "boom")


def test_corrupt_entry_is_skipped_not_fatal(paths):
    reg = Registry(paths)
    reg.put(Attachment(id="good", spec="s", lun=0, target=None, label="l"))
    (reg.directory / "bad.json").write_text("{not json")
    assert [a.id for a in reg.list()] == ["good"]


def test_unknown_fields_from_a_newer_writer_are_ignored(paths):
    reg = Registry(paths)
    reg.directory.mkdir(parents=True)
    (reg.directory / "n.json").write_text(
        json.dumps({"id": "n", "spec": "s", "lun": 0, "target": None, "label": "l", "future": 1})
    )
    assert reg.get("n").label == "l"


def test_ids_cannot_escape_the_directory(paths):
    with pytest.raises(ValueError):
        Registry(paths).get("../../etc/passwd")


def _count(state_dir, n):
    reg = Registry(HostPaths(state=state_dir))
    for _ in range(n):
        reg.record_operation("add", "success", 0.5)


def test_hotplug_stats_count_across_processes(paths):
    procs = [multiprocessing.Process(target=_count, args=(paths.state, 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    reg = Registry(paths)
    reg.record_operation("remove", "failure", 2.25)
    stats = reg.read_stats()
    assert stats.totals == {"add": {"success": 100}, "remove": {"failure": 1}}
    assert stats.last_seconds["remove"] == 2.25


def test_write_atomic_replaces_and_sets_mode(tmp_path):
    target = tmp_path / "sub" / "f"
    write_atomic(target, "one", mode=0o600)
    write_atomic(target, b"two", mode=0o600)
    assert target.read_text() == "two"
    assert oct(os.stat(target).st_mode & 0o777) == "0o600"
    assert [p.name for p in target.parent.iterdir()] == ["f"]  # no temp files left


def test_stale_records_are_write_once_and_clearable(paths):
    records = StaleRecords(paths)
    first = StaleRecord(
        "vm1",
        100.0,
        "md127",
        "web1",
        3,
        "iqn.2001-04.com.example:s",
        1,
        "sda",
        "/dev/vg/vm1",
        "iSCSI leg faulty",
    )
    records.put(first)
    records.put(StaleRecord("vm1", 200.0, "md127", "web1", 3, None, None, None, None, "later sighting"))
    assert records.get("vm1").since == 100.0
    assert "web1" in records.get("vm1").describe()
    assert [r.label for r in records.list()] == ["vm1"]
    assert oct(os.stat(records.path("vm1")).st_mode & 0o777) == "0o600"
    assert records.clear("vm1") is True
    assert records.get("vm1") is None
    with pytest.raises(ValueError):
        records.path("../x")


def test_timed_operation_counts_success_and_failure(paths):
    reg = Registry(paths)
    with reg.timed_operation("resolve"):
        pass
    with pytest.raises(RuntimeError), reg.timed_operation("resolve"):
        raise RuntimeError("mdadm failed")
    stats = reg.read_stats()
    assert stats.totals == {"resolve": {"success": 1, "failure": 1}}
    assert stats.last_seconds["resolve"] >= 0
