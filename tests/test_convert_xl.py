"""What stock xl (Xen 4.17) makes of our disk entries, asked of xl's own parser.

libxlutil (Debian xen-utils-4.17) holds the code xl uses to read a domU config
(`xlu_cfg_readdata`, `xlu_cfg_get_list`) and each DISKSPEC (`xlu_disk_parse`). It
needs no hypervisor, so it runs anywhere the package is installed (scripts/test
installs it). This checks the README's claims: the legacy `iscsimple:` prefix is
rejected, the converted `script=…,target=…` form is accepted and hands our spec to the
script unchanged, and core.xlcfg finds the same disk entries xl does.
"""

import ctypes
import ctypes.util
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsimple.cli.convert import convert_file, write_conversion
from iscsimple.core.xlcfg import parse_diskspec, string_lists

DOMU = Path(__file__).resolve().parent / "fixtures" / "domu"
IQN = "iqn.2001-04.com.example:storage"

# The head of libxl_device_disk (libxl_types.idl), stable since Xen 4.2:
# backend_domid u32, backend_domname char*, pdev_path char*, vdev char*,
# backend int, format int, script char*, removable int, readwrite int, ...
_PDEV_PATH, _VDEV, _SCRIPT, _READWRITE = 16, 24, 40, 52
_DISK_STRUCT_BYTES = 4096  # larger than the struct in any Xen release


class LibXlUtil:
    def __init__(self):
        try:
            self.util = ctypes.CDLL("libxlutil.so.4.17")
            self.light = ctypes.CDLL("libxenlight.so.4.17")
        except OSError as e:
            pytest.skip(
                f"xl's libxlutil 4.17 is not installed ({e}); install xen-utils-4.17 (scripts/test does)"
            )
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self.libc.fopen.restype = ctypes.c_void_p
        self.libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        self.libc.fclose.argtypes = [ctypes.c_void_p]
        u = self.util
        u.xlu_cfg_init.restype = ctypes.c_void_p
        u.xlu_cfg_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        u.xlu_cfg_destroy.argtypes = [ctypes.c_void_p]
        u.xlu_cfg_readdata.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        u.xlu_cfg_get_list.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
        u.xlu_cfg_get_listitem.argtypes = [ctypes.c_void_p, ctypes.c_int]
        u.xlu_cfg_get_listitem.restype = ctypes.c_char_p
        u.xlu_disk_parse.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_void_p,
        ]
        self.light.libxl_device_disk_init.argtypes = [ctypes.c_void_p]
        self.light.libxl_device_disk_dispose.argtypes = [ctypes.c_void_p]

    def _with_config(self, report: Path, use):
        stream = self.libc.fopen(str(report).encode(), b"w")
        cfg = self.util.xlu_cfg_init(stream, b"domu.cfg")
        try:
            return use(cfg)
        finally:
            self.util.xlu_cfg_destroy(cfg)
            self.libc.fclose(stream)

    def parse_disk(self, spec: str, report: Path) -> dict:
        """xl's reading of one DISKSPEC: rc, the error it printed, and the fields libxl gets."""

        def parse(cfg):
            disk = ctypes.create_string_buffer(_DISK_STRUCT_BYTES)
            self.light.libxl_device_disk_init(disk)
            specs = (ctypes.c_char_p * 1)(spec.encode())
            rc = self.util.xlu_disk_parse(cfg, 1, specs, disk)

            def string_at(offset):
                pointer = ctypes.c_void_p.from_buffer(disk, offset).value
                return ctypes.string_at(pointer).decode() if pointer else None

            result = {
                "rc": rc,
                "target": string_at(_PDEV_PATH),
                "vdev": string_at(_VDEV),
                "script": string_at(_SCRIPT),
                "readwrite": ctypes.c_int.from_buffer(disk, _READWRITE).value,
            }
            self.light.libxl_device_disk_dispose(disk)
            return result

        result = self._with_config(report, parse)
        result["error"] = report.read_text()
        return result

    def disk_list(self, data: bytes, report: Path) -> list[str] | str:
        """The `disk` list as xl reads the file, or xl's error text."""

        def read(cfg):
            if self.util.xlu_cfg_readdata(cfg, data, len(data)):
                return None
            items, count = ctypes.c_void_p(), ctypes.c_int()
            if self.util.xlu_cfg_get_list(cfg, b"disk", ctypes.byref(items), ctypes.byref(count), 0):
                return []
            return [self.util.xlu_cfg_get_listitem(items, i).decode() for i in range(count.value)]

        result = self._with_config(report, read)
        return report.read_text() if result is None else result


@pytest.fixture(scope="module")
def xl():
    return LibXlUtil()


