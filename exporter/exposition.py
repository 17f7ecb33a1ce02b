"""Rendering snapshots into the exposition formats, reusing what did not change.

A snapshot is immutable, so its exposition is too: it is rendered in the refresh
thread and then served as bytes. A scrape therefore costs a lookup and a socket
write, and can never block on the host, whatever state its devices are in.

`Renderer` keeps, per collector, the encoded sample lines of each run of CHUNK
arrays (and sessions), keyed on the very view objects they were rendered from.
A derived snapshot shares the views that did not change, so an update re-encodes
only the chunks holding a changed view; the body is a list of those cached pieces
(text and OpenMetrics share them; only the HELP/TYPE lines differ), joined or
compressed when a scrape first asks for it.
"""

from __future__ import annotations

import bisect
import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from prometheus_client import exposition as text_format
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics_format

from iscsimple import __version__ as VERSION
from iscsimple.core.snapshot import HostSnapshot

from .collectors.base import Part, SnapshotCollector

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
    _joined: dict[str, bytes] = field(default_factory=dict, repr=False)
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

    def _pieces(self, accept: str) -> tuple[list[bytes], str]:
        if "application/openmetrics-text" in (accept or ""):
            return self.openmetrics_pieces, OPENMETRICS_CONTENT_TYPE
        return self.text_pieces, TEXT_CONTENT_TYPE

    def body(self, accept: str) -> tuple[bytes, str]:
        pieces, content_type = self._pieces(accept)
        with self._lock:
            joined = self._joined.get(content_type)
            if joined is None:
                joined = self._joined[content_type] = b"".join(pieces)
        return joined, content_type

    def gzipped(self, accept: str) -> tuple[bytes, str]:
        """The same body gzip-compressed, once per snapshot and format.

        One gzip member whose deflate stream is made of segments compressed apart (each ends
        with a full flush, so it needs nothing before it): a segment whose pieces did not
        change since the last body is reused, and only the CRC runs over the whole body."""
        pieces, content_type = self._pieces(accept)
        with self._lock:
            packed = self._gzipped.get(content_type)
            if packed is None:
                packed = self._gzipped[content_type] = self.segments.gzip(content_type, pieces)
        return packed, content_type


class GzipSegments:
    """Compressed segments of the last body of each format, shared by successive Rendered."""

    SIZE = 4  # pieces per segment (a piece joins up to BLOCK chunks of one family's samples)

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


CHUNK = 4  # arrays (or sessions) per cached piece: small enough that one change re-encodes little


BLOCK = 16  # chunks joined into one piece of the body: the body is a list of N / 64 pieces per family


