"""Reader of the open-iscsi sessions in sysfs (the kernel's scsi_transport_iscsi).

Layout (iscsi_tcp; the session device hangs under its Scsi_Host):

    /sys/class/iscsi_session/session1 -> ../../devices/platform/host0/session1/iscsi_session/session1
        targetname, tpgt, state (LOGGED_IN|FAILED|FREE), recovery_tmo
    /sys/devices/platform/host0/session1/                    the session device
        connection1:0/iscsi_connection/connection1:0/        persistent_address, persistent_port, state
        target0:0:0/0:0:0:1/                                 one SCSI device per LUN: state, block/sda/dev

Reading sysfs needs no daemon and no command, so it works while iscsid hangs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

from iscsimple.core.sysfs import AttrReader, open_dir, parse_dev, parse_int, read_bytes

__all__ = [
    "SKIPPED",
    "IscsiReadResult",
    "IscsiSession",
    "ScsiLun",
    "find_lun_block",
    "iscsi_session_names",
    "read_iscsi_session",
    "read_iscsi_session_parts",
    "read_iscsi_sessions",
    "read_session_states",
    "session_sid",
]

_SESSION = re.compile(r"^session([0-9]{1,9})$")
_HCTL = re.compile(r"^([0-9]{1,9}):([0-9]{1,9}):([0-9]{1,9}):([0-9]{1,19})$")


@dataclass(frozen=True, slots=True)
class ScsiLun:
    hctl: str  # "0:0:0:1"
    lun: int
    state: str | None  # running, blocked, transport-offline, offline, ...
    block: str | None  # "sda"; None while the disk is not (or no longer) attached
    dev: str | None  # "8:0"


@dataclass(frozen=True, slots=True)
class IscsiSession:
    sid: int
    name: str  # "session1"
    target: str  # IQN
    state: str | None  # LOGGED_IN | FAILED | FREE
    recovery_tmo: int | None  # seconds the kernel queues I/O before failing it
    host: str | None  # "host0"
    portal_address: str | None
    portal_port: int | None
    luns: tuple[ScsiLun, ...] = ()

    @property
    def portal(self) -> str | None:
        if self.portal_address is None:
            return None
        address = f"[{self.portal_address}]" if ":" in self.portal_address else self.portal_address
        return address if self.portal_port is None else f"{address}:{self.portal_port}"

    def lun(self, number: int) -> ScsiLun | None:
        return next((lun for lun in self.luns if lun.lun == number), None)


@dataclass
class IscsiReadResult:
    sessions: list[IscsiSession] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def read_iscsi_sessions(sysfs: Path) -> IscsiReadResult:
    """All iSCSI sessions, sorted by sid. No iscsi_session class (module not loaded) = no sessions."""
    names, errors = iscsi_session_names(sysfs)
    result = IscsiReadResult(errors=errors)
    for session, session_errors in read_iscsi_session_parts(sysfs, names).values():
        result.errors.extend(session_errors)
        if session is not None:
            result.sessions.append(session)
    return result


def read_iscsi_session_parts(
    sysfs: Path, names: list[str]
) -> dict[str, tuple[IscsiSession | None, list[str]]]:
    """read_iscsi_session for each of `names` (in their order), looking at the class directory's
    own layout once instead of once per session."""
    class_dir = os.path.join(sysfs, "class", "iscsi_session")
    plain = _plain_class_dir(class_dir)
    return {name: read_iscsi_session(sysfs, name, plain) for name in names}


def iscsi_session_names(sysfs: Path) -> tuple[list[str], list[str]]:
    """The session names ("session3") sorted by sid, and listing errors."""
    class_dir = os.path.join(sysfs, "class", "iscsi_session")
    try:
        names = [e.name for e in os.scandir(class_dir) if _SESSION.match(e.name)]
    except FileNotFoundError:
        return [], []
    except OSError as e:
        return [], [f"{class_dir}: cannot list: {e.strerror or e}"]
    return sorted(names, key=session_sid), []


def session_sid(name: str) -> int:
    return int(name[len("session") :])


def read_iscsi_session(
    sysfs: Path, name: str, plain_class_dir: bool | None = None
) -> tuple[IscsiSession | None, list[str]]:
    """One session by name and the problems reading it; None when it does not exist (any more).

    `plain_class_dir`: what _plain_class_dir says of the class directory, when known."""
    class_dir = os.path.join(sysfs, "class", "iscsi_session")
    errors: list[str] = []
    if not _SESSION.match(name):
        return None, []
    try:
        return _read_session(sysfs, class_dir, name, errors, plain_class_dir), errors
    except _Gone:
        return None, []  # logged out (or never there)
    except (OSError, ValueError) as e:  # one broken session never hides the others
        return None, [*errors, f"{os.path.join(class_dir, name)}: {e}"]


class _Gone(Exception):
    pass


SKIPPED = "(not read)"  # read_session_states: listed, state not read


def read_session_states(sysfs: Path, skip: Container[str] = ()) -> dict[str, str | None]:
    """Only the `state` of every session, by name: what a cheap periodic look for session
    changes needs (the kernel sends no uevent when a session fails or recovers). A session
    named in `skip` is listed but not read: its value is SKIPPED.

    It runs for every session on every poll, so it opens each `state` relative to one
    descriptor of the class directory and skips AttrReader's error bookkeeping: a state that
    cannot be read is None, which differs from the snapshot's and so has the session re-read
    (where the reader reports the problem)."""
    class_dir = os.path.join(sysfs, "class", "iscsi_session")
    try:
        dir_fd = os.open(class_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return {}
    states: dict[str, str | None] = {}
    try:
        for name in os.listdir(dir_fd):
            if name in skip:  # a name the snapshot has: matched when it was read
                states[name] = SKIPPED
                continue
            if not _SESSION.match(name):
                continue
            try:
                data = read_bytes(name + "/state", dir_fd)
                text = data.decode("utf-8").strip()
            except (OSError, UnicodeDecodeError):
                states[name] = None
                continue
            states[name] = text if text.isprintable() else None
    except OSError:
        return {}
    finally:
        os.close(dir_fd)
    return states


def find_lun_block(
    sysfs: Path, target: str, lun: int, sessions: list[IscsiSession] | None = None
) -> list[tuple[IscsiSession, ScsiLun]]:
    """Sessions to `target` whose LUN `lun` has a block device (several with multiple portals).

    `sessions`: ones just read (e.g. a snapshot's) instead of reading sysfs again."""
    found = []
    for session in read_iscsi_sessions(sysfs).sessions if sessions is None else sessions:
        if session.target != target:
            continue
        scsi_lun = session.lun(lun)
        if scsi_lun is not None and scsi_lun.block is not None:
            found.append((session, scsi_lun))
    return found


def _read_session(
    sysfs: Path, class_dir: str, name: str, errors: list[str], plain_class_dir: bool | None = None
) -> IscsiSession | None:
    attrs_dir = _session_attrs_dir(class_dir, name, plain_class_dir)
    # .../host0/session1/iscsi_session/session1 -> the session device is two levels up. Every
    # file is opened relative to it: the kernel resolves a few names, not the whole path.
    session_dir = os.path.dirname(os.path.dirname(attrs_dir))
    try:
        session_fd = open_dir(session_dir)
    except (FileNotFoundError, NotADirectoryError):
        raise _Gone from None
    try:
        return _read_session_at(sysfs, session_fd, session_dir, attrs_dir, name, errors)
    finally:
        os.close(session_fd)


def _read_session_at(
    sysfs: Path, session_fd: int, session_dir: str, attrs_dir: str, name: str, errors: list[str]
) -> IscsiSession | None:
    session_errors: list[str] = []
    relative = attrs_dir[len(session_dir) + 1 :] + "/"
    attrs = AttrReader(attrs_dir, session_errors, session_fd, relative)
    target = attrs.text("targetname", required=True, empty_ok=False, shared=False)
    host = os.path.basename(os.path.dirname(session_dir))
    try:
        entries = os.listdir(session_fd)
    except OSError:
        entries = []
    address, port = _read_connection(session_fd, session_dir, entries, session_errors)
    session = IscsiSession(
        sid=int(name[len("session") :]),
        name=name,
        target=target or "",
        state=attrs.text("state", required=True, empty_ok=False),
        recovery_tmo=attrs.parsed("recovery_tmo", True, parse_int),
        host=host if host.startswith("host") else None,
        portal_address=address,
        portal_port=port,
        luns=_read_luns(sysfs, session_fd, session_dir, entries, session_errors),
    )
    if session_errors and not os.path.isdir(attrs_dir):
        return None  # logged out while we read it: the missing files are no fault
    errors.extend(session_errors)
    return session


def _plain_class_dir(class_dir: str) -> bool:
    """Neither the class directory nor its parent is a symlink (as in /sys): a session's
    relative link can then be joined to the class directory's path as it is."""
    return not os.path.islink(class_dir) and not os.path.islink(os.path.dirname(class_dir))


def _session_attrs_dir(class_dir: str, name: str, plain_class_dir: bool | None = None) -> str:
    """Where the class link class_dir/NAME points. The kernel's link is relative,
    ../../devices/.../iscsi_session/sessionN: joined to class_dir that needs one readlink,
    where realpath costs an lstat per component of the whole path (for every session on a
    full read). Anything else, or class dirs that are links themselves, goes to realpath.
    Raises _Gone when there is no such entry."""
    link = os.path.join(class_dir, name)
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        raise _Gone from None
    except OSError:
        return os.path.realpath(link)
    simple = (
        target.startswith("../../devices/")
        and "/." not in target[len("../..") :]
        and "//" not in target
        and (_plain_class_dir(class_dir) if plain_class_dir is None else plain_class_dir)
    )
    if not simple:
        return os.path.realpath(link)
    return os.path.normpath(os.path.join(class_dir, target))


def _read_connection(
    session_fd: int, session_dir: str, entries: list[str], errors: list[str]
) -> tuple[str | None, int | None]:
    # open-iscsi uses one connection per session (connection<sid>:0); take the first.
    for conn in sorted(e for e in entries if e.startswith("connection")):
        relative = f"{conn}/iscsi_connection/{conn}"
        try:
            conn_fd = os.open(relative, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=session_fd)
        except (FileNotFoundError, NotADirectoryError):
            continue  # not a connection device (or gone)
        except OSError as e:
            errors.append(f"{session_dir}/{relative}: unreadable: {e.strerror or e}")
            return None, None
        try:
            attrs = AttrReader(f"{session_dir}/{relative}", errors, conn_fd)
            return (
                attrs.text("persistent_address", required=True, empty_ok=False),
                attrs.parsed("persistent_port", True, parse_int, none_words=("",)),
            )
        finally:
            os.close(conn_fd)
    return None, None


def _read_luns(
    sysfs: Path, session_fd: int, session_dir: str, entries: list[str], errors: list[str]
) -> tuple[ScsiLun, ...]:
    luns = []
    for target in (e for e in entries if e.startswith("target")):
        target_dir = f"{session_dir}/{target}"
        for hctl in _list(target_dir):
            m = _HCTL.match(hctl)
            if m is None:
                continue
            relative = f"{target}/{hctl}/"
            lun_dir = f"{target_dir}/{hctl}"
            # One disk per SCSI device; a LUN being scanned or deleted has none.
            blocks = sorted(_list(lun_dir + "/block"))
            block = blocks[0] if blocks else None
            luns.append(
                ScsiLun(
                    hctl=hctl,
                    lun=int(m[4]),
                    state=AttrReader(lun_dir, errors, session_fd, relative).text("state", required=True),
                    block=block,
                    dev=_block_dev(sysfs, session_fd, lun_dir, relative, block),
                )
            )
    luns.sort(key=lambda lun: lun.lun)
    return tuple(luns)


def _block_dev(sysfs: Path, session_fd: int, lun_dir: str, relative: str, block: str | None) -> str | None:
    if block is None:
        return None
    ignored: list[str] = []  # optional: the disk may be going away
    dev = AttrReader(lun_dir, ignored, session_fd, relative).parsed(f"block/{block}/dev", False, parse_dev)
    if dev is None:
        dev = AttrReader(os.path.join(sysfs, "block", block), ignored).parsed("dev", False, parse_dev)
    return dev


def _list(directory: str) -> list[str]:
    """The names in `directory`; empty when it cannot be listed. By path: a listing through a
    descriptor costs more syscalls (dup, seek) than the open it saves."""
    try:
        return os.listdir(directory)
    except OSError:
        return []
