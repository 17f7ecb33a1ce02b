"""A snapshot derived piecewise (HostSnapshot.update) equals a full re-read of the same tree,
and its exposition rendered from cached pieces equals a full render.

Random sequences of what happens on a host (attach, resync progress, iSCSI outages, heals,
detach, hotplug statistics, stale records) are played on a simulated kernel tree; after
each step the changes are found the way the agent finds them (the /proc/mdstat diff and the
session-state poll of exporter/events.py, the registry's file signatures) and the previous
snapshot is updated with them."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsimple.core import files
from iscsimple.core.atomic import write_atomic
from iscsimple.core.dirwatch import DirWatch
from iscsimple.core.snapshot import Changes, HostSnapshot
from iscsimple.core.stale import StaleRecord, StaleRecords
from iscsimple.exporter import exposition
from iscsimple.exporter.collectors import default_collectors
from iscsimple.exporter.events import ChangePoll, MdstatDiff
from iscsimple.exporter.exposition import Renderer, render
from iscsimple.exporter.safety import Safety
from iscsimple.exporter.simhost import SimulatedHost

TARGETS = [f"iqn.2026-11.test.example:t{i}" for i in range(3)]
LABELS = [f"vm{i}-disk" for i in range(6)]

step = st.one_of(
    st.tuples(st.just("attach"), st.sampled_from(LABELS), st.sampled_from(TARGETS)),
    st.tuples(st.just("advance"), st.sampled_from(LABELS), st.floats(0, 1)),
    st.tuples(st.just("finish"), st.sampled_from(LABELS)),
    st.tuples(st.just("fail"), st.sampled_from(TARGETS)),
    st.tuples(st.just("expire"), st.sampled_from(TARGETS)),
    st.tuples(st.just("restore"), st.sampled_from(TARGETS)),
    st.tuples(st.just("heal"), st.sampled_from(LABELS)),
    st.tuples(st.just("detach"), st.sampled_from(LABELS)),
    st.tuples(st.just("hotplug"), st.sampled_from(["add", "remove"])),
    st.tuples(st.just("errors"), st.sampled_from(LABELS), st.integers(0, 5)),
    st.tuples(st.just("stale"), st.sampled_from(LABELS)),
    st.tuples(st.just("clear-stale"), st.sampled_from(LABELS)),
    st.tuples(st.just("corrupt-stale"), st.sampled_from(LABELS)),
    st.tuples(st.just("records"), st.sampled_from(["unreadable", "readable"])),
)


def records_readable(host: SimulatedHost) -> bool:
    return not StaleRecords(host.paths).directory.is_file()


def set_records_readable(host: SimulatedHost, readable: bool) -> None:
    """Put a file in place of the records directory (its listing fails), or the directory back."""
    stale = StaleRecords(host.paths).directory
    aside = stale.with_name("stale-aside")
    if readable and stale.is_file():
        stale.unlink()
        aside.rename(stale)
    elif not readable and not stale.is_file():
        stale.mkdir(parents=True, exist_ok=True)
        stale.rename(aside)
        stale.write_text("not a directory")


def play(host: SimulatedHost, action: tuple) -> Changes:
    """Do `action` if it applies; the changes no detector would see are returned explicitly."""
    kind, *args = action
    labels = set(host.labels())
    if kind == "records":
        set_records_readable(host, args[0] == "readable")
        return Changes()
    if kind.endswith("stale") and not records_readable(host):
        return Changes()  # nothing writes a record there
    if kind == "attach" and args[0] not in labels:
        host.attach(args[0], args[0][:3], args[1], 1 + LABELS.index(args[0]))
        # udev: the new SCSI device (H:C:T:L), its disk and the md array appear.
        hctl = f"{host._sessions[args[1]].host}:0:0:{1 + LABELS.index(args[0])}"
        return Changes(devices=frozenset({hctl, host.iscsi_device(args[0]), host.md_device(args[0])}))
    elif kind == "advance" and args[0] in labels:
        with contextlib.suppress(ValueError):  # no recovery running
            host.advance_resync(args[0], args[1], speed_kib=1000 + int(args[1] * 1000))
    elif kind == "finish" and args[0] in labels:
        host.finish_resync(args[0])
    elif kind in ("fail", "expire", "restore") and args[0] in host._sessions:
        state = {"fail": "FAILED", "expire": "FREE", "restore": "LOGGED_IN"}[kind]
        if host._sessions[args[0]].state == state:
            # The kernel does nothing to a session already in that state (the simulated host
            # would set its LUNs' states again, which no poll of the session state sees).
            return Changes()
        {"fail": host.fail_session, "expire": host.expire_session, "restore": host.restore_session}[kind](
            args[0]
        )
    elif kind == "heal" and args[0] in labels:
        with contextlib.suppress(ValueError):  # the iSCSI leg is not faulty
            host.heal(args[0])
    elif kind == "detach" and args[0] in labels:
        array = host._arrays[args[0]]
        gone = {f"{host._sessions[array.target].host}:0:0:{array.lun}", host.iscsi_device(args[0]), array.md}
        host.detach(args[0])
        return Changes(devices=frozenset(gone))  # udev: the SCSI device, its disk and the array go
    elif kind == "hotplug":
        host.record_hotplug(args[0], "success", 1.5)
    elif kind == "errors" and args[0] in labels:
        host.set_leg_errors(args[0], "local", args[1])
        # md announces no change of a leg's error count (no uevent, same mdstat): the sweep
        # finds it. Named here as a udev change of the member would name it.
        return Changes(md=frozenset({host.md_device(args[0])}))
    elif kind == "stale" and args[0] in labels:
        StaleRecords(host.paths).put(
            StaleRecord(args[0], 1.0, host.md_device(args[0]), "vm", 1, None, 1, None, None, "test", 1.0)
        )
    elif kind == "clear-stale":
        StaleRecords(host.paths).clear(args[0])
    elif kind == "corrupt-stale" and StaleRecords(host.paths).path(args[0]).exists():
        write_atomic(StaleRecords(host.paths).path(args[0]), b"{not json", mode=0o600)
    return Changes()


def same(a: HostSnapshot, b: HostSnapshot, known: HostSnapshot | None = None) -> None:
    """`a` (derived) reads as `b` (a full read). `known`: the last snapshot that could read the
    records while they cannot be read now: an update keeps its records, a full read has none."""
    assert a.attachments == b.attachments
    assert a.md.arrays == b.md.arrays and list(a.md.arrays) == list(b.md.arrays)
    assert a.md.errors == b.md.errors
    assert a.iscsi == b.iscsi
    assert a.records_error == b.records_error
    if known is not None:
        assert b.records_error is not None and a.stale == known.stale
        assert [v.stale for v in a.arrays] == [known.stale_record(v.label) for v in a.arrays]
        assert a.sessions == b.sessions and a.hotplug == b.hotplug
        return
    assert a.arrays == b.arrays
    assert a.sessions == b.sessions
    assert a.stale == b.stale
    assert a.hotplug == b.hotplug
    # A heal looks only at its target's sessions (through the derived index).
    for target in {*TARGETS, *(s.target for s in b.iscsi.sessions)}:
        assert a.target_sessions(target) == tuple(s for s in b.iscsi.sessions if s.target == target)
    assert {k: v.errors for k, v in a.sources.items()} == {k: v.errors for k, v in b.sources.items()}


def quiet_safety(host: SimulatedHost) -> Safety:
    """The agent's safety watcher for the safety collector, never observing (its detector would
    write records the full read then sees): it renders the snapshot's records, no bitmap moves."""
    safety = Safety.for_host(host.paths, heal=False)
    safety.bitmap_changes = set()
    return safety


