"""convert-config: legacy `iscsimple:` entries → `vdev=..,script=block-iscsimple,target=..`,
every other byte of the file unchanged."""

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsimple.cli.convert import (
    backup_path,
    convert_file,
    convert_text,
    legacy_to_xl,
    write_conversion,
)
from iscsimple.core.errors import InputError, OperationError
from iscsimple.core.xlcfg import XlCfgError, parse_diskspec, string_lists

DOMU = Path(__file__).resolve().parent / "fixtures" / "domu"
IQN = "iqn.2001-04.com.example:storage"


@pytest.fixture
def cfgdir(tmp_path):
    dest = tmp_path / "xen"
    shutil.copytree(DOMU, dest)
    return dest


@pytest.mark.parametrize(
    ("legacy", "xl"),
    [
        (f"iscsimple:lun0@{IQN}+web1,xvda2,w", f"vdev=xvda2,access=w,script=block-iscsimple,target=lun0@{IQN}+web1"),
        (f"iscsimple:{IQN},xvdb,r", f"vdev=xvdb,access=r,script=block-iscsimple,target={IQN}"),
        (f"iscsimple:{IQN}+a,xvdb", f"vdev=xvdb,script=block-iscsimple,target={IQN}+a"),
        (f"iscsimple:{IQN}+a,xvdb,", f"vdev=xvdb,script=block-iscsimple,target={IQN}+a"),
        (f" iscsimple: {IQN}+a , xvdb:disk , rw", f"vdev=xvdb,devtype=disk,access=rw,script=block-iscsimple,target={IQN}+a"),
        ("iscsimple:MISSING+solo,xvda,w", "vdev=xvda,access=w,script=block-iscsimple,target=MISSING+solo"),
    ],
)  # fmt: skip
def test_legacy_to_xl(legacy, xl):
    assert legacy_to_xl(legacy) == xl
    disk = parse_diskspec(xl)
    assert disk.script == "block-iscsimple"
    assert disk.target == legacy.split(":", 1)[1].split(",")[0].strip()
    assert xl.rsplit(",", 1)[1].startswith("target=") or "+" in xl


@pytest.mark.parametrize(
    ("legacy", "fragments"),
    [
        (f"iscsimple:{IQN}+a", ["no virtual device"]),
        (f"iscsimple:{IQN}+a,,w", ["no virtual device"]),
        (f"iscsimple:{IQN}+a,xvda,w,extra", ["4 fields"]),
        (f"iscsimple:{IQN}+a,xvda,rwx", ["access 'rwx'"]),
        (f"iscsimple:{IQN}+a,xvda:floppy,w", ["device type 'floppy'"]),
        ("iscsimple:lun0@IQN.2001-04.com.example:x+a,xvda,w", ["bad disk spec", "upper-case"]),
        ("iscsimple:MISSING,xvda,w", ["'MISSING'", "+LABEL"]),
        ("iscsimple:,xvda,w", ["it is empty"]),
    ],
)
def test_legacy_to_xl_rejects(legacy, fragments):
    with pytest.raises((ValueError, InputError)) as caught:
        legacy_to_xl(legacy)
    for fragment in fragments:
        assert fragment in str(caught.value)


def _outside_entries(text: str) -> list[str]:
    """The file with every disk string literal cut out: what must not change."""
    pieces, done = [], 0
    for s in string_lists(text):
        pieces.append(text[done : s.start])
        done = s.end
    pieces.append(text[done:])
    return pieces


def test_multiline_list_with_comments_and_other_entries():
    text = (DOMU / "web1.cfg").read_text()
    new, rewrites, errors = convert_text(text, "web1.cfg")
    assert errors == []
    assert [r.line for r in rewrites] == [12, 15]
    assert new == text.replace(
        f"'iscsimple:lun0@{IQN}.web+web1-root,xvda2,w'",
        f"'vdev=xvda2,access=w,script=block-iscsimple,target=lun0@{IQN}.web+web1-root'",
    ).replace(
        f"'iscsimple:lun1@{IQN}.web+web1-data,xvdb,w'",
        f"'vdev=xvdb,access=w,script=block-iscsimple,target=lun1@{IQN}.web+web1-data'",
    )
    assert "'phy:/dev/vg0/web1-swap,xvda1,w'" in new
    assert "# swap stays local\n" in new and "   # data\n" in new
    assert _outside_entries(new) == _outside_entries(text)
    assert [s.value for s in string_lists(new)] == [
        f"vdev=xvda2,access=w,script=block-iscsimple,target=lun0@{IQN}.web+web1-root",
        "phy:/dev/vg0/web1-swap,xvda1,w",
        f"vdev=xvdb,access=w,script=block-iscsimple,target=lun1@{IQN}.web+web1-data",
    ]


