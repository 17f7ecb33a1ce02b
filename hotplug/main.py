"""block-iscsimple: the Xen block hotplug script (/etc/xen/scripts/block-iscsimple).

libxl runs it as `block-iscsimple add|remove` with XENBUS_PATH=backend/vbd/<domid>/<devid>
in the environment and the disk's `target=` in XENBUS_PATH/params. Like Xen's own
scripts (xen-hotplug-common.sh), a failure writes hotplug-error and
hotplug-status=error there and exits 1; libxl shows the error to the operator.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from iscsimple import __version__
from iscsimple.core.config import MAX_BUDGET, Config, ConfigError, load_config
from iscsimple.core.errors import InputError, IscsimpleError, one_line, os_problem
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Registry
from iscsimple.core.run import Deadline, process_started
from iscsimple.core.spec import DiskSpec, parse_spec
from iscsimple.core.xenstore import open_xenstore

from .attach import attach
from .detach import detach
from .xen import XenContext

log = logging.getLogger("block-iscsimple")

USAGE = "usage: block-iscsimple add|remove (run by libxl with XENBUS_PATH set)"


def build_parser() -> argparse.ArgumentParser:
    """What `--help`, `--version` and the man page show; libxl's own calls bypass it."""
    p = argparse.ArgumentParser(
        prog="block-iscsimple",
        description="Xen block hotplug script for iSCSI LUNs, optionally mirrored onto a local device "
        "(metadata-less md RAID1). libxl runs it for disks with script=block-iscsimple, as "
        "/etc/xen/scripts/block-iscsimple add|remove, with XENBUS_PATH=backend/vbd/DOMID/DEVID; the "
        "disk's target=, [lunN@]TARGET[+LABEL], is read from XENBUS_PATH/params. A failure is written "
        "to XENBUS_PATH/hotplug-error as one sentence, which xl shows.",
        epilog="Files: /etc/xen/scripts/block-iscsimple-tab.conf (LABEL to local device), "
        "/etc/iscsimple/iscsimple.toml, /run/iscsimple (registry), /var/lib/iscsimple (stale-copy "
        "records), /var/run/xen-hotplug (locks shared with Xen's scripts). Logs go to syslog and "
        "/var/log/xen/xen-hotplug.log. See iscsimple(1) for attach/detach outside Xen, iscsimple-agent(1) for the agent.",
    )
    p.add_argument("command", choices=("add", "remove"), help="attach (add) or undo (remove) the disk")
    p.add_argument("--version", action="version", version=f"block-iscsimple {__version__}")
    return p


def main(argv: list[str] | None = None, forked: float | None = None) -> int:
    """`forked`: when libxl started the script (a monotonic reading); by default, when
    run as the program, this process's fork, and when called in-process, now."""
    if forked is None:
        forked = process_started() if argv is None else time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "--version") for a in argv):
        build_parser().parse_args(argv)  # prints and exits 0
    command = argv[0] if len(argv) == 1 else None
    xenbus_path = os.environ.get("XENBUS_PATH", "").strip()
    if command not in ("add", "remove") or not xenbus_path:
        print(USAGE, file=sys.stderr)
        return 1
    xen = XenContext(open_xenstore(), xenbus_path)
    _setup_logging(xen.attachment_id)
    started = time.monotonic()
    paths = None
    # Whatever goes wrong, libxl must get hotplug-status=error and a sentence, never silence.
    try:
        paths = HostPaths.from_env()
        config = _config(paths, command)
        spec = _spec(xen) if command == "add" else None
    except Exception as e:
        if paths is not None:
            _count(paths, command, started)  # attach()/detach() count their own outcomes, not these
        return _fail(xen, _message(command, e))
    # libxl's timeout counts from its fork of this process, start-up included.
    deadline = Deadline(
        config.attach_budget,
        not_after=forked + MAX_BUDGET,
        why=f"{MAX_BUDGET:g} s have passed since libxl started the script (libxl kills it at 40 s)",
    )
    try:
        if spec is not None:
            attachment = attach(spec, paths, config, xen=xen, operation="add", deadline=deadline)
            log.info("add done in %.1f s: %s", time.monotonic() - started, attachment.device_path)
        else:
            detach(
                xen.recorded_id() or xen.attachment_id,
                paths,
                config,
                xen=xen,
                operation="remove",
                deadline=deadline,
            )
            log.info("remove done in %.1f s", time.monotonic() - started)
    except Exception as e:
        return _fail(xen, _message(command, e))
    return 0


def _message(command: str, error: Exception) -> str:
    if isinstance(error, IscsimpleError):
        return str(error)
    if isinstance(error, OSError):  # a file or directory of the host: say which and why
        return f"block-iscsimple {command} failed: {os_problem(error)}"
    # A bug: still tell libxl, in words, rather than die silently.
    log.error("unexpected error", exc_info=error)
    return f"block-iscsimple {command} failed: internal error {type(error).__name__}: {error}"


def _config(paths: HostPaths, command: str) -> Config:
    try:
        return load_config(paths.config)
    except ConfigError as e:
        if command == "add":
            raise
        # A typo in the config must not keep a VM's disk attached: undo with the defaults.
        log.warning("%s; removing with the default settings", e)
        return Config()


def _spec(xen: XenContext) -> DiskSpec:
    params = xen.params()
    if not params:
        raise InputError(f"no disk spec: {xen.key('params')} is empty or missing (target= in the disk line)")
    return parse_spec(params)


def _count(paths: HostPaths, command: str, started: float) -> None:
    Registry(paths).record_operation(command, "failure", time.monotonic() - started)  # never raises


def _fail(xen: XenContext, message: str) -> int:
    message = one_line(message)
    log.error("%s", message)
    xen.fail(message)
    return 1


XEN_HOTPLUG_LOG = Path("/var/log/xen/xen-hotplug.log")  # where xen-hotplug-common.sh sends stderr


def _setup_logging(attachment_id: str) -> None:
    """stderr, syslog and Xen's hotplug log, each line naming the disk.

    ISCSIMPLE_NO_SYSLOG=1 keeps it to stderr (tests, the CLI's own runs).
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if os.environ.get("ISCSIMPLE_DEBUG") else logging.INFO)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(f"%(name)s {attachment_id}: %(levelname)s %(message)s"))
    root.addHandler(stderr)
    if os.environ.get("ISCSIMPLE_NO_SYSLOG"):
        return
    with contextlib.suppress(OSError):
        if os.path.exists("/dev/log"):
            from logging.handlers import SysLogHandler  # only when syslog is wanted

            syslog = SysLogHandler(address="/dev/log")
            syslog.ident = "block-iscsimple: "
            syslog.setFormatter(logging.Formatter(f"{attachment_id}: %(message)s"))
            root.addHandler(syslog)
    with contextlib.suppress(OSError):
        if XEN_HOTPLUG_LOG.parent.is_dir():
            xenlog = logging.FileHandler(XEN_HOTPLUG_LOG)
            xenlog.setFormatter(
                logging.Formatter(
                    f"%(asctime)s block-iscsimple[%(process)d] {attachment_id}: %(levelname)s %(message)s"
                )
            )
            root.addHandler(xenlog)


if __name__ == "__main__":
    sys.exit(main())
