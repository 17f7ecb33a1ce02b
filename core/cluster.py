"""The cross-host guard: what the other hosts' agents report, read from Prometheus.

A stale-copy record (core.stale) lives on the host whose local leg holds the newer
writes. Another host attaching the same LUN cannot see it locally. Every host's
agent exports, per LUN it uses (exporter/safety.py):

    iscsimple_lun_stale_since_seconds{host,target,lun,label,domain}   = the record's `since`
    iscsimple_lun_attached{host,target,lun,label,domain}              = 1 while attached there

and the Prometheus that scrapes them all answers two questions through its HTTP API
(`/api/v1/query`), each bounded by `[cluster] timeout` (≤ 3 s of the 30 s add budget):

- `stale_elsewhere(target, lun)`: does another host hold writes this LUN lacks? A host
  that is down (its `up` is 0) keeps counting with its *last* report within `lookback`,
  so a crash does not make its stale copy vanish from the cluster view; so does a host
  whose agent cannot read its stale-copy records (`iscsimple_stale_records_readable` 0:
  restarted so, it reports nothing, though its record may stand).
- `attached_elsewhere(target, lun)`: does a running host use this LUN now (the heal and
  `resolve --keep local` write onto the LUN; they must not while another host's mirror
  uses it)?

The operator can accept a specific stale report on purpose (`iscsimple accept-loss`):
an acceptance names the host, target, LUN and the report's `since`, is stored on this
host, and only that report is ignored — a later outage on that host is guarded again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_atomic
from .errors import OperationError, time_text
from .files import UnsafeFileError, load_state_json_in, open_state_dir
from .paths import HostPaths

log = logging.getLogger(__name__)

ON_UNREACHABLE = ("refuse", "proceed")
MAX_TIMEOUT = 3.0  # of the 30 s add budget
DURATION_RE = re.compile(r"^[1-9][0-9]*[smhdw]$")

STALE_METRIC = "iscsimple_lun_stale_since_seconds"
ATTACHED_METRIC = "iscsimple_lun_attached"
READABLE_METRIC = "iscsimple_stale_records_readable"
# Marks a last report (not a current one) in a query's answer, saying why it counts:
LAST_REPORT_LABEL = "iscsimple_last_report"
DOWN = "down"  # the host's agent is not scraped successfully now
RECORDS_UNREADABLE = "records_unreadable"  # its agent cannot read its stale-copy records now
# Not a report: a host whose agent cannot read its stale-copy records uses this LUN (any
# iscsimple_lun_* series of it): without a report of it, whether its copy is stale is unknown.
UNKNOWN = "unknown"


class ClusterUnreachable(OperationError):
    """Prometheus did not answer (in time, or sensibly): the cluster view is unknown."""


@dataclass(frozen=True)
class ClusterSettings:
    """`[cluster]` of iscsimple.toml. No `prometheus_url`: the guard is off."""

    prometheus_url: str | None = None
    timeout: float = 2.0
    on_unreachable: str = "refuse"
    host_name: str | None = None  # this host in the metrics' `host` label; default: the hostname
    lookback: str = "14d"  # how long a host that went down keeps its last stale report

    @property
    def configured(self) -> bool:
        return self.prometheus_url is not None

    @property
    def host(self) -> str:
        return self.host_name or socket.gethostname()


@dataclass(frozen=True)
class RemoteLun:
    """One other host's report about a LUN (from Prometheus)."""

    host: str
    instance: str
    label: str
    domain: str
    since: float | None = None  # stale reports: when that host's iSCSI copy went stale
    down: bool = False  # the host's agent is not scraped successfully now (its last report counts)
    records_unreadable: bool = False  # its agent cannot read its stale-copy records (last report counts)

    @property
    def last(self) -> bool:
        """A last report that counts though the host does not report it now."""
        return self.down or self.records_unreadable

    @property
    def where(self) -> str:
        """The host as messages name it: "host H", with its scrape instance when that differs."""
        return f"host {self.host}" + (f" [{self.instance}]" if self.instance != self.host else "")

    def describe(self) -> str:
        vm = f" ({self.domain})" if self.domain else ""
        where = self.where
        state = ""
        if self.down:
            state = ", which is down now (its last report)"
        elif self.records_unreadable:
            state = ", whose agent cannot read its stale-copy records now (its last report)"
        if self.since is None:
            return f"{where}{state} has it attached as {self.label}{vm}"
        return f"{where}{state}: since {time_text(self.since, utc=True)} its local leg of {self.label}{vm} holds writes the iSCSI copy lacks"