@pytest.fixture
def report(tmp_path):
    return tmp_path / "xl-report.txt"


@pytest.mark.parametrize(
    "legacy",
    [
        f"iscsimple:lun0@{IQN}+web1-root,xvda2,w",
        f"iscsimple:{IQN},xvdb,r",
        "iscsimple:MISSING+solo,xvda,w",
    ],
)
def test_stock_xl_rejects_the_legacy_prefix(xl, report, legacy):
    parsed = xl.parse_disk(legacy, report)
    assert parsed["rc"] != 0
    # Either xl sees an unknown prefix (when a non-alphanumeric follows the colon), or it
    # takes "iscsimple:SPEC" for a path and the vdev for a format it does not know.
    assert (
        "unknown deprecated disk prefix" in parsed["error"] or "unknown value for format" in parsed["error"]
    )


def test_stock_xl_knows_only_four_script_prefixes(xl, report):
    """The documented deprecated script prefixes work; any other prefix does not."""
    for prefix in ("iscsi", "nbd", "enbd", "drbd"):
        parsed = xl.parse_disk(f"{prefix}:{IQN},xvda,w", report)
        assert (parsed["rc"], parsed["script"]) == (0, f"block-{prefix}")
    parsed = xl.parse_disk("iscsimple:/dev/x,xvda,w", report)
    assert parsed["rc"] != 0 and "unknown deprecated disk prefix" in parsed["error"]


@pytest.mark.parametrize(
    ("converted", "target", "vdev", "readwrite"),
    [
        (
            f"vdev=xvda2,access=w,script=block-iscsimple,target=lun0@{IQN}+web1-root",
            f"lun0@{IQN}+web1-root",
            "xvda2",
            1,
        ),
        (f"vdev=xvdb,access=r,script=block-iscsimple,target={IQN}", IQN, "xvdb", 0),
        ("vdev=xvda,script=block-iscsimple,target=MISSING+solo", "MISSING+solo", "xvda", 1),
    ],
)
def test_stock_xl_accepts_the_converted_form(xl, report, converted, target, vdev, readwrite):
    parsed = xl.parse_disk(converted, report)
    assert parsed["rc"] == 0, parsed["error"]
    # libxl runs /etc/xen/scripts/block-iscsimple with our spec, untouched, as `params`.
    assert (parsed["script"], parsed["target"], parsed["vdev"], parsed["readwrite"]) == (
        "block-iscsimple",
        target,
        vdev,
        readwrite,
    )


def test_target_must_come_last(xl, report):
    """target= swallows the rest: anything after it becomes part of the spec."""
    parsed = xl.parse_disk(f"vdev=xvda,script=block-iscsimple,target=lun0@{IQN}+a,access=r", report)
    assert parsed["target"] == f"lun0@{IQN}+a,access=r"


@pytest.mark.parametrize("name", ["web1.cfg", "db1.cfg", "converted.cfg", "bad.cfg"])
def test_xlcfg_finds_the_disks_xl_finds(xl, report, name):
    data = (DOMU / name).read_bytes()
    assert [s.value for s in string_lists(data.decode())] == xl.disk_list(data, report)


def test_xl_rejects_crlf_files(xl, report):
    """Worth knowing when a config was edited on Windows: check-config says so too."""
    assert "lexical error" in xl.disk_list((DOMU / "crlf.cfg").read_bytes(), report)


@pytest.mark.parametrize("name", ["web1.cfg", "db1.cfg"])
def test_converted_files_are_accepted_by_xl(xl, report, tmp_path, name):
    path = tmp_path / name
    shutil.copyfile(DOMU / name, path)
    before = xl.disk_list(path.read_bytes(), report)
    assert any(xl.parse_disk(d, report)["rc"] != 0 for d in before)

    conversion, errors = convert_file(path)
    assert errors == []
    write_conversion(conversion)

    after = xl.disk_list(path.read_bytes(), report)
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        parsed = xl.parse_disk(new, report)
        assert parsed["rc"] == 0, (new, parsed["error"])
        if old.startswith("iscsimple:"):
            assert parsed["script"] == "block-iscsimple"
            assert parsed["target"] == old[len("iscsimple:") :].split(",")[0]
        else:
            assert new == old


