"""core.md against every captured kernel state and generated sysfs trees."""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from fixturetree import STATES, FakeMember, write_md_array
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsimple.core import md as md_module
from iscsimple.core.errors import OperationError
from iscsimple.core.md import MdArray, MdMember, SysfsError, read_md_array, read_md_arrays


def m(name, slot, state, dev=None, errors=0) -> MdMember:
    return MdMember(
        name=name,
        slot=slot,
        state=frozenset(state.split(",")) if state else frozenset(),
        errors=errors,
        dev=dev,
    )


def real_path(path, dir_fd=None) -> str:
    """The file an os.open(path, dir_fd=...) call opens, for fakes that intercept it."""
    if dir_fd is not None:
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.realpath(path)


LOOP1 = m("loop1", 0, "in_sync", dev="7:1")
SDA_WM = m("sda", 1, "in_sync,write_mostly", dev="8:0")
SDA_FAULTY = m("sda", None, "faulty,write_mostly,write_error", dev="8:0")

# state: (array_state, degraded, sync_action, last_sync_action, sync_completed, sync_speed, members);
# last_sync_action is what the capture holds, not read (nothing uses it).
EXPECTED = {
    "01_built_degraded": ("read-auto", 1, "idle", "none", None, None, (SDA_WM,)),
    "02_recovering_a": (
        "clean",
        1,
        "recover",
        "recovery",
        (8320, 131072),
        2645,
        (m("loop1", 0, "spare", dev="7:1"), SDA_WM),
    ),
    "03_recovering_b": (
        "clean",
        1,
        "recover",
        "recovery",
        (49920, 131072),
        2261,
        (m("loop1", 0, "spare", dev="7:1"), SDA_WM),
    ),
    "04_in_sync": ("clean", 0, "idle", "recovery", None, None, (LOOP1, SDA_WM)),
    # The 05 captures have no /proc/partitions, so member major:minor is not derivable.
    "05a_outage_session_failed": (
        "clean",
        0,
        "idle",
        "recovery",
        None,
        None,
        (m("loop1", 0, "in_sync"), m("sda", 1, "in_sync,write_mostly")),
    ),
    "05b_outage_io_blocked_md_not_yet_degraded": (
        "active",
        0,
        "idle",
        "recovery",
        None,
        None,
        (m("loop1", 0, "in_sync"), m("sda", 1, "in_sync,write_mostly")),
    ),
    "06_outage_after_io_leg_faulty": ("clean", 1, "idle", "recovery", None, None, (LOOP1, SDA_FAULTY)),
    "07_target_back_session_relogged": ("clean", 1, "idle", "recovery", None, None, (LOOP1, SDA_FAULTY)),
    "08_iscsi_leg_removed": ("clean", 1, "idle", "recovery", None, None, (LOOP1,)),
    "09_recovering_local_to_iscsi": (
        "clean",
        1,
        "recover",
        "recovery",
        (8320, 131072),
        3968,
        (LOOP1, m("sda", 1, "write_mostly,spare", dev="8:0")),
    ),
    "10_in_sync_again": ("clean", 0, "idle", "recovery", None, None, (LOOP1, SDA_WM)),
}


def test_every_capture_has_an_expectation():
    assert set(EXPECTED) | {"11_stopped", "12_logged_out"} == set(STATES)


@pytest.mark.parametrize("state", sorted(EXPECTED))
def test_captured_state(kernel_state_readonly, state):
    array_state, degraded, action, _last_action, completed, speed, members = EXPECTED[state]
    result = read_md_arrays(kernel_state_readonly(state) / "sys")
    assert result.errors == []
    assert result.arrays == {
        "md127": MdArray(
            name="md127",
            level="raid1",
            array_state=array_state,
            degraded=degraded,
            sync_action=action,
            sync_completed=completed,
            sync_speed_kib=speed,
            size_bytes=65536 * 1024,
            members=members,
            mismatch_sectors=0,
        )
    }


