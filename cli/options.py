"""Options every `iscsimple` subcommand shares, and the host paths they name."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from iscsimple.core.errors import InputError
from iscsimple.core.paths import HostPaths, require_given_dirs


class UsageError(InputError):
    pass


MAX_SECONDS = 7 * 24 * 3600.0  # a week: anything longer is a typo
_SECONDS = re.compile(r"[0-9]{1,12}(\.[0-9]{0,9})?|\.[0-9]{1,9}")


def seconds_option(text: str) -> float:
    """A duration flag in seconds: plain decimal, 0 to a week (float() would take nan, inf, 1e400,
    "1_0" and non-ASCII digits; nan and inf would make a wait loop forever)."""
    if not _SECONDS.fullmatch(text) or float(text) > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to {MAX_SECONDS:g}")
    return float(text)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is our InputError: one sentence, exit 2."""

    def error(self, message: str):
        raise UsageError(f"{message}; see '{self.prog} --help'")


# --- paths and config from the common options ----------------------------------------------------

_DEFAULTS = HostPaths()

# (flag after --path., HostPaths field, default shown, what it is)
PATH_OPTIONS = (
    ("tab", "tab", _DEFAULTS.tab, "tab file"),
    ("config", "config", _DEFAULTS.config, "config file"),
    ("state", "state", _DEFAULTS.state, "registry directory"),
    ("records", "records", _DEFAULTS.records, "durable records"),
    ("locks", "locks", _DEFAULTS.locks, "hotplug lock directory"),
    ("procfs", "procfs", _DEFAULTS.procfs, "procfs mount point"),
    ("sysfs", "sysfs", _DEFAULTS.sysfs, "sysfs mount point"),
    ("devfs", "devfs", _DEFAULTS.devfs, "devfs mount point"),
)


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts, before or after its name (defaults: HostPaths.from_env)."""
    common = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    group = common.add_argument_group("host paths (for tests and unusual layouts)")
    # The same --path.* names as iscsimple-agent (its log suggests them); the short names stay.
    for flag, dest, default, what in PATH_OPTIONS:
        names = [f"--path.{flag}"] + ([f"--{dest}"] if flag not in ("procfs", "sysfs", "devfs") else [])
        metavar = "FILE" if dest in ("tab", "config") else "DIR"
        group.add_argument(
            *names, dest=dest, type=Path, default=s, metavar=metavar, help=f"{what} (default {default})"
        )
    group.add_argument("--debug", action="store_true", default=s, help="log every step and show tracebacks")
    return common


def host_paths(args: argparse.Namespace) -> HostPaths:
    paths = HostPaths.from_env()
    changes = {
        name: getattr(args, name)
        for name in (dest for _, dest, _, _ in PATH_OPTIONS)
        if getattr(args, name, None) is not None
    }
    paths = paths.with_(**changes)
    require_given_dirs(paths, {name: f"--path.{name}" for name in ("state", "records") if name in changes})
    return paths
