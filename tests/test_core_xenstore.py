from iscsimple.core.xenstore import CommandXenStore, FileXenStore, open_xenstore


def test_file_double_reads_writes_and_removes_subtrees(tmp_path):
    xs = FileXenStore(tmp_path / "xs.json")
    assert xs.read("backend/vbd/0/1/params") is None
    xs.write("backend/vbd/0/1/params", "lun0@iqn.2001-04.com.example:s")
    xs.write("backend/vbd/0/1/hotplug-status", "connected")
    xs.write("backend/vbd/0/10/params", "other")
    assert xs.read("backend/vbd/0/1/params") == "lun0@iqn.2001-04.com.example:s"
    xs.rm("backend/vbd/0/1")
    assert xs.read("backend/vbd/0/1/hotplug-status") is None
    assert xs.read("backend/vbd/0/10/params") == "other"  # a sibling with a common prefix survives
    xs.rm("backend/vbd/0/1")  # idempotent


def test_selection_by_environment(tmp_path):
    assert isinstance(open_xenstore({}), CommandXenStore)
    xs = open_xenstore({"ISCSIMPLE_XENSTORE_FILE": str(tmp_path / "x.json")})
    assert isinstance(xs, FileXenStore)


def test_file_double_writes_several_keys_at_once(tmp_path):
    xs = FileXenStore(tmp_path / "xs.json")
    xs.write_many(
        [("backend/vbd/0/1/hotplug-error", "it broke"), ("backend/vbd/0/1/hotplug-status", "error")]
    )
    assert xs.read("backend/vbd/0/1/hotplug-error") == "it broke"
    assert xs.read("backend/vbd/0/1/hotplug-status") == "error"