@pytest.mark.parametrize("state", ["11_stopped", "12_logged_out"])
def test_captured_state_without_arrays(kernel_state_readonly, state):
    result = read_md_arrays(kernel_state_readonly(state) / "sys")
    assert (result.arrays, result.errors) == ({}, [])


def test_state_06_member_flags(kernel_state_readonly):
    array = read_md_array(kernel_state_readonly("06") / "sys", "md127")
    sda, loop1 = array.member("sda"), array.member("loop1")
    assert sda is not None and loop1 is not None
    assert (sda.faulty, sda.write_mostly, sda.write_error, sda.in_sync, sda.spare) == (
        True,
        True,
        True,
        False,
        False,
    )
    assert (loop1.in_sync, loop1.faulty, loop1.write_mostly) == (True, False, False)
    assert not sda.recovering and not loop1.recovering
    assert array.degraded == 1
    assert array.member("sdb") is None


def test_state_09_iscsi_leg_is_recovering(kernel_state_readonly):
    sda = read_md_array(kernel_state_readonly("09") / "sys", "md127").member("sda")
    assert sda is not None
    assert (sda.recovering, sda.spare, sda.write_mostly, sda.slot) == (True, True, True, 1)


def test_missing_array_raises_sysfs_error(kernel_state_readonly):
    with pytest.raises(SysfsError, match="md127") as excinfo:
        read_md_array(kernel_state_readonly("11") / "sys", "md127")
    assert isinstance(excinfo.value, OperationError)


@pytest.mark.parametrize("name", ["", ".", "..", "../md127", "sda"])
def test_read_md_array_refuses_non_arrays(kernel_state_readonly, name):
    with pytest.raises(SysfsError):
        read_md_array(kernel_state_readonly("04") / "sys", name)


def test_no_block_dir_at_all(tmp_path):
    result = read_md_arrays(tmp_path)
    assert (result.arrays, result.errors) == ({}, [])


# --- generated trees ---------------------------------------------------------------------------


def test_many_arrays_and_label_names(tmp_path):
    sysfs = tmp_path / "sys"
    for i in range(40):
        write_md_array(
            sysfs,
            f"md_vm{i}" if i % 2 else f"md{i}",
            [
                FakeMember(f"dm-{i}", 0, dev=f"253:{i}"),
                FakeMember(f"sd{i}", 1, "in_sync,write_mostly", dev=f"8:{i}"),
            ],
            minor=i,
        )
    # Block devices that are not arrays are skipped, as is a stopped array's leftover disk.
    (sysfs / "block" / "sda").mkdir()
    (sysfs / "block" / "md999").mkdir()
    result = read_md_arrays(sysfs)
    assert result.errors == []
    assert len(result.arrays) == 40
    array = result.arrays["md_vm7"]
    assert (array.name, array.size_bytes) == ("md_vm7", 65536 * 1024)
    assert array.members == (
        m("dm-7", 0, "in_sync", dev="253:7"),
        m("sd7", 1, "in_sync,write_mostly", dev="8:7"),
    )
    assert result.arrays["md8"].member("sd8").dev == "8:8"


@pytest.mark.parametrize(
    ("state", "flags"),
    [
        ("in_sync", {"in_sync"}),
        ("in_sync,write_mostly", {"in_sync", "write_mostly"}),
        ("faulty,write_mostly,write_error", {"faulty", "write_mostly", "write_error"}),
        ("faulty", {"faulty"}),
        ("spare", {"spare"}),
        ("write_mostly,spare", {"write_mostly", "spare"}),
        ("in_sync,blocked", {"in_sync", "blocked"}),
        ("faulty,blocked,write_error", {"faulty", "blocked", "write_error"}),
        ("in_sync,want_replacement", {"in_sync", "want_replacement"}),
        ("spare,replacement", {"spare", "replacement"}),
        ("journal", {"journal"}),
        ("in_sync,failfast", {"in_sync", "failfast"}),
        ("in_sync,external_bbl", {"in_sync", "external_bbl"}),
        ("", set()),
    ],
)
def test_every_member_state(tmp_path, state, flags):
    write_md_array(tmp_path, "md0", [FakeMember("sdb", 0, state)])
    member = read_md_array(tmp_path, "md0").member("sdb")
    assert member is not None
    assert member.state == frozenset(flags)
    assert member.in_sync == ("in_sync" in flags)
    assert member.write_mostly == ("write_mostly" in flags)
    assert member.faulty == ("faulty" in flags)
    assert member.spare == ("spare" in flags)
    assert member.blocked == ("blocked" in flags)
    assert member.replacement == ("replacement" in flags)


