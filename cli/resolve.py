"""`iscsimple resolve LABEL --keep local|iscsi`: settle a mirror whose iSCSI copy is stale.

What each choice does is DESCRIPTION below (the operator's `--help`). Internally: the
record is core.stale's; a running array is healed with core.safety.plan_heal (the agent's
checks); a stopped one is built with hotplug's session and mdadm wrappers.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from iscsimple.core.bitmap import choose_route
from iscsimple.core.cluster import check_before_writing_lun
from iscsimple.core.config import Config, load_config
from iscsimple.core.errors import InputError, OperationError
from iscsimple.core.heal import CHANGED, execute_heal
from iscsimple.core.md import md_path
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import LEG_LOCAL, Registry
from iscsimple.core.run import Deadline, run
from iscsimple.core.safety import HealBlocked, plan_heal, recovery_complete
from iscsimple.core.snapshot import ArrayView, HostSnapshot
from iscsimple.core.spec import check_label, parse_spec
from iscsimple.core.stale import StaleRecord, StaleRecords
from iscsimple.core.tab import read_tab
from iscsimple.hotplug import mdadm
from iscsimple.hotplug.attach import attach
from iscsimple.hotplug.detach import detach
from iscsimple.hotplug.devices import active_md_array

from .options import host_paths, seconds_option

log = logging.getLogger(__name__)

POLL = 1.0

Out = Callable[[str], None]

DESCRIPTION = """\
While a stale-copy record stands for LABEL, every attach of LABEL is refused: building
the mirror from iSCSI would overwrite the writes only the local leg has. You decide
which copy wins (see /usr/share/doc/iscsimple/data-safety.md):

--keep local   The local copy is the source. If LABEL's array runs (the VM runs),
               the stale iSCSI leg is failed, removed and added back write-mostly,
               with the same checks as the agent's heal. If it does not run: log in,
               find the LUN by target and LUN, then
                   mdadm --build /dev/md/LABEL --level=1 --raid-devices=2 LOCAL missing
                   mdadm /dev/md/LABEL --add --write-mostly ISCSI_DEV
               so the iSCSI copy recovers from the local leg. When it is in sync the
               record is cleared (here with --wait, or by the agent) and the array
               resolve built is stopped, so the VM's normal attach can run.
--keep iscsi   Discard the local writes: clear the record so the next attach rebuilds
               the local leg from iSCSI. Only with --yes-discard-local-writes, and
               never while the array runs.