# Files shaped like real configs (statements of strings, numbers and lists, comments,
# odd spacing, escapes), so that xl accepts most of them and there is something to compare.
_SPACE = st.sampled_from(["", " ", "\t", "  "])
_STRING = st.sampled_from(
    ["'a'", '"b"', f"'iscsimple:lun0@{IQN}+x,xvda,w'", f'"vdev=xvdb,script=block-iscsimple,target={IQN}"',
     "'a\\'b'", '"c\\\\d"', "'tap:aio:/x,xvda,w'", "'#not a comment'", '"[x]"', "''"]
)  # fmt: skip
_ITEMS = st.lists(st.tuples(_SPACE, _STRING, st.sampled_from(["", "\n", " # c\n"])), max_size=4)
_LIST = st.builds(
    lambda items, trailing: (
        "[" + ",".join(f"{sp}{v}{nl}" for sp, v, nl in items) + ("," if trailing and items else "") + "]"
    ),
    _ITEMS,
    st.booleans(),
)
_VALUE = st.one_of(_STRING, st.sampled_from(["1", "2048", "0x10"]), _LIST)
_STATEMENT = st.builds(
    lambda key, op, sp, value, end: f"{key}{sp}{op}{sp}{value}{end}",
    st.sampled_from(["disk", "disk", "name", "vif", "disks", "memory"]),
    st.sampled_from(["=", "=", "+="]),
    _SPACE,
    _VALUE,
    st.sampled_from(["\n", ";\n", "; ", " # comment\n", "\n\n"]),
)
XL_FILE = st.lists(st.one_of(_STATEMENT, st.just("# a comment\n"), st.just("\n")), max_size=8).map("".join)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200, deadline=None)
@given(XL_FILE)
def test_fuzz_xlcfg_agrees_with_xl(xl, tmp_path, text):
    """Whenever xl reads a file, core.xlcfg finds the same disk strings at the same places."""
    report = tmp_path / "fuzz-report.txt"
    theirs = xl.disk_list(text.encode(), report)
    if isinstance(theirs, str):
        return  # xl rejects the file (e.g. `disk = 1`): convert-config leaves such entries alone
    ours = string_lists(text)
    assert len(ours) == len(theirs)
    for mine, xls in zip(ours, theirs, strict=True):
        assert text[mine.start] == mine.quote and text[mine.end - 1] == mine.quote
        if not mine.has_escape:  # xl unescapes; we keep the literal
            assert mine.value == xls


@pytest.mark.parametrize(
    ("text", "disks"),
    [
        ("disk = 'a'\ndisk = ['b']\n", ["b"]),
        ("disk = ['a']\ndisk = 'x'\n", []),
        ("disk = ['a']\ndisk += ['b']\n", ["a", "b"]),
        ("disk += ['b']\n", ["b"]),
        ("disk = ['a']\ndisk = ['c']; disk += ['d']\n", ["c", "d"]),
    ],
)
def test_later_settings_replace_or_extend_like_xl(xl, report, text, disks):
    assert xl.disk_list(text.encode(), report) == disks
    assert [s.value for s in string_lists(text)] == disks


_PARAM = st.sampled_from(
    ["vdev=xvda", "vdev=xvdb2", "access=w", "access=ro", "format=raw", "script=block-iscsimple",
     "script=/usr/local/bin/x", "devtype=disk", "cdrom", "discard", "no-discard", "direct-io-safe",
     "/dev/vg0/x", "xvdc", "w", "raw", "", " xvdd", "\tr"]
)  # fmt: skip
_TARGET = st.sampled_from(["", f"target=lun0@{IQN}+a", f"target={IQN}", "target=a,b", "target= x "])
_BARE = {"/dev/vg0/x", "xvdc", "w", "raw", "", " xvdd", "\tr", "xvde"}


def _diskspec(parts: list[str], target: str) -> str:
    # xl refuses target= after a bare value ("target respecified"): keep one or the other.
    if target:
        parts = [p for p in parts if p not in _BARE]
        if not any(p.startswith("vdev=") for p in parts):
            parts = ["vdev=xvdz", *parts]  # xl requires a vdev
    return ",".join([*parts, target] if target else parts)


DISKSPEC = st.builds(
    _diskspec,
    # Each keyword at most once: xl rejects the rest ("respecified").
    st.lists(_PARAM, max_size=4, unique_by=lambda p: p.split("=")[0] if "=" in p else p).flatmap(
        lambda parts: st.permutations([*parts, "xvde"] if len(parts) < 3 else parts)
    ),
    _TARGET,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300, deadline=None)
@given(DISKSPEC)
def test_fuzz_diskspec_agrees_with_xl(xl, report, spec):
    """Whenever xl accepts a DISKSPEC, parse_diskspec gets the same target, vdev and script."""
    parsed = xl.parse_disk(spec, report)
    if parsed["rc"] != 0:
        return
    disk = parse_diskspec(spec)
    # xl leaves an empty target unset; so do we, as "".
    assert (disk.target or None, disk.vdev, disk.script) == (
        parsed["target"] or None,
        parsed["vdev"],
        parsed["script"],
    )