@dataclass
class _Pieces:
    """One collector's encoded sample lines for one kind of view (arrays or sessions)."""

    items: list[tuple]  # the views of each chunk, as rendered
    by_family: dict[str, list[bytes]]  # family name -> one piece per chunk (b"" when it has none)
    # family name -> one piece per BLOCK chunks (their pieces joined), kept up to date by _patch
    joined: dict[str, list[bytes]] = field(default_factory=dict)

    def blocks(self, family: str) -> list[bytes]:
        joined = self.joined.get(family)
        if joined is None:
            pieces = self.by_family.get(family)
            if pieces is None:
                return []
            joined = self.joined[family] = [
                b"".join(pieces[start : start + BLOCK]) for start in range(0, len(pieces), BLOCK)
            ]
        return joined

    def rejoin(self, chunks: Iterable[int]) -> None:
        """Join again the blocks holding these chunks, in every family already joined."""
        for block in {index // BLOCK for index in chunks}:
            start = block * BLOCK
            for family, joined in self.joined.items():
                joined[block] = b"".join(self.by_family[family][start : start + BLOCK])


class Renderer:
    """Renders snapshot after snapshot, re-encoding only the chunks whose views changed."""

    def __init__(self, collectors: Sequence[SnapshotCollector]):
        self.collectors = list(collectors)
        self._pieces: dict[tuple[str, bool], _Pieces] = {}
        self._segments = GzipSegments()
        self._headers: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}
        self._last: HostSnapshot | None = None  # the snapshot the cached pieces were rendered from

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
        agent = _agent_families(snapshot, success, seconds)
        agent_text, agent_om = encode_both(agent)
        text.append(agent_text)
        om.append(agent_om)  # ends with "# EOF"
        return Rendered(snapshot, self.collectors, success, text, om, agent, self._segments)

    def _moved(self, snapshot: HostSnapshot) -> tuple[set[int] | None, set[int] | None]:
        """The chunks of arrays and of sessions whose views are not those of the last render
        (None: any may be), found from what the snapshot says changed: no walk over every chunk."""
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
                arrays.add(position // CHUNK)
        sessions: set[int] | None = set()
        if snapshot.sessions is not last.sessions:
            targets = snapshot.changed_targets or frozenset()
            if len(snapshot.sessions) != len(last.sessions) or any(
                _session_range(snapshot, t) != _session_range(last, t) for t in targets
            ):
                sessions = None
            else:
                sessions = _session_chunks(snapshot, set(targets))
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
        arrays = self._update(collector, snapshot, True, _array_chunks(snapshot, labels), moved[0])
        sessions = self._update(collector, snapshot, False, _session_chunks(snapshot, targets), moved[1])
        # Build both lists first: a failing collector adds nothing.
        text_part: list[bytes] = []
        om_part: list[bytes] = []
        for family in families:
            key = (family.name, family.type, family.documentation)
            headers = self._headers.get(key)
            if headers is None:
                headers = self._headers[key] = _headers(family)
            array_blocks = arrays.blocks(family.name)
            session_blocks = sessions.blocks(family.name)
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
        items = snapshot.arrays if arrays else snapshot.sessions
        key = (collector.name, arrays)
        old = self._pieces.get(key)
        count = (len(items) + CHUNK - 1) // CHUNK
        if old is not None and dirty is not None and moved is not None and count == len(old.items):
            return self._patch(collector, snapshot, arrays, old, dirty | moved)
        todo = []
        for index in range(count):
            chunk = items[index * CHUNK : (index + 1) * CHUNK]
            if (
                old is not None
                and index < len(old.items)
                and (dirty is not None and index not in dirty)
                and old.items[index] == chunk  # the same view objects: compared by identity first
            ):
                continue
            todo.append((index, chunk))
        if old is not None and not todo and count == len(old.items):
            return old
        new_items = list(old.items[:count]) if old is not None else []
        new_items += [()] * (count - len(new_items))
        by_family = {}
        if old is not None:
            for family, pieces in old.by_family.items():
                pieces = pieces[:count]
                by_family[family] = pieces + [b""] * (count - len(pieces))
        for index, chunk in todo:
            part = Part(arrays=chunk) if arrays else Part(sessions=chunk)
            for family in collector.families(snapshot, part):
                pieces = by_family.get(family.name)
                if pieces is None:
                    pieces = by_family[family.name] = [b""] * count
                pieces[index] = _sample_lines(family)
            new_items[index] = chunk
        pieces = self._pieces[key] = _Pieces(new_items, by_family)
        return pieces

    def _patch(
        self, collector, snapshot: HostSnapshot, arrays: bool, old: _Pieces, todo: set[int]
    ) -> _Pieces:
        """Re-encode the chunks `todo` of the cached pieces in place (no rendered body shares
        these lists: each render copies the pieces it uses)."""
        items = snapshot.arrays if arrays else snapshot.sessions
        for index in sorted(todo):
            chunk = items[index * CHUNK : (index + 1) * CHUNK]
            part = Part(arrays=chunk) if arrays else Part(sessions=chunk)
            for pieces in old.by_family.values():
                pieces[index] = b""
            for family in collector.families(snapshot, part):
                pieces = old.by_family.get(family.name)
                if pieces is None:
                    pieces = old.by_family[family.name] = [b""] * len(old.items)
                pieces[index] = _sample_lines(family)
            old.items[index] = chunk
        old.rejoin(todo)
        return old


def _session_range(snapshot: HostSnapshot, target: str) -> tuple[int, int]:
    sessions = snapshot.sessions
    return bisect.bisect_left(sessions, target, key=_target), bisect.bisect_right(
        sessions, target, key=_target
    )


def _array_chunks(snapshot: HostSnapshot, labels: set[str] | None) -> set[int] | None:
    """The chunks holding these labels' views (None: all)."""
    if labels is None:
        return None
    chunks = set()
    for label in labels:
        for key in snapshot.ids_of(label):
            position = snapshot.position(key)
            if position is not None:
                chunks.add(position // CHUNK)
    return chunks


def _session_chunks(snapshot: HostSnapshot, targets: set[str] | None) -> set[int] | None:
    if targets is None:
        return None
    chunks = set()
    sessions = snapshot.sessions  # ordered by target
    for target in targets:
        start = bisect.bisect_left(sessions, target, key=_target)
        end = bisect.bisect_right(sessions, target, key=_target)
        chunks.update(range(start // CHUNK, (max(start, end - 1)) // CHUNK + 1))
    return chunks


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
    lines = []
    for sample in family.samples:
        if sample.name.endswith("_created"):
            continue
        labels = sample.labels
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{sample.name}{{{inner}}} {_value(sample.value)}\n")
        else:
            lines.append(f"{sample.name} {_value(sample.value)}\n")
    return "".join(lines).encode()


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _value(v: float) -> str:
    if v == 1.0:
        return "1.0"
    if v == 0.0:
        return "0.0"
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


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