@dataclass(frozen=True)
class QueryResult:
    reports: list[RemoteLun]
    seconds: float
    unknown: list[RemoteLun] = field(
        default_factory=list
    )  # hosts using the LUN that cannot read their records


class ClusterGuard:
    """Asks Prometheus about the other hosts. `urlopen` is injectable for tests."""

    def __init__(self, settings: ClusterSettings, urlopen=None):
        self.settings = settings
        self.urlopen = urlopen

    def query(self, promql: str, timeout: float | None = None) -> list[dict]:
        """An instant query; returns the result vector. Raises ClusterUnreachable."""
        # Imported here: urllib.request pulls in http, ssl and email, a large part of the
        # hotplug's start-up, and most adds never ask Prometheus anything.
        import urllib.error
        import urllib.parse
        import urllib.request

        assert self.settings.prometheus_url is not None
        timeout = self.settings.timeout if timeout is None else timeout
        url = self.settings.prometheus_url.rstrip("/") + "/api/v1/query"
        data = urllib.parse.urlencode({"query": promql, "timeout": f"{timeout:g}s"}).encode()
        request = urllib.request.Request(url, data=data, method="POST")
        urlopen = self.urlopen or urllib.request.urlopen
        try:
            with urlopen(request, timeout=timeout) as response:
                body = response.read(10 << 20)
        except (OSError, urllib.error.URLError, ValueError) as e:
            raise ClusterUnreachable(
                f"Prometheus at {self.settings.prometheus_url} did not answer: {e}"
            ) from None
        try:
            answer = json.loads(body)
            if answer.get("status") != "success":
                raise ValueError(answer.get("error") or answer.get("status"))
            result = answer["data"]["result"]
            if answer["data"].get("resultType") != "vector" or not isinstance(result, list):
                raise ValueError(f"not a vector: {answer['data'].get('resultType')}")
            return result
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ClusterUnreachable(
                f"Prometheus at {self.settings.prometheus_url} gave no usable answer: {str(e)[:200]}"
            ) from None

    def stale_elsewhere(self, target: str, lun: int) -> QueryResult:
        """Other hosts' stale copies of this LUN: reported now, or last reported by a host now down
        or whose agent cannot read its stale-copy records now (`iscsimple_stale_records_readable`
        0; a host that exports 1, or not that metric, counts with what it reports now). Such a
        host that uses this LUN now (any iscsimple_lun_* series naming it) is in `unknown`."""
        selector = self._selector(STALE_METRIC, target, lun)
        last = f"last_over_time({selector}[{self.settings.lookback}])"
        down = f"{last} unless on(instance, job) (up == 1)"
        unreadable = f"{last} and on(instance, job) ({READABLE_METRIC} == 0)"
        any_series = self._selector('__name__=~"iscsimple_lun_.+",', target, lun)
        uses = (
            f"count by (host, instance, job, label, domain) "
            f"({any_series} and on(instance, job) ({READABLE_METRIC} == 0))"
        )
        promql = (
            f'{selector} or label_replace({down}, "{LAST_REPORT_LABEL}", "{DOWN}", "instance", ".*")'
            f' or label_replace({unreadable}, "{LAST_REPORT_LABEL}", "{RECORDS_UNREADABLE}", "instance", ".*")'
            f' or label_replace({uses}, "{LAST_REPORT_LABEL}", "{UNKNOWN}", "instance", ".*")'
        )
        return self._reports(promql, stale=True)

    def attached_elsewhere(self, target: str, lun: int) -> QueryResult:
        """Other running hosts that have this LUN attached now."""
        return self._reports(self._selector(ATTACHED_METRIC, target, lun) + " == 1", stale=False)

    def probe(self) -> float:
        """One trivial query; its duration (raises ClusterUnreachable)."""
        start = time.monotonic()
        self.query("vector(1)")
        return time.monotonic() - start

    def _selector(self, metric: str, target: str, lun: int) -> str:
        """`metric{target,lun,host!=ME}`; a metric ending in "," is a first matcher (`{__name__=~...,`)."""
        me = _quote(self.settings.host)
        matchers = f'target="{_quote(target)}",lun="{int(lun)}",host!="{me}"'
        if metric.endswith(","):
            return f"{{{metric}{matchers}}}"
        return f"{metric}{{{matchers}}}"

    def _reports(self, promql: str, stale: bool) -> QueryResult:
        start = time.monotonic()
        result = self.query(promql)
        seen: dict[tuple[str, str], RemoteLun] = {}
        unknown: dict[tuple[str, str], RemoteLun] = {}
        for sample in result:
            try:
                labels = sample["metric"]
                value = float(sample["value"][1])
                if not isinstance(labels, dict):
                    raise TypeError
            except (KeyError, IndexError, TypeError, ValueError):
                raise ClusterUnreachable(f"Prometheus gave a malformed sample: {sample!r:.200}") from None
            mark = labels.get(LAST_REPORT_LABEL)
            report = RemoteLun(
                host=str(labels.get("host", "?")),
                instance=str(labels.get("instance", labels.get("host", "?"))),
                label=str(labels.get("label", "")),
                domain=str(labels.get("domain", "")),
                since=value if stale and mark != UNKNOWN and math.isfinite(value) else None,
                down=mark == DOWN,
                records_unreadable=mark in (RECORDS_UNREADABLE, UNKNOWN),
            )
            key = (report.host, report.label)
            if mark == UNKNOWN:
                unknown.setdefault(key, report)
                continue
            if key not in seen or (seen[key].last and not report.last):  # a current report wins
                seen[key] = report
        return QueryResult(
            sorted(seen.values(), key=lambda r: (r.host, r.label)),
            time.monotonic() - start,
            sorted(unknown.values(), key=lambda r: (r.host, r.label)),
        )


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- operator acceptances of a loss -----------------------------------------------------------------