Both print what they will do first; --dry-run stops there."""


def resolve_attachment_id(label: str) -> str:
    """The registry id of the array `resolve --keep local` builds (the same as `iscsimple attach` uses)."""
    return f"cli-{label}"


class Resolver:
    def __init__(
        self,
        paths: HostPaths,
        config: Config,
        *,
        out: Out = print,
        runner=run,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.paths = paths
        self.config = config
        self.out = out
        self.runner = runner
        self.sleep = sleep
        self.clock = clock
        self.records = StaleRecords(paths)
        self.registry = Registry(paths)

    # -- --keep iscsi --------------------------------------------------------------------------

    def keep_iscsi(self, label: str, *, confirmed: bool, dry_run: bool) -> int:
        record = self.records.get(label)
        if record is None:
            self.out(f"{label}: no stale-copy record; nothing to resolve")
            return 0
        running = active_md_array(self.paths, label)
        if running:
            raise OperationError(
                f"/dev/md/{label} ({running}) is running: its VM writes to the local leg now, and keeping the "
                "iSCSI copy would throw those writes away too; stop the VM first, or use --keep local"
            )
        self.out(f"{label}: {record.describe()}.")
        self.out(
            f"will: discard those writes: clear the record ({self.records.path(label)}); the next attach "
            f"rebuilds the local leg {self._local_device(label, record)} from the iSCSI copy "
            f"({_lun_words(record)}), overwriting it"
        )
        if dry_run:
            self.out("dry run: nothing done")
            return 0
        if not confirmed:
            raise InputError(
                "nothing done: discarding the local writes needs --yes-discard-local-writes "
                f"(or keep them: iscsimple resolve {label} --keep local)"
            )
        with self.registry.timed_operation("resolve"):
            self.records.clear(label)
        log.warning("%s: stale record cleared by the operator, local writes since it are discarded", label)
        self.out(f"{label}: record cleared; start the VM: its attach rebuilds the local leg from iSCSI")
        return 0

    # -- --keep local --------------------------------------------------------------------------

    def keep_local(self, label: str, *, dry_run: bool, wait: float) -> int:
        record = self.records.get(label)
        if record is None:
            self.out(f"{label}: no stale-copy record; nothing to resolve")
            return self._stop_resolved_array(label)
        self.out(f"{label}: {record.describe()}.")
        if record.unreadable:
            record = self._details_of_unreadable(label, record)
        if record.target is None:
            self.out("the mirror has no iSCSI leg: nothing to rebuild; the record is cleared")
            if not dry_run:
                self.records.clear(label)
            return 0
        self._refuse_lun_in_use_elsewhere(record)
        running = active_md_array(self.paths, label)
        if running:
            started = self._heal_running(label, running, dry_run)
        else:
            started = self._build_from_local(label, record, dry_run)
        if dry_run or not started:
            return 0
        return self._wait_and_clear(label, wait)

    def _details_of_unreadable(self, label: str, record: StaleRecord) -> StaleRecord:
        """An unreadable record names no LUN (its target None is not "no iSCSI leg"): the running
        array's registry entry tells which; otherwise nothing is done and the record stands."""
        running = active_md_array(self.paths, label)
        view = self._view(label) if running else None
        if view is None or view.attachment.target is None:
            raise OperationError(
                f"refusing to resolve {label} with --keep local: its record cannot be read, so which LUN "
                f"holds the stale copy is unknown; nothing done, the record stands ({self.records.path(label)}). "
                f"Repair the file (target, lun) and run resolve again, or discard the local writes on purpose: "
                f"'iscsimple resolve {label} --keep iscsi --yes-discard-local-writes'"
            )
        return replace(record, target=view.attachment.target, lun=view.attachment.lun)

    def _refuse_lun_in_use_elsewhere(self, record: StaleRecord) -> None:
        """--keep local writes this host's local leg onto the LUN: never while another host uses it."""
        assert record.target is not None
        verdict = check_before_writing_lun(self.config.cluster, record.target, record.lun or 0)
        if not verdict.allowed:
            raise OperationError(f"refusing to resolve {record.label} with --keep local: {verdict.reason}")

    def _heal_running(self, label: str, running: str, dry_run: bool) -> bool:
        """LABEL's array runs (its VM runs): heal it now, whatever the agent's policy says."""
        view = self._view(label)
        if view is None:
            raise OperationError(
                f"/dev/md/{label} ({running}) runs but no registry entry describes it; stop it "
                f"(mdadm --stop /dev/md/{label}) once nothing uses it, then resolve again"
            )
        if recovery_complete(view):
            self.out("the iSCSI leg is in sync again already")
            return True
        plan = plan_heal(view, self.paths.sysfs, self.paths.devfs, enabled=True)
        if isinstance(plan, HealBlocked):
            if plan.reason == "in_progress":
                self.out("the iSCSI leg already recovers from the local leg")
                return True
            raise OperationError(f"cannot heal {label} now: {plan.detail}")
        # What the executor will run if nothing changes: partial only when proven (core.bitmap).
        shown = choose_route(self.paths, plan)
        self.out(f"will: {shown.describe()}:")
        for argv in shown.commands():
            self.out("  " + " ".join(argv))
        if dry_run:
            self.out("dry run: nothing done")
            return False
        with self.registry.timed_operation("resolve"):
            outcome = execute_heal(
                self.paths, view, plan, Deadline(self.config.attach_budget), runner=self.runner
            )
            if outcome.result == CHANGED:
                raise OperationError(f"{label} changed while we looked at it; run resolve again")
            if not outcome.started:
                raise OperationError(f"cannot heal {label}: {outcome.detail}")
        self.out(f"{outcome.plan.mode} heal started: {outcome.detail}")
        return True

    def _build_from_local(self, label: str, record: StaleRecord, dry_run: bool) -> bool:
        """Not running: build it with the local leg as the source, add the LUN write-mostly."""
        entry = read_tab(self.paths.tab).lookup(label)
        if entry.device is None:
            raise InputError(
                f"{entry.where} says the local leg of {label} is MISSING, but the newer data is on the "
                f"local device {record.local_device}: put it back into the tab file, then resolve again"
            )
        target, lun = record.target, record.lun if record.lun is not None else 0
        assert target is not None
        md = str(md_path(self.paths, label))
        spec = f"lun{lun}@{target}+{label}"
        self.out("will:")
        self.out(f"  use or log in to the session to {target}; find LUN {lun} by target and LUN (sysfs)")
        self.out(
            "  " + " ".join(mdadm.build_argv(md, None, entry.device)) + "   # the local copy is the source"
        )
        self.out(
            "  "
            + " ".join(mdadm.add_argv(md, "ISCSI_DEV", write_mostly=True))
            + "   # the iSCSI copy recovers from the local leg"
        )
        self.out(
            f"  when in sync: clear the record and stop {md} (iscsimple detach {spec}), so the VM can start"
        )
        if dry_run:
            self.out("dry run: nothing done")
            return False

        # The add's own steps, locks and rollback, with the local leg as the source.
        attachment = attach(
            parse_spec(spec),
            self.paths,
            self.config,
            attachment_id=resolve_attachment_id(label),
            operation="resolve",
            source=LEG_LOCAL,
        )
        attachment = self.registry.put(replace(attachment, domain_name=record.domain_name))
        self.out(
            f"{label}: {self.paths.devfs / str(attachment.iscsi_device)} added write-mostly; "
            "it recovers from the local leg"
        )
        return True

    # -- the end ---------------------------------------------------------------------------------

    def _wait_and_clear(self, label: str, wait: float) -> int:
        end = self.clock() + wait
        while True:
            view = self._view(label)
            if view is not None and recovery_complete(view):
                self.records.clear(label)
                log.warning("%s: iSCSI copy in sync with the local leg again; stale record cleared", label)
                self.out(f"{label}: in sync; record cleared")
                return self._stop_resolved_array(label)
            left = end - self.clock()
            if left <= 0:
                break
            self.sleep(min(POLL, left))
        ratio = f" ({view.sync_completed_ratio:.0%} done)" if view is not None else ""
        self.out(
            f"{label}: the iSCSI copy recovers from the local leg{ratio}; the record stands until it is in "
            f"sync (the agent clears it then). Wait here with 'iscsimple resolve {label} --keep local "
            "--wait SECONDS'; do not start the VM anywhere before"
        )
        return 0

    def _stop_resolved_array(self, label: str) -> int:
        """Stop the array resolve built once its job is done; a VM's own array is left alone."""
        attachment = self.registry.get(resolve_attachment_id(label))
        if attachment is None or attachment.source_leg != LEG_LOCAL:
            return 0
        view = self._view(label)
        if view is not None and view.md is not None and not recovery_complete(view):
            return 0
        detach(attachment.id, self.paths, self.config, operation="resolve")
        self.out(
            f"{label}: stopped {attachment.md_path}; start the VM now (its attach rebuilds the local leg from "
            "the iSCSI copy, which is complete again)"
        )
        return 0

    def _local_device(self, label: str, record: StaleRecord) -> str:
        """What the next attach overwrites: the tab's device now (the record says what it was)."""
        try:
            device = read_tab(self.paths.tab).lookup(label).device
        except InputError:
            device = None
        return device or record.local_device or "(no local leg)"

    def _view(self, label: str) -> ArrayView | None:
        return HostSnapshot.read(self.paths).array(label)


