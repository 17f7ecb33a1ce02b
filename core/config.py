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
[cluster]                       # the cross-host guard (docs/data-safety.md); off without prometheus_url
prometheus_url = "http://prometheus.example:9090"   # the Prometheus that scrapes every host's agent
timeout = 2                     # seconds per query (at most 3 of the add's 30)
on_unreachable = "refuse"       # or "proceed": go on without the guard, log loudly, count it
host_name = "xen1"              # this host in the agents' `host` label; default: the hostname
lookback = "14d"                # how long a host that is down keeps its last stale report
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import DURATION_RE, MAX_TIMEOUT, ON_UNREACHABLE, ClusterSettings
from .errors import InputError
from .spec import SpecError, parse_spec


class ConfigError(InputError):
    pass


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
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    path: str | None = None

    def replacement_timeout(self, target: str, mirrored: bool) -> int:
        if target in self.target_replacement_timeout:
            return self.target_replacement_timeout[target]
        return self.replacement_timeout_mirrored if mirrored else self.replacement_timeout_unmirrored


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "iscsi": {
        "portals": list,
        "login_timeout": (int, float),
        "replacement_timeout_mirrored": int,
        "replacement_timeout_unmirrored": int,
    },
    "attach": {"device_wait": (int, float), "budget": (int, float)},
    "heal": {
        "enabled": bool,
        "stable_seconds": (int, float),
        "backoff_max_seconds": (int, float),
        "max_parallel": int,
    },
    "cluster": {
        "prometheus_url": str,
        "timeout": (int, float),
        "on_unreachable": str,
        "host_name": str,
        "lookback": str,
    },
}