def body(rendered) -> bytes:
    """Everything but the agent's own families (durations and the refresh time differ)."""
    return b"".join(piece.plain() for piece in rendered.openmetrics_pieces[:-1])


@settings(
    max_examples=40,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(step, min_size=1, max_size=14),
    st.lists(st.sampled_from(LABELS), max_size=3),
    st.sampled_from(["inotify", "stat", "racy stat"]),
    st.sampled_from([1, 2, 3, exposition.BLOCK]),
)
def test_update_equals_full_read(steps, first, records_by, block):
    # The records directory: its inotify watch names the files that changed; without one (no
    # inotify) the directory's stat says when to list it. Files written within the last 2 s are
    # read again whatever their stat says (the racy-git rule), which would hide the per-file
    # reuse here: the "stat" runs trust every stat.
    racy = mock.patch.object(files, "_RACY_NS", 0) if records_by == "stat" else contextlib.nullcontext()
    no_inotify = (
        mock.patch.object(DirWatch, "start", return_value=None)
        if records_by != "inotify"
        else contextlib.nullcontext()
    )
    # A few views per piece of the body, so that lines are spliced into pieces holding others.
    blocks = mock.patch.object(exposition, "BLOCK", block)
    with tempfile.TemporaryDirectory() as tmp, racy, no_inotify, blocks:
        host = SimulatedHost(Path(tmp))
        for i, label in enumerate(first):
            if label not in host.labels():
                host.attach(label, "vm", TARGETS[i % len(TARGETS)], 1 + LABELS.index(label))
        mdstat = MdstatDiff(host.paths.procfs / "mdstat")
        mdstat.read()
        poll = ChangePoll(host.paths.sysfs, mdstat)
        snapshot = HostSnapshot.read(host.paths)
        pinned = [snapshot]
        safety = quiet_safety(host)
        renderer = Renderer(default_collectors(lambda: pinned[0], safety=safety))
        renderer.render(snapshot)
        known = snapshot  # the last snapshot that could read the records
        for action in steps:
            explicit = play(host, action)
            # What the md event watcher would report (md wakes it on every array change),
            # then the scheduled poll.
            changes = Changes(md=frozenset(mdstat.read())) | explicit | poll(snapshot)
            updated = snapshot.update(host.paths, changes)
            full = HostSnapshot.read(host.paths)
            readable = updated.records_error is None
            same(updated, full, None if readable else known)
            if readable:
                known = updated
            pinned[0] = updated
            incremental = renderer.render(updated)
            # While the records cannot be read, the update keeps the records read last (a full
            # read has none): it renders as a fresh render of the same snapshot.
            expected = full if readable else updated
            fresh = render(expected, default_collectors(lambda e=expected: e, safety=quiet_safety(host)))
            assert body(incremental) == body(fresh)
            # Views that read the same are the previous snapshot's objects.
            previous = {v.attachment.id: v for v in snapshot.arrays}
            for view in updated.arrays:
                key = view.attachment.id
                if key not in (updated.changed or ()):
                    assert view is previous[key]
            snapshot = updated