def _lun_words(record: StaleRecord) -> str:
    if record.target is None:  # an unreadable record names none ("LUN None of None" before)
        return "the LUN of the VM's disk spec: the record names none"
    return f"LUN {record.lun} of {record.target}"


# -- CLI ---------------------------------------------------------------------------------------------


def add_resolve(sub) -> None:
    p = sub.add_parser(
        "resolve",
        help="settle a mirror whose iSCSI copy is stale: keep the local writes, or discard them",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("label", metavar="LABEL")
    p.add_argument("--keep", choices=("local", "iscsi"), required=True, help="which copy wins")
    p.add_argument(
        "--yes-discard-local-writes",
        dest="confirmed",
        action="store_true",
        help="with --keep iscsi: yes, throw away every write only the local leg has",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")
    p.add_argument(
        "--wait",
        type=seconds_option,
        default=0.0,
        metavar="SECONDS",
        help="with --keep local: wait this long for the iSCSI copy to be in sync, then clear the record",
    )
    p.set_defaults(run=run_resolve)


def run_resolve(args: argparse.Namespace) -> int:
    if args.confirmed and args.keep != "iscsi":
        raise InputError("--yes-discard-local-writes goes with --keep iscsi only")
    check_label(args.label, InputError)
    paths = host_paths(args)
    resolver = Resolver(paths, load_config(paths.config))
    if args.keep == "iscsi":
        return resolver.keep_iscsi(args.label, confirmed=args.confirmed, dry_run=args.dry_run)
    return resolver.keep_local(args.label, dry_run=args.dry_run, wait=args.wait)
