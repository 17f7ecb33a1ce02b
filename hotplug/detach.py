"""remove / `iscsimple detach`: undo an attachment, whatever state it is in.

Idempotent and safe after a half-done add or a crash: the registry entry (written
before an add does anything) says what may exist; sysfs says what does. Nothing
here reads a block device, and every command is bounded, so a dead target cannot
make remove hang: `mdadm --stop` and `iscsiadm --logout` get a timeout each.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from iscsimple.core.config import Config
from iscsimple.core.errors import OperationError, StateFileError
from iscsimple.core.locking import hotplug_lock, label_lock_name, target_lock_name
from iscsimple.core.md import md_kernel_names, md_path
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import STATE_DETACHING, Attachment, Registry
from iscsimple.core.run import Deadline
from iscsimple.core.safety import record_if_stale

from . import bitmaps, mdadm, session
from .devices import md_array_state, wait_for_md_gone
from .xen import XenContext

log = logging.getLogger(__name__)


def detach(
    attachment_id: str,
    paths: HostPaths,
    config: Config,
    *,
    xen: XenContext | None = None,
    deadline: Deadline | None = None,
    operation: str = "detach",
) -> Attachment | None:
    """Undo attachment `attachment_id`. Returns what was detached, None if nothing was attached."""
    deadline = deadline or Deadline(config.attach_budget)
    registry = Registry(paths)
    with registry.timed_operation(operation):
        return _detach(attachment_id, paths, config, registry, deadline)


def _detach(
    attachment_id: str, paths: HostPaths, config: Config, registry: Registry, deadline: Deadline
) -> Attachment | None:
    try:
        attachment = registry.get(attachment_id)
    except StateFileError as e:
        raise StateFileError(
            f"cannot detach {attachment_id}: {e}; what it attached is unknown and stays as it is ('iscsimple "
            "status' lists what runs): stop its mirror and log out by hand, then remove that file"
        ) from None
    if attachment is None:
        log.info("nothing is attached as %s: nothing to undo", attachment_id)
        return None
    with ExitStack() as locks:
        if attachment.label:
            locks.enter_context(hotplug_lock(paths.locks, label_lock_name(attachment.label), deadline))
            attachment = registry.get(attachment_id)  # as it is now that we own the label
            if attachment is None:
                return None
        undo(attachment, paths, config, registry, deadline)
    log.info("detached %s (%s)", attachment.id, attachment.spec)
    return attachment


def undo(
    attachment: Attachment, paths: HostPaths, config: Config, registry: Registry, deadline: Deadline
) -> None:
    """Stop the array, drop the registry entry, log out if last. Hold the label lock."""
    attachment = registry.put(replace(attachment, state=STATE_DETACHING))
    if attachment.label:
        record_stale_copy(paths, attachment)
        stop_array(paths, attachment, deadline)
    if attachment.target:
        with hotplug_lock(paths.locks, target_lock_name(attachment.target), deadline):
            try:
                session.release(paths, config, registry, attachment, deadline)
            except OperationError as e:
                raise OperationError(
                    f"{attachment.spec} is detached, but logging out of {attachment.target} failed: {e}; "
                    f"log out by hand once it answers: iscsiadm -m node -T {attachment.target} --logout"
                ) from None
    else:
        registry.remove(attachment.id)


def stop_array(paths: HostPaths, attachment: Attachment, deadline: Deadline) -> None:
    """Stop LABEL's array if it runs. The entry (kept on failure) lets a retry finish the job."""
    label = attachment.label
    assert label is not None
    names = md_kernel_names(paths, label)
    if (
        attachment.md_device
        and attachment.md_device not in names
        and md_array_state(paths, attachment.md_device)
    ):
        names.append(attachment.md_device)
    link = md_path(paths, label)
    for name in names:
        state = md_array_state(paths, name)
        if state is None or state == "clear":  # gone, or an empty md node: nothing to stop
            continue
        target = str(link) if _points_to(link, name) else str(paths.devfs / name)
        try:
            mdadm.stop(target, deadline)
        except OperationError as e:
            raise OperationError(
                f"cannot stop the array of {label} ({name}): {e}; the disk stays attached, "
                "retry remove (or iscsimple detach) once nothing uses it"
            ) from None
        log.info("stopped %s (%s)", target, name)
        wait_for_md_gone(paths, name, deadline)
    bitmaps.forget(paths, label)


def record_stale_copy(paths: HostPaths, attachment: Attachment) -> None:
    """Data safety (docs/data-safety.md): before the array stops, record a stale iSCSI copy.

    The agent normally wrote the record already; this covers an agent that is not
    running. Once stopped, nobody can tell which leg was newer. Never fails a remove.
    """
    label = attachment.label
    assert label is not None
    try:
        for name in md_kernel_names(paths, label) or [attachment.md_device]:
            record = record_if_stale(paths, attachment, name)
            if record is not None:
                log.warning(
                    "%s; the next attach of %s is refused until it is resolved", record.describe(), label
                )
                return
    except Exception as e:  # a remove must still stop the array
        log.error("could not check whether the iSCSI copy of %s is stale: %s", label, e)


def _points_to(link: Path, name: str) -> bool:
    return os.path.lexists(link) and os.path.basename(os.path.realpath(link)) == name