def test_members_sorted_by_slot_then_spares(tmp_path):
    write_md_array(
        tmp_path,
        "md0",
        [
            FakeMember("sdz", None, "spare"),
            FakeMember("sdb", 1),
            FakeMember("sdc", 0),
            FakeMember("sda", None, "faulty"),
        ],
    )
    assert [x.name for x in read_md_array(tmp_path, "md0").members] == ["sdc", "sdb", "sda", "sdz"]


def test_sync_completed_delayed(tmp_path):
    write_md_array(
        tmp_path,
        "md0",
        [FakeMember("sda")],
        sync_action="resync",
        sync_completed="delayed",
        sync_speed="none",
    )
    array = read_md_array(tmp_path, "md0")
    assert (array.sync_completed, array.sync_delayed, array.sync_speed_kib) == (None, True, None)


@pytest.mark.parametrize(("action", "speed"), [("idle", None), ("frozen", None), ("recover", 1234)])
def test_sync_speed_is_read_only_while_a_sync_runs(tmp_path, action, speed):
    # md shows "none" without a running sync; a value there (a race, a tree) is never used.
    write_md_array(tmp_path, "md0", [FakeMember("sda")], sync_action=action, sync_speed="1234")
    assert read_md_array(tmp_path, "md0").sync_speed_kib == speed


def test_component_size_is_read_on_demand(tmp_path):
    write_md_array(tmp_path, "md0", [FakeMember("sda")], component_size=4096)
    assert md_module.component_size_kib(tmp_path, "md0") == 4096
    assert md_module.component_size_kib(tmp_path, "md1") is None
    (tmp_path / "block" / "md0" / "md" / "component_size").write_text("lots\n")
    assert md_module.component_size_kib(tmp_path, "md0") is None


def test_non_redundant_level_has_no_sync_attributes_and_that_is_fine(tmp_path):
    write_md_array(tmp_path, "md0", [FakeMember("sda"), FakeMember("sdb", 1)], level="raid0")
    errors: list[str] = []
    array = read_md_array(tmp_path, "md0", errors)
    assert errors == []
    assert (array.level, array.degraded, array.sync_action, array.sync_completed) == (
        "raid0",
        None,
        None,
        None,
    )


@pytest.mark.parametrize("attr", ["degraded", "array_state", "sync_action", "level"])
def test_missing_required_file_is_none_and_an_error(tmp_path, attr):
    md = write_md_array(tmp_path, "md0", [FakeMember("sda")])
    write_md_array(tmp_path, "md1", [FakeMember("sdb")], minor=1)
    (md / attr).unlink()
    result = read_md_arrays(tmp_path)
    assert getattr(result.arrays["md0"], attr) is None
    # Errors name the path an operator knows: /sys/block/<array>/md/<attr>.
    assert result.errors == [f"{tmp_path / 'block' / 'md0' / 'md' / attr}: missing"]
    assert result.arrays["md1"].array_state == "clean"


def test_missing_optional_member_link_is_not_an_error(tmp_path):
    write_md_array(tmp_path, "md0", [FakeMember("sda", dev=None)])
    result = read_md_arrays(tmp_path)
    assert result.errors == []
    assert result.arrays["md0"].member("sda").dev is None


