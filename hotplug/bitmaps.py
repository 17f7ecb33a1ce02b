"""The hotplug's side of write-intent bitmaps (core/bitmap.py): build with one, forget it at stop.

The files live in RAM (core/bitmapstore.py: zram with ext4, made by the first build of a boot)
or, where that cannot be made, on the records directory's filesystem. A host without support
(mdadm >= 4.4, a kernel without bitmap files, bitmap files on a filesystem md cannot map) builds
exactly as before and says why once per boot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from iscsimple.core import bitmap as core_bitmap
from iscsimple.core import bitmapstore
from iscsimple.core.paths import HostPaths
from iscsimple.core.run import Deadline

from . import mdadm
from .devices import BlockDevice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildBitmap:
    file: Path
    chunk_bytes: int
    kmsg_seq: int | None  # the kernel log's last record before the build


def for_build(paths: HostPaths, label: str, deadline: Deadline) -> BuildBitmap | None:
    """The bitmap to build LABEL's mirror with, or None (no support: say so once per boot)."""
    fresh = not (paths.state / core_bitmap.SUPPORT_MEMO).exists()
    support = core_bitmap.cached_support(
        paths,
        lambda: core_bitmap.detect_support(
            paths, lambda: mdadm.version(deadline), lambda: bitmapstore.ensure(paths, deadline)
        ),
    )
    if not support.supported:
        if fresh:
            log.warning(
                "no write-intent bitmaps on this host (%s): every heal copies the whole disk", support.reason
            )
        return None
    if not fresh:  # a fresh probe has just ensured it; else one mountinfo read, remade if it went
        bitmapstore.ensure(paths, deadline)
    try:
        file = core_bitmap.prepare_file(paths, label)
    except OSError as e:
        log.error("cannot prepare the bitmap file of %s (%s): building it without one", label, e)
        return None
    return BuildBitmap(file, support.chunk_bytes, core_bitmap.kmsg_last_seq(paths))


def build(
    paths: HostPaths,
    md_path: str,
    iscsi_dev: str | None,
    local_dev: str | None,
    deadline: Deadline,
    bitmap: BuildBitmap | None,
) -> BuildBitmap | None:
    """mdadm --build, with the bitmap if any; if mdadm or the kernel refuses the bitmap (mdadm
    then stops what it started), remember that this host has no support and build without.
    Returns the bitmap in use."""
    if bitmap is not None:
        try:
            mdadm.build(md_path, iscsi_dev, local_dev, deadline, bitmap.file, bitmap.chunk_bytes)
            return bitmap
        except mdadm.MdadmError as e:
            if "bitmap" not in str(e).lower():
                raise
            core_bitmap.remember_support(paths, core_bitmap.BitmapSupport(False, str(e)))
            log.warning("%s: building without a write-intent bitmap; every heal copies the whole disk", e)
    mdadm.build(md_path, iscsi_dev, local_dev, deadline)
    return None


def note_built(
    paths: HostPaths,
    label: str,
    md_device: str,
    bitmap: BuildBitmap,
    local_device: str | None,
    iscsi_dev: BlockDevice | None,
    iscsi_source: bool,
) -> None:
    """`iscsi_source`: the array was built from the LUN (in sync from the start), not from the local leg."""
    try:
        core_bitmap.note_built(
            paths,
            label,
            md_device,
            bitmap.chunk_bytes,
            bitmap.kmsg_seq,
            local_device,
            iscsi_dev.name if iscsi_dev else None,
            iscsi_source,
        )
    except OSError as e:  # the mirror works; only its heals will copy everything
        log.error("cannot record the bitmap of %s: %s; its heals will copy the whole disk", label, e)


def forget(paths: HostPaths, label: str) -> None:
    try:
        core_bitmap.forget(paths, label)
    except OSError as e:
        log.error("cannot remove the bitmap file of %s: %s", label, e)
