"""`iscsimple check-config`: every error of tab, config and domU files as FILE:LINE, exit 2."""

import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsimple.cli.checkconfig import check_all
from iscsimple.cli.main import main
from iscsimple.core.paths import HostPaths

DOMU = Path(__file__).resolve().parent / "fixtures" / "domu"
IQN = "iqn.2001-04.com.example:storage"
# A major number from the experimental range: nothing real sits behind these nodes.
FAKE_MAJOR = 241


@pytest.fixture
def etc(tmp_path):
    """A host layout: tab, config, domU dir and a devfs with a few block devices."""
    dev = tmp_path / "dev"
    (dev / "vg0").mkdir(parents=True)
    for minor, name in enumerate(("dm-0", "dm-1", "dm-2")):
        _blockdev(dev / name, minor)
    for name, target in (("web1-root", "dm-0"), ("web1-data", "dm-1"), ("db1-root", "dm-2")):
        (dev / "vg0" / name).symlink_to(f"../{target}")
    (dev / "mapper").mkdir()
    (dev / "mapper" / "vg0-web1--root").symlink_to("../dm-0")
    (dev / "vg0" / "not-a-disk").write_text("")
    xen = tmp_path / "xen"
    xen.mkdir()
    return tmp_path


def _blockdev(path: Path, minor: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("creating block device nodes needs root (scripts/test runs as root)")
    os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(FAKE_MAJOR, minor))


def _run(capsys, root: Path, *args: str, tab_option: bool = True):
    tab = [f"--tab={root / 'tab.conf'}"] if tab_option else []
    code = main(
        ["check-config", *tab, f"--config={root / 'iscsimple.toml'}", f"--path.devfs={root / 'dev'}", *args]
    )
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def _convert(src: Path, dest: Path) -> Path:
    from iscsimple.cli.convert import convert_file, write_conversion

    shutil.copyfile(src, dest)
    conversion, errors = convert_file(dest)
    assert errors == []
    write_conversion(conversion)
    return dest


def test_a_good_host_passes(capsys, etc):
    (etc / "tab.conf").write_text(
        "# LABEL  DEVICE\nweb1-root /dev/vg0/web1-root\nweb1-data /dev/vg0/web1-data\ndb1-root /dev/vg0/db1-root\n"
    )
    (etc / "iscsimple.toml").write_text(
        f'[iscsi]\nportals = ["192.0.2.10"]\n[targets."{IQN}.db"]\nreplacement_timeout = 30\n'
    )
    web1 = _convert(DOMU / "web1.cfg", etc / "xen" / "web1.cfg")
    db1 = _convert(DOMU / "db1.cfg", etc / "xen" / "db1.cfg")
    code, out, err = _run(capsys, etc, str(web1), str(db1))
    assert (code, err) == (0, [])
    assert out.startswith("check-config: ok (tab ")
    assert "3 label(s)" in out and "1 per-target timeout(s)" in out
    assert "4 iscsimple disk entries in 2 domU config file(s)" in out