def test_unreadable_file_is_none_and_an_error(tmp_path):
    md = write_md_array(tmp_path, "md0", [FakeMember("sda")])
    # chmod 000 does not stop root: a directory where the file should be gives EISDIR.
    (md / "dev-sda" / "state").unlink()
    (md / "dev-sda" / "state").mkdir()
    result = read_md_arrays(tmp_path)
    assert result.arrays["md0"].member("sda").state == frozenset()
    assert len(result.errors) == 1
    assert result.errors[0].startswith(f"{tmp_path}/block/md0/md/dev-sda/state: unreadable")


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    write_md_array(tmp_path, "md0", [FakeMember("sda")])
    real_open = os.open
    denied = str(tmp_path / "block" / "md0" / "md" / "sync_action")

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):
        if real_path(path, dir_fd) == os.path.realpath(denied):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake_open)
    result = read_md_arrays(tmp_path)
    assert result.arrays["md0"].sync_action is None
    assert result.errors == [f"{denied}: unreadable: Permission denied"]


@pytest.mark.parametrize(
    ("attr", "value", "field"),
    [
        ("degraded", "lots", "degraded"),
        ("sync_completed", "12 of 34", "sync_completed"),
        ("sync_completed", "a / b", "sync_completed"),
        ("sync_speed", "fast", "sync_speed_kib"),
        ("mismatch_cnt", "9" * 5000, "mismatch_sectors"),
        ("../size", "-", "size_bytes"),
    ],
)
def test_garbage_values_are_none_and_an_error(tmp_path, attr, value, field):
    md = write_md_array(tmp_path, "md0", [FakeMember("sda")], sync_action="resync")
    (md / attr).write_text(value + "\n")
    result = read_md_arrays(tmp_path)
    assert getattr(result.arrays["md0"], field) is None
    named = os.path.normpath(f"block/md0/md/{attr}")  # ../size: the message names /sys/block/md0/size
    assert len(result.errors) == 1 and f"{named}: cannot parse" in result.errors[0]


def test_one_broken_array_never_hides_the_others(tmp_path, monkeypatch):
    write_md_array(tmp_path, "md0", [FakeMember("sda")], minor=0)
    broken = write_md_array(tmp_path, "md1", [FakeMember("sdb")], minor=1)
    write_md_array(tmp_path, "md2", [FakeMember("sdc")], minor=2)
    real_open = os.open

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is None and os.fspath(path) == os.path.join(tmp_path, "block", "md1", "md"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake_open)
    result = read_md_arrays(tmp_path)
    assert sorted(result.arrays) == ["md0", "md2"]
    assert len(result.errors) == 1 and "md1" in result.errors[0]
    assert broken.is_dir()


def test_array_stopped_while_reading_is_skipped_silently(tmp_path, monkeypatch):
    write_md_array(tmp_path, "md0", [FakeMember("sda")], minor=0)
    write_md_array(tmp_path, "md1", [FakeMember("sdb")], minor=1)
    real_read = md_module._read_array

    def stop_md1_first(block, name, errors):
        if name == "md1":  # mdadm --stop between the listing and the read
            shutil.rmtree(tmp_path / "devices" / "virtual" / "block" / "md1" / "md")
        return real_read(block, name, errors)

    monkeypatch.setattr(md_module, "_read_array", stop_md1_first)
    result = read_md_arrays(tmp_path)
    assert list(result.arrays) == ["md0"]
    assert result.errors == []


def test_each_attribute_file_is_read_once_and_no_device_is_opened(kernel_state_readonly, monkeypatch):
    sysfs = kernel_state_readonly("04") / "sys"
    opened: list[str] = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *, dir_fd=None):
        opened.append(real_path(path, dir_fd))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def refuse_open(path, *args, **kwargs):
        raise AssertionError(f"the reader uses os.open only, opened {path}")

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(builtins, "open", refuse_open)
    read_md_arrays(sysfs)
    monkeypatch.undo()
    assert len(opened) == len(set(opened))
    assert all(p.startswith(os.path.realpath(sysfs) + "/") for p in opened)
    # md/ itself, 7 array attributes (no sync_speed while idle), 4 per member: bounded work
    # per array on every scrape.
    assert len(opened) == 1 + 7 + 2 * 4
    assert not any(Path(p).name in ("sda", "loop1", "md127") for p in opened)


