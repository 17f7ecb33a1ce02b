"""`iscsimple install-hook`: the launcher xl runs, and example files that never replace real ones."""

import os
import stat
import subprocess
import sys
from pathlib import Path

from iscsimple.cli.install import EXAMPLE_CONFIG, EXAMPLE_TAB, MARKER, entry_point, install_hook, launcher
from iscsimple.cli.main import main
from iscsimple.core.config import Config, load_config
from iscsimple.core.tab import parse_tab

HOOK = Path("etc/xen/scripts/block-iscsimple")
TAB = Path("etc/xen/scripts/block-iscsimple-tab.conf")
CONFIG = Path("etc/iscsimple/iscsimple.toml")


def _install(capsys, *args):
    code = main(["install-hook", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_fresh_install(capsys, tmp_path):
    code, out, err = _install(capsys, "--prefix", tmp_path)
    assert (code, err) == (0, "")
    hook = tmp_path / HOOK
    assert stat.S_IMODE(hook.stat().st_mode) == 0o755
    text = hook.read_text()
    assert text.startswith("#!/bin/sh\n") and MARKER in text
    argv = entry_point()
    assert Path(argv[0]).is_absolute()  # xl's PATH is minimal
    assert text.rstrip().endswith('"$@"')
    assert out.splitlines() == [
        f"{hook}: installed (runs {' '.join(argv)})",
        f"{tmp_path / TAB}: example written",
        f"{tmp_path / CONFIG}: example written",
    ]
    # The examples are valid and do nothing until edited.
    assert parse_tab((tmp_path / TAB).read_text()).entries == {}
    assert (tmp_path / TAB).read_text() == EXAMPLE_TAB
    assert (tmp_path / CONFIG).read_text() == EXAMPLE_CONFIG
    assert load_config(tmp_path / CONFIG) == Config(path=str(tmp_path / CONFIG))
    assert not [p for p in (tmp_path / HOOK).parent.iterdir() if p.name.startswith(".")]


def test_the_launcher_runs_this_installations_hook(capsys, tmp_path):
    """Run the installed launcher like libxl does (minimal env, no XENBUS_PATH): it reaches
    block-iscsimple, which answers with its usage line and exit 1."""
    _install(capsys, "--prefix", tmp_path)
    result = subprocess.run(
        [str(tmp_path / HOOK), "add"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "usage: block-iscsimple add|remove" in result.stderr


def test_module_fallback_launcher(tmp_path):
    result = install_hook(prefix=tmp_path, argv=[sys.executable, "-m", "iscsimple.hotplug.main"])
    assert f'exec {sys.executable} -m iscsimple.hotplug.main "$@"' in result.hook.read_text()


def test_reinstall_keeps_tab_and_config(capsys, tmp_path):
    tab = tmp_path / TAB
    config = tmp_path / CONFIG
    tab.parent.mkdir(parents=True)
    config.parent.mkdir(parents=True)
    tab.write_text("web1-root /dev/vg0/web1-root\n")
    config.write_text("[heal]\nenabled = false\n")
    for expected in ("installed", "unchanged"):
        code, out, _ = _install(capsys, "--prefix", tmp_path)
        assert code == 0
        assert out.splitlines()[0].startswith(f"{tmp_path / HOOK}: {expected} ")
        assert f"{tab}: exists, left as it is" in out
        assert tab.read_text() == "web1-root /dev/vg0/web1-root\n"
        assert config.read_text() == "[heal]\nenabled = false\n"


def test_dangling_tab_symlink_is_left_alone(capsys, tmp_path):
    tab = tmp_path / TAB
    tab.parent.mkdir(parents=True)
    tab.symlink_to("/nonexistent/shared/tab.conf")
    code, out, _ = _install(capsys, "--prefix", tmp_path)
    assert code == 0 and tab.is_symlink() and f"{tab}: exists, left as it is" in out


def test_older_launcher_is_updated(capsys, tmp_path):
    hook = tmp_path / HOOK
    hook.parent.mkdir(parents=True)
    hook.write_text(f'#!/bin/sh\n{MARKER}\nexec /old/venv/bin/block-iscsimple "$@"\n')
    code, out, _ = _install(capsys, "--prefix", tmp_path)
    assert code == 0 and out.startswith(f"{hook}: updated ")
    assert "/old/venv" not in hook.read_text()


def test_foreign_script_needs_force(capsys, tmp_path):
    hook = tmp_path / "my-block-script"
    hook.write_text("#!/bin/sh\n# someone's own script\n")
    code, out, err = _install(capsys, "--prefix", tmp_path, "--dest", hook)
    assert (code, out) == (2, "")
    assert err == (
        f"iscsimple install-hook: {hook} exists and is not an iscsimple launcher; "
        "move it away or run install-hook --force to replace it\n"
    )
    assert hook.read_text() == "#!/bin/sh\n# someone's own script\n"
    code, _, _ = _install(capsys, "--prefix", tmp_path, "--dest", hook, "--force")
    assert code == 0 and MARKER in hook.read_text()


def test_explicit_tab_path(capsys, tmp_path):
    tab = tmp_path / "elsewhere" / "tab.conf"
    code, out, _ = _install(capsys, "--prefix", tmp_path, "--tab", tab)
    assert code == 0 and tab.read_text() == EXAMPLE_TAB
    assert f"{tab}: example written" in out
    assert not (tmp_path / TAB).exists()


def test_unwritable_destination_is_exit_1(capsys, tmp_path):
    blocker = tmp_path / "etc"
    blocker.write_text("a file where a directory should be\n")
    code, out, err = _install(capsys, "--prefix", tmp_path)
    assert code == 1 and out == ""
    assert err.startswith("iscsimple install-hook: ") and "Traceback" not in err


def test_mdadm_names_dropin_is_opt_in_and_never_replaced(capsys, tmp_path):
    dropin = tmp_path / "etc/mdadm/mdadm.conf.d/iscsimple.conf"
    assert _install(capsys, "--prefix", tmp_path)[0] == 0
    assert not dropin.exists()  # host-wide setting: only on request

    code, out, _ = _install(capsys, "--prefix", tmp_path, "--mdadm-names")
    assert code == 0
    assert "CREATE names=yes" in dropin.read_text().splitlines()
    assert f"{dropin}: example written" in out.splitlines()

    dropin.write_text("CREATE names=yes\n# edited by the operator\n")
    code, out, _ = _install(capsys, "--prefix", tmp_path, "--mdadm-names")
    assert code == 0 and f"{dropin}: exists, left as it is" in out.splitlines()
    assert dropin.read_text().endswith("# edited by the operator\n")


# -- a host where the Debian package is installed -----------------------------------------------------
ENTRY = Path("usr/sbin/block-iscsimple")
DPKG_LIST = Path("var/lib/dpkg/info/iscsimple.list")
PACKAGED_LAUNCHER = launcher(["/usr/sbin/block-iscsimple"])


def _packaged_root(root: Path, *, hook: str | None = PACKAGED_LAUNCHER, entry: bool = True, listed=True):
    """A root as dpkg leaves it: the entry point, its list of the package's files, the conffiles."""
    if entry:
        (root / ENTRY).parent.mkdir(parents=True)
        (root / ENTRY).write_text("#!/usr/bin/python3\n")
    if listed:
        (root / DPKG_LIST).parent.mkdir(parents=True)
        names = ["/.", "/etc", "/etc/xen/scripts", "/etc/xen/scripts/block-iscsimple"]
        names += ["/etc/xen/scripts/block-iscsimple-tab.conf", "/usr/sbin/block-iscsimple"]
        (root / DPKG_LIST).write_text("\n".join(names) + "\n")
    if hook is not None:
        (root / HOOK).parent.mkdir(parents=True, exist_ok=True)
        (root / HOOK).write_text(hook)
        (root / HOOK).chmod(0o755)


def test_packaged_hook_is_checked_and_left_to_dpkg(capsys, tmp_path):
    _packaged_root(tmp_path)
    before = (tmp_path / HOOK).stat()
    code, out, err = _install(capsys, "--prefix", tmp_path)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{tmp_path / HOOK}: installed by the Debian package iscsimple, left as it is "
        "(runs /usr/sbin/block-iscsimple)"
    ]
    after = (tmp_path / HOOK).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # The tab and config are the package's conffiles: no example appears where the operator removed one.
    assert not (tmp_path / TAB).exists() and not (tmp_path / CONFIG).exists()
    # The same file named another way is the same hook.
    other_name = tmp_path / "etc/xen/scripts/../scripts/block-iscsimple"
    code, out, _ = _install(capsys, "--prefix", tmp_path, "--dest", other_name)
    assert code == 0 and "installed by the Debian package iscsimple" in out


def test_packaged_hook_detected_by_the_entry_point_alone(capsys, tmp_path):
    _packaged_root(tmp_path, listed=False)
    code, out, _ = _install(capsys, "--prefix", tmp_path, "--force")
    assert code == 0 and "installed by the Debian package iscsimple" in out


def test_packaged_hook_replaced_by_another_launcher_is_an_error_never_rewritten(capsys, tmp_path):
    venv_launcher = f'#!/bin/sh\n{MARKER}\nexec /opt/iscsimple/bin/block-iscsimple "$@"\n'
    _packaged_root(tmp_path, hook=venv_launcher)
    for extra in ((), ("--force",)):
        code, out, err = _install(capsys, "--prefix", tmp_path, *extra)
        assert (code, out) == (2, "")
        assert err.startswith(
            f"iscsimple install-hook: {tmp_path / HOOK}: the Debian package iscsimple installs this hook "
            "and it is not the package's launcher of /usr/sbin/block-iscsimple; install-hook leaves the "
            "package's files to dpkg: restore it with 'apt-get install --reinstall"
        )
        assert err.count("\n") == 1
        assert (tmp_path / HOOK).read_text() == venv_launcher


def test_packaged_hook_missing_is_an_error_never_written(capsys, tmp_path):
    _packaged_root(tmp_path, hook=None)
    code, _, err = _install(capsys, "--prefix", tmp_path)
    assert code == 2 and "installs this hook and it is missing" in err and "--force-confmiss" in err
    assert not (tmp_path / HOOK).exists()


def test_removed_package_conffile_is_an_error(capsys, tmp_path):
    # dpkg -r: the entry point is gone, the list still names the conffiles it left.
    _packaged_root(tmp_path, entry=False)
    code, _, err = _install(capsys, "--prefix", tmp_path)
    assert code == 2
    assert "a conffile of the removed Debian package iscsimple" in err and "apt purge iscsimple" in err
    assert (tmp_path / HOOK).read_text() == PACKAGED_LAUNCHER


def test_packaged_host_still_writes_the_mdadm_dropin_on_request(capsys, tmp_path):
    _packaged_root(tmp_path)
    code, out, _ = _install(capsys, "--prefix", tmp_path, "--mdadm-names")
    dropin = tmp_path / "etc/mdadm/mdadm.conf.d/iscsimple.conf"
    assert code == 0 and f"{dropin}: example written" in out.splitlines()
    assert (tmp_path / HOOK).read_text() == PACKAGED_LAUNCHER


def test_dpkg_list_is_untrusted_input(capsys, tmp_path):
    # Another package's paths that merely start like ours, and bytes that are not UTF-8: not the hook.
    (tmp_path / DPKG_LIST).parent.mkdir(parents=True)
    (tmp_path / DPKG_LIST).write_bytes(
        b"/etc/xen/scripts/block-iscsimple-tab.conf\n\xff\xfe\x00garbage\n/etc/xen/scripts/block-iscsimple.old\n"
    )
    code, out, _ = _install(capsys, "--prefix", tmp_path)
    assert code == 0 and out.startswith(f"{tmp_path / HOOK}: installed (runs ")

    # A list that cannot be read: one line saying so, nothing written.
    (tmp_path / HOOK).unlink()
    (tmp_path / DPKG_LIST).unlink()
    os.mkfifo(tmp_path / DPKG_LIST)
    code, out, err = _install(capsys, "--prefix", tmp_path)
    assert (code, out) == (1, "")
    assert err.startswith(f"iscsimple install-hook: {tmp_path / DPKG_LIST}: cannot read it (")
    assert "cannot tell whether the Debian package iscsimple owns" in err and err.count("\n") == 1
    assert not (tmp_path / HOOK).exists()


def test_package_build_writes_its_launcher_with_an_explicit_entry(tmp_path):
    # debian/rules: the entry point is already in the build tree; the explicit argv writes the hook.
    _packaged_root(tmp_path, hook=None, listed=False)
    result = install_hook(prefix=tmp_path, argv=["/usr/sbin/block-iscsimple"])
    assert result.hook_action == "installed" and (tmp_path / HOOK).read_text() == PACKAGED_LAUNCHER
