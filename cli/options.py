"""Options every `iscsimple` subcommand shares, and the host paths they name."""

from __future__ import annotations

import argparse
from pathlib import Path

from iscsimple.core.errors import InputError
from iscsimple.core.paths import HostPaths


class UsageError(InputError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is our InputError: one sentence, exit 2."""

    def error(self, message: str):
        raise UsageError(f"{message}; see '{self.prog} --help'")


# --- paths and config from the common options ----------------------------------------------------


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts, before or after its name (defaults: HostPaths.from_env)."""
    common = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    group = common.add_argument_group("host paths (for tests and unusual layouts)")
    group.add_argument(
        "--tab", type=Path, default=s, help="tab file (default /etc/xen/scripts/block-iscsimple-tab.conf)"
    )
    group.add_argument(
        "--config", type=Path, default=s, help="config file (default /etc/iscsimple/iscsimple.toml)"
    )
    group.add_argument("--state", type=Path, default=s, help="registry directory (default /run/iscsimple)")
    group.add_argument("--records", type=Path, default=s, help="durable records (default /var/lib/iscsimple)")
    group.add_argument(
        "--locks", type=Path, default=s, help="hotplug lock directory (default /var/run/xen-hotplug)"
    )
    group.add_argument("--path.procfs", dest="procfs", type=Path, default=s, help="procfs mount point")
    group.add_argument("--path.sysfs", dest="sysfs", type=Path, default=s, help="sysfs mount point")
    group.add_argument("--path.devfs", dest="devfs", type=Path, default=s, help="devfs mount point")
    group.add_argument("--debug", action="store_true", default=s, help="log every step and show tracebacks")
    return common


def host_paths(args: argparse.Namespace) -> HostPaths:
    paths = HostPaths.from_env()
    changes = {
        name: getattr(args, name)
        for name in ("tab", "config", "state", "records", "locks", "procfs", "sysfs", "devfs")
        if getattr(args, name, None) is not None
    }
    return paths.with_(**changes)
