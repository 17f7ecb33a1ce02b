"""`iscsimple convert-config FILE… [--write]` as an operator runs it."""

import shutil
from pathlib import Path

import pytest

from iscsimple.cli.main import main

DOMU = Path(__file__).resolve().parent / "fixtures" / "domu"
IQN = "iqn.2001-04.com.example:storage"


@pytest.fixture
def xen(tmp_path):
    dest = tmp_path / "xen"
    shutil.copytree(DOMU, dest)
    return dest


def _run(capsys, *args):
    code = main(["convert-config", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_diff_only_by_default(capsys, xen):
    before = {p.name: p.read_bytes() for p in xen.iterdir()}
    code, out, err = _run(capsys, xen / "web1.cfg", xen / "db1.cfg", xen / "converted.cfg")
    assert code == 0
    assert out.count("\n--- ") + out.startswith("--- ") == 2  # one diff per file that changes
    assert f"+++ {xen / 'web1.cfg'} (converted)" in out
    assert f"+    'vdev=xvda2,access=w,script=block-iscsimple,target=lun0@{IQN}.web+web1-root',\n" in out
    assert f"{xen / 'converted.cfg'}: no legacy iscsimple: entries, nothing to convert" in err
    assert err.rstrip().endswith("convert-config: nothing written; add --write to apply")
    assert {p.name: p.read_bytes() for p in xen.iterdir()} == before


def test_write_converts_in_place_with_backups(capsys, xen):
    original = (xen / "crlf.cfg").read_bytes()
    code, out, err = _run(capsys, "--write", xen / "web1.cfg", xen / "crlf.cfg")
    assert code == 0
    assert f"{xen / 'web1.cfg'}: converted 2 entries (backup {xen / 'web1.cfg.bak'})" in err
    assert (xen / "crlf.cfg.bak").read_bytes() == original
    assert b"\r\n" in (xen / "crlf.cfg").read_bytes()
    assert "iscsimple:" not in (xen / "web1.cfg").read_text().replace("# ", "")
    # Running it again: nothing to do, backups untouched.
    code, out, err = _run(capsys, "--write", xen / "web1.cfg", xen / "crlf.cfg")
    assert (code, out) == (0, "")
    assert (xen / "crlf.cfg.bak").read_bytes() == original
    assert sorted(p.name for p in xen.iterdir() if ".bak" in p.name) == ["crlf.cfg.bak", "web1.cfg.bak"]


def test_any_error_writes_nothing(capsys, xen):
    good_before = (xen / "web1.cfg").read_bytes()
    code, out, err = _run(capsys, "--write", xen / "web1.cfg", xen / "bad.cfg", xen / "nope.cfg")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert [line.split(": ", 1)[0] for line in lines[:-1]] == [
        f"{xen / 'bad.cfg'}:3",
        f"{xen / 'bad.cfg'}:5",
        f"{xen / 'bad.cfg'}:6",
        f"{xen / 'nope.cfg'}",
    ]
    assert lines[-1] == "convert-config: 4 error(s), nothing written; fix the entries and run it again"
    assert (xen / "web1.cfg").read_bytes() == good_before
    assert not list(xen.glob("*.bak"))


def test_needs_a_file(capsys):
    code, out, err = _run(capsys)
    assert out == ""
    assert code == 2
    assert err.startswith("iscsimple: the following arguments are required: DOMU.cfg")


def test_an_older_backup_is_never_overwritten(capsys, xen):
    (xen / "web1.cfg.bak").write_text("an older backup\n")
    original = (xen / "web1.cfg").read_bytes()
    code, _, err = _run(capsys, "--write", xen / "web1.cfg")
    assert code == 0
    assert (xen / "web1.cfg.bak").read_text() == "an older backup\n"
    (stamped,) = xen.glob("web1.cfg.bak-*")
    assert stamped.read_bytes() == original
    assert f"(backup {stamped})" in err