def test_every_error_is_reported_with_file_and_line(capsys, etc):
    tab = etc / "tab.conf"
    tab.write_text(
        "web1-root  /dev/vg0/web1-root\n"  # 1
        "web1-data  vg0/web1-data\n"  # 2 relative
        "web1-root  /dev/vg0/db1-root\n"  # 3 duplicate label
        "odd        /dev/vg0/not-a-disk\n"  # 4 not a block device
        "alias      /dev/mapper/vg0-web1--root\n"  # 5 same device as line 1 via symlinks
        "later      /dev/vg0/not-made-yet\n"  # 6 warning only
    )
    config = etc / "iscsimple.toml"
    config.write_text("[iscsi]\nreplacement_timeout_mirrored = 0\n")
    cfg = etc / "xen" / "vm.cfg"
    cfg.write_text(
        "name = 'vm'\n"
        "disk = [\n"
        f"  'vdev=xvda,access=w,script=block-iscsimple,target=lun0@{IQN}+web1-root',\n"  # 3 ok
        f"  'vdev=xvdb,access=w,script=block-iscsimple,target=lun0@{IQN}+web1-root',\n"  # 4 label+LUN reused
        f"  'vdev=xvdc,script=/etc/xen/scripts/block-iscsimple,target=lun1@{IQN}+nolabel',\n"  # 5 no tab line
        f"  'script=block-iscsimple,target=lun2@{IQN}',\n"  # 6 no vdev
        f"  'vdev=xvde,script=block-iscsimple,target=lun3@{IQN}+x,access=r',\n"  # 7 target not last
        f"  'iscsimple:lun4@{IQN}+web1-data,xvdf,w',\n"  # 8 legacy
        "  'vdev=xvdg,script=block-iscsimple',\n"  # 9 no target
        "  'phy:/dev/vg0/swap,xvdh,w',\n"  # not ours
        "]\n"
    )
    other = etc / "xen" / "other.cfg"
    other.write_text(f"disk = [ 'vdev=xvda,script=block-iscsimple,target=lun1@{IQN.upper()}' ]\n")
    missing = etc / "xen" / "missing.cfg"

    code, out, err = _run(capsys, etc, str(cfg), str(other), str(missing))
    assert code == 2 and out == "", err
    errors = [line for line in err if not line.startswith(("warning: ", "check-config: "))]
    where = [line.split(": ", 1)[0] for line in errors]
    assert where == [
        f"{tab}:2",
        f"{tab}:3",
        f"{tab}:4",
        f"{tab}:5",
        f"{config}:2",
        f"{cfg}:6",
        f"{cfg}:7",
        f"{cfg}:8",
        f"{cfg}:9",
        f"{other}:1",
        f"{missing}",
        f"{cfg}:4",
        f"{cfg}:4",
        f"{cfg}:5",
    ]
    text = "\n".join(errors)
    for fragment in (
        "relative path",
        "already defined on line 1",
        "is not a block device",
        "same device as the local leg of 'web1-root'",
        "replacement_timeout_mirrored must be positive",
        "no vdev=",
        "target= must come last",
        f"stock xl rejects it: run 'iscsimple convert-config {cfg} --write'",
        "without target=",
        "upper-case",
        "no such file",
        f"LABEL 'web1-root' is also used at {cfg}:3",
        f"lun0@{IQN} is also used at {cfg}:3",
        f"LABEL 'nolabel' has no line in {tab}",
    ):
        assert fragment in text, fragment
    assert f"warning: {tab}:6: DEVICE /dev/vg0/not-made-yet does not exist on this host" in "\n".join(err)
    assert err[-1] == "check-config: 14 error(s); fix them and run it again"
    assert not any("Traceback" in line for line in err)


def test_missing_tab_is_an_error_only_when_labels_need_it(capsys, etc, monkeypatch):
    monkeypatch.setenv("ISCSIMPLE_TAB", str(etc / "tab.conf"))
    plain = etc / "xen" / "plain.cfg"
    plain.write_text(f"disk = [ 'vdev=xvda,script=block-iscsimple,target=lun0@{IQN}' ]\n")
    code, out, err = _run(capsys, etc, str(plain), tab_option=False)
    assert code == 0
    assert err == [
        f"warning: {etc / 'tab.conf'}: tab file not found; create it with one 'LABEL DEVICE' line per mirrored disk"
    ]
    assert "config " in out and "absent, defaults apply" in out

    mirrored = etc / "xen" / "mirrored.cfg"
    mirrored.write_text(f"disk = [ 'vdev=xvda,script=block-iscsimple,target=lun0@{IQN}+web1-root' ]\n")
    code, _, err = _run(capsys, etc, str(mirrored), tab_option=False)
    assert code == 2
    assert err[0] == (
        f"{etc / 'tab.conf'}: tab file not found but 1 disk entry names a LABEL; "
        "create it with one 'LABEL DEVICE' line per mirrored disk"
    )

    # A tab file named on the command line must exist.
    code, _, err = _run(capsys, etc, str(plain))
    assert code == 2
    assert (
        err[0]
        == f"{etc / 'tab.conf'}: tab file not found; create it with one 'LABEL DEVICE' line per mirrored disk"
    )


def test_both_legs_missing(capsys, etc):
    (etc / "tab.conf").write_text("solo MISSING\n")
    cfg = etc / "xen" / "solo.cfg"
    cfg.write_text("disk = [ 'vdev=xvda,script=block-iscsimple,target=MISSING+solo' ]\n")
    code, _, err = _run(capsys, etc, str(cfg))
    assert code == 2
    assert err[0].startswith(f"{cfg}:1: both legs of 'solo' are MISSING (spec and {etc / 'tab.conf'}:1)")