def test_double_quotes_one_line_and_unmirrored():
    text = (DOMU / "db1.cfg").read_text()
    new, rewrites, errors = convert_text(text)
    assert errors == [] and len(rewrites) == 2
    line = next(x for x in new.splitlines() if x.startswith("disk"))
    assert line == (
        f'disk = ["vdev=xvda,access=w,script=block-iscsimple,target=lun2@{IQN}.db+db1-root", '
        f'"vdev=xvdb,access=r,script=block-iscsimple,target=lun3@{IQN}.db", '
        '"format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/srv/iso/debian-12.iso"]'
    )
    assert _outside_entries(new) == _outside_entries(text)


def test_crlf_and_append_and_semicolon_kept_byte_for_byte():
    data = (DOMU / "crlf.cfg").read_bytes()
    new, rewrites, errors = convert_text(data.decode())
    assert errors == []
    assert [r.line for r in rewrites] == [4, 5]
    assert new.encode() == data.replace(
        b"'iscsimple:MISSING+legacy3-root,xvda2,w'", b"'vdev=xvda2,access=w,script=block-iscsimple,target=MISSING+legacy3-root'"
    ).replace(
        b"' iscsimple:eui.02004567A425678D+legacy3-data, xvdb:disk, rw'",
        b"'vdev=xvdb,devtype=disk,access=rw,script=block-iscsimple,target=eui.02004567A425678D+legacy3-data'",
    )  # fmt: skip
    assert new.count("\r\n") == data.count(b"\r\n")


def test_already_converted_file_is_unchanged():
    text = (DOMU / "converted.cfg").read_text()
    new, rewrites, errors = convert_text(text)
    assert (new, rewrites, errors) == (text, (), [])


def test_every_bad_entry_is_reported_with_its_line():
    text = (DOMU / "bad.cfg").read_text()
    _, rewrites, errors = convert_text(text, "bad.cfg")
    messages = [str(e) for e in errors]
    assert [m.split(": ", 1)[0] for m in messages] == ["bad.cfg:3", "bad.cfg:5", "bad.cfg:6"]
    assert "upper-case" in messages[0]
    assert "LABEL 'broken.swap'" in messages[1]
    assert "4 fields" in messages[2]
    assert [r.line for r in rewrites] == [4]  # the good one is converted in the text...
    assert all(isinstance(e, InputError) for e in errors)  # ...but the CLI writes nothing


def test_escapes_are_left_to_a_person():
    text = "disk = [ 'iscsimple:lun0@iqn.2001-04.com.example:x+a\\x2c,xvda,w' ]\n"
    new, rewrites, errors = convert_text(text, "e.cfg")
    assert new == text and rewrites == ()
    assert "backslash escape" in str(errors[0]) and str(errors[0]).startswith("e.cfg:1: ")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("name = 'x\ndisk = []\n", 1, "unterminated string"),
        ("disk = [ 'a', 1 ]\n", 1, "unexpected '1' in the disk list"),
        ("name = 'x'\ndisk = [ 'a',\n", 2, "no closing ']'"),
        ("memory = -1\n", 1, "unexpected character '-'"),
    ],
)
def test_unreadable_config_is_an_error_with_line(text, line, fragment):
    new, rewrites, errors = convert_text(text, "x.cfg")
    assert new == text and rewrites == ()
    (error,) = errors
    assert isinstance(error, XlCfgError)
    assert str(error).startswith(f"x.cfg:{line}: ") and fragment in str(error)


def test_not_a_disk_setting():
    """Only `disk` lists count: a vif list or a `disk` inside a string or comment does not."""
    text = "vif = [ 'iscsimple:x,y,z' ]\n# disk = [ 'iscsimple:x,y,z' ]\nextra = \"disk = ['q']\"\ndisks = ['x']\n"
    assert string_lists(text) == []
    assert convert_text(text)[0] == text


