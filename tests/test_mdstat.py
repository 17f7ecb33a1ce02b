"""core.mdstat against the real captures, hand-made odd texts and generated ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixturetree import KERNEL_CAPTURES, STATES, materialize
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsimple.core.errors import InputError
from iscsimple.core.mdstat import (
    Mdstat,
    MdstatArray,
    MdstatError,
    MdstatMember,
    MdstatProgress,
    format_mdstat,
    parse_mdstat,
    read_mdstat,
)

ODD = Path(__file__).resolve().parent / "fixtures" / "mdstat"


def captured(state: str) -> Mdstat:
    return parse_mdstat((KERNEL_CAPTURES / state / "proc_mdstat").read_text())


def member(name, index, **flags) -> MdstatMember:
    return MdstatMember(name=name, index=index, **flags)


# --- real captures -----------------------------------------------------------------------------

# state: (read_only, members, working_disks, status, progress)
EXPECTED = {
    "01_built_degraded": ("auto-read-only", (member("sda", 1, write_mostly=True),), 1, "_U", None),
    "02_recovering_a": (
        None,
        (member("loop1", 2), member("sda", 1, write_mostly=True)),
        1,
        "_U",
        MdstatProgress("recovery", 0.116, 7936, 65536, 0.2, 3968),
    ),
    "03_recovering_b": (
        None,
        (member("loop1", 2), member("sda", 1, write_mostly=True)),
        1,
        "_U",
        MdstatProgress("recovery", 0.379, 25088, 65536, 0.2, 2280),
    ),
    "04_in_sync": (None, (member("loop1", 2), member("sda", 1, write_mostly=True)), 2, "UU", None),
    "05a_outage_session_failed": (
        None,
        (member("loop1", 2), member("sda", 1, write_mostly=True)),
        2,
        "UU",
        None,
    ),
    "05b_outage_io_blocked_md_not_yet_degraded": (
        None,
        (member("loop1", 2), member("sda", 1, write_mostly=True)),
        2,
        "UU",
        None,
    ),
    "06_outage_after_io_leg_faulty": (
        None,
        (member("loop1", 2), member("sda", 1, write_mostly=True, faulty=True)),
        1,
        "U_",
        None,
    ),
    "07_target_back_session_relogged": (
        None,
        (member("loop1", 2), member("sda", 1, write_mostly=True, faulty=True)),
        1,
        "U_",
        None,
    ),
    "08_iscsi_leg_removed": (None, (member("loop1", 2),), 1, "U_", None),
    "09_recovering_local_to_iscsi": (
        None,
        (member("sda", 3, write_mostly=True), member("loop1", 2)),
        1,
        "U_",
        MdstatProgress("recovery", 0.062, 4224, 65536, 0.4, 2112),
    ),
    "10_in_sync_again": (None, (member("sda", 3, write_mostly=True), member("loop1", 2)), 2, "UU", None),
}


def test_every_capture_has_an_expectation():
    assert set(EXPECTED) | {"11_stopped", "12_logged_out"} == set(STATES)


@pytest.mark.parametrize("state", sorted(EXPECTED))
def test_captured_array(state):
    read_only, members, working, status, progress = EXPECTED[state]
    mdstat = captured(state)
    assert mdstat.personalities == ("raid1",)
    assert list(mdstat.arrays) == ["md127"]
    assert mdstat.arrays["md127"] == MdstatArray(
        name="md127",
        active=True,
        read_only=read_only,
        level="raid1",
        members=members,
        blocks=65536,
        super="non-persistent",
        raid_disks=2,
        working_disks=working,
        status=status,
        progress=progress,
        sync_state=None,
    )


@pytest.mark.parametrize("state", ["11_stopped", "12_logged_out"])
def test_captured_without_arrays(state):
    assert captured(state) == Mdstat(personalities=("raid1",), arrays={})


def test_read_mdstat_from_materialised_root(tmp_path):
    root = materialize("06", tmp_path)
    array = read_mdstat(root / "proc").arrays["md127"]
    assert array.member("sda") == member("sda", 1, write_mostly=True, faulty=True)
    assert array.member("sdb") is None


def test_read_mdstat_without_md_module(tmp_path):
    assert read_mdstat(tmp_path) == Mdstat()


# --- hand-made odd texts -----------------------------------------------------------------------


def odd(name: str) -> Mdstat:
    return parse_mdstat((ODD / name).read_text())


def test_many_levels():
    mdstat = odd("many_levels.txt")
    assert mdstat.personalities == (
        "raid1",
        "linear",
        "multipath",
        "raid0",
        "raid6",
        "raid5",
        "raid4",
        "raid10",
    )
    assert list(mdstat.arrays) == ["md5", "md10", "md0", "md3", "md_data", "md127"]
    md5 = mdstat.arrays["md5"]
    assert (md5.level, md5.raid_disks, md5.working_disks, md5.status) == ("raid5", 3, 3, "UUU")
    assert md5.progress == MdstatProgress("check", 0.173, 169018368, 976630272, 79.5, 169254)
    assert md5.bitmap == "1/8 pages [4KB], 65536KB chunk"
    assert mdstat.arrays["md10"].status == "UUUU"
    md0 = mdstat.arrays["md0"]
    assert (md0.level, md0.blocks, md0.super, md0.raid_disks, md0.status) == (
        "raid0",
        1953260544,
        "1.2",
        None,
        None,
    )
    assert mdstat.arrays["md3"].level == "linear"
    assert [m.name for m in mdstat.arrays["md_data"].members] == ["nvme1n1p2", "nvme0n1p2"]
    inactive = mdstat.arrays["md127"]
    assert (inactive.active, inactive.level, inactive.blocks) == (False, None, 1953382488)
    assert inactive.members == (member("sdm", 0, spare=True),)


def test_write_mostly_and_faulty():
    array = odd("write_mostly_faulty.txt").arrays["md_vm1"]
    assert array.members == (member("dm-3", 2), member("sda", 1, write_mostly=True, faulty=True))
    assert (array.working_disks, array.status) == (1, "U_")


def test_resync_pending_and_delayed():
    mdstat = odd("resync_pending_delayed.txt")
    assert mdstat.arrays["md1"].read_only == "auto-read-only"
    assert mdstat.arrays["md1"].sync_state == "PENDING"
    assert mdstat.arrays["md1"].progress is None
    assert mdstat.arrays["md2"].sync_state == "DELAYED"
    assert mdstat.arrays["md2"].bitmap == "0/1 pages [0KB], 65536KB chunk"
    assert mdstat.arrays["md3"].sync_state is None
    assert mdstat.arrays["md3"].progress == MdstatProgress("resync", 0.091, 96000, 1048512, 1.6, 9600)


def test_spare_replacement_journal_reshape_and_old_superblock():
    mdstat = odd("spare_replacement_reshape.txt")
    md4 = mdstat.arrays["md4"]
    assert md4.read_only == "read-only"
    assert md4.members == (
        member("sdc", 3, replacement=True),
        member("sdb", 2, spare=True),
        member("sda", 0),
        member("sdd", 1, journal=True),
    )
    assert md4.progress is not None and md4.progress.action == "recovery"
    md6 = mdstat.arrays["md6"]
    assert (md6.raid_disks, md6.working_disks, md6.status) == (5, 4, "UUUU_")
    assert md6.progress == MdstatProgress("reshape", 0.009, 1947520, 209584128, 105.9, 32657)
    assert (mdstat.arrays["md0"].super, mdstat.arrays["md0"].status) == (None, "UU")


def test_external_metadata():
    mdstat = odd("external_metadata.txt")
    assert mdstat.arrays["md126"].super == "external:/md127/0"
    assert mdstat.arrays["md127"].super == "external:imsm"
    assert mdstat.arrays["md127"].active is False


@pytest.mark.parametrize(
    ("name", "line", "fragment"),
    [
        ("garbage_in_array.txt", 4, "this line means nothing to md"),
        ("bad_member.txt", 2, "sda[1]{W}"),
        ("trailing_garbage.txt", 6, "Fri Nov 23"),
    ],
)
def test_garbage_is_reported_with_line_number(name, line, fragment):
    with pytest.raises(MdstatError) as excinfo:
        odd(name)
    assert f"line {line}:" in str(excinfo.value)
    assert fragment in str(excinfo.value)
    assert isinstance(excinfo.value, InputError)


@pytest.mark.parametrize(
    "text",
    [
        "      65536 blocks super 1.2 [2/2] [UU]\n",  # continuation without a header
        "Personalities : raid1\n",
        "md0 : active raid1 sda[1]\nmd0 : active raid1 sda[1]\n",
        "md0 : active raid1 sda[1]\n      65536 blocks [2/2] [UU]\n      65536 blocks [2/2] [UU]\n",
        "md0 : active RAID1 sda[1]\n",
        "md0 : active raid1 sda[99999999999]\n",
        "md0 : active raid1 sda[1]\n      " + "9" * 5000 + " blocks\n",
    ],
)
def test_malformed_texts(text):
    with pytest.raises(MdstatError):
        parse_mdstat(text)


def test_empty_text_is_empty_mdstat():
    assert parse_mdstat("") == Mdstat()


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.text())
def test_any_text_parses_or_raises_mdstat_error(text):
    try:
        result = parse_mdstat(text)
    except MdstatError as e:
        assert "line " in str(e)
    else:
        assert isinstance(result, Mdstat)


_lines = st.sampled_from(
    [
        "Personalities : [raid1] [raid5] ",
        "md127 : active raid1 loop1[2] sda[1](W)(F)",
        "md1 : inactive sdb[0](S)",
        "      65536 blocks super non-persistent [2/1] [U_]",
        "      [==>..................]  recovery = 11.6% (7936/65536) finish=0.2min speed=3968K/sec",
        "      \tresync=PENDING",
        "      bitmap: 0/1 pages [0KB], 65536KB chunk",
        "      ",
        "unused devices: <none>",
        "",
    ]
)


@settings(max_examples=300)
@given(st.lists(st.one_of(_lines, st.text(max_size=30)), max_size=12))
def test_mixed_real_and_random_lines_parse_or_raise_mdstat_error(lines):
    try:
        result = parse_mdstat("\n".join(lines))
    except MdstatError as e:
        assert "line " in str(e)
    else:
        assert all(isinstance(a, MdstatArray) for a in result.arrays.values())


_names = st.from_regex(r"\A(sd[a-z]{1,2}[0-9]?|loop[0-9]{1,2}|dm-[0-9]{1,3}|nvme[0-9]n[0-9]p[0-9])\Z")


@st.composite
def members(draw):
    faulty = draw(st.booleans())
    return MdstatMember(
        name=draw(_names),
        index=draw(st.integers(0, 4096)),
        write_mostly=draw(st.booleans()),
        faulty=faulty,
        # The kernel prints nothing after (F), so a faulty member shows no (S)/(R).
        spare=not faulty and draw(st.booleans()),
        replacement=not faulty and draw(st.booleans()),
        journal=draw(st.booleans()),
    )


@st.composite
def progresses(draw):
    return MdstatProgress(
        action=draw(st.sampled_from(["resync", "recovery", "check", "repair", "reshape"])),
        ratio=draw(st.integers(0, 1000)) / 1000,
        done_blocks=draw(st.integers(0, 2**40)),
        total_blocks=draw(st.integers(1, 2**40)),
        finish_minutes=draw(st.integers(0, 10**6)) / 10,
        speed_kib=draw(st.integers(0, 10**7)),
    )


@st.composite
def arrays(draw, name):
    active = draw(st.booleans())
    raid_disks = draw(st.integers(1, 16)) if active and draw(st.booleans()) else None
    status = draw(st.text("U_", min_size=raid_disks, max_size=raid_disks)) if raid_disks else None
    return MdstatArray(
        name=name,
        active=active,
        read_only=draw(st.sampled_from([None, "read-only", "auto-read-only"])) if active else None,
        level=draw(st.sampled_from(["raid0", "raid1", "raid5", "raid6", "raid10", "linear"]))
        if active
        else None,
        members=tuple(draw(st.lists(members(), min_size=1, max_size=6))),
        blocks=draw(st.integers(0, 2**50)),
        super=draw(st.sampled_from([None, "1.2", "non-persistent", "external:imsm", "external:/md127/0"])),
        raid_disks=raid_disks,
        working_disks=status.count("U") if status else None,
        status=status,
        progress=draw(st.none() | progresses()) if active else None,
        sync_state=draw(st.sampled_from([None, "PENDING", "DELAYED"])) if active else None,
        bitmap=draw(st.sampled_from([None, "0/1 pages [0KB], 65536KB chunk"])),
    )


@st.composite
def mdstats(draw):
    names = draw(st.lists(st.from_regex(r"\Amd(_[a-z][a-z0-9]{0,8}|[0-9]{1,3})\Z"), max_size=5, unique=True))
    return Mdstat(
        personalities=tuple(
            draw(st.lists(st.sampled_from(["raid1", "raid0", "raid10", "linear"]), max_size=4))
        ),
        arrays={name: draw(arrays(name)) for name in names},
    )


@settings(max_examples=100)
@given(mdstats())
def test_round_trip_of_well_formed_mdstat(mdstat):
    assert parse_mdstat(format_mdstat(mdstat)) == mdstat