@pytest.mark.parametrize(
    "entry",
    [
        "vdev=xvda,access=w,target=lun0@iqn.2001-04.com.example:s+web1,script=block-iscsimple",
        "target=lun0@iqn.2001-04.com.example:s, script=/etc/xen/scripts/block-iscsimple ,vdev=xvda",
    ],
)
def test_target_written_before_script_is_caught(capsys, etc, entry):
    """xl's target= swallows the rest of the entry: the script= after it never takes effect."""
    (etc / "tab.conf").write_text("")
    cfg = etc / "xen" / "early.cfg"
    cfg.write_text(f"disk = [ '{entry}' ]\n")
    code, _, err = _run(capsys, etc, str(cfg))
    assert code == 2
    assert err[0].startswith(f"{cfg}:1: target= comes before script=")
    assert "target= must come last" in err[0]


def test_target_last_after_script_is_fine_and_other_scripts_are_ignored(capsys, etc):
    (etc / "tab.conf").write_text("")
    cfg = etc / "xen" / "other.cfg"
    cfg.write_text("disk = [ 'vdev=xvdb,target=iqn.x,script=block-iscsi', 'phy:/dev/vg0/a,xvdc,w' ]\n")
    code, _, _ = _run(capsys, etc, str(cfg))
    assert code == 0


def test_crlf_and_unreadable_syntax(capsys, etc):
    (etc / "tab.conf").write_text("")
    crlf = etc / "xen" / "crlf.cfg"
    shutil.copyfile(DOMU / "crlf.cfg", crlf)
    broken = etc / "xen" / "broken.cfg"
    broken.write_text("name = 'x\n")
    code, _, err = _run(capsys, etc, str(crlf), str(broken))
    assert code == 2
    assert (
        err[0]
        == f"{crlf}:1: carriage return (Windows line ending); xl rejects the file: convert it with dos2unix"
    )
    assert f"{broken}:1: unterminated string" in "\n".join(err)


def test_the_legacy_fixtures_as_a_whole(capsys, etc):
    """The shipped legacy examples: every entry is reported, bad specs with the bad part."""
    (etc / "tab.conf").write_text("")
    code, _, err = _run(capsys, etc, *(str(p) for p in sorted(DOMU.glob("*.cfg"))))
    assert code == 2
    text = "\n".join(err)
    assert f"{DOMU / 'bad.cfg'}:3: bad disk spec" in text and "upper-case" in text
    assert f"{DOMU / 'bad.cfg'}:5: bad disk spec" in text and "LABEL 'broken.swap'" in text
    assert f"{DOMU / 'web1.cfg'}:12: legacy disk entry" in text
    assert f"{DOMU / 'converted.cfg'}:4: LABEL 'app2-root' has no line" in text


ENTRY_PIECES = st.sampled_from(
    ["vdev=xvda", "script=block-iscsimple", "script=/x/block-iscsimple", f"target=lun0@{IQN}+web1-root",
     f"target={IQN}", "target=MISSING+x", "target=", "iscsimple:", f"lun1@{IQN}", "+a", ",", "w", "access=r",
     "=", " ", "cdrom", "'", "\\\\"]
)  # fmt: skip
CFG_TEXT = st.lists(st.lists(ENTRY_PIECES, max_size=8).map("".join), max_size=5).map(
    lambda entries: "disk = [ " + ", ".join(f"'{e}'" for e in entries) + " ]\n"
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(st.lists(st.one_of(CFG_TEXT, st.text(max_size=80)), min_size=1, max_size=3))
def test_fuzz_never_an_internal_error(tmp_path, texts):
    (tmp_path / "tab.conf").write_text("web1-root /dev/vg0/web1-root\nx MISSING\n")
    cfgs = []
    for n, text in enumerate(texts):
        cfgs.append(tmp_path / f"{n}.cfg")
        cfgs[-1].write_text(text)
    paths = HostPaths(tab=tmp_path / "tab.conf", config=tmp_path / "none.toml", devfs=tmp_path / "dev")
    report = check_all(paths, cfgs)
    for error in report.errors:
        assert error.startswith((str(tmp_path / "tab.conf"), *(str(c) for c in cfgs))), error
        assert "\n" not in error
