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

import logging
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
        """The same body gzip-compressed, compressed once per snapshot and format."""
        pieces, content_type = self._pieces(accept)
        with self._lock:
            packed = self._gzipped.get(content_type)
            if packed is None:
                packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: gzip framing
                packed = b"".join([*map(packer.compress, pieces), packer.flush()])
                self._gzipped[content_type] = packed
        return packed, content_type


CHUNK = 16  # arrays (or sessions) per cached piece: small enough that one change re-encodes little


@dataclass
class _Cached:
    items: tuple
    lines: dict[str, bytes]  # by family name


class Renderer:
    """Renders snapshot after snapshot, re-encoding only the chunks whose views changed."""

    def __init__(self, collectors: Sequence[SnapshotCollector]):
        self.collectors = list(collectors)
        self._arrays: dict[str, list[_Cached]] = {}
        self._sessions: dict[str, list[_Cached]] = {}

    def render(self, snapshot: HostSnapshot) -> Rendered:
        text: list[bytes] = []
        om: list[bytes] = []
        success: dict[str, bool] = {}
        seconds: dict[str, float] = {}
        for collector in self.collectors:
            started = time.perf_counter()
            name = collector.name
            try:
                text_part, om_part = self._collector(collector, snapshot)
                text.extend(text_part)
                om.extend(om_part)
                failed = [
                    s for s in collector.sources if s in snapshot.sources and not snapshot.sources[s].ok
                ]
                success[name] = not failed
            except Exception:
                log.exception("collector %s failed", name)
                self._arrays.pop(name, None)
                self._sessions.pop(name, None)
                success[name] = False
            read = sum(snapshot.sources[s].seconds for s in collector.sources if s in snapshot.sources)
            seconds[name] = read + time.perf_counter() - started
        agent = _agent_families(snapshot, success, seconds)
        agent_text, agent_om = encode_both(agent)
        text.append(agent_text)
        om.append(agent_om)  # ends with "# EOF"
        return Rendered(snapshot, self.collectors, success, text, om, agent)

    def _collector(self, collector: SnapshotCollector, snapshot: HostSnapshot):
        name = collector.name
        labels, sessions_dirty = collector.dirty(snapshot)
        families = list(collector.families(snapshot, Part(rest=True)))
        dirty_chunks: set[int] | None = None
        if labels is not None:
            dirty_chunks = set()
            for label in labels:
                for key in snapshot.ids_of(label):
                    position = snapshot.position(key)
                    if position is not None:
                        dirty_chunks.add(position // CHUNK)
        arrays = self._chunks(
            collector, snapshot, snapshot.arrays, self._arrays.setdefault(name, []), dirty_chunks, True
        )
        sessions = self._chunks(
            collector,
            snapshot,
            snapshot.sessions,
            self._sessions.setdefault(name, []),
            None if sessions_dirty else set(),
            False,
        )
        text: list[bytes] = []
        om: list[bytes] = []
        for family in families:
            text_header, om_header = _headers(family)
            text.append(text_header)
            om.append(om_header)
            name = family.name
            body = [line for line in (c.lines.get(name) for c in arrays) if line]
            body.extend(line for line in (c.lines.get(name) for c in sessions) if line)
            rest = _sample_lines(family)
            if rest:
                body.append(rest)
            text.extend(body)
            om.extend(body)
        return text, om

    def _chunks(
        self, collector, snapshot, items: tuple, cache: list[_Cached], dirty: set[int] | None, arrays: bool
    ):
        count = (len(items) + CHUNK - 1) // CHUNK
        del cache[count:]
        for index in range(count):
            chunk = items[index * CHUNK : (index + 1) * CHUNK]
            if index < len(cache):
                cached = cache[index]
                if (dirty is not None and index not in dirty) and cached.items == chunk:
                    continue
            part = Part(arrays=chunk) if arrays else Part(sessions=chunk)
            lines = {f.name: _sample_lines(f) for f in collector.families(snapshot, part)}
            rendered = _Cached(chunk, lines)
            if index < len(cache):
                cache[index] = rendered
            else:
                cache.append(rendered)
        return cache


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
