"""Before moving a VM between hosts: `iscsimple migrate-check` and `iscsimple accept-loss`.

migrate-check DOMAIN|LABEL   Run on the source host before `xl migrate`. Safe (exit 0) when
                             every mirror of the VM has its iSCSI copy complete (leg in sync,
                             session up, no stale record) and, with [cluster] configured, no
                             other host reports a stale copy of its LUN (the destination's
                             attach would refuse). Otherwise exit 1, with every reason.
accept-loss SPEC --host HOST Run on the host that should attach SPEC (lunN@TARGET) although
                             HOST reports a stale copy of it (HOST crashed or is lost with its
                             disk): accept losing HOST's writes since its report on purpose.
                             Only that report is accepted; a later one blocks again.
"""

from __future__ import annotations

import argparse
import time

from iscsimple.core.cluster import Acceptance, Acceptances, ClusterGuard, check_before_attach
from iscsimple.core.config import load_config
from iscsimple.core.errors import InputError, OperationError
from iscsimple.core.safety import migrate_blockers
from iscsimple.core.snapshot import HostSnapshot
from iscsimple.core.spec import parse_spec

from .options import host_paths


def add_migrate_check(sub) -> None:
    p = sub.add_parser(
        "migrate-check",
        help="is it safe to migrate this VM (or mirror) to another host now? exit 0 yes, 1 no (with why)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="DOMAIN|LABEL")
    p.set_defaults(run=run_migrate_check)


def run_migrate_check(args: argparse.Namespace) -> int:
    paths = host_paths(args)
    config = load_config(paths.config)
    snapshot = HostSnapshot.read(paths)
    views = [v for v in snapshot.arrays if args.name in (v.label, v.domain)]
    # An entry that cannot be read may be (another disk of) this VM: never "safe" then.
    unreadable = snapshot.sources["registry"].errors
    if not views and not unreadable:
        raise InputError(f"no iscsimple mirror with LABEL or VM name {args.name!r} is attached on this host")
    unsafe = 0
    for error in unreadable:
        unsafe += 1
        print(
            f"{args.name}: NOT known to be safe to migrate: an unreadable registry entry may be one of its disks: {error}"
        )
    # Records that could not be listed may hold one of this VM's ("no record" is not known). An
    # unreadable record file stands as its LABEL's record (view.stale), so only the rest count.
    of_labels = {r.reason for r in snapshot.stale if r.unreadable}
    for error in (e for e in snapshot.sources["stale"].errors if e not in of_labels):
        unsafe += 1
        print(f"{args.name}: NOT known to be safe to migrate: the stale-copy records cannot be read: {error}")
    for view in views:
        reasons = migrate_blockers(view, records_error=snapshot.records_error)
        target = view.attachment.target
        if target is not None and view.iscsi.configured and config.cluster.configured:
            verdict = check_before_attach(config.cluster, paths, target, view.attachment.lun)
            if not verdict.allowed:
                reasons.append(f"the destination's attach would refuse: {verdict.reason}")
        vm = f" ({view.domain})" if view.domain else ""
        if reasons:
            unsafe += 1
            print(f"{view.label}{vm}: NOT safe to migrate: " + "; ".join(reasons))
        else:
            print(f"{view.label}{vm}: safe to migrate (iSCSI copy complete)")
    return 1 if unsafe else 0


def add_accept_loss(sub) -> None:
    p = sub.add_parser(
        "accept-loss",
        help="let this host attach a LUN another host reports a stale copy of, accepting that host's writes are lost",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", metavar="lunN@TARGET")
    p.add_argument("--host", required=True, help="the host whose stale report is accepted (its `host` label)")
    p.add_argument(
        "--yes-discard-writes-on-that-host",
        dest="confirmed",
        action="store_true",
        help="yes: the writes only that host's local leg has are lost for this LUN",
    )
    p.set_defaults(run=run_accept_loss)


def run_accept_loss(args: argparse.Namespace) -> int:
    spec = parse_spec(args.spec)
    if spec.target is None or spec.target.startswith("MISSING"):
        raise InputError(f"{args.spec!r}: give the LUN as lunN@TARGET")
    paths = host_paths(args)
    config = load_config(paths.config)
    if not config.cluster.configured:
        raise InputError(
            f"the cross-host guard is off (no [cluster] prometheus_url in {paths.config}): nothing to accept"
        )
    lun = f"lun{spec.lun}@{spec.target}"
    reports = [
        r
        for r in ClusterGuard(config.cluster).stale_elsewhere(spec.target, spec.lun).reports
        if r.host == args.host
    ]
    if not reports:
        print(f"host {args.host} reports no stale copy of {lun} (to Prometheus): nothing to accept")
        return 0
    for r in reports:
        print(f"{lun}: {r.describe()}.")
    print(f"accepting means: every write {args.host} made to its local leg since then is lost for {lun}")
    if not args.confirmed:
        raise InputError(
            "nothing done: accepting the loss needs --yes-discard-writes-on-that-host "
            f"(or keep the writes: heal or 'iscsimple resolve LABEL --keep local' on {args.host})"
        )
    store = Acceptances(paths)
    for r in reports:
        if r.since is None:
            raise OperationError(f"host {args.host}'s report of {r.label} has no time; cannot accept it")
        path = store.put(Acceptance(args.host, spec.target, spec.lun, r.since, r.label, time.time()))
        print(
            f"accepted ({path}); attach {lun} on this host now. On {args.host}, once it is back and the VM "
            f"runs here, discard its copy: 'iscsimple resolve {r.label} --keep iscsi --yes-discard-local-writes'"
        )
    return 0