def test_member_removed_while_reading_is_skipped_silently(tmp_path, monkeypatch):
    md = write_md_array(tmp_path, "md0", [FakeMember("sda"), FakeMember("sdb", 1, dev="8:16")])
    real_listdir = os.listdir

    def listdir_then_remove(path):
        if not (isinstance(path, int) and real_path(".", path) == os.path.realpath(md)):
            return real_listdir(path)
        entries = real_listdir(path)
        shutil.rmtree(md / "dev-sdb")  # mdadm --remove right after the listing
        return entries

    monkeypatch.setattr(md_module.os, "listdir", listdir_then_remove)
    result = read_md_arrays(tmp_path)
    assert [x.name for x in result.arrays["md0"].members] == ["sda"]
    assert result.errors == []


_STATE_FLAGS = [
    "in_sync",
    "write_mostly",
    "faulty",
    "spare",
    "blocked",
    "write_error",
    "replacement",
    "journal",
]


@st.composite
def fake_members(draw):
    names = draw(
        st.lists(st.from_regex(r"\A(sd[a-z]{1,2}|dm-[0-9]{1,3}|loop[0-9])\Z"), max_size=4, unique=True)
    )
    return [
        FakeMember(
            name,
            slot=draw(st.none() | st.integers(0, 15)),
            state=",".join(draw(st.lists(st.sampled_from(_STATE_FLAGS), unique=True))),
            errors=draw(st.integers(0, 2**31)),
            dev=draw(st.none() | st.builds("{}:{}".format, st.integers(0, 4095), st.integers(0, 2**20))),
        )
        for name in names
    ]


@settings(max_examples=25, deadline=None)
@given(
    members=fake_members(),
    level=st.sampled_from(["raid1", "raid10", "raid0", "linear"]),
    array_state=st.sampled_from(["clean", "active", "read-auto", "readonly", "write-pending", "broken"]),
    completed=st.none() | st.tuples(st.integers(0, 2**40), st.integers(1, 2**40)),
)
def test_generated_array_reads_back_exactly(members, level, array_state, completed):
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        sysfs = Path(tmp)
        write_md_array(
            sysfs,
            "md_vm",
            members,
            minor=5,
            level=level,
            array_state=array_state,
            sync_completed="none" if completed is None else f"{completed[0]} / {completed[1]}",
        )
        result = read_md_arrays(sysfs)
    assert result.errors == []
    array = result.arrays["md_vm"]
    redundant = level in ("raid1", "raid10")
    assert (array.level, array.array_state, array.size_bytes) == (level, array_state, 65536 * 1024)
    assert array.sync_completed == (completed if redundant else None)
    assert array.degraded == (0 if redundant else None)
    expected = sorted(members, key=lambda x: (x.slot is None, x.slot or 0, x.name))
    assert array.members == tuple(
        MdMember(
            name=x.name,
            slot=x.slot,
            state=frozenset(filter(None, x.state.split(","))),
            errors=x.errors,
            dev=x.dev,
        )
        for x in expected
    )


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=30),
        st.from_regex(rb"\A[ \t\n+-]{0,2}[0-9]{0,24}(:[0-9]{0,24})?[ \t\n_]{0,2}\Z"),
    )
)
def test_numbers_taken_from_the_bytes_read_as_the_text_parsers_read_them(data):
    """AttrReader.parsed takes plain decimal numbers and major:minor from the bytes at once
    (every sysfs number on a full read); the value, or the error line, is what decoding the
    text and parse_int / parse_dev give."""
    from iscsimple.core.sysfs import AttrReader, _checked_text, parse_dev, parse_int

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "attr").write_bytes(data)
        for parse in (parse_int, parse_dev):
            errors: list[str] = []
            got = AttrReader(tmp, errors).parsed("attr", True, parse)
            text = _checked_text(data, shared=False)
            if text is None:
                assert got is None and errors == [f"{tmp}/attr: not text: {data[:40]!r}"]
                continue
            try:
                expected = None if text == "none" else parse(text)
            except ValueError:
                assert got is None and errors == [f"{tmp}/attr: cannot parse {text[:80]!r}"]
                continue
            assert (got, errors) == (expected, [])
            assert type(got) is type(expected)
