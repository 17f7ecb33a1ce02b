"""`iscsimple status`: the host's attachments as a table or JSON, rendered from one HostSnapshot.

Nothing is derived here that core.snapshot already derives (local_only, leg states,
sync progress): the CLI and the agent must never disagree. This module only turns the
snapshot into rows and words, plus the replacement timeout the config asks for (the
hotplug's rule, hotplug.session.replacement_timeout) beside the one the kernel uses.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from iscsimple.core.config import Config
from iscsimple.core.iscsi import IscsiSession
from iscsimple.core.registry import Attachment, vm_name
from iscsimple.core.snapshot import ArrayView, HostSnapshot, LegView, PlainView
from iscsimple.hotplug.session import replacement_timeout

# The package ships the runbooks here; from a checkout they are under docs/.
INSTALLED_RUNBOOKS = Path("/usr/share/doc/iscsimple/runbooks")
RUNBOOKS = str(INSTALLED_RUNBOOKS) if INSTALLED_RUNBOOKS.is_dir() else "docs/runbooks"


@dataclass(frozen=True)
class LegRow:
    device: str | None
    state: str  # LEG_STATES, or "none" for a leg left out on purpose (MISSING)
    write_mostly: bool
    configured: bool
    errors: int | None


@dataclass(frozen=True)
class SessionRow:
    target: str | None
    portal: str | None
    state: str | None  # LOGGED_IN | FAILED | FREE; None: expected but gone
    lun_state: str | None
    replacement_timeout: int | None  # what the kernel uses now (recovery_tmo)
    replacement_timeout_configured: int | None  # what the config asks for, given who uses the target


@dataclass(frozen=True)
class DiskRow:
    """One attachment: a mirror (label set) or a plain LUN handed to Xen."""

    id: str
    vm: str
    domain_id: int | None
    vbd: str | None
    spec: str
    label: str | None
    state: str  # registry state: attaching | attached | detaching
    device: str | None  # what Xen gets
    md_device: str | None
    running: bool
    iscsi: LegRow
    local: LegRow | None
    sync_action: str | None
    sync_ratio: float | None
    sync_remaining_seconds: float | None
    session: SessionRow
    syncing: bool = False  # a resync or recovery runs (the snapshot's ArrayView.syncing)
    local_only: bool = False
    unprotected: bool = False
    recovery_stopped: bool = False
    no_good_leg: bool = False
    write_mostly_wrong: bool = False
    stale_since: float | None = None
    stale: str | None = None  # the record in words

    @property
    def flags(self) -> list[str]:
        flags = []
        if self.label is not None and not self.running:
            flags.append("NOT-RUNNING")
        for on, name in (
            (self.no_good_leg, "NO-GOOD-LEG"),
            (self.local_only, "LOCAL-ONLY"),
            (self.stale_since is not None, "ISCSI-STALE"),
            (self.unprotected and not self.no_good_leg, "UNPROTECTED"),
            (self.recovery_stopped, "RECOVERY-STOPPED"),
            (self.write_mostly_wrong, "WRITE-MOSTLY-WRONG"),
        ):
            if on:
                flags.append(name)
        if self.label is None and self.iscsi.state != "in_sync":
            flags.append("ISCSI-DOWN")
        if self.state != "attached":
            flags.append(self.state.upper())
        return flags


@dataclass(frozen=True)
class StaleRow:
    """A stale-copy record whose LABEL no attached disk uses (the VM is stopped or gone)."""

    label: str
    since: float
    vm: str | None
    target: str | None
    lun: int | None
    text: str


@dataclass(frozen=True)
class Status:
    taken: float
    disks: tuple[DiskRow, ...]
    errors: tuple[str, ...]  # sources that could not be read
    stale: tuple[StaleRow, ...] = ()  # records of labels not attached now


def build_status(snapshot: HostSnapshot, config: Config) -> Status:
    arrays = {a.attachment.id: a for a in snapshot.arrays}
    plain = {p.attachment.id: p for p in snapshot.plain}
    users: dict[str, list[Attachment]] = {}
    for a in snapshot.attachments:
        if a.target:
            users.setdefault(a.target, []).append(a)
    wanted_by_target = {t: replacement_timeout(config, t, us)[0] for t, us in users.items()}
    rows = []
    for a in sorted(snapshot.attachments, key=lambda a: (_vm(a), a.vbd or "", a.label or "", a.id)):
        wanted = wanted_by_target.get(a.target) if a.target else None
        if a.id in arrays:
            rows.append(_array_row(arrays[a.id], wanted))
        elif a.id in plain:
            rows.append(_plain_row(plain[a.id], wanted))
    errors = tuple(e for source in snapshot.sources.values() for e in source.errors)
    attached = {a.label for a in snapshot.attachments if a.label}
    stale = tuple(
        StaleRow(r.label, r.since, r.domain_name, r.target, r.lun, r.describe())
        for r in sorted(snapshot.stale, key=lambda r: r.label)
        if r.label not in attached
    )
    return Status(snapshot.taken, tuple(rows), errors, stale)


def _vm(a: Attachment) -> str:
    return vm_name(a.domain_name, a.domain_id, unknown="-")


def _leg(leg: LegView) -> LegRow:
    state = leg.state if leg.configured else "none"
    return LegRow(leg.device, state, leg.write_mostly, leg.configured, leg.errors)


def _session(target: str | None, session: IscsiSession | None, lun: int, wanted: int | None) -> SessionRow:
    scsi = session.lun(lun) if session else None
    return SessionRow(
        target=target,
        portal=session.portal if session else None,
        state=session.state if session else None,
        lun_state=scsi.state if scsi else None,
        replacement_timeout=session.recovery_tmo if session else None,
        replacement_timeout_configured=wanted,
    )


def _attachment_fields(a: Attachment) -> dict:
    """The columns every disk row takes from its registry entry."""
    return dict(
        id=a.id, vm=_vm(a), domain_id=a.domain_id, vbd=a.vbd, spec=a.spec, state=a.state, device=a.device_path
    )


def _array_row(view: ArrayView, wanted: int | None) -> DiskRow:
    a = view.attachment
    return DiskRow(
        **_attachment_fields(a),
        label=a.label,
        md_device=view.md.name if view.md else a.md_device,
        running=view.md is not None,
        iscsi=_leg(view.iscsi),
        local=_leg(view.local),
        sync_action=view.sync_action,
        syncing=view.syncing,
        sync_ratio=view.sync_completed_ratio if view.md else None,
        sync_remaining_seconds=view.sync_remaining_seconds if view.md else None,
        session=_session(a.target, view.session, a.lun, wanted),
        local_only=view.local_only,
        unprotected=view.unprotected,
        recovery_stopped=view.recovery_stopped,
        no_good_leg=view.no_good_leg,
        write_mostly_wrong=view.write_mostly_wrong,
        stale_since=view.stale.since if view.stale else None,
        stale=view.stale.describe() if view.stale else None,
    )


def _plain_row(view: PlainView, wanted: int | None) -> DiskRow:
    a = view.attachment
    return DiskRow(
        **_attachment_fields(a),
        label=None,
        md_device=None,
        running=view.present,
        iscsi=LegRow(view.device, view.state, False, True, None),
        local=None,
        sync_action=None,
        sync_ratio=None,
        sync_remaining_seconds=None,
        session=_session(a.target, view.session, a.lun, wanted),
    )


# --- rendering -----------------------------------------------------------------------------------

HEADER = ("VM", "VBD", "LABEL", "MD", "ISCSI LEG", "LOCAL LEG", "SYNC", "SESSION", "TIMEOUT", "FLAGS")


def _leg_cell(leg: LegRow | None) -> str:
    if leg is None:
        return "-"
    if not leg.configured:
        return "none (MISSING)"
    text = f"{leg.device or '?'} {leg.state}"
    return text + " wm" if leg.write_mostly else text


def _sync_cell(row: DiskRow) -> str:
    if row.sync_ratio is None:
        return "-"
    if not row.syncing and row.sync_ratio < 1:
        return "degraded"  # idle with a slot empty or failed: nothing is copying
    text = f"{row.sync_ratio * 100:.1f}%" if row.sync_ratio < 1 else "100%"
    if row.syncing:
        text += f" {row.sync_action}"
        if row.sync_remaining_seconds:
            text += f" ~{_duration(row.sync_remaining_seconds)}"
    return text


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _session_cell(s: SessionRow) -> str:
    if s.target is None:
        return "none (MISSING)"
    if s.state is None:
        return "GONE"
    return s.state if s.lun_state in (None, "running") else f"{s.state} lun {s.lun_state}"


def _timeout_cell(s: SessionRow) -> str:
    if s.target is None:
        return "-"
    now = "-" if s.replacement_timeout is None else f"{s.replacement_timeout}s"
    want = s.replacement_timeout_configured
    if want is not None and s.replacement_timeout is not None and want != s.replacement_timeout:
        return f"{now} (config {want}s)"
    return now


def render_table(status: Status) -> str:
    if not status.disks:
        text = "no iscsimple disks are attached on this host\n"
        if status.stale:
            text += f"{len(status.stale)} LABEL(s) hold writes their iSCSI copy lacks:\n"
    else:
        rows = [HEADER] + [
            (
                row.vm,
                row.vbd or "-",
                row.label or "-",
                row.md_device or "-",
                _leg_cell(row.iscsi),
                _leg_cell(row.local),
                _sync_cell(row),
                _session_cell(row.session),
                _timeout_cell(row.session),
                ",".join(row.flags) or "ok",
            )
            for row in status.disks
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        text = "".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows
        )
    notes = [note for row in status.disks for note in _notes(row)]
    notes += [
        f"{r.label}: {r.text}; attaching it here is refused and elsewhere would lose those writes: "
        f"run 'iscsimple resolve {r.label} --keep local' on this host first — see {RUNBOOKS}/IscsimpleArrayIscsiStale.md"
        for r in status.stale
    ]
    if notes:
        text += "\n" + "".join(f"{n}\n" for n in notes)
    return text


def _notes(row: DiskRow) -> list[str]:
    """What a flagged disk means and what to do, one sentence each."""
    name = f"{row.vm} {row.label or row.spec}"
    notes = []
    if row.no_good_leg:
        notes.append(
            f"{name}: neither leg can serve I/O; the VM's disk is failing — see {RUNBOOKS}/IscsimpleArrayBothLegsGone.md"
        )
    elif row.local_only:
        notes.append(
            f"{name}: runs on its local leg alone and the iSCSI copy is going stale; do not migrate, stop or "
            f"move this VM until the mirror is healed — see {RUNBOOKS}/IscsimpleArrayLocalOnly.md"
        )
    if row.stale is not None:
        notes.append(
            f"{name}: {row.stale}; do not start this VM on another host — see {RUNBOOKS}/IscsimpleArrayIscsiStale.md"
        )
        notes.append(f"{name}: heal: {_heal_progress(row)}")
    if row.recovery_stopped and row.running:
        notes.append(
            f"{name}: the local leg is an idle spare: its recovery from iSCSI stopped (an iSCSI outage cut it) "
            "and md does not restart it; the VM depends on iSCSI alone until the agent resumes it (once the "
            f"session is back and stable) or it is re-added by hand — see {RUNBOOKS}/IscsimpleArrayUnprotected.md"
        )
    elif row.unprotected and not row.no_good_leg and row.running:
        why = "is still recovering" if row.local and row.local.state == "recovering" else "is not in sync"
        if row.local and not row.local.configured:
            why = "was left out (MISSING)"
        notes.append(f"{name}: the local leg {why}; the VM depends on iSCSI alone until it is in sync")
    if row.label is None and row.iscsi.state != "in_sync":
        state = row.session.state or "gone"
        notes.append(
            f"{name}: unmirrored and its iSCSI session is {state}; the VM's I/O waits for the target "
            f"(up to {row.session.replacement_timeout or '?'} s), then fails — see {RUNBOOKS}/IscsimpleIscsiSessionDown.md"
        )
    timeout = row.session
    if (
        timeout.replacement_timeout is not None
        and timeout.replacement_timeout_configured is not None
        and timeout.replacement_timeout != timeout.replacement_timeout_configured
    ):
        notes.append(
            f"{name}: the session to {timeout.target} queues I/O for {timeout.replacement_timeout} s on an "
            f"outage (TIMEOUT column), the config asks for {timeout.replacement_timeout_configured} s: it is "
            "set at login and when an attach or detach changes the target's disks, and the session was "
            "logged in with another value (by hand or an older config); the next such change applies it"
        )
    if row.label is not None and not row.running:
        notes.append(
            f"{name}: the registry lists it but no md array is running; run 'iscsimple detach {row.spec}' to clean up"
        )
    return notes


def _heal_progress(row: DiskRow) -> str:
    """Where the heal of a stale iSCSI copy stands, as far as the host shows it (the agent's own
    attempts and back-off are in its log and iscsimple_heal_operations_total)."""
    iscsi = row.iscsi.state
    if not row.running:
        return (
            f"the VM is stopped; run 'iscsimple resolve {row.label} --keep local' to rebuild the iSCSI copy"
        )
    if iscsi in ("recovering", "spare"):
        done = "" if row.sync_ratio is None else f" {row.sync_ratio * 100:.0f}% done"
        left = (
            "" if row.sync_remaining_seconds is None else f", about {row.sync_remaining_seconds:.0f} s left"
        )
        return f"the iSCSI copy is being rebuilt from the local leg,{done}{left}; the record is cleared when it is in sync"
    if iscsi == "in_sync":
        return "both legs are in sync; the agent clears the record on its next refresh"
    if row.session.state != "LOGGED_IN":
        return f"waiting for the iSCSI session (now {row.session.state or 'gone'}); the agent re-adds the leg once it is back"
    return (
        f"the session is back and the iSCSI leg is {iscsi}: the agent re-adds it after [heal] stable_seconds "
        "(if heal is enabled); its log and iscsimple_heal_operations_total say what it tried"
    )


def render_json(status: Status) -> str:
    data = {
        "taken": status.taken,
        "taken_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(status.taken)),
        "disks": [asdict(row) | {"flags": row.flags} for row in status.disks],
        "errors": list(status.errors),
        "stale": [asdict(r) for r in status.stale],
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