def test_full_sweep_keeps_unchanged_views(tmp_path):
    host = SimulatedHost(tmp_path)
    host.attach("a", "vm", TARGETS[0], 1)
    host.attach("b", "vm", TARGETS[1], 2)
    before = HostSnapshot.read(host.paths)
    after = before.update(host.paths, Changes(everything=True))
    assert after.changed == frozenset()
    assert all(x is y for x, y in zip(after.arrays, before.arrays, strict=True))
    host.advance_resync("b", 0.5)
    swept = after.update(host.paths, Changes(everything=True))
    assert swept.changed == {host.registry.by_label("b").id}
    assert swept.arrays[0] is after.arrays[0] and swept.arrays[1] is not after.arrays[1]
    same(swept, HostSnapshot.read(host.paths))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.binary(max_size=200), max_size=300),
    st.lists(st.tuples(st.integers(0, 400), st.binary(max_size=200)), max_size=5),
    st.booleans(),
)
def test_a_gzip_body_of_compressed_pieces_is_one_valid_member(lines, edits, libz):
    """The gzip body is the pieces' compressed bytes one after the other: one gzip member (any
    client reads it), whose CRC is combined from the pieces' (zlib's crc32_combine, or without
    libz the lines' own CRC)."""
    import gzip
    import zlib

    from iscsimple.exporter.exposition import GzipBody, Piece, PlainBody, gzip_member

    no_libz = contextlib.nullcontext() if libz else mock.patch.object(exposition, "_CRC32_COMBINE", None)
    pieces = [Piece.of(piece) for piece in lines]
    with no_libz:
        for index, piece in [(None, None), *edits]:
            if index is not None:
                pieces.insert(min(index, len(pieces)), Piece.of(piece))
            whole = b"".join(piece.plain() for piece in pieces)
            assert b"".join(PlainBody(pieces)) == whole and len(PlainBody(pieces)) == len(whole)
            packed = gzip_member(pieces)
            assert gzip.decompress(packed) == whole
            single = zlib.decompressobj(wbits=31)
            assert single.decompress(packed) == whole and single.eof and not single.unused_data
            # As the web server writes it: in runs of at least RUN bytes (the last one shorter).
            with mock.patch.object(GzipBody, "RUN", 64):
                body = GzipBody.of(pieces)
                runs = list(body)
            assert b"".join(runs) == packed and len(body) == len(packed)
            assert all(len(run) >= 64 for run in runs[:-1])


