"""Rendering one snapshot into the exposition formats, once.

A snapshot is immutable, so its exposition is too: it is rendered when the
snapshot is taken (text format) or first asked for (OpenMetrics) and then served
as bytes. A scrape therefore costs a dictionary lookup and a socket write, and
can never block on the host, whatever state its devices are in.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client import exposition as text_format
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics_format

from iscsimple import __version__ as VERSION
from iscsimple.core.snapshot import HostSnapshot

from .collectors.base import SnapshotCollector

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
    families: list[Metric]
    success: dict[str, bool]
    text: bytes
    _openmetrics: bytes | None = None
    _gzipped: dict[str, bytes] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def up(self) -> bool:
        return all(self.success.values())

    def body(self, accept: str) -> tuple[bytes, str]:
        if "application/openmetrics-text" in (accept or ""):
            with self._lock:
                if self._openmetrics is None:
                    self._openmetrics = encode(self.families, openmetrics=True)
            return self._openmetrics, OPENMETRICS_CONTENT_TYPE
        return self.text, TEXT_CONTENT_TYPE

    def gzipped(self, accept: str) -> tuple[bytes, str]:
        """The same body gzip-compressed, compressed once per snapshot and format."""
        body, content_type = self.body(accept)
        with self._lock:
            packed = self._gzipped.get(content_type)
            if packed is None:
                packed = self._gzipped[content_type] = gzip.compress(body, compresslevel=1)
        return packed, content_type


def render(snapshot: HostSnapshot, collectors: Sequence[SnapshotCollector]) -> Rendered:
    """Run every collector on `snapshot` and add the agent's own health metrics."""
    families: list[Metric] = []
    success: dict[str, bool] = {}
    seconds: dict[str, float] = {}
    for collector in collectors:
        started = time.perf_counter()
        try:
            families.extend(collector.families(snapshot))
            failed = [s for s in collector.sources if s in snapshot.sources and not snapshot.sources[s].ok]
            success[collector.name] = not failed
        except Exception:
            log.exception("collector %s failed", collector.name)
            success[collector.name] = False
        read = sum(snapshot.sources[s].seconds for s in collector.sources if s in snapshot.sources)
        seconds[collector.name] = read + time.perf_counter() - started
    families.extend(_agent_families(snapshot, success, seconds))
    # Both formats now, in the refresh thread: Prometheus asks for OpenMetrics, and a scrape
    # must not pay for encoding (hundreds of ms at thousands of arrays).
    text, openmetrics = encode_both(families)
    return Rendered(snapshot, families, success, text, openmetrics)


def encode_text(families: Iterable[Metric]) -> bytes:
    return encode(families)


def encode(families: Iterable[Metric], openmetrics: bool = False) -> bytes:
    return encode_both(families)[1 if openmetrics else 0]


def encode_both(families: Iterable[Metric]) -> tuple[bytes, bytes]:
    """The text format 0.0.4 and OpenMetrics 1.0, exactly as prometheus_client's encoders
    write them for gauges and counters, in one pass (the sample lines are the same).

    The generic encoders validate and escape every label name of every sample; ours are
    fixed identifiers, so only label values are escaped (a test compares both, line by line)."""
    text: list[str] = []
    om: list[str] = []
    for family in families:
        name = family.name
        typ = family.type
        if typ not in ("gauge", "counter", "untyped"):
            # Histograms, summaries, info...: not used by the agent; keep exact semantics.
            text.append(text_format.generate_latest(_Families([family])).decode())
            om.append(
                openmetrics_format.generate_latest(_Families([family])).decode().removesuffix("# EOF\n")
            )
            continue
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        text_name = name + "_total" if typ == "counter" else name
        text.append(f"# HELP {text_name} {doc}\n# TYPE {text_name} {typ}\n")
        om_doc = doc.replace('"', r"\"")
        om.append(f"# HELP {name} {om_doc}\n# TYPE {name} {'unknown' if typ == 'untyped' else typ}\n")
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
        block = "".join(lines)
        text.append(block)
        om.append(block)
    om.append("# EOF\n")
    return "".join(text).encode(), "".join(om).encode()


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