def test_diff_and_write_keep_a_backup(cfgdir):
    path = cfgdir / "web1.cfg"
    original = path.read_bytes()
    os.chmod(path, 0o640)
    conversion, errors = convert_file(path)
    assert errors == [] and conversion.changed
    diff = conversion.diff()
    assert diff.startswith(f"--- {path}\n+++ {path} (converted)\n")
    assert f"-    'iscsimple:lun0@{IQN}.web+web1-root,xvda2,w',\n" in diff
    assert f"+    'vdev=xvda2,access=w,script=block-iscsimple,target=lun0@{IQN}.web+web1-root',\n" in diff
    assert sum(1 for x in diff.splitlines() if x.startswith(("+", "-"))) == 2 + 2 * 2
    assert path.read_bytes() == original  # diff only

    backup = write_conversion(conversion)
    assert backup == cfgdir / "web1.cfg.bak"
    assert backup.read_bytes() == original
    assert path.read_text() == conversion.converted
    assert (path.stat().st_mode & 0o777, backup.stat().st_mode & 0o777) == (0o640, 0o640)
    assert not [p for p in cfgdir.iterdir() if p.name.endswith(".tmp")]

    # A second run has nothing to do; an existing backup is never overwritten.
    again, errors = convert_file(path)
    assert errors == [] and not again.changed
    assert backup_path(path, now=0).name.startswith("web1.cfg.bak-19700101T")


def test_write_through_symlink_edits_the_target(cfgdir):
    real = cfgdir / "db1.cfg"
    link = cfgdir / "auto-db1.cfg"
    link.symlink_to("db1.cfg")
    conversion, _ = convert_file(link)
    write_conversion(conversion)
    assert link.is_symlink()
    assert "script=block-iscsimple" in real.read_text()
    assert (cfgdir / "db1.cfg.bak").read_text() == conversion.original


def test_write_refuses_when_the_file_changed_meanwhile(cfgdir):
    path = cfgdir / "web1.cfg"
    conversion, _ = convert_file(path)
    path.write_text(path.read_text() + "# edited meanwhile\n")
    with pytest.raises(OperationError, match="changed while it was being converted"):
        write_conversion(conversion)
    assert not (cfgdir / "web1.cfg.bak").exists()


def test_undecodable_bytes_survive(tmp_path):
    path = tmp_path / "latin1.cfg"
    data = b"# Gr\xfc\xdfe aus K\xf6ln\ndisk = [ 'iscsimple:lun0@iqn.2001-04.com.example:x+a,xvda,w' ]\n"
    path.write_bytes(data)
    conversion, errors = convert_file(path)
    assert errors == []
    write_conversion(conversion)
    assert path.read_bytes() == data.replace(
        b"iscsimple:lun0@iqn.2001-04.com.example:x+a,xvda,w",
        b"vdev=xvda,access=w,script=block-iscsimple,target=lun0@iqn.2001-04.com.example:x+a",
    )


def test_missing_file_is_input_error(tmp_path):
    conversion, errors = convert_file(tmp_path / "nope.cfg")
    assert conversion is None
    assert "no such file" in str(errors[0]) and errors[0].exit_code == 2


# --- fuzzing: any text → a result or our own error, and nothing outside the entries changes ----

CFG_PIECES = st.sampled_from(
    ["disk", " = ", "+=", "[", "]", ",", "'", '"', "\n", "# c\n", ";", "name", "1",
     f"'iscsimple:lun0@{IQN}+a,xvda,w'", f'"iscsimple:{IQN},xvdb,r"', "'phy:/dev/x,xvdc,w'", "\\", "-"]
)  # fmt: skip


@given(st.one_of(st.lists(CFG_PIECES, max_size=25).map("".join), st.text(max_size=200)))
def test_fuzz_convert(text):
    new, rewrites, errors = convert_text(text, "f.cfg")
    for e in errors:
        assert isinstance(e, InputError) and str(e).startswith("f.cfg:")
    if new != text:
        assert rewrites
        assert _outside_entries(new) == _outside_entries(text)
        assert not any(s.value.startswith("iscsimple:") for s in string_lists(new)) or errors