mdstat_block = st.tuples(
    st.sampled_from([f"md{i}" for i in range(8)] + ["md_web1", "md_db-2"]),
    st.lists(
        st.sampled_from(["[UU]", "[U_]", "recovery = 3.2%", "bitmap: 1/1 pages", "", "speed=9K/sec"]),
        max_size=3,
    ),
)


def mdstat_text(blocks: list[tuple[str, list[str]]]) -> bytes:
    lines = ["Personalities : [raid1] "]
    for name, rest in dict(blocks).items():  # one block per name, as the kernel writes
        lines.append(f"{name} : active raid1 sdb[1] sda[0]")
        lines.extend(f"      {line}" for line in rest)
        lines.append("      ")
    lines.append("unused devices: <none>")
    return ("\n".join(lines) + "\n").encode()


@settings(max_examples=300, deadline=None)
@given(st.lists(mdstat_block, max_size=8), st.lists(mdstat_block, max_size=8))
def test_mdstat_diff_of_the_changed_stretch_equals_a_full_split(one, other):
    """changed_arrays splits only the stretch between the common start and end of two reads;
    it names exactly the arrays whose blocks a full split finds different."""
    from iscsimple.core.mdstat import _named_blocks, changed_arrays, mdstat_blocks

    for before, after in (
        (mdstat_text(one), mdstat_text(other)),
        (mdstat_text(one), mdstat_text(one + other)),
    ):
        old, new = mdstat_blocks(before.decode()), mdstat_blocks(after.decode())
        expected = {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
        assert changed_arrays(before, after) == expected
        # The few arrays a bitmap read asks for are found without splitting the rest.
        assert _named_blocks(after, {"md1", "md_web1", "md9"}) == {
            n: b for n, b in new.items() if n in {"md1", "md_web1", "md9"}
        }


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20), st.integers()), max_size=60))
def test_copy_on_write_index_map_leaves_its_parents_alone(operations):
    """A derived index writes into its own layer: every earlier map still reads what it held,
    through folds into a new base too."""
    from iscsimple.core.snapshot import CowMap

    maps, expected = [CowMap({1: 1, 2: 2})], [{1: 1, 2: 2}]
    with mock.patch.object(CowMap, "FOLD", 3):
        for put, key, value in operations:
            child, model = maps[-1].derive(), dict(expected[-1])
            if put:
                child[key] = value
                model[key] = value
            else:
                assert child.pop(key, "absent") == model.pop(key, "absent")
            maps.append(child)
            expected.append(model)
    for cow, model in zip(maps, expected, strict=True):
        assert dict(cow) == model == cow.as_dict() and len(cow) == len(model)
        assert all((k in cow) == (k in model) and cow.get(k) == model.get(k) for k in range(-1, 22))
    # What changed between two maps is found from their layers alone while they share a base,
    # and equals a compare of every key either way.
    from iscsimple.core.snapshot import changed_keys

    for i in range(len(maps)):
        a, b = maps[i], maps[min(i + 1, len(maps) - 1)]
        a_model, b_model = expected[i], expected[min(i + 1, len(maps) - 1)]
        differ = {
            k for k in a_model.keys() | b_model.keys() if a_model.get(k, "absent") != b_model.get(k, "absent")
        }
        assert changed_keys(a, b) == differ
        assert b.changed_keys(a) in (None, differ)
    assert changed_keys(maps[0], maps[-1]) == {
        k
        for k in expected[0].keys() | expected[-1].keys()
        if expected[0].get(k, "x") != expected[-1].get(k, "x")
    }


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(), max_size=40),
    st.lists(st.dictionaries(st.integers(0, 39), st.integers()), max_size=5),
)
def test_chunked_views_replace_only_their_runs_and_read_as_the_tuple(items, edits):
    """A derived snapshot's views replace a few items of runs shared with its parent: every
    sequence reads as the tuple of its items, and an earlier one is left as it was."""
    from iscsimple.core.snapshot import Chunks

    with mock.patch.object(Chunks, "SIZE", 3):
        seqs, models = [Chunks(items)], [tuple(items)]
        for edit in edits:
            edit = {i: v for i, v in edit.items() if i < len(items)}
            model = list(models[-1])
            for i, v in edit.items():
                model[i] = v
            seqs.append(seqs[-1].replaced(edit))
            models.append(tuple(model))
        for seq, model in zip(seqs, models, strict=True):
            assert seq == model and tuple(seq) == model and len(seq) == len(model)
            assert seq == Chunks(model) and hash(seq) == hash(Chunks(model))
            assert [seq[i] for i in range(-len(model), len(model))] == [*model, *model]
            assert seq[1:-1] == model[1:-1]
            with contextlib.suppress(IndexError):
                seq[len(model)]
                raise AssertionError("indexed past the end")