@dataclass(frozen=True)
class Acceptance:
    """The operator accepted losing the writes `host` has had since `since` on this LUN."""

    host: str
    target: str
    lun: int
    since: float
    label: str = ""
    accepted: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: object) -> Acceptance:
        """What `put` wrote, each field of its type (an acceptance waives a refusal: a value that
        only converts, such as lun true or 1.9 or a host null, is no acceptance); ValueError naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        number = (int, float)
        kinds = {"host": str, "target": str, "lun": int, "since": number, "label": str, "accepted": number}
        values = {"label": "", "accepted": 0.0} | {k: v for k, v in data.items() if k in kinds}
        for name, kind in kinds.items():
            value = values.get(name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{name} {value!r:.40} is not what iscsimple writes")
        return cls(**values)

    def covers(self, report: RemoteLun) -> bool:
        return report.host == self.host and report.since is not None and abs(report.since - self.since) < 1e-3


class Acceptances:
    """records/accepted-loss/*.json on this host: durable, mode 0600, one file per accepted report."""

    def __init__(self, paths: HostPaths):
        self.directory = paths.records / "accepted-loss"

    def _path(self, a: Acceptance) -> Path:
        key = f"{a.host}\0{a.target}\0{a.lun}\0{a.since:.3f}".encode()
        import hashlib  # lazily, like urllib above: OpenSSL's start-up is not free

        return self.directory / f"{hashlib.sha256(key).hexdigest()[:24]}.json"

    def put(self, acceptance: Acceptance) -> Path:
        path = self._path(acceptance)
        write_atomic(path, json.dumps(asdict(acceptance), indent=1, sort_keys=True), mode=0o600)
        return path

    def for_lun(self, target: str, lun: int) -> list[Acceptance]:
        """Acceptances of this LUN. An unreadable file is an error (OperationError), never ignored:
        ignoring it could only make the guard refuse, but the operator must hear why."""
        try:
            # Neither the directory nor the records root is reached through a symlink.
            fd = open_state_dir(self.directory, levels=1)
        except FileNotFoundError:
            return []
        except UnsafeFileError as e:
            raise OperationError(f"cannot read {self.directory}: {e}") from None
        except OSError as e:
            raise OperationError(f"cannot read {self.directory}: {e.strerror or e}") from None
        try:
            try:
                names = sorted(n for n in os.listdir(fd) if n.endswith(".json"))
            except OSError as e:
                raise OperationError(f"cannot read {self.directory}: {e.strerror or e}") from None
            out = []
            for name in names:
                path = self.directory / name
                try:
                    # no FIFO, no symlink, bounded: StateFileError otherwise
                    a = Acceptance.from_dict(load_state_json_in(fd, name, path))
                except (OSError, ValueError, OperationError) as e:
                    raise OperationError(
                        f"{path}: unreadable accepted-loss record ({e}); remove or fix it"
                    ) from None
                if a.target == target and a.lun == lun:
                    out.append(a)
            return out
        finally:
            os.close(fd)


# -- the decisions the hotplug, resolve and the heal share -------------------------------------------


@dataclass(frozen=True)
class GuardVerdict:
    """What a guard check decided. `allowed` False: `reason` is the sentence for the operator."""

    allowed: bool
    outcome: str  # clear | refused | unreachable_refused | unreachable_proceeded | accepted | off
    reason: str = ""
    seconds: float = 0.0
    reports: tuple[RemoteLun, ...] = ()


def check_before_attach(
    settings: ClusterSettings, paths: HostPaths, target: str, lun: int, *, guard: ClusterGuard | None = None
) -> GuardVerdict:
    """Before an add builds anything from the iSCSI copy of target+LUN: may it?"""
    if not settings.configured:
        return GuardVerdict(True, "off")
    guard = guard or ClusterGuard(settings)
    spec = f"lun{lun}@{target}"
    try:
        result = guard.stale_elsewhere(target, lun)
    except ClusterUnreachable as e:
        return _unreachable(settings, e, f"whether another host holds newer writes of {spec}")
    accepted = Acceptances(paths).for_lun(target, lun)
    blocking = [r for r in result.reports if not any(a.covers(r) for a in accepted)]
    reported = {r.host for r in result.reports}  # a host's report (even accepted) speaks for it
    unknown = [u for u in result.unknown if u.host not in reported]
    if not blocking and unknown:
        return _records_unknown(settings, spec, unknown, result.seconds)
    if not blocking:
        outcome = "accepted" if result.reports else "clear"
        if result.reports:
            log.warning(
                "cluster guard: %s; the operator accepted that loss (iscsimple accept-loss): proceeding",
                "; ".join(r.describe() for r in result.reports),
            )
        return GuardVerdict(True, outcome, seconds=result.seconds, reports=tuple(result.reports))
    first = blocking[0]
    others = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
    if first.records_unreadable:
        remedy = _records_remedy(first.host)
    else:
        remedy = (
            f"On host {first.host}: let its heal finish, or run 'iscsimple resolve {first.label} --keep local "
            "--wait 3600' there"
        )
    reason = (
        f"the iSCSI copy of {spec} is stale: {first.describe()}{others}; building the mirror from it would "
        f"lose those writes. {remedy}. If host {first.host} and its disk are lost, accept "
        f"the loss on purpose here: 'iscsimple accept-loss {spec} --host {first.host} "
        "--yes-discard-writes-on-that-host'"
    )
    return GuardVerdict(False, "refused", reason, result.seconds, tuple(blocking))


def check_before_writing_lun(
    settings: ClusterSettings, target: str, lun: int, *, guard: ClusterGuard | None = None
) -> GuardVerdict:
    """Before this host writes its local leg onto the LUN (heal, resolve --keep local): does another
    running host's mirror use the LUN? Then writing would corrupt that host's VM disk."""
    if not settings.configured:
        return GuardVerdict(True, "off")
    guard = guard or ClusterGuard(settings)
    spec = f"lun{lun}@{target}"
    try:
        result = guard.attached_elsewhere(target, lun)
    except ClusterUnreachable as e:
        return _unreachable(settings, e, f"whether another host uses {spec}")
    if not result.reports:
        return GuardVerdict(True, "clear", seconds=result.seconds)
    first = result.reports[0]
    reason = (
        f"{spec} is in use elsewhere: {first.describe()}; writing this host's local leg onto it would "
        f"corrupt that VM's disk. Stop the VM there first, or discard this host's copy "
        f"('iscsimple resolve {first.label} --keep iscsi --yes-discard-local-writes' here)"
    )
    return GuardVerdict(False, "refused", reason, result.seconds, tuple(result.reports))


def _records_unknown(
    settings: ClusterSettings, spec: str, unknown: list[RemoteLun], seconds: float
) -> GuardVerdict:
    """Another host uses the LUN, cannot read its stale-copy records and has no report of it within
    lookback: whether its local leg holds newer writes cannot be told. on_unreachable decides."""
    first = unknown[0]
    where = first.where
    disk = first.label + (f" ({first.domain})" if first.domain else "")
    others = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    what = (
        f"{where} uses {spec}{f' as {disk}' if first.label else ''} but its agent cannot read its stale-copy "
        f"records (iscsimple_stale_records_readable 0) and reported no stale copy of it within [cluster] lookback "
        f"({settings.lookback}){others}: whether its local leg holds writes the iSCSI copy lacks is unknown"
    )
    if settings.on_unreachable == "proceed":
        log.error(
            "CLUSTER GUARD CANNOT TELL: %s; proceeding because [cluster] on_unreachable = proceed: a stale copy "
            "on that host would NOT be noticed",
            what,
        )
        return GuardVerdict(True, "unreachable_proceeded", what, seconds, tuple(unknown))
    return GuardVerdict(
        False,
        "unreachable_refused",
        f"cannot tell whether another host holds newer writes of {spec}: {what}; refusing ([cluster] "
        f"on_unreachable = refuse). {_records_remedy(first.host)}. To go on without knowing, set "
        "on_unreachable = proceed in [cluster]",
        seconds,
        tuple(unknown),
    )


def _records_remedy(host: str) -> str:
    """What to do about a host whose agent cannot read its stale-copy records."""
    return (
        f"On host {host}: make its stale-copy records directory (/var/lib/iscsimple/stale by default) "
        "readable again (its agent logs why not; alert IscsimpleStaleRecordsUnreadable), then its agent "
        "reports whether its copy is still stale"
    )


def _unreachable(settings: ClusterSettings, error: ClusterUnreachable, question: str) -> GuardVerdict:
    if settings.on_unreachable == "proceed":
        log.error(
            "CLUSTER GUARD UNREACHABLE: cannot tell %s (%s); proceeding because [cluster] on_unreachable = "
            "proceed: a stale copy on another host would NOT be noticed",
            question,
            error,
        )
        return GuardVerdict(True, "unreachable_proceeded", str(error))
    return GuardVerdict(
        False,
        "unreachable_refused",
        f"cannot tell {question}: {error}; refusing ([cluster] on_unreachable = refuse). Bring Prometheus "
        "back, or set on_unreachable = proceed in [cluster] to go on without the cross-host guard",
    )
