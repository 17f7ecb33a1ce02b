"""The disk spec xl hands to block-iscsimple: ``[lunN@]TARGET[+LABEL]``.

TARGET is an iSCSI name (RFC 3720 section 3.2.6.3): ``iqn.YYYY-MM.reversed.domain[:anything]``,
``eui.`` + 16 hex digits or ``naa.`` + 16 or 32 hex digits. A TARGET beginning with
``MISSING`` means "no iSCSI leg" and is only allowed with a LABEL (a mirror with only
its local leg). LABEL names the entry in the tab file and the md device /dev/md/LABEL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

MISSING_PREFIX = "MISSING"
# SAM flat-space addressing; iSCSI filers number LUNs far below this.
MAX_LUN = 16383
# The kernel names a named md array "md_" + LABEL and limits disk names to 31 characters.
MAX_LABEL_LEN = 28
# RFC 3720: iSCSI names are at most 223 bytes.
MAX_TARGET_LEN = 223

_LABEL_RE = re.compile(r"[A-Za-z0-9_-]+")
_IQN_RE = re.compile(r"iqn\.(\d{4})-(\d{2})\.([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)(?::(.*))?")
_EUI_RE = re.compile(r"eui\.[0-9A-Fa-f]{16}")
_NAA_RE = re.compile(r"naa\.(?:[0-9A-Fa-f]{16}|[0-9A-Fa-f]{32})")
# After stringprep (RFC 3722) an iSCSI name holds only these characters.
_NAME_CHARS_RE = re.compile(r"[a-z0-9.:-]+")


class SpecError(InputError):
    """A disk spec was rejected; the message names the bad part and why."""

    def __init__(self, spec: str, message: str):
        # Bounded: the spec comes from xenstore or a file and may be of any length.
        super().__init__(f"bad disk spec {shorten(spec)!r}: {shorten(message, 600)}")
        self.spec = spec


def shorten(text: str, limit: int = 100) -> str:
    """Echo at most `limit` characters of what a person typed, so an error stays one line to read."""
    return text if len(text) <= limit + 20 else text[:limit] + "…"


@dataclass(frozen=True)
class DiskSpec:
    lun: int
    target: str | None  # None: no iSCSI leg (TARGET began with MISSING)
    label: str | None  # None: hand the LUN to Xen without a mirror

    @property
    def mirrored(self) -> bool:
        return self.label is not None

    def __str__(self) -> str:
        target = self.target if self.target is not None else MISSING_PREFIX
        text = f"lun{self.lun}@{target}"
        return f"{text}+{self.label}" if self.label else text


def parse_spec(text: str) -> DiskSpec:
    """Parse ``[lunN@]TARGET[+LABEL]``; raise SpecError naming the bad part."""
    spec = text.strip()
    if not spec:
        raise SpecError(
            text,
            "it is empty; expected [lunN@]TARGET[+LABEL], e.g. lun1@iqn.2001-04.com.example:storage+vm1-disk",
        )

    # '+' first: neither TARGET nor LUN may hold one, so a stray '@' in the LABEL is
    # reported as a bad LABEL character rather than as a bad LUN.
    rest = spec
    label = None
    if "+" in rest:
        rest, label = rest.split("+", 1)
        check_label(label, lambda msg: SpecError(spec, msg))

    lun = 0
    if "@" in rest:
        lun_part, rest = rest.split("@", 1)
        lun = _parse_lun(spec, lun_part)

    target = _parse_target(spec, rest)
    if target is None and label is None:
        raise SpecError(
            spec,
            f"TARGET {rest!r} means 'no iSCSI leg', which only makes sense for a mirror: "
            "add +LABEL to use the local device of the tab file alone",
        )
    return DiskSpec(lun=lun, target=target, label=label)


def _parse_lun(spec: str, part: str) -> int:
    if not part.startswith("lun"):
        raise SpecError(spec, f"the part before '@' is {shorten(part)!r}; it must be lunN, e.g. lun0")
    digits = part[3:]
    if not digits.isascii() or not digits.isdigit():
        raise SpecError(spec, f"LUN {shorten(part)!r} must be 'lun' followed by a decimal number, e.g. lun0")
    if len(digits.lstrip("0")) > len(str(MAX_LUN)):
        raise SpecError(spec, f"LUN {shorten(part)!r} is out of range (0-{MAX_LUN})")
    lun = int(digits)
    if lun > MAX_LUN:
        raise SpecError(spec, f"LUN {lun} is out of range (0-{MAX_LUN})")
    return lun


def check_label(label: str, error) -> str:
    """Validate a LABEL; `error(msg)` builds the exception so the tab parser can add FILE:LINE."""
    if not label:
        raise error("LABEL after '+' is empty; use letters, digits, '-' and '_'")
    if not _LABEL_RE.fullmatch(label):
        bad = {c for c in label if not (c.isascii() and (c.isalnum() or c in "-_"))}
        raise error(
            f"LABEL {shorten(label)!r} contains {describe_chars(bad)}; only letters, digits, '-' and '_' are allowed"
        )
    if len(label) > MAX_LABEL_LEN:
        raise error(
            f"LABEL {shorten(label)!r} is {len(label)} characters; at most {MAX_LABEL_LEN} "
            "(the kernel's name for the md device, md_LABEL, is limited to 31)"
        )
    return label


def describe_chars(chars: set[str]) -> str:
    """ "'A', ' ' (space)": the offending characters, each quoted, invisible ones named."""
    names = {" ": "space", "\t": "tab", "\u00a0": "no-break space"}
    parts = []
    shown = sorted(chars)[:12]
    for c in shown:
        text = repr(c)
        if c in names:
            text += f" ({names[c]})"
        parts.append(text)
    more = f" and {len(chars) - len(shown)} more" if len(chars) > len(shown) else ""
    return ", ".join(parts) + more


def _parse_target(spec: str, target: str) -> str | None:
    if target.startswith(MISSING_PREFIX):
        return None
    if "@" in target:
        raise SpecError(spec, f"TARGET {shorten(target)!r} contains '@'; only one 'lunN@' may come first")
    if not target:
        raise SpecError(
            spec, "TARGET is empty; expected an iSCSI name such as iqn.2001-04.com.example:storage"
        )
    size = len(target.encode("utf-8", "surrogatepass"))  # argv may carry undecodable bytes
    if size > MAX_TARGET_LEN:
        raise SpecError(spec, f"TARGET is {size} bytes long; iSCSI names are at most {MAX_TARGET_LEN}")
    lowered = target.lower()
    if lowered.startswith("iqn."):
        return _check_iqn(spec, target)
    if lowered.startswith("eui."):
        if not _EUI_RE.fullmatch(target):
            raise SpecError(
                spec, f"TARGET {target!r}: an eui. name is 'eui.' followed by exactly 16 hex digits"
            )
        return target
    if lowered.startswith("naa."):
        if not _NAA_RE.fullmatch(target):
            raise SpecError(
                spec, f"TARGET {target!r}: an naa. name is 'naa.' followed by 16 or 32 hex digits"
            )
        return target
    raise SpecError(
        spec,
        f"TARGET {target!r} is not an iSCSI name: it must start with 'iqn.', 'eui.' or 'naa.' "
        "(or MISSING for a mirror without iSCSI leg)",
    )


def _check_iqn(spec: str, target: str) -> str:
    if not _NAME_CHARS_RE.fullmatch(target):
        bad = {c for c in target if not _NAME_CHARS_RE.fullmatch(c)}
        if all(c.isascii() and c.isupper() for c in bad):
            raise SpecError(
                spec,
                f"TARGET {target!r} contains upper-case letters {describe_chars(bad)}; "
                f"iSCSI names are lower case: write {target.lower()!r}",
            )
        raise SpecError(
            spec,
            f"TARGET {target!r} contains {describe_chars(bad)}; iSCSI names use lower-case letters, "
            "digits, '.', '-' and ':' only",
        )
    m = _IQN_RE.fullmatch(target)
    if not m:
        raise SpecError(
            spec,
            f"TARGET {target!r} is not of the form iqn.YYYY-MM.reversed.domain[:anything], "
            "e.g. iqn.2001-04.com.example:storage",
        )
    month = int(m.group(2))
    if not 1 <= month <= 12:
        raise SpecError(spec, f"TARGET {target!r}: month {m.group(2)} in iqn.YYYY-MM is not 01-12")
    return target
