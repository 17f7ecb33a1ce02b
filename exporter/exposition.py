"""Rendering snapshots into the exposition formats, reusing what did not change.

A snapshot is immutable, so its exposition is too: it is rendered in the refresh
thread and then served as bytes. A scrape therefore costs a lookup and a socket
write, and can never block on the host, whatever state its devices are in.

`Renderer` keeps, per collector and family, the encoded sample lines of each run of
BLOCK arrays (and sessions) as one piece, and the length of each view's lines in it.
A derived snapshot shares the views that did not change, so an update encodes again
only the changed views and splices their lines into new pieces; the body is a list of
those pieces (text and OpenMetrics share them; only the HELP/TYPE lines differ),
joined or compressed when a scrape asks for it.
"""

from __future__ import annotations

import bisect
import logging
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate

from prometheus_client import exposition as text_format
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics_format

from iscsimple import __version__ as VERSION
from iscsimple.core.snapshot import HostSnapshot

from .collectors.base import Part, SnapshotCollector
from .families import Family, encode_value, escape

log = logging.getLogger(__name__)

TEXT_CONTENT_TYPE = text_format.CONTENT_TYPE_LATEST
OPENMETRICS_CONTENT_TYPE = openmetrics_format.CONTENT_TYPE_LATEST


class _Families:
    """The object prometheus_client's encoders want: something with collect()."""

    def __init__(self, families: Sequence[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


@dataclass
class Rendered:
    snapshot: HostSnapshot
    collectors: Sequence[SnapshotCollector]
    success: dict[str, bool]
    text_pieces: list[bytes]
    openmetrics_pieces: list[bytes]
    agent_families: Sequence[Metric] = ()
    segments: GzipSegments = field(default_factory=lambda: GzipSegments(), repr=False)
    _gzipped: dict[str, bytes] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def up(self) -> bool:
        return all(self.success.values())

    @property
    def text(self) -> bytes:
        return self.body("")[0]

    @cached_property
    def families(self) -> list[Metric]:
        """The families of every collector for this snapshot (tests compare encoders on them)."""
        families: list[Metric] = []
        for collector in self.collectors:
            families.extend(collector.families(self.snapshot, Part.whole(self.snapshot)))
        return [*families, *self.agent_families]

    def pieces(self, accept: str) -> tuple[list[bytes], str]:
        """The body as the list of its pieces, not joined (the web server writes them as they are)."""
        if "application/openmetrics-text" in (accept or ""):
            return self.openmetrics_pieces, OPENMETRICS_CONTENT_TYPE
        return self.text_pieces, TEXT_CONTENT_TYPE

    def body(self, accept: str) -> tuple[bytes, str]:
        """The body, joined for this request: the pieces are the one copy kept (Prometheus asks
        for gzip, whose compressed segments are kept apart)."""
        pieces, content_type = self.pieces(accept)
        return b"".join(pieces), content_type

    def gzipped(self, accept: str) -> tuple[bytes, str]:
        """The same body gzip-compressed, once per snapshot and format.

        One gzip member whose deflate stream is made of segments compressed apart (each ends
        with a full flush, so it needs nothing before it): a segment whose pieces did not
        change since the last body is reused, and only the CRC runs over the whole body."""
        pieces, content_type = self.pieces(accept)
        with self._lock:
            packed = self._gzipped.get(content_type)
            if packed is None:
                packed = self._gzipped[content_type] = self.segments.gzip(content_type, pieces)
        return packed, content_type


class GzipSegments:
    """Compressed segments of the last body of each format, shared by successive Rendered."""

    SIZE = 4  # pieces per segment (a piece holds the lines of BLOCK views in one family)

    def __init__(self):
        # Per format, per segment of the last body: its pieces, compressed, and the CRC and size
        # of the body up to its end (reused while every segment before differs in nothing).
        self._last: dict[str, list[tuple[tuple[bytes, ...], bytes, int, int]]] = {}
        self._lock = threading.Lock()

    def gzip(self, content_type: str, pieces: list[bytes]) -> bytes:
        with self._lock:
            last = self._last.get(content_type, [])
            known = {segment: packed for segment, packed, _, _ in last}
            now: list[tuple[tuple[bytes, ...], bytes, int, int]] = []
            crc = 0
            size = 0
            same_so_far = True
            for number, start in enumerate(range(0, len(pieces), self.SIZE)):
                segment = tuple(pieces[start : start + self.SIZE])
                if same_so_far and number < len(last) and last[number][0] == segment:
                    now.append(last[number])  # the CRC up to here is the last body's
                    crc, size = last[number][2], last[number][3]
                    continue
                same_so_far = False
                packed = known.get(segment)
                if packed is None:
                    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
                    packed = b"".join([*map(packer.compress, segment), packer.flush(zlib.Z_FULL_FLUSH)])
                    known[segment] = packed
                for piece in segment:
                    crc = zlib.crc32(piece, crc)
                    size += len(piece)
                now.append((segment, packed, crc, size))
            self._last[content_type] = now
            out = [_GZIP_HEADER, *(packed for _, packed, _, _ in now), _DEFLATE_END]
            out.append(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
            return b"".join(out)


# A gzip member header (RFC 1952: deflate, no name, no time, OS unknown) and the empty final
# deflate block that ends a stream of full-flushed segments.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_DEFLATE_END = zlib.compressobj(1, zlib.DEFLATED, -15).flush()


BLOCK = 64  # views (arrays or sessions) per piece of the body: N / 64 pieces per family


@dataclass
class _Pieces:
    """One collector's encoded sample lines for one kind of view (arrays or sessions).

    Only one copy of the encoded lines is kept: per family, one piece per BLOCK views (what
    the bodies are made of) and the length of each view's lines in it, so that one view's
    lines are replaced in their piece without encoding the other views again."""

    views: list  # the views as rendered, in the snapshot's order
    blocks: dict[str, list[bytes]] = field(default_factory=dict)  # family -> one piece per BLOCK views
    lengths: dict[str, array] = field(default_factory=dict)  # family -> bytes of each view's lines

    def starts(self, name: str) -> list[int]:
        """Where each view's lines of family `name` start in their piece."""
        starts: list[int] = []
        lengths = self.lengths[name]
        for start in range(0, len(lengths), BLOCK):
            starts.append(0)
            starts += accumulate(lengths[start : start + BLOCK - 1])
        return starts

    def lines(self, name: str, index: int, start: int) -> bytes:
        """The lines of view `index` in family `name`, which start at `start` in their piece."""
        return self.blocks[name][index // BLOCK][start : start + self.lengths[name][index]]

    def replace(self, name: str, index: int, lines: bytes) -> None:
        """Put `lines` in place of view `index`'s lines of family `name`, in a new piece (the
        bodies already rendered keep the old one)."""
        blocks = self.blocks.get(name)
        if blocks is None:
            if not lines:
                return
            # A family no view had samples in until now.
            blocks = self.blocks[name] = [b""] * _block_count(len(self.views))
            self.lengths[name] = array("I", bytes(4 * len(self.views)))
        lengths = self.lengths[name]
        if not lines and not lengths[index]:
            return  # no lines before or now (most families of one view)
        start = sum(lengths[index - index % BLOCK : index])
        end = start + lengths[index]
        piece = blocks[index // BLOCK]
        if end - start == len(lines) and piece.startswith(lines, start):
            return  # the same lines: the piece, and its compressed segment, stay as they are
        blocks[index // BLOCK] = b"".join((piece[:start], lines, piece[end:]))
        lengths[index] = len(lines)


def _block_count(views: int) -> int:
    return (views + BLOCK - 1) // BLOCK


class Renderer:
    """Renders snapshot after snapshot, re-encoding only the views that changed."""

    def __init__(self, collectors: Sequence[SnapshotCollector]):
        self.collectors = list(collectors)
        self._pieces: dict[tuple[str, bool], _Pieces] = {}
        self._segments = GzipSegments()
        self._headers: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}
        self._last: HostSnapshot | None = None  # the snapshot the cached pieces were rendered from
        # During one render: each view's Part, made once for every collector (arrays, sessions).
        self._parts: dict[bool, list[Part]] = {}

    def render(self, snapshot: HostSnapshot) -> Rendered:
        text: list[bytes] = []
        om: list[bytes] = []
        success: dict[str, bool] = {}
        seconds: dict[str, float] = {}
        moved = self._moved(snapshot)
        self._last = snapshot
        for collector in self.collectors:
            started = time.perf_counter()
            name = collector.name
            try:
                self._collector(collector, snapshot, text, om, moved)
                failed = [
                    s for s in collector.sources if s in snapshot.sources and not snapshot.sources[s].ok
                ]
                success[name] = not failed
            except Exception:
                log.exception("collector %s failed", name)
                self._pieces.pop((name, True), None)
                self._pieces.pop((name, False), None)
                success[name] = False
            read = sum(snapshot.sources[s].seconds for s in collector.sources if s in snapshot.sources)
            seconds[name] = read + time.perf_counter() - started
        self._parts.clear()
        agent = _agent_families(snapshot, success, seconds)
        agent_text, agent_om = encode_both(agent)
        text.append(agent_text)
        om.append(agent_om)  # ends with "# EOF"
        return Rendered(snapshot, self.collectors, success, text, om, agent, self._segments)

    def _moved(self, snapshot: HostSnapshot) -> tuple[set[int] | None, set[int] | None]:
        """The positions of the arrays and of the sessions whose views are not those of the last
        render (None: any may be), found from what the snapshot says changed: no walk over every view."""
        last = self._last
        changed = snapshot.changed_since(last)
        if last is None or changed is None:
            return None, None
        arrays: set[int] | None = set()
        if len(snapshot.arrays) != len(last.arrays):
            arrays = None
        else:
            for key in changed:
                position = snapshot.position(key)
                if position is None or position != last.position(key):
                    arrays = None  # views were added, removed or reordered
                    break
                arrays.add(position)
        sessions: set[int] | None = set()
        if snapshot.sessions is not last.sessions:
            targets = snapshot.changed_targets or frozenset()
            if len(snapshot.sessions) != len(last.sessions) or any(
                _session_range(snapshot, t) != _session_range(last, t) for t in targets
            ):
                sessions = None
            else:
                sessions = _session_positions(snapshot, set(targets))
        return arrays, sessions

    def _collector(
        self,
        collector: SnapshotCollector,
        snapshot: HostSnapshot,
        text: list,
        om: list,
        moved: tuple[set[int] | None, set[int] | None] = (None, None),
    ) -> None:
        labels, targets = collector.dirty(snapshot)
        families = list(collector.families(snapshot, Part(rest=True)))
        arrays = self._update(collector, snapshot, True, _array_positions(snapshot, labels), moved[0])
        sessions = self._update(collector, snapshot, False, _session_positions(snapshot, targets), moved[1])
        # Build both lists first: a failing collector adds nothing.
        text_part: list[bytes] = []
        om_part: list[bytes] = []
        for family in families:
            key = (family.name, family.type, family.documentation)
            headers = self._headers.get(key)
            if headers is None:
                headers = self._headers[key] = _headers(family)
            array_blocks = arrays.blocks.get(family.name, ())
            session_blocks = sessions.blocks.get(family.name, ())
            rest = _sample_lines(family)
            text_part.append(headers[0])
            text_part += array_blocks
            text_part += session_blocks
            text_part.append(rest)
            om_part.append(headers[1])
            om_part += array_blocks
            om_part += session_blocks
            om_part.append(rest)
        text.extend(text_part)
        om.extend(om_part)

    def _update(
        self,
        collector,
        snapshot: HostSnapshot,
        arrays: bool,
        dirty: set[int] | None,
        moved: set[int] | None = None,
    ) -> _Pieces:
        views = snapshot.arrays if arrays else snapshot.sessions
        key = (collector.name, arrays)
        old = self._pieces.get(key)
        if old is not None and dirty is not None and moved is not None and len(views) == len(old.views):
            # The views stayed where they were: encode again only the changed ones, in place (no
            # rendered body shares these lists: each render copies the pieces it uses).
            for index in sorted(dirty | moved):
                view = views[index]
                fresh = {f.name: _sample_lines(f) for f in collector.families(snapshot, _part(arrays, view))}
                for name in fresh.keys() | old.blocks.keys():
                    old.replace(name, index, fresh.get(name, b""))
                old.views[index] = view
            return old
        # Views were added, removed or reordered, or any may have changed: a view rendered
        # before (the same object) keeps its lines unless it is dirty; the others are encoded.
        reuse: dict[int, int] = {}  # id of a view rendered before -> where it was
        starts: dict[str, list[int]] = {}  # family -> where each view's lines started
        if old is not None and dirty is not None:
            reuse = {id(view): index for index, view in enumerate(old.views)}
            starts = {name: old.starts(name) for name in old.blocks}
        new = _Pieces(list(views))
        count = _block_count(len(views))
        parts = self._parts.get(arrays)
        if parts is None:
            parts = self._parts[arrays] = [_part(arrays, view) for view in views]
        for start in range(0, len(views), BLOCK):
            stop = min(start + BLOCK, len(views))
            lines: dict[str, list[bytes]] = {}  # this block's lines, by family and view
            for index in range(start, stop):
                view = views[index]
                before = reuse.get(id(view))
                if old is not None and before is not None and dirty is not None and index not in dirty:
                    found = {name: old.lines(name, before, at[before]) for name, at in starts.items()}
                else:
                    found = {f.name: _sample_lines(f) for f in collector.families(snapshot, parts[index])}
                for name, encoded in found.items():
                    if encoded:
                        family = lines.get(name)
                        if family is None:
                            family = lines[name] = [b""] * (stop - start)
                        family[index - start] = encoded
            for name, family in lines.items():
                blocks = new.blocks.get(name)
                if blocks is None:
                    blocks = new.blocks[name] = [b""] * count
                    new.lengths[name] = array("I", bytes(4 * len(views)))
                blocks[start // BLOCK] = b"".join(family)
                new.lengths[name][start:stop] = array("I", map(len, family))
        self._pieces[key] = new
        return new


def _part(arrays: bool, view) -> Part:
    return Part(arrays=(view,)) if arrays else Part(sessions=(view,))


def _session_range(snapshot: HostSnapshot, target: str) -> tuple[int, int]:
    sessions = snapshot.sessions
    return bisect.bisect_left(sessions, target, key=_target), bisect.bisect_right(
        sessions, target, key=_target
    )


def _array_positions(snapshot: HostSnapshot, labels: set[str] | None) -> set[int] | None:
    """Where these labels' views are in the snapshot's arrays (None: all)."""
    if labels is None:
        return None
    positions = set()
    for label in labels:
        for key in snapshot.ids_of(label):
            position = snapshot.position(key)
            if position is not None:
                positions.add(position)
    return positions


def _session_positions(snapshot: HostSnapshot, targets: set[str] | None) -> set[int] | None:
    if targets is None:
        return None
    positions: set[int] = set()
    for target in targets:
        positions.update(range(*_session_range(snapshot, target)))
    return positions


def _target(view) -> str:
    return view.target


def render(snapshot: HostSnapshot, collectors: Sequence[SnapshotCollector]) -> Rendered:
    """Run every collector on all of `snapshot` (no cache) and add the agent's own health metrics."""
    return Renderer(collectors).render(snapshot)


def encode_text(families: Iterable[Metric]) -> bytes:
    return encode(families)


def encode(families: Iterable[Metric], openmetrics: bool = False) -> bytes:
    return encode_both(families)[1 if openmetrics else 0]


def encode_both(families: Iterable[Metric]) -> tuple[bytes, bytes]:
    """The text format 0.0.4 and OpenMetrics 1.0, exactly as prometheus_client's encoders
    write them for gauges and counters, in one pass (the sample lines are the same).

    The generic encoders validate and escape every label name of every sample; ours are
    fixed identifiers, so only label values are escaped (a test compares both, line by line)."""
    text: list[bytes] = []
    om: list[bytes] = []
    for family in families:
        if family.type not in ("gauge", "counter", "untyped"):
            # Histograms, summaries, info...: not used by the agent; keep exact semantics.
            text.append(text_format.generate_latest(_Families([family])))
            om.append(openmetrics_format.generate_latest(_Families([family])).removesuffix(b"# EOF\n"))
            continue
        text_header, om_header = _headers(family)
        block = _sample_lines(family)
        text += (text_header, block)
        om += (om_header, block)
    om.append(b"# EOF\n")
    return b"".join(text), b"".join(om)


def _headers(family: Metric) -> tuple[bytes, bytes]:
    name, typ = family.name, family.type
    if typ not in ("gauge", "counter", "untyped"):
        raise ValueError(f"{name}: the agent renders gauges and counters only, not {typ}")
    doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
    text_name = name + "_total" if typ == "counter" else name
    om_doc = doc.replace('"', r"\"")
    return (
        f"# HELP {text_name} {doc}\n# TYPE {text_name} {typ}\n".encode(),
        f"# HELP {name} {om_doc}\n# TYPE {name} {'unknown' if typ == 'untyped' else typ}\n".encode(),
    )


def _sample_lines(family: Metric) -> bytes:
    if type(family) is Family:
        return family.encoded()
    if not family.samples:  # most families of one view, and of the rest
        return b""
    lines = []
    for sample in family.samples:
        if sample.name.endswith("_created"):
            continue
        labels = sample.labels
        if labels:
            inner = ",".join(f'{k}="{escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{sample.name}{{{inner}}} {encode_value(sample.value)}\n")
        else:
            lines.append(f"{sample.name} {encode_value(sample.value)}\n")
    return "".join(lines).encode()


def _agent_families(snapshot: HostSnapshot, success: dict[str, bool], seconds: dict[str, float]):
    up = GaugeMetricFamily(
        "iscsimple_up",
        "1 when the agent's last reading of the host fully succeeded; 0 means some metrics are missing "
        "or stale: see iscsimple_collector_success and the agent's log.",
    )
    up.add_metric([], 1.0 if all(success.values()) else 0.0)
    ok = GaugeMetricFamily(
        "iscsimple_collector_success",
        "1 when the collector read all its sources without error on the last refresh.",
        labels=["collector"],
    )
    duration = GaugeMetricFamily(
        "iscsimple_collector_duration_seconds",
        "Seconds the collector's sources took to read and render on the last refresh.",
        labels=["collector"],
    )
    for name in success:
        ok.add_metric([name], 1.0 if success[name] else 0.0)
        duration.add_metric([name], seconds[name])
    taken = GaugeMetricFamily(
        "iscsimple_last_refresh_timestamp_seconds",
        "When the agent last read the host (Unix time). Far behind time() means the agent is stuck.",
    )
    taken.add_metric([], snapshot.taken)
    build = GaugeMetricFamily("iscsimple_build_info", "The agent's version. Always 1.", labels=["version"])
    build.add_metric([VERSION], 1.0)
    return up, ok, duration, taken, build