def test_a_record_replaced_under_its_name_is_read_again(tmp_path):
    """The records directory is compared by the inodes of its listing: a record iscsimple
    rewrites (a new file renamed over it) is read again, the others are not."""
    host = SimulatedHost(tmp_path)
    records = StaleRecords(host.paths)
    for label in ("a", "b"):
        records.put(StaleRecord(label, 1.0, "md1", "vm", 1, None, 1, None, None, "test", 1.0))
    known, changed = records.read_moved(None)
    assert set(changed) == {"a", "b"}
    with mock.patch.object(records, "_get_in", wraps=records._get_in) as get:
        again, changed = records.read_moved(known)
        assert again is known and changed == {} and not get.called
        write_atomic(records.path("a"), b"{not json", mode=0o600)
        again, changed = records.read_moved(known)
        assert [c.args[1:] for c in get.call_args_list] == [("a",)]
    assert changed["a"].unreadable and again.errors == [changed["a"].reason]
    records.clear("b")
    _, changed = records.read_moved(again)
    assert changed == {"b": None}


def test_the_body_is_made_of_the_renderers_only_copy_of_the_lines(tmp_path):
    """One encoded copy: every piece of array lines in a rendered body is the very object the
    renderer keeps, and a change replaces only the pieces holding the changed view."""
    host = SimulatedHost(tmp_path)
    for i, label in enumerate(LABELS):
        host.attach(label, "vm", TARGETS[i % len(TARGETS)], 1 + i)
        host.finish_resync(label)
    snapshot = HostSnapshot.read(host.paths)
    pinned = [snapshot]
    renderer = Renderer(default_collectors(lambda: pinned[0]))
    with mock.patch.object(exposition, "BLOCK", 2):
        first = renderer.render(snapshot)
        in_body = {id(piece) for piece in first.openmetrics_pieces}
        arrays = renderer._pieces[("arrays", True)]
        before = {name: list(blocks) for name, blocks in arrays.blocks.items()}
        assert all(len(blocks) == 3 for blocks in before.values())
        assert all(id(piece) in in_body for blocks in before.values() for piece in blocks if piece)
        host.set_leg_errors(LABELS[4], "local", 3)
        updated = pinned[0] = snapshot.update(host.paths, Changes(everything=True))
        second = renderer.render(updated)
        assert body(second) == body(render(updated, default_collectors(lambda: updated)))
        replaced = set()
        for name, blocks in arrays.blocks.items():
            assert blocks[0] is before[name][0] and blocks[1] is before[name][1], name
            if blocks[2] is not before[name][2]:
                replaced.add(name)
        assert replaced == {"iscsimple_leg_errors"}
        assert body(first) != body(second)


def test_an_added_view_leaves_the_blocks_before_it_as_they_were(tmp_path):
    """When views are added (an attach), a block holding the very views it held before, in the
    same order, keeps its compressed pieces: only the blocks from the new view on are encoded."""
    host = SimulatedHost(tmp_path)
    for i, label in enumerate(LABELS[:4]):
        host.attach(label, "vm", TARGETS[i % len(TARGETS)], 1 + i)
    snapshot = HostSnapshot.read(host.paths)
    pinned = [snapshot]
    renderer = Renderer(default_collectors(lambda: pinned[0]))
    with mock.patch.object(exposition, "BLOCK", 2):
        renderer.render(snapshot)
        before = {name: list(blocks) for name, blocks in renderer._pieces[("arrays", True)].blocks.items()}
        host.attach(LABELS[4], "vm", "iqn.2026-11.test.example:new", 5)  # sorts after the others
        updated = pinned[0] = snapshot.update(host.paths, Changes(everything=True))
        second = renderer.render(updated)
        assert body(second) == body(render(updated, default_collectors(lambda: updated)))
        after = renderer._pieces[("arrays", True)].blocks
        assert all(after[name][:2] == blocks[:2] for name, blocks in before.items())  # the same objects
        assert all(len(blocks) == 3 for blocks in after.values())


