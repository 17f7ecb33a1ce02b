"""Where the disk entries are in an xl domain config file (domU .cfg), byte for byte.

Just enough of xl's config syntax (libxlu_cfg_l.l) to find the string literals of the
``disk`` list xl ends up with (a later ``disk = [...]`` replaces, ``disk += [...]``
extends) with their exact positions, so that
`iscsimple convert-config` can rewrite one entry and leave every other byte alone, and
`iscsimple check-config` can report ``FILE:LINE``. Plus a reader of one DISKSPEC string
(xl-disk-configuration(5)): comma-separated ``key=value``, flags and positional
parameters, where ``target=`` swallows the rest of the string and so must come last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import FileInputError

DISK_KEY = "disk"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*")


XlCfgError = FileInputError  # the one FILE:LINE error type (core.errors), under its old name


@dataclass(frozen=True)
class XlString:
    """One quoted string of the file: `text[start:end]` is the literal, quotes included."""

    value: str
    start: int
    end: int
    line: int
    quote: str  # "'" or '"'

    @property
    def has_escape(self) -> bool:
        return "\\" in self.value


@dataclass(frozen=True)
class _Token:
    kind: str  # "ident", "string", "number", or the punctuation itself
    text: str
    start: int
    end: int
    line: int


def _tokens(text: str, path: str) -> list[_Token]:
    tokens = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            tokens.append(_Token("\n", c, i, i + 1, line))
            line += 1
            i += 1
        elif c in " \t\r\f\v":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "'\"":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                # Both quote kinds take backslash escapes (xlu__cfgl_dequote).
                j += 2 if text[j] == "\\" and j + 1 < n and text[j + 1] != "\n" else 1
            if j >= n or text[j] != c:
                raise FileInputError(
                    path, line, f"unterminated string starting with {c}; close it on the same line"
                )
            tokens.append(_Token("string", text[i : j + 1], i, j + 1, line))
            i = j + 1
        elif text.startswith("+=", i):
            tokens.append(_Token("+=", "+=", i, i + 2, line))
            i += 2
        elif c in "=[],;()":
            tokens.append(_Token(c, c, i, i + 1, line))
            i += 1
        elif m := _IDENT.match(text, i):
            tokens.append(_Token("ident", m.group(), i, m.end(), line))
            i = m.end()
        elif m := _NUMBER.match(text, i):
            tokens.append(_Token("number", m.group(), i, m.end(), line))
            i = m.end()
        else:
            raise FileInputError(path, line, f"unexpected character {c!r}; is this an xl domain config file?")
    return tokens


def _unquote(literal: str) -> str:
    return literal[1:-1]


def string_lists(text: str, key: str = DISK_KEY, path: str = "<cfg>") -> list[XlString]:
    """The strings xl ends up with for ``KEY``, in file order, as xl combines settings:
    ``KEY = [...]`` replaces what came before (``KEY = 'x'`` leaves no list at all) and
    ``KEY += [...]`` appends."""
    tokens = _tokens(text, path)
    found: list[XlString] = []
    i = 0
    at_statement_start = True
    while i < len(tokens):
        t = tokens[i]
        if t.kind in ("\n", ";"):
            at_statement_start = True
            i += 1
            continue
        if (
            at_statement_start
            and t.kind == "ident"
            and t.text == key
            and i + 2 < len(tokens)
            and tokens[i + 1].kind in ("=", "+=")
        ):
            appending = tokens[i + 1].kind == "+="
            j = i + 2
            while j < len(tokens) and tokens[j].kind == "\n":
                j += 1
            if j < len(tokens) and tokens[j].kind == "[":
                items, i = _list_items(tokens, j, key, path, tokens[i].line)
                found = found + items if appending else items
                at_statement_start = False
                continue
            if not appending:
                found = []  # KEY = 'x' or KEY = 1: no list any more
        at_statement_start = False
        i += 1
    return found


def _list_items(tokens: list[_Token], j: int, key: str, path: str, line: int) -> tuple[list[XlString], int]:
    """The strings of the list opening at tokens[j]; returns them and the index after ']'."""
    items = []
    j += 1
    while j < len(tokens) and tokens[j].kind != "]":
        s = tokens[j]
        if s.kind == "string":
            items.append(XlString(_unquote(s.text), s.start, s.end, s.line, s.text[0]))
        elif s.kind not in (",", "\n"):
            raise FileInputError(
                path, s.line, f"unexpected {s.text!r} in the {key} list; expected quoted strings"
            )
        j += 1
    if j >= len(tokens):
        raise FileInputError(path, line, f"the {key} list opened here has no closing ']'")
    return items, j + 1


_POSITIONS = ("target", "format", "vdev", "access")


@dataclass(frozen=True)
class XlDisk:
    """One DISKSPEC as xl reads it (only the shape; values are not checked here)."""

    params: dict[str, str] = field(default_factory=dict)  # every key=value, positional ones included
    flags: tuple[str, ...] = ()

    @property
    def target(self) -> str | None:
        return self.params.get("target")

    @property
    def script(self) -> str | None:
        return self.params.get("script")

    @property
    def vdev(self) -> str | None:
        return self.params.get("vdev")


_KEY = re.compile(r"[a-z][-a-z0-9_]*")


def parse_diskspec(value: str) -> XlDisk:
    """Split a DISKSPEC into parameters and flags, the way xl's lexer (libxlu_disk_l.l) does.

    Whitespace before a parameter is ignored; ``target=`` takes the whole rest of the
    string (so a target may contain commas, and nothing may follow it); a bare value goes
    to the first of target, format, vdev, access not given yet. Deprecated ``prefix:``
    handling is not reproduced: a legacy entry is reported as such before this is used.
    """
    params: dict[str, str] = {}
    flags: list[str] = []
    rest = value
    while rest:
        rest = rest.lstrip(" \t\n")
        if rest.startswith("target="):
            params["target"] = rest[len("target=") :]
            break
        part, _, rest = rest.partition(",")
        key, eq, val = part.partition("=")
        if eq and _KEY.fullmatch(key):
            params[key] = val
        elif not eq and part in _FLAGS:
            flags.append(part)
        else:
            slot = next((name for name in _POSITIONS if name not in params), None)
            if slot is not None:
                params[slot] = part
    return XlDisk(params, tuple(flags))


# The bare keywords xl-disk-configuration(5) knows; anything else bare is positional.
_FLAGS = frozenset(
    {"cdrom", "direct-io-safe", "discard", "no-discard", "colo", "no-colo", "trusted", "untrusted"}
)
