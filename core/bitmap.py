"""Write-intent bitmaps for the metadata-less mirrors: heal in proportion to the outage.

Every mirror is built with an external bitmap file (`mdadm --build ... --bitmap=FILE`,
mdadm <= 4.3) on the local filesystem under the records directory, never on the array.
md sets a chunk's bit before it writes there and, while the array is degraded, never
clears it. When the iSCSI leg comes back, re-adding it in its old slot (`mdadm --re-add`
on a running array without a superblock: md's `re-add` state or ADD_NEW_DISK with
MD_DISK_SYNC) makes md copy only the dirty chunks.

The deadly case: a re-add without a bitmap that covers the whole outage copies
nothing and marks the stale leg in sync (checked on the real 6.1 kernel). So the
partial route is taken only when `prove_partial` can show every obligation in
docs/data-safety.md; anything unproven means the full copy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import re
import stat
import struct
import threading
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import bootmemo
from .atomic import remove_durably, write_atomic
from .bitmapstore import bitmap_dir, visible_mount
from .bootmemo import boot_id
from .errors import InputError, StateFileError
from .files import MAX_INPUT_BYTES, load_state_json, read_file
from .mdstat import mdstat_arrays, read_mdstat_arrays
from .paths import HostPaths
from .spec import check_label
from .sysfs import parse_int, write_attr

if TYPE_CHECKING:  # a run-time import would load safety and the snapshot into every hotplug start
    from .safety import HealPlan

log = logging.getLogger(__name__)

BITMAP_MAGIC = 0x6D746962  # "bitm", md-bitmap.h
SUPERBLOCK_BYTES = 256
BITMAP_STALE = 0x2  # md-bitmap.h: the state bit md sets in the file when it stops trusting it
# A heal copies every chunk an outage touched, whole: 4 MiB of scattered 4 KiB writes copy 64 MiB
# at 64 KiB chunks, 1 GiB at 1 MiB. Bigger chunks would not make writers cheaper where it costs:
# a random writer pays one synchronous bitmap-page write per write at any chunk size from 64 KiB
# to 4 MiB (md sets a clean chunk's bit before the write; bench/bitmap_cost.py, docs/benchmarks.md).
DEFAULT_CHUNK_BYTES = 64 << 10
SUPPORT_MEMO = "bitmap-support.json"  # in the state directory, per boot
# Filesystems where md can use a bitmap file (the kernel maps its blocks with bmap()).
BITMAP_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs"})
# mdadm 4.4 removed bitmap files ("mdadm: remove bitmap file support").
MDADM_LAST_WITH_FILES = (4, 3)
KICKED = re.compile(r"kicking failed bitmap file|disabling internal bitmap")
# What md logs when it stops using an array's bitmap (drivers/md/md-bitmap.c, md_bitmap_file_kick):
# "md127: kicking failed bitmap file /var/lib/iscsimple/bitmaps/vm1 from array!" (6.1 prints the
# whole path, later kernels its last four components) or "md127: disabling internal bitmap due to
# errors"; "mdX" when md could not name the array. md keeps "bitmap:" in /proc/mdstat after it.
KICK_RECORD = re.compile(
    r"^\s*(\S+): (?:kicking failed bitmap file .* from array!|disabling internal bitmap due to errors)"
)
UNNAMED_ARRAY = "mdX"


class BitmapFileError(InputError):
    pass


# -- the file -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BitmapFile:
    """An md bitmap file as md keeps it: header, then one bit per chunk (1 = may differ)."""

    chunk_bytes: int
    sync_sectors: int  # what the bitmap covers (the component size)
    chunks: int
    dirty: int
    state: int  # md's bitmap flags (bit 1: BITMAP_STALE)
    bits: int = 0  # bit i set: chunk i is dirty

    @property
    def dirty_bytes(self) -> int:
        return self.dirty * self.chunk_bytes

    def dirty_bytes_after(self, sector: int) -> int:
        """Dirty chunks at or beyond `sector` (what a running recovery still has to copy)."""
        first = sector * 512 // self.chunk_bytes
        return (self.bits >> first).bit_count() * self.chunk_bytes


def parse_bitmap(data: bytes, what: str = "bitmap file") -> BitmapFile:
    if len(data) < SUPERBLOCK_BYTES:
        raise BitmapFileError(f"{what}: {len(data)} bytes, shorter than a bitmap header")
    magic, version = struct.unpack_from("<II", data, 0)
    if magic != BITMAP_MAGIC:
        raise BitmapFileError(f"{what}: not an md bitmap (magic {magic:#x})")
    if version not in (3, 4):
        raise BitmapFileError(f"{what}: unknown bitmap version {version}")
    (sync_sectors,) = struct.unpack_from("<Q", data, 40)
    state, chunk = struct.unpack_from("<II", data, 48)
    if chunk < 512 or chunk & (chunk - 1):
        raise BitmapFileError(f"{what}: chunk size {chunk} is not a power of two")
    chunks = -(-sync_sectors * 512 // chunk)
    bits = data[SUPERBLOCK_BYTES : SUPERBLOCK_BYTES + (chunks + 7) // 8]
    if len(bits) * 8 < chunks:
        raise BitmapFileError(f"{what}: truncated ({chunks} chunks, {len(bits)} bytes of bits)")
    value = int.from_bytes(bits, "little") & ((1 << chunks) - 1)  # md's bit order: little-endian
    return BitmapFile(chunk, sync_sectors, chunks, value.bit_count(), state, value)


def read_bitmap_file(path: Path) -> BitmapFile:
    """Read what md last wrote. md writes the file's blocks directly, not through its page cache,
    so read with O_DIRECT (a cached earlier read would be stale); never follow a symlink."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: the filesystem has no O_DIRECT (tests on tmpfs)
            raise BitmapFileError(f"cannot read bitmap file {path}: {e.strerror or e}") from None
        fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BitmapFileError(f"bitmap file {path} is not a regular file")
        if st.st_size > 64 << 20:
            raise BitmapFileError(f"bitmap file {path} is implausibly large ({st.st_size} bytes)")
        length = max(4096, -(-st.st_size // 4096) * 4096)
        buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
        try:
            got = os.preadv(fd, [buf], 0)
            data = bytes(buf[:got])
        finally:
            buf.close()
    except OSError as e:
        raise BitmapFileError(f"cannot read bitmap file {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return parse_bitmap(data, f"bitmap file {path}")


def bitmap_path(paths: HostPaths, label: str) -> Path:
    check_label(label, ValueError)
    return bitmap_dir(paths) / label


# -- does this host support it? -------------------------------------------------------------------


@dataclass(frozen=True)
class BitmapSupport:
    supported: bool
    reason: str  # why not, or what was found
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


def detect_support(paths: HostPaths, mdadm_version, make_store=None) -> BitmapSupport:
    """A kernel with bitmap files, a bitmaps directory on a filesystem md can map, and an mdadm
    that builds with bitmap files. `make_store()`: puts the directory on the RAM store when it can
    (core.bitmapstore.ensure), asked once the kernel is known to have bitmap files.
    `mdadm_version()`: what `mdadm --version` printed (None: failed); asked last, so a host that
    fails the other checks runs no command."""
    kernel = _kernel_problem(paths)
    if kernel:
        return BitmapSupport(False, kernel)
    store = make_store() if make_store else None
    directory = bitmap_dir(paths)
    fs = filesystem_of(paths, directory)
    if fs not in BITMAP_FILESYSTEMS:
        return BitmapSupport(
            False,
            f"{directory} is on {fs or 'an unknown filesystem'}; md bitmap files need "
            + " or ".join(sorted(BITMAP_FILESYSTEMS)),
        )
    text = mdadm_version()
    found = re.search(r"v(\d+)\.(\d+)", text or "")
    if not found:
        return BitmapSupport(False, f"cannot tell mdadm's version from {text!r}")
    version = (int(found[1]), int(found[2]))
    if version > MDADM_LAST_WITH_FILES:
        return BitmapSupport(False, f"mdadm {version[0]}.{version[1]} has no bitmap files (removed in 4.4)")
    where = store.description if store else fs
    return BitmapSupport(True, f"mdadm {version[0]}.{version[1]}, bitmap files on {where}")


def _kernel_problem(paths: HostPaths) -> str | None:
    try:
        release = _small_text(paths.procfs / "sys" / "kernel" / "osrelease").strip()
    except OSError as e:
        return f"cannot read the kernel release: {e.strerror or e}"
    found = re.match(r"(\d+)\.(\d+)", release)
    if not found:
        return f"cannot parse the kernel release {release!r}"
    if (int(found[1]), int(found[2])) < (6, 6):
        return None  # bitmap files are always built in before CONFIG_MD_BITMAP_FILE (6.6)
    try:
        config = _small_text(paths.procfs.parent / "boot" / f"config-{release}", MAX_INPUT_BYTES)
    except OSError:
        return (
            f"kernel {release}: cannot tell whether CONFIG_MD_BITMAP_FILE is set (no /boot/config-{release})"
        )
    if "CONFIG_MD_BITMAP_FILE=y" not in config:
        return f"kernel {release} is built without CONFIG_MD_BITMAP_FILE"
    return None


def filesystem_of(paths: HostPaths, directory: Path) -> str | None:
    """The type of the filesystem a lookup of `directory` lands on (core.bitmapstore.visible_mount)."""
    mount = visible_mount(paths, directory)
    return mount.fstype if mount else None


def cached_support(paths: HostPaths, probe) -> BitmapSupport:
    """Detected once per boot (core.bootmemo); `probe()` detects."""
    data = bootmemo.recall(paths, SUPPORT_MEMO) or {}
    chunk, supported = data.get("chunk_bytes"), data.get("supported")
    chunk_ok = isinstance(chunk, int) and not isinstance(chunk, bool) and 4096 <= chunk <= 1 << 30
    if isinstance(supported, bool) and chunk_ok:
        return BitmapSupport(supported, str(data.get("reason", ""))[:200], chunk)
    support = probe()
    remember_support(paths, support)
    return support


def remember_support(paths: HostPaths, support: BitmapSupport) -> None:
    bootmemo.remember(paths, SUPPORT_MEMO, asdict(support))


# -- the instance record: what a partial heal must find unchanged ---------------------------------


@dataclass(frozen=True)
class BitmapInstance:
    """Written when a mirror is built with a bitmap (volatile, like the array): what identifies
    this array instance, its bitmap file and the LUN that was its in-sync iSCSI leg."""

    label: str
    md_device: str
    file: str
    file_inode: int
    file_dev: int
    file_ctime_ns: int  # md writes the file's blocks directly: nothing changes it while it runs
    chunk_bytes: int
    boot_id: str | None
    kmsg_seq: int | None  # last kernel log record before the bitmap was set up
    local_device: str | None  # kernel name of the local leg
    local_rdev_ino: int | None  # sysfs inode of md/dev-LOCAL: new for every array instance
    iscsi_wwid: str | None
    iscsi_size_bytes: int | None
    iscsi_source: bool  # the iSCSI leg was in sync in this instance (the array was built from it)


def instance_path(paths: HostPaths, label: str) -> Path:
    check_label(label, ValueError)
    return paths.state / "bitmaps" / f"{label}.json"


def write_instance(paths: HostPaths, instance: BitmapInstance) -> None:
    write_atomic(instance_path(paths, instance.label), json.dumps(asdict(instance)) + "\n", mode=0o600)


def read_instance(paths: HostPaths, label: str) -> BitmapInstance | None:
    """None when there is none; a corrupt record is an error (the caller then heals in full)."""
    path = instance_path(paths, label)
    try:
        data = load_state_json(path)
    except FileNotFoundError:
        return None
    except StateFileError as e:
        raise BitmapFileError(f"bitmap record of {label}: {e}") from None
    if not isinstance(data, dict):
        raise BitmapFileError(f"bitmap record of {label}: {path} holds no JSON object")
    names = {f.name for f in fields(BitmapInstance)}
    if not names <= set(data):
        raise BitmapFileError(f"bitmap record of {label}: {path}: missing fields {sorted(names - set(data))}")
    for f in fields(BitmapInstance):
        if not _has_type(data[f.name], f.type):
            raise BitmapFileError(f"bitmap record of {label}: {path}: {f.name} is not {f.type}")
    instance = BitmapInstance(**{k: data[k] for k in names})
    if instance.label != label or instance.file != str(bitmap_path(paths, label)):
        raise BitmapFileError(f"bitmap record of {label}: {path} names another array's bitmap file")
    return instance


_TYPES = {"str": str, "int": int, "bool": bool}


def _has_type(value: object, annotation: str) -> bool:
    """A JSON value against a BitmapInstance annotation such as 'int | None'."""
    options = [part.strip() for part in annotation.split("|")]
    if value is None:
        return "None" in options
    for name in options:
        kind = _TYPES.get(name)
        if kind is not None and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return True
    return False


def forget(paths: HostPaths, label: str) -> None:
    """At stop: the bitmap file and the record go with the array."""
    for path in (bitmap_path(paths, label), instance_path(paths, label)):
        with contextlib.suppress(FileNotFoundError):
            if path.is_symlink() or path.is_file():
                remove_durably(path)


def prepare_file(paths: HostPaths, label: str) -> Path:
    """A fresh start for mdadm: it reuses an existing file (with its old bits), so remove it."""
    path = bitmap_path(paths, label)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path.parent)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{path.parent} is not a directory")
    os.chmod(path.parent, 0o700)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return path


def note_built(
    paths: HostPaths,
    label: str,
    md_device: str,
    chunk_bytes: int,
    kmsg_seq: int | None,
    local_device: str | None,
    iscsi_device: str | None,
    iscsi_source: bool = True,
) -> BitmapInstance | None:
    """After the build with a bitmap (and the local leg's add): remember this instance."""
    path = bitmap_path(paths, label)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)
            st = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as e:
        log.error("bitmap file of %s: %s; heals of it will copy the whole disk", label, e)
        return None
    instance = BitmapInstance(
        label=label,
        md_device=md_device,
        file=str(path),
        file_inode=st.st_ino,
        file_dev=st.st_dev,
        file_ctime_ns=st.st_ctime_ns,
        chunk_bytes=chunk_bytes,
        boot_id=boot_id(paths),
        kmsg_seq=kmsg_seq,
        local_device=local_device,
        local_rdev_ino=_ino(paths.sysfs / "block" / md_device / "md" / f"dev-{local_device}")
        if local_device
        else None,
        iscsi_wwid=lun_wwid(paths, iscsi_device) if iscsi_device else None,
        iscsi_size_bytes=_size_bytes(paths, iscsi_device) if iscsi_device else None,
        iscsi_source=iscsi_source and iscsi_device is not None,
    )
    write_instance(paths, instance)
    return instance


def _ino(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def lun_wwid(paths: HostPaths, name: str) -> str | None:
    try:
        return _small_text(paths.sysfs / "block" / name / "device" / "wwid").strip() or None
    except OSError:
        return None


def rescan(paths: HostPaths, name: str) -> bool:
    """Make the SCSI layer re-read the device's identity (VPD pages) and capacity."""
    try:
        write_attr(paths.sysfs / "block" / name / "device" / "rescan", "1")
        return True
    except OSError as e:
        log.warning("cannot rescan %s: %s", name, e.strerror or e)
        return False


def _size_bytes(paths: HostPaths, name: str) -> int | None:
    try:
        return parse_int(_small_text(paths.sysfs / "block" / name / "size").strip()) * 512
    except (OSError, ValueError):
        return None


# -- the kernel log -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelLog:
    first_seq: int | None
    last_seq: int | None
    messages: tuple[tuple[int, str], ...]  # (seq, text)
    usecs: tuple[int, ...] = ()  # each message's time: microseconds since boot (CLOCK_MONOTONIC)


MAX_KMSG_BYTES = 64 * 1024 * 1024  # the kernel's ring buffer is at most 32 MiB (CONFIG_LOG_BUF_SHIFT=25)


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 20


def parse_kmsg_record(line: str) -> tuple[int, int, str] | None:
    """One /dev/kmsg record's first line, "PRIORITY,SEQ,USEC,FLAGS;TEXT" -> (seq, usec, text)."""
    head, sep, text = line.partition(";")
    parts = head.split(",")
    if sep and len(parts) >= 3 and _decimal(parts[1]) and _decimal(parts[2]):
        return int(parts[1]), int(parts[2]), text
    return None


def read_kernel_log(paths: HostPaths) -> KernelLog | None:
    """Every record still in the kernel's ring buffer (/dev/kmsg), or None if unreadable."""
    return read_kernel_log_at(paths.devfs / "kmsg")


def read_kernel_log_at(path: Path) -> KernelLog | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    records: list[tuple[int, str]] = []
    usecs: list[int] = []
    total = 0
    try:
        while total < MAX_KMSG_BYTES:  # /dev/kmsg ends; a device such as /dev/zero given as it never does
            try:
                chunk = os.read(fd, 16384)
            except BlockingIOError:
                break
            except BrokenPipeError:  # a record was overwritten while we read: go on with the next
                continue
            if not chunk:
                break
            total += len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                record = parse_kmsg_record(line)
                if record is not None:
                    records.append((record[0], record[2]))
                    usecs.append(record[1])
    except OSError:
        return None
    finally:
        os.close(fd)
    seqs = [s for s, _ in records]
    return KernelLog(min(seqs, default=None), max(seqs, default=None), tuple(records), tuple(usecs))


def kicked_array(message: str) -> str | None:
    """The md array (kernel name) whose bitmap a kernel log message says md dropped, else None."""
    found = KICK_RECORD.match(message)
    return found[1] if found else None


class BitmapKicks:
    """The arrays whose bitmap md dropped, by kernel name, with the kernel log sequence number of
    the last such record: read from the whole kernel log when the agent starts and then from each
    new record (exporter/events.py, KernelLogWatcher). md keeps "bitmap:" in /proc/mdstat after a
    kick, so without this the agent would go on saying the bitmap is in use. Thread-safe: the
    watcher notes, the refresher reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}
        self._changed: list[str] = []  # kicked arrays in order, for `since`

    def note(self, md_name: str, seq: int) -> bool:
        """Remember a kick; True when it is news."""
        with self._lock:
            if self._last.get(md_name, -1) >= seq:
                return False
            self._last[md_name] = seq
            self._changed.append(md_name)
            return True

    def note_log(self, records) -> set[str]:
        """Every kick in (seq, message) records; returns the arrays with news."""
        news = set()
        for seq, message in records:
            md_name = kicked_array(message)
            if md_name is not None and self.note(md_name, seq):
                news.add(md_name)
        return news

    def last_seqs(self) -> dict[str, int]:
        with self._lock:
            return dict(self._last)

    def since(self, mark: int) -> tuple[set[str], int]:
        """The arrays kicked after `mark` (0: ever) and the mark to pass next time."""
        with self._lock:
            return set(self._changed[mark:]), len(self._changed)


def kicked_since(kicks: dict[str, int], md_name: str, seq: int | None) -> int | None:
    """The sequence number of a kick of `md_name`'s bitmap after record `seq` (None: since ever)."""
    last = max(kicks.get(md_name, -1), kicks.get(UNNAMED_ARRAY, -1))
    if last < 0 or (seq is not None and last <= seq):
        return None
    return last


# -- the decision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proof:
    """A partial heal is proven (`ok`) or why not (`reason`, a sentence)."""

    ok: bool
    reason: str
    bitmap: BitmapFile | None = None


def prove_partial(paths: HostPaths, md_name: str, label: str, add_device: str) -> Proof:
    """Every obligation of a partial heal (docs/data-safety.md), or the first one that fails.

    `add_device`: the kernel name of the device that would be re-added.
    """
    try:
        inst = read_instance(paths, label)
    except BitmapFileError as e:
        return Proof(False, str(e))
    if inst is None:
        return Proof(False, f"{label} was not built with a bitmap here")
    if not inst.iscsi_source:
        return Proof(False, f"the iSCSI leg of {label} was never in sync in this array instance")
    current_boot = boot_id(paths)
    if inst.boot_id is None or inst.boot_id != current_boot:
        return Proof(False, f"the bitmap record of {label} is from another boot")
    if inst.md_device != md_name:
        return Proof(False, f"{label} runs as {md_name}, its bitmap record names {inst.md_device}")
    if inst.local_rdev_ino is None or inst.local_device is None:
        return Proof(False, f"cannot tell the array instance of {label} (no local leg recorded)")
    if _ino(paths.sysfs / "block" / md_name / "md" / f"dev-{inst.local_device}") != inst.local_rdev_ino:
        return Proof(False, f"{md_name} is not the array instance the bitmap record of {label} describes")
    mdstat_bitmap = _mdstat_bitmap(paths, md_name)
    if mdstat_bitmap is None or f"file: {inst.file}" not in mdstat_bitmap:
        return Proof(False, f"/proc/mdstat shows no bitmap file {inst.file} on {md_name}")
    try:
        st = os.lstat(inst.file)
    except OSError as e:
        return Proof(False, f"bitmap file {inst.file}: {e.strerror or e}")
    if (st.st_ino, st.st_dev, st.st_ctime_ns) != (inst.file_inode, inst.file_dev, inst.file_ctime_ns):
        return Proof(False, f"bitmap file {inst.file} is not the one {md_name} was built with")
    klog = read_kernel_log(paths)
    if klog is None or inst.kmsg_seq is None:
        return Proof(False, "cannot read the kernel log to rule out a kicked bitmap")
    if klog.first_seq is None or klog.first_seq > inst.kmsg_seq + 1:
        return Proof(False, f"the kernel log no longer reaches back to the build of {md_name}")
    for seq, text in klog.messages:
        named = md_name in text or inst.file in text or kicked_array(text) == UNNAMED_ARRAY
        if seq > inst.kmsg_seq and KICKED.search(text) and named:
            return Proof(False, f"md dropped the bitmap of {md_name}: {text.strip()}")
    # The kernel keeps the VPD pages and capacity it read at scan time; a target that came back
    # with another LU behind the same session would still show the old ones. Ask again first.
    if not rescan(paths, add_device):
        return Proof(False, f"cannot rescan {add_device} to check that it is still the same LUN")
    wwid = lun_wwid(paths, add_device)
    if inst.iscsi_wwid is None or wwid != inst.iscsi_wwid:
        return Proof(
            False, f"{add_device} is not the LUN {label} was built with (WWID {wwid} vs {inst.iscsi_wwid})"
        )
    if _size_bytes(paths, add_device) != inst.iscsi_size_bytes:
        return Proof(False, f"{add_device} changed size since {label} was built")
    try:
        bitmap = read_bitmap_file(Path(inst.file))
    except BitmapFileError as e:
        return Proof(False, str(e))
    if bitmap.state & BITMAP_STALE:  # md stopped trusting the file
        return Proof(False, f"md marked the bitmap of {md_name} stale")
    return Proof(True, f"bitmap {inst.file} active since {md_name} was built", bitmap)


def _mdstat_bitmap(paths: HostPaths, md_name: str) -> str | None:
    try:
        array = read_mdstat_arrays(paths.procfs, {md_name}).get(md_name)
    except (OSError, InputError):
        return None
    return array.bitmap if array else None


def full_route(plan: HealPlan) -> HealPlan:
    """The plan as core.safety.plan_heal makes it: the full copy, no route chosen yet."""
    return replace(plan, mode="full", route_reason="")


def choose_route(paths: HostPaths, plan: HealPlan) -> HealPlan:
    """`plan` turned partial when every obligation is proven now; else full, saying which failed."""
    proof = prove_partial(paths, plan.md_device, plan.label, plan.add)
    if proof.ok:
        return replace(plan, mode="partial", route_reason=proof.reason)
    return replace(plan, mode="full", route_reason=proof.reason)


def kmsg_last_seq(paths: HostPaths) -> int | None:
    klog = read_kernel_log(paths)
    return klog.last_seq if klog else None


# -- what the agent exports -----------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayBitmap:
    """One running mirror's bitmap as the agent sees it on a refresh."""

    label: str
    active: bool  # md uses the bitmap file this host built the array with
    out_of_sync_bytes: int | None  # dirty chunks x chunk size while degraded (None: unknown / not degraded)
    heal_eta_seconds: float | None  # dirty bytes the running recovery has left / its speed
    error: str | None = None


def array_bitmaps(
    paths: HostPaths, views, kicks: dict[str, int] | None = None, mdstat_text: bytes | None = None
) -> list[ArrayBitmap]:
    """For each running ArrayView: is its bitmap active, how much is out of sync, the heal's ETA.
    Reads /proc/mdstat once (parsing only these arrays' lines; `mdstat_text`: the text a caller
    just read instead), and a bitmap file only for a degraded array. `kicks`
    (BitmapKicks.last_seqs()): a kick logged after the array instance's bitmap was set up means
    the bitmap is not active, whatever /proc/mdstat still shows."""
    # Only an array with an instance record can have its bitmap active: the records are listed
    # once (one look per array is a failed open for each array built without one), and only their
    # arrays' /proc/mdstat lines are parsed.
    present = _instance_files(paths) if len(views) > 1 else None
    instances: list[BitmapInstance | BitmapFileError | None] = []
    for view in views:
        if view.md is None or (present is not None and f"{view.label}.json" not in present):
            instances.append(None)
            continue
        try:
            instances.append(read_instance(paths, view.label))
        except BitmapFileError as e:
            instances.append(e)
    names = {
        inst.md_device
        for view, inst in zip(views, instances, strict=True)
        if isinstance(inst, BitmapInstance) and view.md is not None and inst.md_device == view.md.name
    }
    try:
        if not names:
            mdstat = {}
        elif mdstat_text is None:
            mdstat = read_mdstat_arrays(paths.procfs, names)
        else:
            mdstat = mdstat_arrays(mdstat_text, names)
    except (OSError, InputError):
        mdstat = {}
    out = []
    for view, inst in zip(views, instances, strict=True):
        md = view.md
        if md is None:
            continue
        if isinstance(inst, BitmapFileError):
            out.append(ArrayBitmap(view.label, False, None, None, str(inst)))
            continue
        line = mdstat[md.name].bitmap if md.name in mdstat else None
        active = (
            inst is not None
            and inst.md_device == md.name
            and line is not None
            and f"file: {inst.file}" in line
        )
        kicked = kicked_since(kicks or {}, md.name, inst.kmsg_seq) if active and inst else None
        if kicked is not None:
            problem = f"md dropped the bitmap file of {md.name} (kernel log record {kicked})"
            out.append(ArrayBitmap(view.label, False, None, None, problem))
            continue
        if not active or not md.degraded:
            out.append(ArrayBitmap(view.label, active, 0 if active else None, None))
            continue
        try:
            bitmap = read_bitmap_file(Path(inst.file))  # type: ignore[union-attr]
        except BitmapFileError as e:
            out.append(ArrayBitmap(view.label, True, None, None, str(e)))
            continue
        if bitmap.state & BITMAP_STALE:
            out.append(ArrayBitmap(view.label, False, None, None, f"md marked the bitmap of {md.name} stale"))
            continue
        eta = None
        if view.iscsi.state == "recovering" and md.sync_completed and view.sync_speed_bytes > 0:
            eta = bitmap.dirty_bytes_after(md.sync_completed[0]) / view.sync_speed_bytes
        out.append(ArrayBitmap(view.label, True, bitmap.dirty_bytes, eta))
    return out


def _instance_files(paths: HostPaths) -> frozenset[str] | None:
    """The names in the instance records' directory (empty: none yet; None: it cannot be
    listed, so each record is looked for, and its problem reported, one by one)."""
    try:
        return frozenset(os.listdir(paths.state / "bitmaps"))
    except FileNotFoundError:
        return frozenset()
    except OSError:
        return None


def _small_text(path: Path, max_bytes: int = 4096) -> str:
    """A procfs/sysfs value or a small host file: a regular file only (never a FIFO), bounded."""
    return read_file(path, max_bytes=max_bytes).decode("utf-8", "replace")
