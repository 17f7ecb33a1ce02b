"""Where iscsimple looks for things. Every root is injectable so tests, the demo
and `--path.*` flags can point the same code at a fixture tree."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .errors import InputError

DEFAULT_CONFIG = Path("/etc/iscsimple/iscsimple.toml")
DEFAULT_TAB = Path("/etc/xen/scripts/block-iscsimple-tab.conf")
DEFAULT_STATE = Path("/run/iscsimple")
DEFAULT_RECORDS = Path("/var/lib/iscsimple")
# Xen's hotplug lock directory (tools/hotplug/Linux/locking.sh, LOCK_BASEDIR).
DEFAULT_LOCKS = Path("/var/run/xen-hotplug")


@dataclass(frozen=True)
class HostPaths:
    procfs: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    devfs: Path = Path("/dev")
    # Registry of attachments: volatile, gone at reboot like the arrays it describes.
    state: Path = DEFAULT_STATE
    # Durable records (stale iSCSI copies): must survive a reboot.
    records: Path = DEFAULT_RECORDS
    tab: Path = DEFAULT_TAB
    config: Path = DEFAULT_CONFIG
    # Hotplug locks, shared with Xen's own block scripts.
    locks: Path = DEFAULT_LOCKS

    def __post_init__(self) -> None:
        for f in fields(self):
            if "\0" in os.fspath(getattr(self, f.name)):
                raise InputError(
                    f"the {f.name} path {os.fspath(getattr(self, f.name))!r} contains a NUL byte"
                )
            # Absolute and normalised: paths under these roots reach the registry (md_path) and
            # mdadm's argv, where a relative or '..' path would mean something else later.
            object.__setattr__(self, f.name, Path(os.path.abspath(getattr(self, f.name))))

    @classmethod
    def from_env(cls, env: os._Environ[str] | dict[str, str] | None = None) -> HostPaths:
        """Defaults, overridden by ISCSIMPLE_CONFIG / ISCSIMPLE_TAB / ISCSIMPLE_STATE / ISCSIMPLE_RECORDS,
        and ISCSIMPLE_PROCFS / ISCSIMPLE_SYSFS / ISCSIMPLE_DEVFS / ISCSIMPLE_LOCKS (fake roots in tests).

        xl runs the hotplug script with a minimal environment, so production uses the
        defaults; the variables exist for tests and for hosts with unusual layouts.
        """
        env = os.environ if env is None else env
        overrides = {
            field: Path(env[var])
            for field, var in (
                ("config", "ISCSIMPLE_CONFIG"),
                ("tab", "ISCSIMPLE_TAB"),
                ("state", "ISCSIMPLE_STATE"),
                ("records", "ISCSIMPLE_RECORDS"),
                ("procfs", "ISCSIMPLE_PROCFS"),
                ("sysfs", "ISCSIMPLE_SYSFS"),
                ("devfs", "ISCSIMPLE_DEVFS"),
                ("locks", "ISCSIMPLE_LOCKS"),
            )
            if env.get(var)
        }
        return replace(cls(), **overrides)

    def with_(self, **changes: Path) -> HostPaths:
        return replace(self, **changes)


def require_given_dirs(paths: HostPaths, given: dict[str, str]) -> None:
    """Refuse a state or records directory named on the command line that does not exist.

    `given` maps a HostPaths field to the flag that set it (only those the operator typed:
    the defaults may not exist yet on a fresh host). A typo there would otherwise make the
    CLI report nothing attached and the agent look healthy while watching nothing.
    """
    for name, flag in given.items():
        path = getattr(paths, name)
        what = directory_problem(path)
        if what:
            raise InputError(
                f"{flag} {path} {what}; give the directory iscsimple keeps its "
                f"{'registry' if name == 'state' else 'durable records'} in (default "
                f"{DEFAULT_STATE if name == 'state' else DEFAULT_RECORDS})"
            )


def directory_problem(path: Path) -> str | None:
    """Why `path` is not a directory we can use, in words ("does not exist", "is not a directory",
    the system's reason for a name too long or a loop of links); None when it is one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be used ({e.strerror or e})"
    return None if stat.S_ISDIR(st.st_mode) else "is not a directory"
