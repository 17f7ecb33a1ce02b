"""add / `iscsimple attach`: give Xen (or the operator) a disk for `[lunN@]TARGET[+LABEL]`.

Steps (README, "How attach works"):
1. session: reuse the target's session, else log in (node DB record; discovery
   through the configured portals only for a target the DB lacks), with the
   replacement timeout chosen for the LUNs it serves;
2. LUN N's disk from sysfs, by-path as a cross-check, waiting with a bound;
3. without LABEL that disk is the result; with LABEL check the local device, refuse
   a running /dev/md/LABEL, then `mdadm --build ... missing --write-mostly ISCSI` and
   `mdadm /dev/md/LABEL --add LOCAL` (the local leg recovers from iSCSI);
4. xenstore: physical-device, physical-device-path, hotplug-status=connected.

`resolve --keep local` runs the same steps with the local leg as the source:
`mdadm --build ... LOCAL missing`, then `--add --write-mostly ISCSI` (the LUN recovers
from the local leg).

The registry entry is written before anything happens on the host and updated as
each step completes, so a remove after a crash knows what may exist. On failure,
exactly what this add did is undone (and nothing is ever written to a device: the
only writes are md's own recovery onto the local leg, which is what an add is for).
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

from iscsimple.core.cluster import check_before_attach
from iscsimple.core.config import Config
from iscsimple.core.errors import InputError, IscsimpleError, OperationError, os_problem
from iscsimple.core.locking import hotplug_lock, label_lock_name, target_lock_name
from iscsimple.core.md import md_kernel_names, md_path
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import (
    LEG_ISCSI,
    LEG_LOCAL,
    STATE_ATTACHED,
    Attachment,
    OperationResult,
    Registry,
    vm_name,
)
from iscsimple.core.run import Deadline
from iscsimple.core.spec import DiskSpec
from iscsimple.core.stale import StaleRecords
from iscsimple.core.tab import TabEntry, read_tab

from . import bitmaps, iscsiadm, mdadm, session
from .detach import stop_array, undo
from .devices import (
    BlockDevice,
    active_md_array,
    check_local_device,
    holders,
    wait_for_lun,
    wait_for_md,
)
from .xen import XenContext

log = logging.getLogger(__name__)

# Kept back from the budget for undoing a failed add, so that failing still ends in time.
ROLLBACK_RESERVE = 8.0


class AttachError(OperationError):
    """An add failed; the message is the sentence for hotplug-error."""


class AttachInputError(InputError):
    """An add was refused for bad input (tab entry, spec); the message is the hotplug-error sentence."""


def cli_attachment_id(spec: DiskSpec) -> str:
    """Registry id of an attachment made with `iscsimple attach SPEC` (not by Xen)."""
    if spec.label:
        return f"cli-{spec.label}"
    return f"cli-lun{spec.lun}-{re.sub(r'[^A-Za-z0-9_.-]', '_', spec.target or '')}"


@dataclass
class _Done:
    """What this add changed on the host, for an exact rollback."""

    registered: bool = False
    login_attempted: bool = False
    portal: str | None = None  # of the login this add attempted
    logged_in: bool = False
    built: bool = False
    published: bool = False

    def attempt_login(self, portal: str) -> None:
        self.login_attempted, self.portal = True, portal


def attach(
    spec: DiskSpec,
    paths: HostPaths,
    config: Config,
    *,
    xen: XenContext | None = None,
    deadline: Deadline | None = None,
    attachment_id: str | None = None,
    operation: str = "attach",
    source: str = LEG_ISCSI,
) -> Attachment:
    """Attach `spec`; returns the registry entry (its `device_path` is what Xen gets).

    `source` is the leg the mirror is built from: LEG_ISCSI (the add: the local leg
    recovers from the LUN) or LEG_LOCAL (`resolve --keep local`: the array starts on
    the local device and the LUN, added write-mostly, recovers from it; a stale-copy
    record is then the reason, not an obstacle).

    Raises InputError (bad tab entry, both legs missing) or OperationError; either way
    nothing this call did is left behind, unless the message says cleanup failed.
    """
    deadline = deadline or Deadline(config.attach_budget)
    registry = Registry(paths)
    attachment_id = attachment_id or (xen.attachment_id if xen else cli_attachment_id(spec))
    started = time.monotonic()
    with registry.timed_operation(operation):
        try:
            run = _Add(spec, paths, config, registry, xen, deadline, attachment_id, source)
            return run.attach(started, operation)
        except (AttachError, AttachInputError):
            raise
        except IscsimpleError as e:  # refused before anything was done: nothing to undo
            raise _wrap(spec, e) from e


@dataclass
class _Add:
    """One add: what it was asked, and (`done`) what it changed on the host so far."""

    spec: DiskSpec
    paths: HostPaths
    config: Config
    registry: Registry
    xen: XenContext | None
    deadline: Deadline  # the whole add, rollback included
    attachment_id: str
    source: str
    entry: TabEntry | None = None
    done: _Done = field(default_factory=_Done)

    @property
    def local_dev(self) -> str | None:
        return self.entry.device if self.entry else None

    def attach(self, started: float, operation: str) -> Attachment:
        spec, paths, registry = self.spec, self.paths, self.registry
        self.entry = _tab_entry(spec, paths)
        self._check_legs()
        if self.source == LEG_ISCSI:  # building from the iSCSI copy: is it the newest one?
            _refuse_stale(spec, paths)
            _refuse_stale_elsewhere(spec, paths, self.config, registry)
        # Forward steps stop early enough for the rollback to finish within the budget.
        deadline = self.deadline
        forward = deadline.reserving(min(ROLLBACK_RESERVE, deadline.seconds / 4))

        with ExitStack() as locks:
            if spec.label:
                locks.enter_context(hotplug_lock(paths.locks, label_lock_name(spec.label), forward))
            _clear_leftover(self.attachment_id, spec, paths, self.config, registry, forward)
            if spec.label:
                _refuse_busy_label(spec.label, self.attachment_id, paths, registry)
                if self.local_dev:  # fail before logging in; the size is checked once the LUN is known
                    _check_local(self.local_dev, paths, None, self.entry)  # type: ignore[arg-type]

            attachment = _new_attachment(
                spec, self.attachment_id, self.local_dev, self.xen, paths, self.source
            )
            try:
                device = self._steps(forward, attachment)
                attachment = registry.get(self.attachment_id) or attachment
                result = OperationResult(operation, "success", time.monotonic() - started, time.time())
                attachment = registry.put(replace(attachment, state=STATE_ATTACHED, last=result))
                log.info("attached %s as %s (%s)", spec, device.path, device.name)
                return attachment
            except BaseException as e:
                problems = self._rollback()
                error = _wrap(spec, e)
                if problems:
                    error.args = (f"{error}; cleanup incomplete ({'; '.join(problems)}): run remove again",)
                log.error("%s", error)
                raise error from e

    def _check_legs(self) -> None:
        spec = self.spec
        if spec.label and spec.target is None and self.local_dev is None:
            raise InputError(
                f"both legs are MISSING (the spec's TARGET and {self.entry.where}); "  # type: ignore[union-attr]
                "a mirror needs at least one"
            )
        if self.source == LEG_LOCAL and (spec.label is None or spec.target is None or self.local_dev is None):
            raise InputError(
                f"{spec}: building from the local leg needs a LABEL, a TARGET and a local device"
            )

    def _steps(self, deadline: Deadline, attachment: Attachment) -> BlockDevice:
        spec, paths, registry, done = self.spec, self.paths, self.registry, self.done
        iscsi_dev: BlockDevice | None = None
        if spec.target is not None:
            with hotplug_lock(paths.locks, target_lock_name(spec.target), deadline):
                _refuse_busy_lun(spec, attachment.id, registry)
                # Registered under the target lock: a concurrent last remove sees us and stays logged in.
                attachment = registry.put(attachment)
                done.registered = True
                result = session.ensure(
                    paths,
                    self.config,
                    registry,
                    spec.target,
                    deadline,
                    before_login=done.attempt_login,
                )
            done.logged_in = result.logged_in
            attachment = registry.put(
                replace(
                    attachment,
                    portal=result.portal,
                    we_logged_in=result.logged_in,
                    replacement_timeout=result.replacement_timeout,
                )
            )
            found, iscsi_dev = wait_for_lun(
                paths,
                spec.target,
                spec.lun,
                self.config.device_wait,
                deadline,
                on_stall=None if result.logged_in else _rescanner(paths, spec.target, deadline),
            )
            attachment = registry.put(
                replace(attachment, iscsi_device=iscsi_dev.name, portal=found.portal or result.portal)
            )
            users = holders(paths, iscsi_dev.name)
            if users:
                raise OperationError(
                    f"LUN {spec.lun}'s disk {iscsi_dev.name} is in use by {', '.join(users)}, "
                    "which iscsimple did not set up; two users of one LUN would corrupt it"
                )
        else:
            attachment = registry.put(attachment)
            done.registered = True

        if spec.label is None:
            assert iscsi_dev is not None
            device = iscsi_dev
        else:
            device = self._build(spec.label, deadline, attachment, iscsi_dev)

        if self.xen is not None:
            done.published = True
            self.xen.publish(device, attachment.id)
        return device

    def _build(
        self, label: str, deadline: Deadline, attachment: Attachment, iscsi_dev: BlockDevice | None
    ) -> BlockDevice:
        paths, registry, local_dev = self.paths, self.registry, self.local_dev
        if local_dev is not None:
            min_size = iscsi_dev.size_bytes if iscsi_dev else None
            local = _check_local(local_dev, paths, min_size, self.entry)  # type: ignore[arg-type]
            attachment = registry.put(replace(attachment, local_kernel_name=local.name))
        running = active_md_array(paths, label)
        if running:
            raise OperationError(
                f"/dev/md/{label} ({running}) appeared while attaching; another tool built it"
            )
        path = str(md_path(paths, label))
        from_local = self.source == LEG_LOCAL or iscsi_dev is None
        mirrored = iscsi_dev is not None and local_dev is not None
        bitmap = bitmaps.for_build(paths, label, deadline) if mirrored else None
        self.done.built = True  # from here on an array may exist, even if mdadm fails or times out
        if from_local:
            bitmap = bitmaps.build(paths, path, None, local_dev, deadline, bitmap)
        else:
            bitmap = bitmaps.build(paths, path, iscsi_dev.path, None, deadline, bitmap)  # type: ignore[union-attr]
        md = wait_for_md(paths, label, deadline)
        attachment = registry.put(replace(attachment, md_device=md.name))
        if iscsi_dev is not None and local_dev is not None:
            if from_local:  # the LUN recovers from the local leg
                mdadm.add(path, iscsi_dev.path, deadline, write_mostly=True)
            else:  # the local leg recovers from the LUN
                mdadm.add(path, local_dev, deadline)
        if bitmap is not None:
            bitmaps.note_built(
                paths, label, md.name, bitmap, attachment.local_kernel_name, iscsi_dev, not from_local
            )
        return BlockDevice(path, md.name, md.major, md.minor, md.size_bytes)

    def _rollback(self) -> list[str]:
        """Undo what `done` says, within what is left of the budget. Returns what could not be undone."""
        spec, paths, registry, done, deadline = self.spec, self.paths, self.registry, self.done, self.deadline
        problems: list[str] = []
        if done.published and self.xen is not None:
            try:
                self.xen.unpublish()
            except IscsimpleError as e:
                problems.append(f"xenstore: {e}")
        attachment = registry.get(self.attachment_id)
        if attachment is None:
            return problems
        if done.built and spec.label and md_kernel_names(paths, spec.label):
            try:
                stop_array(paths, attachment, deadline)
            except IscsimpleError as e:
                problems.append(str(e))
                return problems  # the entry stays: the array still holds the LUN, remove must finish
        if not done.registered:
            return problems
        try:
            if spec.target is not None:
                with hotplug_lock(paths.locks, target_lock_name(spec.target), deadline):
                    logout = session.LOGOUT_ALWAYS if done.login_attempted else session.LOGOUT_NEVER
                    attachment = replace(attachment, portal=attachment.portal or done.portal)
                    session.release(paths, self.config, registry, attachment, deadline, logout=logout)
            else:
                registry.remove(self.attachment_id)
        except IscsimpleError as e:
            problems.append(str(e))
        return problems


def _rescanner(paths: HostPaths, target: str, deadline: Deadline):
    """For a shared session that predates the LUN: ask the target for new LUNs once."""

    def rescan() -> None:
        for s in session.target_sessions(paths, target):
            log.info("LUN not on session %d yet: rescanning", s.sid)
            iscsiadm.rescan(s.sid, deadline)

    return rescan


def _tab_entry(spec: DiskSpec, paths: HostPaths) -> TabEntry | None:
    if spec.label is None:
        return None
    return read_tab(paths.tab).lookup(spec.label)


def _check_local(device: str, paths: HostPaths, min_size: int | None, entry: TabEntry) -> BlockDevice:
    return check_local_device(device, paths, min_size, entry.where)


def _refuse_stale(spec: DiskSpec, paths: HostPaths) -> None:
    """Never build from an iSCSI copy the local leg has newer writes than (core.stale)."""
    if spec.label is None:
        return
    records = StaleRecords(paths)
    record = records.get(spec.label)
    if record is None:
        return
    if spec.target is None:
        log.warning(
            "%s has a stale-iSCSI record, but this mirror has no iSCSI leg: the local copy is the source",
            spec.label,
        )
        return
    raise OperationError(
        f"refusing to attach {spec.label}: {record.describe()}, and building the mirror from iSCSI would "
        f"overwrite them (record {records.path(spec.label)}); resolve it first with "
        f"'iscsimple resolve {spec.label} --keep local' (keep the local writes) or '--keep iscsi' (discard them)"
    )


def _refuse_stale_elsewhere(spec: DiskSpec, paths: HostPaths, config: Config, registry: Registry) -> None:
    """Never build from an iSCSI copy another host has newer writes than (core.cluster, via Prometheus)."""
    if spec.target is None or not config.cluster.configured:
        return
    verdict = check_before_attach(config.cluster, paths, spec.target, spec.lun)
    registry.record_operation("cluster_guard", verdict.outcome, verdict.seconds)
    if not verdict.allowed:
        raise OperationError(verdict.reason)


def _refuse_busy_label(label: str, attachment_id: str, paths: HostPaths, registry: Registry) -> None:
    other = registry.by_label(label)
    if other is not None and other.id != attachment_id:
        who = vm_name(other.domain_name, other.domain_id, unknown=other.id)
        raise OperationError(
            f"{label} is already attached ({who}, {other.id}, {other.state}); a mirror can serve one disk at a time: "
            "detach it there first"
        )
    running = active_md_array(paths, label)
    if running:
        raise OperationError(
            f"/dev/md/{label} is already running ({running}) but iscsimple did not attach it; "
            f"if nothing uses it, stop it with 'mdadm --stop /dev/md/{label}' and retry"
        )


def _refuse_busy_lun(spec: DiskSpec, attachment_id: str, registry: Registry) -> None:
    """One LUN, one disk: two VMs (or a mirror and a plain disk) writing it would corrupt it."""
    assert spec.target is not None
    for other in registry.using_target(spec.target, exclude=attachment_id):
        if other.lun == spec.lun:
            who = vm_name(other.domain_name, other.domain_id, unknown=other.id)
            raise OperationError(
                f"LUN {spec.lun} of {spec.target} is already attached ({who}, {other.id}, {other.spec}); "
                "two disks on one LUN would corrupt it: detach it there first"
            )


def _clear_leftover(
    attachment_id: str,
    spec: DiskSpec,
    paths: HostPaths,
    config: Config,
    registry: Registry,
    deadline: Deadline,
) -> None:
    """An entry for this very disk: attached already (refuse), or left by an add that died (undo it)."""
    leftover = registry.get(attachment_id)
    if leftover is None:
        return
    if leftover.state == STATE_ATTACHED:
        raise OperationError(f"{attachment_id} is already attached ({leftover.spec}); detach it first")
    if leftover.label and leftover.label != spec.label:
        # Its label's lock is not ours: leave it to a remove of that disk.
        raise OperationError(
            f"an unfinished attach of {leftover.spec} is registered as {attachment_id}; run remove for it first"
        )
    log.warning("undoing what an unfinished earlier attach of %s (%s) left", attachment_id, leftover.spec)
    undo(leftover, paths, config, registry, deadline)


def _new_attachment(
    spec: DiskSpec,
    attachment_id: str,
    local_dev: str | None,
    xen: XenContext | None,
    paths: HostPaths,
    source: str,
) -> Attachment:
    mirrored = spec.label is not None
    return Attachment(
        id=attachment_id,
        spec=str(spec),
        lun=spec.lun,
        target=spec.target,
        label=spec.label,
        local_device=local_dev,
        md_path=str(md_path(paths, spec.label)) if spec.label else None,
        write_mostly_leg=LEG_ISCSI if mirrored and spec.target and local_dev else None,
        source_leg=(source if spec.target else LEG_LOCAL) if mirrored else None,
        domain_id=xen.domain_id if xen else None,
        domain_name=xen.domain_name() if xen else None,
        vbd=xen.vbd() if xen else None,
        xenbus_path=xen.xenbus_path if xen else None,
    )


def _wrap(spec: DiskSpec, error: BaseException) -> AttachError | AttachInputError:
    message = _sentence(spec, error)
    return AttachInputError(message) if isinstance(error, InputError) else AttachError(message)


def _sentence(spec: DiskSpec, error: BaseException) -> str:
    if isinstance(error, IscsimpleError):
        return f"cannot attach {spec}: {error}"
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return f"cannot attach {spec}: interrupted"
    if isinstance(error, OSError):  # a file or directory of the host: say which and why
        return f"cannot attach {spec}: {os_problem(error)}"
    return f"cannot attach {spec}: internal error {type(error).__name__}: {error} (a bug: please report it)"
