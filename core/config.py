"""/etc/iscsimple/iscsimple.toml: everything an operator may tune. Every key is optional.

[iscsi]
portals = ["192.0.2.10:3260"]   # discovery, only for targets the node DB does not know
iface = "default"
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
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError


class ConfigError(InputError):
    pass


@dataclass(frozen=True)
class Config:
    portals: tuple[str, ...] = ()
    iface: str = "default"
    login_timeout: float = 15.0
    replacement_timeout_mirrored: int = 5
    replacement_timeout_unmirrored: int = 120
    target_replacement_timeout: dict[str, int] = field(default_factory=dict)
    device_wait: float = 10.0
    attach_budget: float = 30.0
    heal_enabled: bool = True
    path: str | None = None

    def replacement_timeout(self, target: str, mirrored: bool) -> int:
        if target in self.target_replacement_timeout:
            return self.target_replacement_timeout[target]
        return self.replacement_timeout_mirrored if mirrored else self.replacement_timeout_unmirrored


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "iscsi": {
        "portals": list,
        "iface": str,
        "login_timeout": (int, float),
        "replacement_timeout_mirrored": int,
        "replacement_timeout_unmirrored": int,
    },
    "attach": {"device_wait": (int, float), "budget": (int, float)},
    "heal": {"enabled": bool},
}


def load_config(path: Path | str) -> Config:
    """A missing file means defaults; an unknown key or a wrong type is an error naming it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None

    def fail(message: str):
        raise ConfigError(f"{path}: {message}")

    for section, values in data.items():
        if section == "targets":
            continue
        if section not in _SCHEMA:
            fail(f"unknown section [{section}]; known: {', '.join(sorted([*_SCHEMA, 'targets']))}")
        if not isinstance(values, dict):
            fail(f"[{section}] must be a table")
        for key, value in values.items():
            expected = _SCHEMA[section].get(key)
            if expected is None:
                fail(f"unknown key {key!r} in [{section}]; known: {', '.join(sorted(_SCHEMA[section]))}")
            if isinstance(value, bool) and expected is not bool:
                fail(f"[{section}] {key} must be a number, not {value!r}")
            if not isinstance(value, expected):
                fail(f"[{section}] {key} has the wrong type ({type(value).__name__})")

    iscsi = data.get("iscsi", {})
    portals = iscsi.get("portals", [])
    if not all(isinstance(p, str) and p for p in portals):
        fail("[iscsi] portals must be a list of 'host[:port]' strings")
    for key in ("login_timeout", "replacement_timeout_mirrored", "replacement_timeout_unmirrored"):
        if key in iscsi and iscsi[key] <= 0:
            fail(f"[iscsi] {key} must be positive")

    per_target = {}
    for target, values in data.get("targets", {}).items():
        if not isinstance(values, dict) or set(values) - {"replacement_timeout"}:
            fail(f"[targets.{target!r}] may only set replacement_timeout")
        timeout = values.get("replacement_timeout")
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            fail(f"[targets.{target!r}] replacement_timeout must be a positive integer")
        per_target[target] = timeout

    attach = data.get("attach", {})
    budget = float(attach.get("budget", 30.0))
    if not 0 < budget <= 35:
        fail("[attach] budget must be between 0 and 35 seconds (libxl kills the hotplug script at 40)")
    return Config(
        portals=tuple(portals),
        iface=iscsi.get("iface", "default"),
        login_timeout=float(iscsi.get("login_timeout", 15.0)),
        replacement_timeout_mirrored=iscsi.get("replacement_timeout_mirrored", 5),
        replacement_timeout_unmirrored=iscsi.get("replacement_timeout_unmirrored", 120),
        target_replacement_timeout=per_target,
        device_wait=float(attach.get("device_wait", 10.0)),
        attach_budget=budget,
        heal_enabled=data.get("heal", {}).get("enabled", True),
        path=str(path),
    )
