"""`iscsimple install-hook`: the launcher xl runs, and example files that never replace real ones."""

import stat
import subprocess
import sys
from pathlib import Path

from iscsimple.cli.install import EXAMPLE_CONFIG, EXAMPLE_TAB, MARKER, entry_point, install_hook
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