def load_config(path: Path | str) -> Config:
    """A missing file means defaults; an unknown key or a wrong type is an error naming it.

    Errors read ``FILE:LINE: message`` (the line of the offending key or table).
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except FileNotFoundError:
        return Config()
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = m.group(1) if m else text.rstrip("\n").count("\n") + 1  # "at end of document"
        where = f"{path}:{line}"
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None

    def fail(message: str, table: tuple[str, ...] = (), key: str | None = None):
        line = _line_of(text, table, key)
        raise ConfigError(f"{path}:{line}: {message}" if line else f"{path}: {message}")

    for section, values in data.items():
        if section == "targets":
            continue
        if section not in _SCHEMA:
            known = ", ".join(sorted([*_SCHEMA, "targets"]))
            if isinstance(values, dict):
                fail(f"unknown section [{section}]; known: {known}", (section,))
            fail(f"unknown key {section!r} outside any section; known sections: {known}", (), section)
        if not isinstance(values, dict):
            fail(f"[{section}] must be a table", (), section)
        for key, value in values.items():
            expected = _SCHEMA[section].get(key)
            if expected is None:
                fail(
                    f"unknown key {key!r} in [{section}]; known: {', '.join(sorted(_SCHEMA[section]))}",
                    (section,),
                    key,
                )
            if isinstance(value, bool) and expected is not bool:
                fail(f"[{section}] {key} must be a number, not {value!r}", (section,), key)
            if not isinstance(value, expected):
                fail(f"[{section}] {key} has the wrong type ({type(value).__name__})", (section,), key)

    iscsi = data.get("iscsi", {})
    portals = iscsi.get("portals", [])
    if not all(isinstance(p, str) and p for p in portals):
        fail("[iscsi] portals must be a list of 'host[:port]' strings", ("iscsi",), "portals")
    for key in ("login_timeout", "replacement_timeout_mirrored", "replacement_timeout_unmirrored"):
        if key in iscsi and iscsi[key] <= 0:
            fail(f"[iscsi] {key} must be positive", ("iscsi",), key)

    targets = data.get("targets", {})
    if not isinstance(targets, dict):
        fail('targets must be tables: [targets."iqn.…"] with replacement_timeout = N', (), "targets")
    per_target = {}
    for target, values in targets.items():
        table = ("targets", target)
        problem = _target_name_problem(target)
        if problem:
            fail(f"[targets.{target!r}]: {problem}", table)
        if not isinstance(values, dict) or set(values) - {"replacement_timeout"}:
            fail(f"[targets.{target!r}] may only set replacement_timeout", table)
        timeout = values.get("replacement_timeout")
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            fail(
                f"[targets.{target!r}] replacement_timeout must be a positive integer",
                table,
                "replacement_timeout",
            )
        per_target[target] = timeout

    attach = data.get("attach", {})
    budget = float(attach.get("budget", 30.0))
    if not 0 < budget <= 35:
        fail(
            "[attach] budget must be between 0 and 35 seconds (libxl kills the hotplug script at 40)",
            ("attach",),
            "budget",
        )
    if "device_wait" in attach and not 0 < attach["device_wait"] < budget:
        fail(
            f"[attach] device_wait must be positive and below the budget ({budget:g} s)",
            ("attach",),
            "device_wait",
        )
    heal = data.get("heal", {})
    for key in ("stable_seconds", "backoff_max_seconds", "max_parallel"):
        if key in heal and heal[key] <= 0:
            fail(f"[heal] {key} must be positive", ("heal",), key)
    cluster = _cluster_settings(data.get("cluster", {}), fail)
    return Config(
        portals=tuple(portals),
        login_timeout=float(iscsi.get("login_timeout", 15.0)),
        replacement_timeout_mirrored=iscsi.get("replacement_timeout_mirrored", 5),
        replacement_timeout_unmirrored=iscsi.get("replacement_timeout_unmirrored", 120),
        target_replacement_timeout=per_target,
        device_wait=float(attach.get("device_wait", 10.0)),
        attach_budget=budget,
        heal_enabled=heal.get("enabled", True),
        heal_stable_seconds=float(heal.get("stable_seconds", 30.0)),
        heal_backoff_max_seconds=float(heal.get("backoff_max_seconds", 3600.0)),
        heal_max_parallel=heal.get("max_parallel", 4),
        cluster=cluster,
        path=str(path),
    )


def _cluster_settings(cluster: dict, fail) -> ClusterSettings:
    where = ("cluster",)
    url = cluster.get("prometheus_url")
    if url is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
        fail(
            f"[cluster] prometheus_url must be an http:// or https:// URL, not {url!r}",
            where,
            "prometheus_url",
        )
    timeout = cluster.get("timeout", 2.0)
    if not 0 < timeout <= MAX_TIMEOUT:
        fail(
            f"[cluster] timeout must be above 0 and at most {MAX_TIMEOUT:g} seconds (of the add's budget)",
            where,
            "timeout",
        )
    policy = cluster.get("on_unreachable", "refuse")
    if policy not in ON_UNREACHABLE:
        fail(
            f"[cluster] on_unreachable must be one of {', '.join(ON_UNREACHABLE)}, not {policy!r}",
            where,
            "on_unreachable",
        )
    host = cluster.get("host_name")
    if host is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", host):
        fail(f"[cluster] host_name {host!r}: letters, digits, '.', '-', '_' (at most 63)", where, "host_name")
    lookback = cluster.get("lookback", "14d")
    if not DURATION_RE.match(lookback):
        fail(
            f"[cluster] lookback must be a duration such as '14d' or '12h', not {lookback!r}",
            where,
            "lookback",
        )
    return ClusterSettings(
        prometheus_url=url,
        timeout=float(timeout),
        on_unreachable=policy,
        host_name=host,
        lookback=lookback,
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


_TABLE_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")


def _line_of(text: str, table: tuple[str, ...], key: str | None) -> int | None:
    """The line of `key` in `[table]` (or of the table header): good enough for error messages."""
    current: tuple[str, ...] = ()
    header_line = None
    for number, line in enumerate(text.split("\n"), start=1):
        m = _TABLE_RE.match(line)
        if m:
            current = _table_name(m.group(1))
            if current == table and header_line is None:
                header_line = number
            continue
        if key is not None and current == table:
            name = line.split("=", 1)[0].strip().strip("\"'")
            if "=" in line and name == key:
                return number
    return header_line


def _table_name(header: str) -> tuple[str, ...]:
    """'targets."iqn.2001-04.com.example:x"' → ("targets", "iqn.2001-04.com.example:x")."""
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([^."\'\s]+)', header)
    return tuple(next(p for p in group if p) if any(group) else "" for group in parts)
