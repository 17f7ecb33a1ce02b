"""Per array and per leg: the md side of every mirror iscsimple attached.

Only attachments in the registry are rendered (one per LABEL); arrays iscsimple
did not build are node_exporter's business.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric

from iscsimple.core.snapshot import LEG_STATES, SYNC_ACTIONS, ArrayView, HostSnapshot

from .base import Part, SnapshotCollector, add_one_hot, gauge

INFO_LABELS = ("label", "device", "domain", "vbd", "target", "lun", "iscsi_device", "local_device")


class ArraysCollector(SnapshotCollector):
    name = "arrays"
    sources = ("registry", "md", "iscsi")
    views = frozenset({"arrays"})

    def families(self, snapshot: HostSnapshot, part: Part) -> Iterable[Metric]:
        info = gauge(
            "iscsimple_array_info",
            "An iscsimple mirror: which VM (domain, vbd) uses which md device, iSCSI target/LUN and "
            "local device. Always 1; join on label to name the VM in alerts.",
            INFO_LABELS,
        )
        degraded = gauge(
            "iscsimple_array_degraded",
            "Legs missing or failed in the md array (kernel md/degraded). 0 means both legs hold the "
            "data; 1 means the VM runs on one copy only.",
            ["label"],
        )
        action = gauge(
            "iscsimple_array_sync_action",
            "What md is doing to the array (one-hot). 'recover' copies onto a leg that is not in sync "
            "yet; 'idle' with degraded > 0 means nothing is repairing the mirror.",
            ["label", "action"],
        )
        ratio = gauge(
            "iscsimple_array_sync_completed_ratio",
            "Fraction (0..1) done of the running resync/recovery; 1 when idle and in sync, 0 when idle "
            "and degraded. Not increasing while sync_action is not idle means the copy is stalled.",
            ["label"],
        )
        speed = gauge(
            "iscsimple_array_sync_speed_bytes_per_second",
            "Speed of the running resync/recovery in bytes per second (0 when idle).",
            ["label"],
        )
        remaining = gauge(
            "iscsimple_array_sync_remaining_seconds",
            "Estimated seconds until the running resync/recovery completes at its current speed; 0 when "
            "idle; NaN when a sync runs but makes no progress.",
            ["label"],
        )
        size = gauge("iscsimple_array_size_bytes", "Size of the md array in bytes.", ["label"])
        mismatch = gauge(
            "iscsimple_array_mismatch_sectors",
            "Sectors md's last check found different between the two legs (md/mismatch_cnt; md resets "
            "it when a check starts, and a check runs after a heal with [heal] check_after). Above 0 "
            "after a check: the copies differ.",
            ["label"],
        )
        leg_state = gauge(
            "iscsimple_leg_state",
            "State of one leg (one-hot). in_sync: holds current data; recovering: being copied onto; "
            "faulty: md stopped using it; missing: not in the array; spare: present but unused; "
            "blocked: md waits for it.",
            ["label", "leg", "state"],
        )
        write_mostly = gauge(
            "iscsimple_leg_write_mostly",
            "1 when md reads from this leg only if the other fails (sysfs dev-*/state write_mostly). "
            "Should be 1 for the iscsi leg and 0 for the local leg; otherwise VM reads cross the network.",
            ["label", "leg"],
        )
        errors = gauge(
            "iscsimple_leg_errors",
            "Read errors md corrected on this leg (dev-*/errors). A growing value means the device is "
            "failing even if md still uses it.",
            ["label", "leg"],
        )
        local_only = gauge(
            "iscsimple_array_local_only",
            "1 when the VM's I/O is served by its local leg alone because the iSCSI leg failed or its "
            "session is down: the VM is safe for now but its iSCSI copy is going stale. Do not migrate, "
            "stop or re-attach the VM elsewhere until the mirror is healed.",
            ["label", "domain"],
        )
        unprotected = gauge(
            "iscsimple_array_unprotected",
            "1 when the local leg is missing, faulty or not yet in sync: the VM depends on iSCSI alone "
            "and an iSCSI outage would stop its disk. Normal for a while after attach (recovery).",
            ["label", "domain"],
        )
        stopped = gauge(
            "iscsimple_array_recovery_stopped",
            "1 when the local leg waits as an idle spare and no recovery runs: its copy from iSCSI was cut "
            "(an iSCSI outage during it) and md does not restart it by itself. The VM depends on iSCSI "
            "alone; the agent resumes the copy once the session is back and stable "
            "(iscsimple_recovery_resumes_total).",
            ["label", "domain"],
        )
        for view in part.arrays:
            _render(view, info, degraded, action, ratio, speed, remaining, size, leg_state)
            label = view.label
            for leg in (view.iscsi, view.local):
                if leg.member is not None:
                    write_mostly.add_metric([label, leg.role], 1.0 if leg.write_mostly else 0.0)
                    errors.add_metric([label, leg.role], float(leg.errors or 0))
            local_only.add_metric([label, view.domain], 1.0 if view.local_only else 0.0)
            unprotected.add_metric([label, view.domain], 1.0 if view.unprotected else 0.0)
            stopped.add_metric([label, view.domain], 1.0 if view.recovery_stopped else 0.0)
            if view.md is not None and view.md.mismatch_sectors is not None:
                mismatch.add_metric([label], float(view.md.mismatch_sectors))
        return (
            info,
            degraded,
            action,
            ratio,
            speed,
            remaining,
            size,
            mismatch,
            leg_state,
            write_mostly,
            errors,
            local_only,
            unprotected,
            stopped,
        )


def _render(view: ArrayView, info, degraded, action, ratio, speed, remaining, size, leg_state) -> None:
    a = view.attachment
    label = view.label
    info.add_metric(
        [
            label,
            (view.md.name if view.md else a.md_device) or "",
            view.domain,
            a.vbd or "",
            a.target or "",
            str(a.lun),
            view.iscsi.device or "",
            a.local_device or "",
        ],
        1.0,
    )
    for leg in (view.iscsi, view.local):
        add_one_hot(leg_state, [label, leg.role], LEG_STATES, leg.state)
    md = view.md
    if md is None:
        return  # not running: only info and leg_state (missing) say so
    if md.degraded is not None:
        degraded.add_metric([label], float(md.degraded))
    add_one_hot(action, [label], SYNC_ACTIONS, view.sync_action)
    ratio.add_metric([label], view.sync_completed_ratio)
    speed.add_metric([label], view.sync_speed_bytes)
    left = view.sync_remaining_seconds
    remaining.add_metric([label], float("nan") if left is None else left)
    if md.size_bytes is not None:
        size.add_metric([label], float(md.size_bytes))