def test_a_spliced_piece_is_compressed_by_the_first_gzip_body_or_the_next_render(tmp_path):
    """A change's new pieces are left uncompressed until a gzip body needs them or the next render
    (a view changing again meanwhile is spliced in plain lines); the bodies read the same."""
    import gzip

    host = SimulatedHost(tmp_path)
    for i, label in enumerate(LABELS[:4]):
        host.attach(label, "vm", TARGETS[i % len(TARGETS)], 1 + i)
        host.finish_resync(label)
    snapshot = HostSnapshot.read(host.paths)
    pinned = [snapshot]
    renderer = Renderer(default_collectors(lambda: pinned[0]))
    renderer.render(snapshot)
    arrays = renderer._pieces[("arrays", True)]
    assert all(piece._plain is None for blocks in arrays.blocks.values() for piece in blocks)
    for errors, gzipped in ((3, True), (4, False), (5, False)):
        host.set_leg_errors(LABELS[1], "local", errors)
        updated = pinned[0] = pinned[0].update(host.paths, Changes(everything=True))
        rendered = renderer.render(updated)
        spliced = arrays.blocks["iscsimple_leg_errors"][0]
        assert spliced._plain is not None and spliced._packed is None
        assert f'leg="local"}} {float(errors)}'.encode() in spliced.plain()
        full = render(updated, default_collectors(lambda updated=updated: updated))
        assert body(rendered) == body(full)
        if gzipped:
            packed = b"".join(rendered.gzipped("application/openmetrics-text")[0])
            assert spliced._plain is None and spliced._packed is not None
            assert gzip.decompress(packed).startswith(body(full))
    renderer.render(pinned[0])
    assert spliced._plain is None and spliced._packed is not None


def _record(label: str, reason: str = "test") -> StaleRecord:
    return StaleRecord(label, 1.0, "md1", "vm", 1, None, 1, None, None, reason, 1.0)


def test_a_watched_records_directory_is_not_listed_and_names_what_changed(tmp_path):
    """With its inotify watch, an update reads only the record files the kernel named: none when
    nothing moved (no listing), a record rewritten in place (same inode, which a listing would
    miss until the sweep), a new one, a removed one."""
    host = SimulatedHost(tmp_path)
    records = StaleRecords(host.paths)
    for label in ("a", "b", "c"):
        records.put(_record(label))
    known, _ = records.read_moved(None)
    known, changed = records.read_watched(known)  # starts the watch, lists once
    assert known.watch is not None and known.watch.alive and changed == {}
    with (
        mock.patch.object(records, "_inodes", wraps=records._inodes) as listing,
        mock.patch.object(records, "_get_in", wraps=records._get_in) as get,
    ):
        again, changed = records.read_watched(known)
        assert again is known and changed == {} and not get.called
        with open(records.path("b"), "r+b") as f:  # edited in place: the inode stays
            f.write(b"{not json")
        records.put(_record("d"))
        records.clear("c")
        again, changed = records.read_watched(known)
        assert not listing.called
    assert sorted(c.args[1] for c in get.call_args_list if c.args[1] != "d") == ["b"]
    assert changed["b"].unreadable and changed["c"] is None and changed["d"] == _record("d")
    assert again.watch is known.watch and set(again.files) == {"a.json", "b.json", "d.json"}
    assert again == records.read_moved(None)[0]


def test_records_are_listed_when_the_watch_cannot_tell(tmp_path):
    """The directory is listed again when the watch died (queue overflow, directory replaced),
    when the state given is not the one the watch last answered for (an older snapshot
    updated twice), and when inotify is unavailable."""
    host = SimulatedHost(tmp_path)
    records = StaleRecords(host.paths)
    records.put(_record("a"))
    known, _ = records.read_watched(records.read_moved(None)[0])
    first, _ = records.read_watched(known)
    records.put(_record("b"))
    _, changed = records.read_watched(first)
    assert set(changed) == {"b"}
    # `first` is older than the watch's last answer: what changed since it is found by listing.
    records.clear("a")
    with mock.patch.object(records, "_inodes", wraps=records._inodes) as listing:
        branch, changed = records.read_watched(first)
        assert listing.called and changed == {"a": None, "b": _record("b")}
    known.watch.close()  # as an IN_Q_OVERFLOW does
    records.put(_record("c"))
    with mock.patch.object(records, "_inodes", wraps=records._inodes) as listing:
        after, changed = records.read_watched(branch)
        assert listing.called and set(changed) == {"c"} and after.watch.alive
        assert after.watch is not known.watch
    with mock.patch.object(DirWatch, "start", return_value=None):
        unwatched, _ = records.read_watched(records.read_moved(None)[0])
    assert not unwatched.watch.alive and unwatched.watch.take() is None


