"""Rendering snapshots into the exposition formats, reusing what did not change.

A snapshot is immutable, so its exposition is too: it is rendered in the refresh
thread and then served as bytes. A scrape therefore costs a lookup and a socket
write, and can never block on the host, whatever state its devices are in.

`Renderer` keeps, per collector and family, the encoded sample lines of each run of
BLOCK arrays (and sessions) as one piece, and the length of each view's lines in it.
A derived snapshot shares the views that did not change, so an update encodes again
only the changed views and splices their lines into new pieces; the body is a list of
those pieces (text and OpenMetrics share them; only the HELP/TYPE lines differ).

A piece is kept deflate-compressed (`Piece`): the lines are a few megabytes per thousand
arrays, compressed a fifteenth of that. Each piece is a self-contained stretch of one
deflate stream, so a gzip body is the pieces' compressed bytes one after the other (its
CRC combined from theirs); a plain body is decompressed piece by piece as it is written.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate, pairwise

from prometheus_client import exposition as text_format
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics_format

from iscsimple import __version__ as VERSION
from iscsimple.core.snapshot import HostSnapshot

from .collectors.base import Part, SnapshotCollector
from .families import MADE, Family, encode_value, escape

log = logging.getLogger(__name__)

TEXT_CONTENT_TYPE = text_format.CONTENT_TYPE_LATEST
OPENMETRICS_CONTENT_TYPE = openmetrics_format.CONTENT_TYPE_LATEST


class _Families:
    """The object prometheus_client's encoders want: something with collect()."""

    def __init__(self, families: Sequence[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class Piece:
    """Encoded lines, kept deflate-compressed: a stretch of a raw deflate stream that needs
    nothing before it (a fresh compressor, ended by a full flush), with the length and CRC-32
    of the lines, so that pieces joined make one stream and one gzip member.

    A piece a change made is compressed when a gzip body first needs it or at the next render,
    whichever comes first (a view that changes again meanwhile is spliced in its plain lines);
    every other piece is compressed when made."""

    __slots__ = ("_packed", "_plain", "crc", "size")

    def __init__(self, lines: bytes, pack: bool = True):
        self.size = len(lines)
        self.crc = zlib.crc32(lines)
        self._plain: bytes | None = lines
        self._packed: bytes | None = None
        if pack:
            self.pack()

    @classmethod
    def of(cls, lines: bytes, pack: bool = True) -> Piece:
        return cls(lines, pack) if lines else EMPTY

    def pack(self) -> bytes:
        """The compressed form (made once; the plain lines are then let go)."""
        packed = self._packed
        if packed is None:
            with _PACKING:  # the web server's thread and the refresh's may both ask
                packed = self._packed
                if packed is None:
                    lines = self._plain or b""
                    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
                    packed = packer.compress(lines) + packer.flush(zlib.Z_FULL_FLUSH) if lines else b""
                    self._packed = packed  # before the lines go: plain() finds one or the other
                    self._plain = None
        return packed

    def plain(self) -> bytes:
        lines = self._plain
        if lines is not None:
            return lines
        return zlib.decompressobj(-15).decompress(self._packed) if self.size else b""

    def __len__(self) -> int:
        """Bytes of lines (not of the compressed form): an empty piece is false."""
        return self.size

    def __repr__(self) -> str:
        return f"Piece({self.size} bytes{'' if self._packed is None else f' in {len(self._packed)}'})"


_PACKING = threading.Lock()
EMPTY = Piece(b"")


class PlainBody:
    """A plain-text body as the web server writes it: its length known, its bytes made piece
    by piece as they are written, never joined whole."""

    def __init__(self, pieces: Sequence[Piece]):
        self.pieces = pieces
        self.size = sum(p.size for p in pieces)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        for piece in self.pieces:
            if piece.size:
                yield piece.plain()


class GzipBody:
    """A gzip body as the web server writes it: one gzip member (RFC 1952) made of the pieces'
    compressed bytes one after the other, in runs of at least RUN bytes; never joined whole, nor
    kept (only the lists of the pieces' compressed bytes and the trailer are)."""

    RUN = 64 * 1024  # as web.WRITE_CHUNK, and for the same reason

    def __init__(self, groups: Sequence[_Group], trailer: bytes):
        self.chunks: list[bytes] = [_GZIP_HEADER]
        self._cuts = [0]  # where each run starts in chunks
        self.size = run = len(_GZIP_HEADER)
        for group in groups:
            self.chunks.extend(group.packed)
            self.size += group.packed_size
            run += group.packed_size
            if run >= self.RUN:
                self._cuts.append(len(self.chunks))
                run = 0
        self.chunks += (_DEFLATE_END, trailer)
        self.size += len(_DEFLATE_END) + len(trailer)

    @classmethod
    def of(cls, pieces: Sequence[Piece]) -> GzipBody:
        groups, crc, size = _GROUPS.of(pieces)
        return cls(groups, struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        cuts = [*self._cuts, len(self.chunks)]
        for start, end in pairwise(cuts):
            if start < end:
                yield b"".join(self.chunks[start:end])


@dataclass(frozen=True, slots=True)
class _Group:
    """GROUP consecutive pieces of a body: their compressed bytes, and the CRC-32 and length of
    their lines together."""

    pieces: tuple[Piece, ...]
    packed: tuple[bytes, ...]
    packed_size: int
    crc: int
    size: int

    @classmethod
    def of(cls, pieces: tuple[Piece, ...]) -> _Group:
        packed = tuple(p.pack() for p in pieces if p.size)
        return cls(pieces, packed, sum(map(len, packed)), _combined_crc(pieces), sum(p.size for p in pieces))


class _Groups:
    """The groups of the last gzip body made, by their pieces' identities. A body made after a
    refresh shares all but the changed views' pieces with the one before, so it combines the
    CRCs and gathers the compressed bytes only of the groups holding those (a body at rest,
    every 10 s, went through ~34 000 pieces at 1000 arrays)."""

    GROUP = 64

    def __init__(self) -> None:
        self._last: dict[tuple[Piece, ...], _Group] = {}
        self._lock = threading.Lock()

    def of(self, pieces: Sequence[Piece]) -> tuple[list[_Group], int, int]:
        """The body's groups, and the CRC-32 and length of all its lines."""
        with self._lock:
            last, kept = self._last, {}
            groups = []
            for start in range(0, len(pieces), self.GROUP):
                members = tuple(pieces[start : start + self.GROUP])
                # A tuple of pieces hashes and compares by the pieces' identities (in C).
                group = last.get(members) or _Group.of(members)
                kept[group.pieces] = group
                groups.append(group)
            self._last = kept
        combine = _CRC32_COMBINE
        if combine is None:  # no libz to call: the CRC of the lines themselves
            return groups, _combined_crc(pieces), sum(g.size for g in groups)
        crc = 0
        for group in groups:
            if group.size:
                crc = combine(crc, group.crc, group.size)
        return groups, crc, sum(g.size for g in groups)


_GROUPS = _Groups()


@dataclass
class Rendered:
    snapshot: HostSnapshot
    collectors: Sequence[SnapshotCollector]
    success: dict[str, bool]
    text_pieces: list[Piece]
    openmetrics_pieces: list[Piece]
    agent_families: Sequence[Metric] = ()
    _gzipped: dict[str, GzipBody] = field(default_factory=dict, repr=False)
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

    def _format(self, accept: str) -> tuple[list[Piece], str]:
        if "application/openmetrics-text" in (accept or ""):
            return self.openmetrics_pieces, OPENMETRICS_CONTENT_TYPE
        return self.text_pieces, TEXT_CONTENT_TYPE

    def pieces(self, accept: str) -> tuple[PlainBody, str]:
        """The plain body as the web server writes it: decompressed piece by piece."""
        pieces, content_type = self._format(accept)
        return PlainBody(pieces), content_type

    def body(self, accept: str) -> tuple[bytes, str]:
        """The plain body, joined for this request (the compressed pieces are the one copy kept)."""
        pieces, content_type = self._format(accept)
        return b"".join(PlainBody(pieces)), content_type

    def gzipped(self, accept: str) -> tuple[GzipBody, str]:
        """The same body gzip-compressed: the pieces' compressed bytes, one gzip member whose CRC
        is combined from theirs (once per snapshot and format)."""
        pieces, content_type = self._format(accept)
        with self._lock:
            body = self._gzipped.get(content_type)
            if body is None:
                body = self._gzipped[content_type] = GzipBody.of(pieces)
        return body, content_type


def gzip_member(pieces: Sequence[Piece]) -> bytes:
    """One gzip member (RFC 1952) holding the pieces' lines, joined."""
    return b"".join(GzipBody.of(pieces))


def _zlib_crc32_combine():
    """zlib's crc32_combine (the CRC-32 of A+B from those of A and B and the length of B): the
    zlib module does not offer it, and the library under it does since 1.2.2."""
    try:
        function = ctypes.CDLL("libz.so.1").crc32_combine
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_ulong, ctypes.c_ulong, ctypes.c_long)
    function.restype = ctypes.c_ulong
    return function


_CRC32_COMBINE = _zlib_crc32_combine()


def _combined_crc(pieces: Sequence[Piece]) -> int:
    combine = _CRC32_COMBINE
    crc = 0
    if combine is None:  # no libz to call: the CRC of the lines themselves, piece by piece
        for piece in pieces:
            if piece.size:
                crc = zlib.crc32(piece.plain(), crc)
        return crc
    for piece in pieces:
        if piece.size:
            crc = combine(crc, piece.crc, piece.size)
    return crc


# A gzip member header (RFC 1952: deflate, no name, no time, OS unknown) and the empty final
# deflate block that ends a stream of full-flushed pieces.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_DEFLATE_END = zlib.compressobj(1, zlib.DEFLATED, -15).flush()


# Views (arrays or sessions) per piece of the body: N / 16 pieces per family. A change decompresses
# and compresses again the pieces holding its view's lines, which costs in proportion to their size;
# bigger pieces compress better (at 1000 arrays: 0.42 MB at 16, 0.30 at 64, 4.6 MB of lines).
BLOCK = 16


@dataclass
class _Pieces:
    """One collector's encoded sample lines for one kind of view (arrays or sessions).

    Only one copy of the encoded lines is kept, compressed: per family, one piece per BLOCK
    views (what the bodies are made of), and the length and hash of each view's lines in it,
    so that one view's lines are replaced in their piece without encoding the other views
    again, nor opening a piece whose lines did not change."""

    views: list  # the views as rendered, in the snapshot's order
    blocks: dict[str, list[Piece]] = field(default_factory=dict)  # family -> one piece per BLOCK views
    lengths: dict[str, array] = field(default_factory=dict)  # family -> bytes of each view's lines
    hashes: dict[str, array] = field(default_factory=dict)  # family -> hash() of each view's lines

    def add_family(self, name: str) -> list[Piece]:
        views = len(self.views)
        blocks = self.blocks[name] = [EMPTY] * _block_count(views)
        self.lengths[name] = array("I", bytes(4 * views))
        self.hashes[name] = array("q", [_NO_LINES]) * views
        return blocks

    def starts(self, name: str) -> list[int]:
        """Where each view's lines of family `name` start in their piece."""
        starts: list[int] = []
        lengths = self.lengths[name]
        for start in range(0, len(lengths), BLOCK):
            starts.append(0)
            starts += accumulate(lengths[start : start + BLOCK - 1])
        return starts

    def replace(self, name: str, index: int, lines: bytes) -> Piece | None:
        """Put `lines` in place of view `index`'s lines of family `name`, in a new piece (the
        bodies already rendered keep the old one), left uncompressed; None if they are the same."""
        blocks = self.blocks.get(name)
        if blocks is None:
            if not lines:
                return None
            blocks = self.add_family(name)  # a family no view had samples in until now
        lengths = self.lengths[name]
        if not lines and not lengths[index]:
            return None  # no lines before or now (most families of one view)
        hashes = self.hashes[name]
        digest = hash(lines)
        if lengths[index] == len(lines) and hashes[index] == digest:
            return None  # the same lines: the piece is not opened
        start = sum(lengths[index - index % BLOCK : index])
        end = start + lengths[index]
        piece = blocks[index // BLOCK].plain()
        blocks[index // BLOCK] = spliced = Piece.of(b"".join((piece[:start], lines, piece[end:])), pack=False)
        lengths[index] = len(lines)
        hashes[index] = digest
        return spliced


_NO_LINES = hash(b"")


class _OpenedPieces:
    """The lines of pieces being taken apart, each decompressed once; a few at a time (the views
    of a block mostly come from one or two blocks of before)."""

    KEEP = 64

    def __init__(self, pieces: _Pieces):
        self.pieces = pieces
        self.starts = {name: pieces.starts(name) for name in pieces.blocks}
        self._plain: dict[tuple[str, int], bytes] = {}

    def lines(self, name: str, index: int) -> bytes:
        """The lines of view `index` in family `name`."""
        length = self.pieces.lengths[name][index]
        if not length:
            return b""
        key = (name, index // BLOCK)
        plain = self._plain.get(key)
        if plain is None:
            if len(self._plain) >= self.KEEP:
                self._plain.clear()
            plain = self._plain[key] = self.pieces.blocks[name][index // BLOCK].plain()
        start = self.starts[name][index]
        return plain[start : start + length]


_NO_PIECES = _Pieces([])  # a kind of view the collector has no samples for


def _block_count(views: int) -> int:
    return (views + BLOCK - 1) // BLOCK


class Renderer:
    """Renders snapshot after snapshot, re-encoding only the views that changed."""

    def __init__(self, collectors: Sequence[SnapshotCollector]):
        self.collectors = list(collectors)
        self._pieces: dict[tuple[str, bool], _Pieces] = {}
        self._headers: dict[tuple[str, str, str], tuple[Piece, Piece]] = {}
        # The lines of the families' samples that belong to no view, as last compressed.
        self._rest: dict[bytes, Piece] = {}
        # The pieces the last render spliced, left uncompressed for a while: by where they are.
        self._spliced: dict[tuple, Piece] = {}
        self._last: HostSnapshot | None = None  # the snapshot the cached pieces were rendered from
        # During one render: each view's Part, made once for every collector (arrays, sessions).
        self._parts: dict[bool, list[Part]] = {}

    def render(self, snapshot: HostSnapshot) -> Rendered:
        text: list[Piece] = []
        om: list[Piece] = []
        rest, self._rest = self._rest, {}
        for piece in self._spliced.values():
            piece.pack()  # unless a gzip body did already
        self._spliced = {}
        success: dict[str, bool] = {}
        seconds: dict[str, float] = {}
        moved = self._moved(snapshot)
        self._last = snapshot
        for collector in self.collectors:
            started = time.perf_counter()
            name = collector.name
            try:
                self._collector(collector, snapshot, text, om, moved, rest)
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
        text.append(Piece.of(agent_text))
        om.append(Piece.of(agent_om))  # ends with "# EOF"
        return Rendered(snapshot, self.collectors, success, text, om, agent)

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
        text: list[Piece],
        om: list[Piece],
        moved: tuple[set[int] | None, set[int] | None] = (None, None),
        rest_before: dict[bytes, Piece] | None = None,
    ) -> None:
        labels, targets = collector.dirty(snapshot)
        families = list(collector.families(snapshot, Part(rest=True)))
        arrays = self._update(collector, snapshot, True, _array_positions(snapshot, labels), moved[0])
        sessions = self._update(collector, snapshot, False, _session_positions(snapshot, targets), moved[1])
        # Build both lists first: a failing collector adds nothing.
        text_part: list[Piece] = []
        om_part: list[Piece] = []
        for family in families:
            key = (family.name, family.type, family.documentation)
            headers = self._headers.get(key)
            if headers is None:
                text_header, om_header = _headers(family)
                headers = self._headers[key] = (Piece.of(text_header), Piece.of(om_header))
            array_blocks = arrays.blocks.get(family.name, ())
            session_blocks = sessions.blocks.get(family.name, ())
            lines = _sample_lines(family)
            rest = EMPTY
            if lines:
                rest = (rest_before or {}).get(lines) or Piece.of(lines)
                self._rest[lines] = rest
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
        if ("arrays" if arrays else "sessions") not in collector.views:
            return _NO_PIECES
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
                    spliced = old.replace(name, index, fresh.get(name, b""))
                    if spliced is not None:
                        self._spliced[key, name, index // BLOCK] = spliced
                old.views[index] = view
            return old
        # Views were added, removed or reordered, or any may have changed: a view rendered
        # before (the same object) keeps its lines unless it is dirty; the others are encoded.
        reuse: dict[int, int] = {}  # id of a view rendered before -> where it was
        opened: _OpenedPieces | None = None
        if old is not None and dirty is not None:
            reuse = {id(view): index for index, view in enumerate(old.views)}
            opened = _OpenedPieces(old)
        new = _Pieces(list(views))
        views = new.views  # indexed view by view below: a list, not the snapshot's Chunks
        parts = self._parts.get(arrays)
        if parts is None:
            parts = self._parts[arrays] = [_part(arrays, view) for view in views]
        for start in range(0, len(views), BLOCK):
            stop = min(start + BLOCK, len(views))
            if opened is not None and _same_block(reuse, views, start, stop, len(old.views), dirty):
                # The very views of a block of before, in its order: its pieces as they are.
                first = reuse[id(views[start])]
                for name, blocks in old.blocks.items():
                    if name not in new.blocks:
                        new.add_family(name)
                    new.blocks[name][start // BLOCK] = blocks[first // BLOCK]
                    new.lengths[name][start:stop] = old.lengths[name][first : first + stop - start]
                    new.hashes[name][start:stop] = old.hashes[name][first : first + stop - start]
                continue
            # This block's lines, by family and view. Every view of the block encoded afresh (a
            # first render): one call of the collector for the block, its samples split by view,
            # instead of one call per view.
            together = (
                _block_lines(collector, snapshot, arrays, views[start:stop])
                if opened is None and stop - start > 1
                else None
            )
            lines: dict[str, list[bytes]] = {} if together is None else together
            for index in range(start, stop) if together is None else ():
                view = views[index]
                before = reuse.get(id(view))
                if opened is not None and before is not None and index not in dirty:
                    found = {name: opened.lines(name, before) for name in opened.starts}
                else:
                    found = {f.name: _sample_lines(f) for f in collector.families(snapshot, parts[index])}
                for name, encoded in found.items():
                    if encoded:
                        family = lines.get(name)
                        if family is None:
                            family = lines[name] = [b""] * (stop - start)
                        family[index - start] = encoded
            for name, family in lines.items():
                blocks = new.blocks.get(name) or new.add_family(name)
                blocks[start // BLOCK] = Piece.of(b"".join(family))
                new.lengths[name][start:stop] = array("I", map(len, family))
                new.hashes[name][start:stop] = array("q", map(hash, family))
        self._pieces[key] = new
        return new


class _Recorded(Sequence):
    """A Part's views that note, as a collector iterates them, how many samples each family
    made so far holds when each view's turn starts and ends (`MADE` lists the families)."""

    def __init__(self, views: Sequence, made: list[Family]):
        self.views = views
        self.made = made
        # (view index, the families' sample counts at its turn's start, at its end)
        self.turns: list[tuple[int, list[int], list[int]]] = []

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index):
        return self.views[index]

    def __iter__(self):
        made, turns = self.made, self.turns
        start = [len(f._added) for f in made]
        for index, view in enumerate(self.views):
            yield view
            end = [len(f._added) for f in made]
            turns.append((index, start, end))
            start = end


def _block_lines(
    collector: SnapshotCollector, snapshot: HostSnapshot, arrays: bool, views: Sequence
) -> dict[str, list[bytes]] | None:
    """Per family name (those with samples), each view's lines, as `collector.families` of a
    Part of that view alone gives them, from one call for all `views`: every sample added
    during a view's turn of an iteration over the Part's views is that view's. None (encode view by view) when that does
    not account for every sample: one added outside a turn (after a list of the views was
    made, say), or a family that is not a `Family`."""
    made: list[Family] = []
    recorded = _Recorded(views, made)
    part = Part(arrays=recorded) if arrays else Part(sessions=recorded)
    outer, MADE.families = MADE.families, made
    try:
        families = list(collector.families(snapshot, part))
    finally:
        MADE.families = outer
    returned = {id(f) for f in families}
    if any(type(f) is not Family for f in families) or returned - {id(f) for f in made}:
        return None
    found: dict[str, list[bytes]] = {}
    lines: dict[int, list[str]] = {}  # each family's lines by sample, once it has any
    at = [0] * len(made)  # per family: its samples accounted for so far, in the order added
    for index, start, end in recorded.turns:
        if start == end:
            continue  # the turn added no sample
        for j, count in enumerate(end):
            if count == at[j] or id(made[j]) not in returned:
                continue
            if (start[j] if j < len(start) else 0) != at[j]:
                return None  # samples added between turns: whose they are is unknown
            family = made[j]
            encoded = lines.get(j)
            if encoded is None:
                encoded = lines[j] = family.entry_lines()
            lines_of = found.get(family.name)
            if lines_of is None:
                lines_of = found[family.name] = [b""] * len(views)
            lines_of[index] += "".join(encoded[at[j] : count]).encode()
            at[j] = count
    if any(len(f._added) != at[j] for j, f in enumerate(made) if id(f) in returned):
        return None  # samples added after the last turn
    return found


def _same_block(reuse: dict[int, int], views: Sequence, start: int, stop: int, before: int, dirty) -> bool:
    """Whether views[start:stop] are, in order and none dirty, the whole of a block of before
    (`reuse`: where each view rendered before was; `before`: how many views there were)."""
    first = reuse.get(id(views[start]))
    if first is None or first % BLOCK or min(first + BLOCK, before) - first != stop - start:
        return False
    return all(
        reuse.get(id(views[index])) == first + index - start and index not in dirty
        for index in range(start, stop)
    )


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
