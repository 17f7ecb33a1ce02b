"""Per iSCSI session and LUN of the targets the registry depends on."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric

from iscsimple.core.snapshot import SESSION_STATES, HostSnapshot

from .base import Part, SnapshotCollector, add_one_hot, gauge

# scsi_device_state names (drivers/scsi/scsi_sysfs.c) an operator is likely to see.
LUN_STATES = ("running", "blocked", "transport-offline", "offline", "created", "quiesce", "cancel", "deleted")


class IscsiCollector(SnapshotCollector):
    name = "iscsi"
    sources = ("registry", "iscsi")
    views = frozenset({"sessions"})

    def families(self, snapshot: HostSnapshot, part: Part) -> Iterable[Metric]:
        state = gauge(
            "iscsimple_iscsi_session_state",
            "State of the iSCSI session (one-hot). FAILED: the connection broke and the kernel queues "
            "I/O for up to recovery_tmo; FREE: it gave up and fails I/O (md will fail the iSCSI legs). "
            "All 0 when the session the registry expects does not exist.",
            ["target", "portal", "state"],
        )
        up = gauge(
            "iscsimple_iscsi_session_up",
            "1 when the session to a target used by an attached disk is LOGGED_IN; 0 when it is FAILED, "
            "FREE or gone. 0 for a target means every mirror on it runs on its local leg alone.",
            ["target", "portal"],
        )
        lun_state = gauge(
            "iscsimple_iscsi_lun_state",
            "SCSI device state of an iSCSI LUN (one-hot). running is normal; blocked: I/O queued while "
            "the session recovers; transport-offline: I/O fails.",
            ["target", "lun", "device", "state"],
        )
        for view in part.sessions:
            labels = [view.target, view.portal]
            add_one_hot(state, labels, SESSION_STATES, view.state)
            up.add_metric(labels, 1.0 if view.up else 0.0)
            if view.session is None:
                continue
            for lun in view.session.luns:
                add_one_hot(lun_state, [view.target, str(lun.lun), lun.block or ""], LUN_STATES, lun.state)
        return state, up, lun_state