def test_a_replaced_records_directory_kills_the_watch(tmp_path):
    host = SimulatedHost(tmp_path)
    records = StaleRecords(host.paths)
    records.put(_record("a"))
    known, _ = records.read_watched(records.read_moved(None)[0])
    watch = known.watch
    records.directory.rename(records.directory.with_name("stale.old"))
    assert watch.take() is None and not watch.alive
    records.put(_record("b"))
    again, changed = records.read_watched(known)
    assert changed == {"a": None, "b": _record("b")} and again.watch.alive


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(step, min_size=1, max_size=12))
def test_the_detectors_carried_records_equal_a_pass_over_everything(steps):
    """The stale detector takes its last pass's records over and sets again only the labels the
    update re-read or it wrote; after every step they equal what a detector that looks at every
    view and record of the same snapshot finds."""
    from iscsimple.exporter.safety import StaleDetector

    with tempfile.TemporaryDirectory() as tmp:
        host = SimulatedHost(Path(tmp))
        for i, label in enumerate(LABELS[:3]):
            host.attach(label, "vm", TARGETS[i], 1 + i)
        mdstat = MdstatDiff(host.paths.procfs / "mdstat")
        mdstat.read()
        poll = ChangePoll(host.paths.sysfs, mdstat)
        # One clock for both: a record that cannot be written is made afresh on each pass.
        detector = StaleDetector(StaleRecords(host.paths), clock=lambda: 1.7e9)
        snapshot = HostSnapshot.read(host.paths)
        detector.observe(snapshot)
        for action in steps:
            explicit = play(host, action)
            changes = Changes(md=frozenset(mdstat.read())) | explicit | poll(snapshot)
            snapshot = snapshot.update(host.paths, changes)
            carried = detector.observe(snapshot)
            assert detector.touched is not None  # the incremental pass ran
            assert dict(carried) == dict(
                StaleDetector(StaleRecords(host.paths), clock=lambda: 1.7e9).observe(snapshot)
            )


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.one_of(step, st.tuples(st.just("stale-elsewhere"), st.sampled_from(LABELS[4:]))),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from([1, 2, exposition.BLOCK]),
)
def test_the_watchers_collectors_rendered_from_what_changed_equal_a_full_render(steps, block):
    """The health and safety collectors re-render only the labels whose verdicts or standing
    records changed (found from the records' shared layers, not by comparing every record):
    after every step the body equals one rendered from scratch by new collectors."""
    from iscsimple.exporter.collectors import Context
    from iscsimple.exporter.health import HealthChecker
    from iscsimple.exporter.safety import Safety

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(exposition, "BLOCK", block):
        host = SimulatedHost(Path(tmp))
        for i, label in enumerate(LABELS[:4]):
            host.attach(label, "vm", TARGETS[i % len(TARGETS)], 1 + i)
        mdstat = MdstatDiff(host.paths.procfs / "mdstat")
        mdstat.read()
        poll = ChangePoll(host.paths.sysfs, mdstat)
        health, safety = HealthChecker(), Safety.for_host(host.paths, heal=False)
        safety.mdstat = mdstat.latest
        pinned = [HostSnapshot.read(host.paths)]
        context = Context(lambda: pinned[0], health, safety)
        renderer = Renderer(default_collectors(context))
        for action in [None, *steps]:
            if action is not None and action[0] == "stale-elsewhere" and not records_readable(host):
                explicit = Changes()  # nothing writes a record there
            elif action is not None and action[0] == "stale-elsewhere" and action[1] not in host.labels():
                # A record whose array is not here (written by a remove): exported on its own.
                StaleRecords(host.paths).put(_record(action[1]))
                explicit = Changes()
            elif action is not None:
                explicit = play(host, action)
                changes = Changes(md=frozenset(mdstat.read())) | explicit | poll(pinned[0])
                pinned[0] = pinned[0].update(host.paths, changes)
            health.observe(pinned[0])
            safety.observe(pinned[0])
            incremental = renderer.render(pinned[0])
            fresh = Renderer(default_collectors(Context(lambda: pinned[0], health, safety))).render(pinned[0])
            assert body(incremental) == body(fresh)


