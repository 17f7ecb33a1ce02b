"""Reader of /proc/mdstat.

The format is whatever the kernel's md_seq_show() prints (drivers/md/md.c):

    Personalities : [raid1]
    md127 : active (auto-read-only) raid1 loop1[2] sda[1](W)(F)
          65536 blocks super non-persistent [2/1] [U_]
          bitmap: 0/1 pages [0KB], 65536KB chunk
          [=======>.............]  recovery = 37.9% (25088/65536) finish=0.2min speed=2280K/sec

    unused devices: <none>

Lines the agent does not need (bitmap, level-specific chunk/layout text) are
accepted and skipped; a line inside an array block that matches nothing the
kernel prints raises MdstatError, because silently misreading an array's state
is worse than reporting that we could not read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from iscsimple.core.errors import InputError
from iscsimple.core.files import read_file

__all__ = [
    "Mdstat",
    "MdstatArray",
    "MdstatError",
    "MdstatMember",
    "MdstatProgress",
    "format_mdstat",
    "mdstat_arrays",
    "mdstat_blocks",
    "parse_mdstat",
    "read_mdstat",
    "read_mdstat_arrays",
]


class MdstatError(InputError):
    """/proc/mdstat (or a capture of it) holds a line we cannot make sense of."""


@dataclass(frozen=True)
class MdstatMember:
    name: str  # "sda", "loop1", "dm-3", "nvme0n1p2"
    index: int  # the number in brackets: the descriptor number, not the slot
    write_mostly: bool = False  # (W)
    faulty: bool = False  # (F)
    spare: bool = False  # (S)
    replacement: bool = False  # (R)
    journal: bool = False  # (J)


@dataclass(frozen=True)
class MdstatProgress:
    action: str  # resync | recovery | check | repair | reshape
    ratio: float | None  # 0.379 for "37.9%"
    done_blocks: int | None
    total_blocks: int | None
    finish_minutes: float | None
    speed_kib: int | None  # KiB/s


@dataclass(frozen=True)
class MdstatArray:
    name: str  # "md127", "md_data"
    active: bool
    read_only: str | None  # "read-only" | "auto-read-only" | None
    level: str | None  # "raid1"; None for inactive arrays
    members: tuple[MdstatMember, ...]
    blocks: int | None  # KiB
    super: str | None  # "1.2", "non-persistent", "external:imsm"; None for 0.90
    raid_disks: int | None  # n of [n/m]
    working_disks: int | None  # m of [n/m]
    status: str | None  # "U_"
    progress: MdstatProgress | None = None
    sync_state: str | None = None  # "PENDING" | "DELAYED" | "REMOTE" (resync=...)
    bitmap: str | None = None  # text after "bitmap: ", kept verbatim

    def member(self, name: str) -> MdstatMember | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass(frozen=True)
class Mdstat:
    personalities: tuple[str, ...] = ()
    arrays: dict[str, MdstatArray] = field(default_factory=dict)


_HEADER = re.compile(r"^(?P<name>[^\s:]+) : (?P<state>active|inactive)(?P<rest>(?: .*)?)$")
_MEMBER = re.compile(r"^(?P<name>[^\s\[\]()]+)\[(?P<index>[0-9]{1,9})\](?P<flags>(?:\([A-Z]\))*)$")
_LEVEL = re.compile(r"^[a-z][a-z0-9_-]*$")
_BLOCKS = re.compile(
    r"^(?P<blocks>[0-9]{1,19}) blocks"
    r"(?: super (?P<super>\S+))?"
    # Personality-specific text ("level 5, 512k chunk, algorithm 2", "512K chunks 2 near-copies",
    # "64k rounding") is not needed; it is plain words, numbers and commas.
    r"(?P<extra>(?: [\w.,-]+)*?)"
    r"(?: \[(?P<raid>[0-9]{1,9})/(?P<working>[0-9]{1,9})\] \[(?P<status>[U_]*)\])?$"
)
_PROGRESS = re.compile(
    r"^(?:\[[=>.]*\]\s+)?(?P<action>[a-z]+)\s*=\s*(?P<percent>[0-9]{1,3}(?:\.[0-9]{1,6})?)%"
    r"(?:\s+\((?P<done>[0-9]{1,19})/(?P<total>[0-9]{1,19})\))?"
    r"(?:\s+finish=(?P<finish>[0-9]{1,12}(?:\.[0-9]{1,6})?)min)?"
    r"(?:\s+speed=(?P<speed>[0-9]{1,19})K/sec)?$"
)
_SYNC_STATE = re.compile(r"^resync=(?P<state>[A-Z]+)$")
_BITMAP = re.compile(r"^bitmap: (?P<text>.*)$")
_PERSONALITIES = re.compile(r"^Personalities :(?P<rest>.*)$")
_FLAG_FIELDS = {"W": "write_mostly", "F": "faulty", "S": "spare", "R": "replacement", "J": "journal"}
_RO_MARKERS = {"(read-only)": "read-only", "(auto-read-only)": "auto-read-only"}


def read_mdstat(procfs: Path) -> Mdstat:
    """Read and parse procfs/mdstat. A missing file (md module not loaded) is an empty Mdstat."""
    try:
        text = read_mdstat_text(procfs / "mdstat")
    except FileNotFoundError:
        return Mdstat()
    return parse_mdstat(text)


# A host with 10 000 arrays has a few MiB of mdstat; more is not /proc/mdstat.
MAX_MDSTAT_BYTES = 32 * 1024 * 1024


def read_mdstat_text(path: Path) -> str:
    """The text of an mdstat file: a regular file (no FIFO, device or directory), bounded."""
    return read_file(path, max_bytes=MAX_MDSTAT_BYTES).decode("utf-8", "replace")


def read_mdstat_arrays(procfs: Path, names: set[str]) -> dict[str, MdstatArray]:
    """Only the named arrays of procfs/mdstat, each parsed on its own: what a few arrays need
    from a file of thousands. An array whose lines cannot be parsed is left out."""
    try:
        text = read_file(procfs / "mdstat", max_bytes=MAX_MDSTAT_BYTES)
    except FileNotFoundError:
        return {}
    return mdstat_arrays(text, names)


def mdstat_arrays(text: bytes, names: set[str]) -> dict[str, MdstatArray]:
    """read_mdstat_arrays on a text already read (the agent's md event read it): only the named
    arrays' lines are found (searches in C) and decoded."""
    if len(names) > _FEW:
        blocks = mdstat_blocks(text.decode("utf-8", "replace"))
    else:
        blocks = _named_blocks(text, names)
    arrays = {}
    for name in names & blocks.keys():
        try:
            arrays.update(parse_mdstat(blocks[name] + "\n").arrays)
        except MdstatError:
            continue
    return arrays


_FEW = 32  # up to this many arrays, each is found by a search of the text instead of a split of all


def _named_blocks(text: bytes, names: set[str]) -> dict[str, str]:
    """mdstat_blocks(text), only for `names`: each block found by one search in C near where it
    was found last (what changes before it moves it by a few bytes). A name never looked for
    has every header of the text noted at once (one pass, the first time), so no lookup
    searches the whole text: at worst it searches as far as the block moved since."""
    blocks = {}
    for name in names:
        header = f"{name} : ".encode()
        if text.startswith(header):
            start = 0
        else:
            if name not in _LAST_FOUND:
                _note_headers(text)
            hint = _LAST_FOUND.get(name, 0)
            needle = b"\n" + header
            start = text.find(needle, max(0, hint - _NEAR), hint + _NEAR) + 1
            if start == 0:  # moved further: look on from there, then back
                start = text.find(needle, hint) + 1 or text.rfind(needle, 0, hint + len(needle)) + 1
            if start == 0:
                continue
            _LAST_FOUND[name] = start
        tail = _UNINDENTED_BYTES.search(text, start + len(header))
        blocks[name] = text[start : tail.start() if tail else len(text)].decode("utf-8", "replace")
    return blocks


def _note_headers(text: bytes) -> None:
    """Note where every array's block starts in `text` (once per text: a name it does not hold
    is then looked for in the whole text, as before hints)."""
    global _NOTED
    noted = (id(text), len(text))
    if noted == _NOTED:
        return
    _NOTED = noted
    for found in _HEADER_BYTES.finditer(text):
        _LAST_FOUND[found.group(1).decode("utf-8", "replace")] = found.start()


# Where each array's block started when last looked for (a header is unique: an array's other
# lines are indented, so a header found in the window is the array's).
_LAST_FOUND: dict[str, int] = {}
_NEAR = 8192
_NOTED: tuple[int, int] | None = None  # the text whose headers were all noted (id, length): a hint only
_HEADER_BYTES = re.compile(rb"^(\S+) : ", re.MULTILINE)


_UNINDENTED_BYTES = re.compile(rb"^[^\s]", re.MULTILINE)


def parse_mdstat(text: str) -> Mdstat:
    personalities: tuple[str, ...] = ()
    arrays: dict[str, MdstatArray] = {}
    block: _ArrayBlock | None = None

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue  # the kernel ends every array block with a whitespace-only line
        if raw[0].isspace():
            if block is None:
                raise MdstatError(f"mdstat line {number}: indented line outside an array: {raw!r}")
            block.add_line(line, number, raw)
            continue
        if block is not None:
            arrays[block.name] = block.finish()
            block = None
        if m := _PERSONALITIES.match(line):
            personalities = _parse_personalities(m["rest"], number, raw)
        elif line.startswith("unused devices:") or line.startswith("read_ahead "):
            pass
        elif m := _HEADER.match(line):
            if m["name"] in arrays:
                raise MdstatError(f"mdstat line {number}: array {m['name']} listed twice: {raw!r}")
            block = _ArrayBlock.from_header(m, number, raw)
        else:
            raise MdstatError(f"mdstat line {number}: not an array, personality or unused line: {raw!r}")
    if block is not None:
        arrays[block.name] = block.finish()
    return Mdstat(personalities=personalities, arrays=arrays)


def _parse_personalities(rest: str, number: int, raw: str) -> tuple[str, ...]:
    names = []
    for token in rest.split():
        if not (token.startswith("[") and token.endswith("]") and len(token) > 2):
            raise MdstatError(f"mdstat line {number}: bad personality {token!r}: {raw!r}")
        names.append(token[1:-1])
    return tuple(names)


class _ArrayBlock:
    """Accumulates the lines of one array while parsing."""

    def __init__(self, name: str, active: bool, read_only: str | None, level: str | None, members):
        self.name = name
        self.active = active
        self.read_only = read_only
        self.level = level
        self.members: tuple[MdstatMember, ...] = members
        self.blocks: int | None = None
        self.super: str | None = None
        self.raid_disks: int | None = None
        self.working_disks: int | None = None
        self.status: str | None = None
        self.progress: MdstatProgress | None = None
        self.sync_state: str | None = None
        self.bitmap: str | None = None

    @classmethod
    def from_header(cls, m: re.Match[str], number: int, raw: str) -> _ArrayBlock:
        tokens = m["rest"].split()
        read_only = None
        if tokens and tokens[0] in _RO_MARKERS:
            read_only = _RO_MARKERS[tokens.pop(0)]
        level = None
        if tokens and "[" not in tokens[0]:
            if not _LEVEL.match(tokens[0]):
                raise MdstatError(f"mdstat line {number}: bad level {tokens[0]!r}: {raw!r}")
            level = tokens.pop(0)
        members = tuple(_parse_member(token, number, raw) for token in tokens)
        return cls(m["name"], m["state"] == "active", read_only, level, members)

    def add_line(self, line: str, number: int, raw: str) -> None:
        if m := _BLOCKS.match(line):
            if self.blocks is not None:
                raise MdstatError(f"mdstat line {number}: second size line for {self.name}: {raw!r}")
            self.blocks = int(m["blocks"])
            self.super = m["super"]
            if m["raid"] is not None:
                self.raid_disks = int(m["raid"])
                self.working_disks = int(m["working"])
                self.status = m["status"]
        elif m := _PROGRESS.match(line):
            self.progress = MdstatProgress(
                action=m["action"],
                ratio=round(float(m["percent"]) / 100, 6),
                done_blocks=_int_or_none(m["done"]),
                total_blocks=_int_or_none(m["total"]),
                finish_minutes=float(m["finish"]) if m["finish"] is not None else None,
                speed_kib=_int_or_none(m["speed"]),
            )
        elif m := _SYNC_STATE.match(line):
            self.sync_state = m["state"]
        elif m := _BITMAP.match(line):
            self.bitmap = m["text"]
        else:
            raise MdstatError(f"mdstat line {number}: cannot parse line of {self.name}: {raw!r}")

    def finish(self) -> MdstatArray:
        return MdstatArray(
            name=self.name,
            active=self.active,
            read_only=self.read_only,
            level=self.level,
            members=self.members,
            blocks=self.blocks,
            super=self.super,
            raid_disks=self.raid_disks,
            working_disks=self.working_disks,
            status=self.status,
            progress=self.progress,
            sync_state=self.sync_state,
            bitmap=self.bitmap,
        )


def _parse_member(token: str, number: int, raw: str) -> MdstatMember:
    m = _MEMBER.match(token)
    if m is None:
        raise MdstatError(f"mdstat line {number}: bad member {token!r}: {raw!r}")
    # Letters the kernel may add in future are ignored rather than fatal: the member
    # itself was understood.
    flags = {_FLAG_FIELDS[letter]: True for letter in m["flags"][1::3] if letter in _FLAG_FIELDS}
    return MdstatMember(name=m["name"], index=int(m["index"]), **flags)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None else None


def format_mdstat(mdstat: Mdstat) -> str:
    """Render an Mdstat the way the kernel prints it (for demo hosts and tests)."""
    out = ["Personalities : " + "".join(f"[{p}] " for p in mdstat.personalities)]
    for array in mdstat.arrays.values():
        head = f"{array.name} : {'active' if array.active else 'inactive'}"
        if array.read_only:
            head += f" ({array.read_only})"
        if array.level:
            head += f" {array.level}"
        for member in array.members:
            head += f" {member.name}[{member.index}]" + _member_flags(member)
        out.append(head)
        size = ""
        if array.blocks is not None:
            size = f"{array.blocks} blocks"
            if array.super is not None:
                size += f" super {array.super}"
            if array.raid_disks is not None:
                size += f" [{array.raid_disks}/{array.working_disks}] [{array.status}]"
        out.append("      " + size)
        if array.sync_state:
            out.append(f"      \tresync={array.sync_state}")
        if array.progress is not None:
            out.append("      " + _format_progress(array.progress))
        if array.bitmap is not None:
            out.append(f"      bitmap: {array.bitmap}")
        out.append("      ")
    out.append("unused devices: <none>")
    return "\n".join(out) + "\n"


def _member_flags(member: MdstatMember) -> str:
    flags = "(W)" if member.write_mostly else ""
    flags += "(J)" if member.journal else ""
    if member.faulty:
        return flags + "(F)"
    flags += "(S)" if member.spare else ""
    return flags + ("(R)" if member.replacement else "")


def _format_progress(p: MdstatProgress) -> str:
    text = f"[====>...............]  {p.action} ="
    text += f"{p.ratio * 100:5.1f}%" if p.ratio is not None else "  0.0%"
    if p.done_blocks is not None and p.total_blocks is not None:
        text += f" ({p.done_blocks}/{p.total_blocks})"
    if p.finish_minutes is not None:
        text += f" finish={p.finish_minutes}min"
    if p.speed_kib is not None:
        text += f" speed={p.speed_kib}K/sec"
    return text


_ARRAY_HEADER = re.compile(r"^(\S+) : ", re.MULTILINE)


def mdstat_blocks(text: str) -> dict[str, str]:
    """Each array's lines of /proc/mdstat as one string, by array name.

    A cheap split (no parsing; one regex scan in C) for telling which arrays changed between
    two reads: an array block starts with its unindented `NAME : ...` line and runs to the
    next unindented line."""
    blocks: dict[str, str] = {}
    starts = [(m.start(), m.group(1)) for m in _ARRAY_HEADER.finditer(text) if m.group(1) != "Personalities"]
    for index, (start, name) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else len(text)
        block = text[start:end]
        tail = _UNINDENTED.search(block, 1)  # "unused devices:" after the last array
        blocks[name] = block[: tail.start()] if tail else block
    return blocks


_UNINDENTED = re.compile(r"^[^\s]", re.MULTILINE)


def changed_arrays(before: bytes, after: bytes) -> set[str]:
    """The arrays whose lines differ between two reads of /proc/mdstat.

    Only the stretch between the texts' common start and common end is split into blocks (the
    comparisons run in C), so one array changing among thousands costs a few blocks."""
    if before == after:
        return set()
    shortest = min(len(before), len(after))
    head = _common_prefix(before, after, shortest)
    tail = min(_common_suffix(before, after, shortest), shortest - head)
    start = min(_block_start(before, head), _block_start(after, head))
    # Both stretches end where an array block starts in each text, at the same distance from the end.
    keep = min(
        _tail_from_next_block(before, len(before) - tail), _tail_from_next_block(after, len(after) - tail)
    )
    old = mdstat_blocks(before[start : len(before) - keep].decode("utf-8", "replace"))
    new = mdstat_blocks(after[start : len(after) - keep].decode("utf-8", "replace"))
    return {name for name in old.keys() | new.keys() if old.get(name) != new.get(name)}


# Bytes compared at once (memcmp, no copy), then again within the block that differs, before the
# XOR of the one small block that differs.
_COMPARED = (65536, 4096, 256)


def _common_prefix(a: bytes, b: bytes, length: int) -> int:
    """How many first bytes a and b share (of their first `length`): equal blocks compared in C
    (memcmp through a view of b, so nothing is copied), narrowed to a small block, then one XOR
    of big integers over it."""
    view = memoryview(b)
    start = 0
    for block in _COMPARED:
        while start < length:
            end = min(start + block, length)
            if not a.startswith(view[start:end], start):
                length = end  # the first difference is in this block
                break
            start = end
        else:
            return length
    x = int.from_bytes(a[start:length], "big") ^ int.from_bytes(b[start:length], "big")
    return length - (x.bit_length() + 7) // 8


def _common_suffix(a: bytes, b: bytes, length: int) -> int:
    """How many last bytes a and b share (of their last `length`), the same way from the end."""
    view = memoryview(b)
    done = 0
    for block in _COMPARED:
        while done < length:
            size = min(block, length - done)
            if not a.endswith(view[len(b) - done - size : len(b) - done], 0, len(a) - done):
                length = done + size
                break
            done += size
        else:
            return length
    x_a, x_b = a[len(a) - length : len(a) - done], b[len(b) - length : len(b) - done]
    x = int.from_bytes(x_a, "little") ^ int.from_bytes(x_b, "little")
    return length - (x.bit_length() + 7) // 8


def _block_start(text: bytes, position: int) -> int:
    """Where the unindented line at or before `position` starts (an array's header, or 0)."""
    start = text.rfind(b"\n", 0, position) + 1
    while start > 0 and not text[start : start + 1].strip():  # an indented or empty line, or the end
        start = text.rfind(b"\n", 0, start - 1) + 1
    return start


def _tail_from_next_block(text: bytes, position: int) -> int:
    """The length of what follows the first unindented line start at or after `position`."""
    m = _NEXT_UNINDENTED.search(text, max(0, position - 1))
    return len(text) - m.end() if m else 0


_NEXT_UNINDENTED = re.compile(rb"\n(?=\S)")
