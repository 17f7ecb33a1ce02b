"""/etc/iscsimple/iscsimple.toml: everything an operator may tune. Every key is optional.

[iscsi]
portals = ["192.0.2.10:3260"]   # discovery, only for targets the node DB does not know
login_timeout = 15              # seconds for one iscsiadm --login
# How long open-iscsi queues I/O for a dead session before failing it.
replacement_timeout_mirrored = 5     # md then fails the iSCSI leg and carries on locally
replacement_timeout_unmirrored = 120 # nothing to fail over to: ride out short outages
[targets."iqn.2001-04.com.example:storage"]
replacement_timeout = 10        # per-target override
[attach]
device_wait = 10                # seconds to wait for the LUN's block device
budget = 30                     # the whole add, success or not (libxl kills us at 40)
[heal]
enabled = true                  # re-add a returned iSCSI leg automatically
stable_seconds = 30             # ...once its session and LUN looked healthy this long
backoff_max_seconds = 3600      # the wait doubles after each failed heal, up to this
max_parallel = 4                # iSCSI legs recovering at once
check_after = false             # after a heal completes, have md compare the legs (reads the whole LUN)
[cluster]                       # the cross-host guard (docs/data-safety.md); off without prometheus_url
prometheus_url = "http://prometheus.example:9090"   # the Prometheus that scrapes every host's agent
timeout = 2                     # seconds per query (at most 3 of the add's 30)
on_unreachable = "refuse"       # or "proceed": go on without the guard, log loudly, count it
host_name = "xen1"              # this host in the agents' `host` label; default: the hostname
lookback = "14d"                # how long a host that is down keeps its last stale report
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import DURATION_RE, MAX_TIMEOUT, ON_UNREACHABLE, ClusterSettings
from .errors import FileInputError
from .files import read_problem, read_text
from .spec import SpecError, parse_spec

ConfigError = FileInputError  # the one FILE:LINE error type (core.errors), under its old name

# libxl kills the hotplug script at 40 s; the add must have ended (and undone itself) before.
MAX_BUDGET = 35.0
# Upper bounds that keep a typo from reaching iscsiadm or a timer as an absurd number.
MAX_SECONDS = 7 * 24 * 3600.0
MAX_COUNT = 2**31 - 1  # open-iscsi and the kernel keep these in an int
MAX_INT = 2**63  # TOML integers are 64-bit: a longer one is no value of this file


@dataclass(frozen=True)
class Config:
    portals: tuple[str, ...] = ()
    login_timeout: float = 15.0
    replacement_timeout_mirrored: int = 5
    replacement_timeout_unmirrored: int = 120
    target_replacement_timeout: dict[str, int] = field(default_factory=dict)
    device_wait: float = 10.0
    attach_budget: float = 30.0
    heal_enabled: bool = True
    heal_stable_seconds: float = 30.0  # session and LUN healthy this long before a heal
    heal_backoff_max_seconds: float = 3600.0  # cap of the wait, doubled after each failed heal
    heal_max_parallel: int = 4  # iSCSI legs recovering at once (a returning filer serves many)
    # Off: a check reads the whole LUN again, the filer load a partial heal spares (README).
    heal_check_after: bool = False
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    path: str | None = None

    def replacement_timeout(self, target: str, mirrored: bool) -> int:
        if target in self.target_replacement_timeout:
            return self.target_replacement_timeout[target]
        return self.replacement_timeout_mirrored if mirrored else self.replacement_timeout_unmirrored


SECONDS, COUNT, FLAG, PORTALS, STRING = "seconds", "count", "flag", "portals", "string"
NUMBER = "number"  # finite; its range checked where it is used

# section → key → (field, kind); "cluster.x" is ClusterSettings.x. The defaults are the
# dataclasses', written once above.
_SCHEMA: dict[str, dict[str, tuple[str, str]]] = {
    "iscsi": {
        "portals": ("portals", PORTALS),
        "login_timeout": ("login_timeout", SECONDS),
        "replacement_timeout_mirrored": ("replacement_timeout_mirrored", COUNT),
        "replacement_timeout_unmirrored": ("replacement_timeout_unmirrored", COUNT),
    },
    "attach": {"device_wait": ("device_wait", SECONDS), "budget": ("attach_budget", SECONDS)},
    "heal": {
        "enabled": ("heal_enabled", FLAG),
        "stable_seconds": ("heal_stable_seconds", SECONDS),
        "backoff_max_seconds": ("heal_backoff_max_seconds", SECONDS),
        "max_parallel": ("heal_max_parallel", COUNT),
        "check_after": ("heal_check_after", FLAG),
    },
    "cluster": {
        "prometheus_url": ("cluster.prometheus_url", STRING),
        "timeout": ("cluster.timeout", NUMBER),
        "on_unreachable": ("cluster.on_unreachable", STRING),
        "host_name": ("cluster.host_name", STRING),
        "lookback": ("cluster.lookback", STRING),
    },
}


def load_config(path: Path | str) -> Config:
    """A missing file means defaults; an unknown key or a wrong value is an error naming it.

    Errors read ``FILE:LINE: message`` (the line of the offending key or table). When there
    are several, the first is raised and says how many more `iscsimple check-config` lists.
    """
    config, errors = check_config(path)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            raise FileInputError(
                first.path,
                first.line,
                f"{first.message} (and {len(errors) - 1} more error(s): 'iscsimple check-config' lists them)",
            )
        raise first
    return config


def check_config(path: Path | str) -> tuple[Config, list[FileInputError]]:
    """The config and every error in it (for check-config); bad keys keep their defaults."""
    path = Path(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        if os.path.islink(path):  # someone meant a config to be there
            return Config(), [
                FileInputError(
                    path, None, f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
                )
            ]
        return Config(), []
    except (OSError, UnicodeDecodeError) as e:
        return Config(), [FileInputError(path, None, f"cannot read: {read_problem(e)}")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = int(m.group(1)) if m else text.rstrip("\n").count("\n") + 1  # "at end of document"
        return Config(), [FileInputError(path, line, f"not valid TOML: {e}")]
    except RecursionError:
        return Config(), [
            FileInputError(path, None, "not valid here: arrays or tables nested too deeply for a config file")
        ]
    except ValueError as e:  # int() past its digit limit ("Exceeds the limit (4300 digits)...")
        return Config(), [FileInputError(path, None, f"not valid here: {str(e)[:120]}")]
    checker = _Checker(path, text)
    values = checker.check(data)
    errors = sorted(checker.errors, key=lambda e: e.line or 0)
    return Config(**values, path=str(path)), errors


class _Checker:
    def __init__(self, path: Path, text: str):
        self.path = path
        self.errors: list[FileInputError] = []
        self._lines = _Locations(text)

    def fail(self, message: str, table: tuple[str, ...] = (), key: str | None = None) -> None:
        self.errors.append(FileInputError(self.path, self._lines.find(table, key), message))

    def check(self, data: dict) -> dict:
        values: dict = {}
        for section, table in data.items():
            if section == "targets":
                continue
            if section not in _SCHEMA:
                known = ", ".join(sorted([*_SCHEMA, "targets"]))
                if isinstance(table, dict):
                    self.fail(f"unknown section [{section}]; known: {known}", (section,))
                else:
                    self.fail(
                        f"unknown key {section!r} outside any section; known sections: {known}", (), section
                    )
                continue
            if not isinstance(table, dict):
                self.fail(f"[{section}] must be a table", (), section)
                continue
            for key, value in table.items():
                known_key = _SCHEMA[section].get(key)
                if known_key is None:
                    known = ", ".join(sorted(_SCHEMA[section]))
                    self.fail(f"unknown key {key!r} in [{section}]; known: {known}", (section,), key)
                    continue
                name, kind = known_key
                problem = _value_problem(kind, value)
                if problem:
                    self.fail(f"[{section}] {key} {problem}", (section,), key)
                else:
                    values[name] = (
                        tuple(value)
                        if kind == PORTALS
                        else float(value)
                        if kind in (SECONDS, NUMBER)
                        else value
                    )
        self._check_attach(values)
        values["cluster"] = self._cluster(
            {name.split(".", 1)[1]: values.pop(name) for name in list(values) if name.startswith("cluster.")}
        )
        values["target_replacement_timeout"] = self._targets(data.get("targets", {}))
        return values

    def _check_attach(self, values: dict) -> None:
        budget = values.get("attach_budget", Config.attach_budget)
        if budget > MAX_BUDGET:
            self.fail(
                f"[attach] budget must be between 0 and {MAX_BUDGET:g} seconds (libxl kills the hotplug script at 40)",
                ("attach",),
                "budget",
            )
            values.pop("attach_budget")
            budget = Config.attach_budget
        if values.get("device_wait", 0) >= budget:
            self.fail(
                f"[attach] device_wait must be positive and below the budget ({budget:g} s)",
                ("attach",),
                "device_wait",
            )
            values.pop("device_wait")

    def _cluster(self, given: dict) -> ClusterSettings:
        """[cluster], each value checked; a bad one is reported and keeps its default."""
        where = ("cluster",)
        checks = {
            "prometheus_url": (
                lambda url: re.match(r"^https?://[^/\s]+(/\S*)?$", url),
                lambda url: f"[cluster] prometheus_url must be an http:// or https:// URL, not {url!r}",
            ),
            "timeout": (
                lambda timeout: 0 < timeout <= MAX_TIMEOUT,
                lambda _: (
                    f"[cluster] timeout must be above 0 and at most {MAX_TIMEOUT:g} seconds (of the add's budget)"
                ),
            ),
            "on_unreachable": (
                lambda policy: policy in ON_UNREACHABLE,
                lambda policy: (
                    f"[cluster] on_unreachable must be one of {', '.join(ON_UNREACHABLE)}, not {policy!r}"
                ),
            ),
            "host_name": (
                lambda host: re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", host),
                lambda host: f"[cluster] host_name {host!r}: letters, digits, '.', '-', '_' (at most 63)",
            ),
            "lookback": (
                lambda lookback: DURATION_RE.match(lookback),
                lambda lookback: (
                    f"[cluster] lookback must be a duration such as '14d' or '12h', not {lookback!r}"
                ),
            ),
        }
        settings = {}
        for key, value in given.items():
            good, message = checks[key]
            if good(value):
                settings[key] = value
            else:
                self.fail(message(value), where, key)
        return ClusterSettings(**settings)

    def _targets(self, targets) -> dict[str, int]:
        if not isinstance(targets, dict):
            self.fail('targets must be tables: [targets."iqn.…"] with replacement_timeout = N', (), "targets")
            return {}
        per_target = {}
        for target, values in targets.items():
            table = ("targets", target)
            problem = _target_name_problem(target)
            if problem:
                self.fail(f"[targets.{target!r}]: {problem}", table)
                continue
            if not isinstance(values, dict) or set(values) - {"replacement_timeout"}:
                self.fail(f"[targets.{target!r}] may only set replacement_timeout", table)
                continue
            timeout = values.get("replacement_timeout")
            if _value_problem(COUNT, timeout):
                self.fail(
                    f"[targets.{target!r}] replacement_timeout must be a positive integer (at most {MAX_COUNT})",
                    table,
                    "replacement_timeout",
                )
                continue
            per_target[target] = timeout
        return per_target


def _value_problem(kind: str, value) -> str | None:
    """Why `value` is no good for a key of `kind`, in words; None when it is."""
    if kind == FLAG:
        return None if isinstance(value, bool) else f"has the wrong type ({type(value).__name__})"
    if kind == STRING:
        return None if isinstance(value, str) else f"has the wrong type ({type(value).__name__})"
    if kind == PORTALS:
        if isinstance(value, list) and all(isinstance(p, str) and _portal_ok(p) for p in value):
            return None
        return "must be a list of 'host[:port]' strings"
    if isinstance(value, bool):
        return f"must be a number, not {value!r}"
    if kind == COUNT:
        if not isinstance(value, int):
            return f"has the wrong type ({type(value).__name__})"
        return None if 0 < value <= MAX_COUNT else f"must be positive (and at most {MAX_COUNT}), not {value}"
    if not isinstance(value, (int, float)):
        return f"has the wrong type ({type(value).__name__})"
    if isinstance(value, int) and abs(value) > MAX_INT:  # math.isfinite() would raise OverflowError
        return f"must be a finite number of seconds, not a number of {len(str(abs(value)))} digits"
    if not math.isfinite(value):  # TOML's nan and inf, and 1e400 (read as inf)
        return f"must be a finite number of seconds, not {value!r}"
    if kind == NUMBER:
        return None
    return (
        None
        if 0 < value <= MAX_SECONDS
        else f"must be positive (and at most {MAX_SECONDS:g} s), not {value!r}"
    )


def _portal_ok(portal: str) -> bool:
    # It reaches iscsiadm's argv: no blanks or control characters, and no leading '-' (an option).
    return (
        bool(portal)
        and portal.isprintable()
        and not any(c.isspace() for c in portal)
        and not portal.startswith("-")
    )


def _target_name_problem(target: str) -> str | None:
    """Why `target` is not a bare iSCSI name (a typo here would silently never match)."""
    try:
        spec = parse_spec(target)
    except SpecError as e:
        return str(e)
    if spec.target != target.strip() or spec.label is not None or "@" in target:
        return "must be an iSCSI target name alone, without lunN@ or +LABEL"
    return None


class _Locations:
    """Line numbers of tables and keys, found once per file: good enough for error messages.

    Plain string scanning, no regex: a crafted line must not make it backtrack.
    """

    def __init__(self, text: str):
        self.headers: dict[tuple[str, ...], int] = {}
        self.keys: dict[tuple[tuple[str, ...], str], int] = {}
        current: tuple[str, ...] = ()
        for number, line in enumerate(text.split("\n"), start=1):
            header = _table_header(line)
            if header is not None:
                current = _table_name(header)
                self.headers.setdefault(current, number)
                continue
            if "=" in line:
                name = line.split("=", 1)[0].strip().strip("\"'")
                self.keys.setdefault((current, name), number)

    def find(self, table: tuple[str, ...], key: str | None) -> int | None:
        if key is not None and (table, key) in self.keys:
            return self.keys[(table, key)]
        return self.headers.get(table)


def _table_header(line: str) -> str | None:
    """'[ targets."iqn…" ]  # note' → 'targets."iqn…"'; None for anything else (arrays of tables too)."""
    stripped = line.strip()
    if not stripped.startswith("["):
        return None
    end = stripped.find("]")
    inner = stripped[1:end]
    if end < 0 or "[" in inner:
        return None
    rest = stripped[end + 1 :].lstrip()
    if rest and not rest.startswith("#"):
        return None
    return inner.strip() or None


_NAME_PART = re.compile(r'"([^"]*)"|\'([^\']*)\'|([^."\'\s]+)')


def _table_name(header: str) -> tuple[str, ...]:
    """'targets."iqn.2001-04.com.example:x"' → ("targets", "iqn.2001-04.com.example:x")."""
    parts = _NAME_PART.findall(header)
    return tuple(next(p for p in group if p) if any(group) else "" for group in parts)