def test_a_gzip_body_combines_again_only_the_groups_whose_pieces_changed():
    """At rest every refresh makes a new body of almost the same pieces: the groups of pieces
    the last body had are reused (their CRC and compressed bytes), and the body is the same as
    one made from scratch."""
    import gzip

    from iscsimple.exporter.exposition import GzipBody, Piece, _Groups

    pieces = [Piece.of(f"line {i}\n".encode() * (i % 3)) for i in range(1000)]
    groups = _Groups()
    with mock.patch.object(exposition, "_GROUPS", groups):
        first = b"".join(GzipBody.of(pieces))
        with mock.patch.object(exposition, "_combined_crc", wraps=exposition._combined_crc) as made:
            assert b"".join(GzipBody.of(pieces)) == first
            assert made.call_count == 0
            pieces[500] = Piece.of(b"changed 500\n")
            again = b"".join(GzipBody.of(pieces))
            assert made.call_count == 1  # the one group holding piece 500
    assert gzip.decompress(again) == b"".join(p.plain() for p in pieces)
    assert again == b"".join(GzipBody.of(pieces))  # the module's memo, from scratch


def test_records_unreadable_then_readable_re_render_every_safe_to_migrate(tmp_path):
    """Whether the records can be read changes no view, yet every array's safe_to_migrate
    depends on it: the incremental render must re-render them (SafetyCollector.dirty), both ways."""
    host = SimulatedHost(tmp_path)
    for i, label in enumerate(LABELS[:3]):
        host.attach(label, "vm", TARGETS[0], 1 + i)
        host.finish_resync(label)
    safety = Safety.for_host(host.paths, heal=False)
    snapshot = HostSnapshot.read(host.paths)
    pinned = [snapshot]
    renderer = Renderer(default_collectors(lambda: pinned[0], safety=safety))
    safety.observe(snapshot)
    renderer.render(snapshot)
    for readable in (False, True, False, True):
        set_records_readable(host, readable)
        snapshot = snapshot.update(host.paths, Changes())
        assert not snapshot.changed
        pinned[0] = snapshot
        safety.observe(snapshot)
        text = body(renderer.render(snapshot))
        current = snapshot
        assert text == body(render(current, default_collectors(lambda c=current: c, safety=safety)))
        for label in LABELS[:3]:
            sample = f'iscsimple_array_safe_to_migrate{{domain="vm",label="{label}"}} '.encode()
            assert sample + (b"1.0" if readable else b"0.0") in text, text.decode()
        assert b"iscsimple_stale_records_readable " + (b"1.0" if readable else b"0.0") in text


def test_a_record_cleared_while_the_copy_is_still_stale_is_written_again(tmp_path):
    """The detector carried its last pass's records and, for a label whose record went, only
    dropped it: a record removed by hand while the iSCSI copy was still stale read as healed
    until the array's view changed. A pass over every view writes it again; so does the carried one."""
    from iscsimple.exporter.safety import StaleDetector

    host = SimulatedHost(tmp_path)
    host.attach(LABELS[0], "vm", TARGETS[0], 1)
    mdstat = MdstatDiff(host.paths.procfs / "mdstat")
    mdstat.read()
    poll = ChangePoll(host.paths.sysfs, mdstat)
    records = StaleRecords(host.paths)
    detector = StaleDetector(records, clock=lambda: 1.7e9)
    snapshot = HostSnapshot.read(host.paths)
    detector.observe(snapshot)
    for action in [("finish", LABELS[0]), ("expire", TARGETS[0]), ("clear-stale", LABELS[0])]:
        changes = Changes(md=frozenset(mdstat.read())) | play(host, action) | poll(snapshot)
        snapshot = snapshot.update(host.paths, changes)
        standing = detector.observe(snapshot)
    assert LABELS[0] in standing
    assert records.get(LABELS[0]) is not None
