"""The `iscsimple` command itself: exit codes 0/1/2, one sentence on stderr, no tracebacks."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iscsimple import __version__
from iscsimple.cli import main as cli
from iscsimple.cli.options import host_paths

CONSOLE_SCRIPT = Path(sys.executable).parent / "iscsimple"


def _console(*args, env=None, timeout=60):
    executable = str(CONSOLE_SCRIPT) if CONSOLE_SCRIPT.exists() else shutil.which("iscsimple")
    assert executable, "the iscsimple console script is not installed (pip install -e .)"
    return subprocess.run([executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_every_subcommand():
    result = _console("--help")
    assert result.returncode == 0
    for name in ("status", "check-config", "attach", "detach", "convert-config", "install-hook"):
        assert name in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("status", "--jsno"), "unrecognized arguments: --jsno"),
        (("attach",), "the following arguments are required: SPEC"),
    ],
)
def test_usage_errors_exit_2_in_one_line(args, fragment):
    result = _console(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("iscsimple") and fragment in line
    assert "; see 'iscsimple" in line and line.endswith(" --help'")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("lun0@IQN.2001-04.com.example:x+vm1", "upper-case"),
        ("iqn.2001-04.com.example:x+bad.label", "LABEL 'bad.label'"),
        ("MISSING", "+LABEL"),
    ],
)
@pytest.mark.parametrize("command", ["attach", "detach"])
def test_bad_spec_is_exit_2_before_touching_the_host(tmp_path, command, spec, fragment):
    env = {
        "PATH": "/usr/bin:/bin",
        "ISCSIMPLE_STATE": str(tmp_path / "run"),
        "ISCSIMPLE_LOCKS": str(tmp_path),
    }
    result = _console(command, spec, env=env)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"iscsimple {command}: bad disk spec ") and fragment in line
    assert not (tmp_path / "run").exists()


def test_bad_config_is_exit_2(tmp_path):
    config = tmp_path / "iscsimple.toml"
    config.write_text("[iscsi]\nlogin_timeout = 'soon'\n")
    result = _console("status", f"--config={config}", f"--state={tmp_path}", f"--records={tmp_path}")
    assert result.returncode == 2
    # The host's state is still shown: a broken config must not hide an outage.
    assert result.stdout == "no iscsimple disks are attached on this host\n"
    assert result.stderr == (
        f"iscsimple status: {config}:2: [iscsi] login_timeout has the wrong type (str) "
        "(configured timeouts shown are the defaults)\n"
    )
    result = _console("attach", "iqn.2001-04.com.example:x", f"--config={config}", f"--state={tmp_path}")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"iscsimple attach: {config}:2: [iscsi] login_timeout has the wrong type (str)\n"


def test_detach_of_something_never_attached(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "ISCSIMPLE_STATE": str(tmp_path / "run"),
        "ISCSIMPLE_RECORDS": str(tmp_path / "lib"),
        "ISCSIMPLE_LOCKS": str(tmp_path / "locks"),
        "ISCSIMPLE_CONFIG": str(tmp_path / "none.toml"),
    }
    result = _console("detach", "lun3@iqn.2001-04.com.example:x+vm9", env=env)
    assert result.returncode == 0, result.stderr
    assert "was not attached with 'iscsimple attach'; nothing to do" in result.stderr


def test_internal_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("the snapshot fell over")

    monkeypatch.setattr(cli, "run_status", broken)
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "iscsimple status: internal error (RuntimeError: the snapshot fell over); rerun with --debug and report it\n"
    )
    assert cli.main(["status", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("rerun with --debug and report it\n")


def test_os_error_is_exit_1_with_a_hint(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "/run/iscsimple/attachments")

    monkeypatch.setattr(cli, "run_status", denied)
    assert cli.main(["status"]) == 1
    assert capsys.readouterr().err == (
        "iscsimple status: cannot access /run/iscsimple/attachments: Permission denied; "
        "check the path (and run as root)\n"
    )


def test_options_before_or_after_the_subcommand(tmp_path, capsys):
    for argv in (
        ["--state", str(tmp_path), "--records", str(tmp_path), "--config", str(tmp_path / "x"), "status"],
        ["status", "--state", str(tmp_path), "--records", str(tmp_path), "--config", str(tmp_path / "x")],
    ):
        assert cli.main(argv) == 0
        assert capsys.readouterr().out == "no iscsimple disks are attached on this host\n"


def test_a_new_subcommand_plugs_in(monkeypatch, capsys):
    """How a subcommand (like `resolve`) is added: one more add_* in SUBCOMMANDS."""

    def add_example(sub):
        p = sub.add_parser("example-keep", help="an example subcommand")
        p.add_argument("label")
        p.add_argument("--keep", choices=("local", "iscsi"), required=True)
        p.set_defaults(run=lambda args: print(f"would keep {args.keep} for {args.label}") or 0)

    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, add_example))
    assert cli.main(["example-keep", "vm1", "--keep", "local"]) == 0
    assert capsys.readouterr().out == "would keep local for vm1\n"
    assert cli.main(["example-keep", "vm1", "--keep", "both"]) == 2


def test_the_agents_path_names_work_and_the_short_ones_too(tmp_path):
    """The demo and the agent say --path.state/--path.records: the CLI takes the same names."""
    state, records, locks = tmp_path / "run", tmp_path / "lib", tmp_path / "locks"
    cfg, tab = tmp_path / "c.toml", tmp_path / "tab"
    state.mkdir()  # a --state/--records directory that does not exist is a typo (exit 2)
    records.mkdir()
    for argv in (
        ["status", "--path.state", str(state), "--path.records", str(records), "--path.locks", str(locks)],
        ["--state", str(state), "status", "--records", str(records), "--locks", str(locks)],
    ):
        argv += ["--path.config", str(cfg), "--path.tab", str(tab)]
        args = cli.parse_args(cli.build_parser(), argv)
        assert (host_paths(args).state, host_paths(args).records, host_paths(args).locks) == (
            state,
            records,
            locks,
        )
        assert (host_paths(args).config, host_paths(args).tab) == (cfg, tab)


def test_a_missing_state_directory_is_named_by_the_agents_flag(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    assert cli.main(["status", "--path.state", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--path.state {missing} does not exist; give the directory iscsimple keeps its registry in" in err


def test_version():
    result = _console("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"iscsimple {__version__}"


def test_an_unknown_option_points_at_the_subcommands_help_and_guesses(capsys):
    assert cli.main(["status", "--jsn"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --jsn (did you mean --json?)" in err
    assert "see 'iscsimple status --help'" in err


@pytest.mark.parametrize("name", ["status", "check-config", "attach", "detach", "convert-config", "resolve"])
def test_every_subcommand_help_starts_with_a_description(name, capsys):
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.strip() and not description.startswith(("positional", "options"))


def test_resolve_help_speaks_to_operators_not_about_modules(capsys):
    with pytest.raises(SystemExit):
        cli.main(["resolve", "--help"])
    out = capsys.readouterr().out
    assert "--keep local" in out
    for internal in ("core.", "hotplug.", "plan_heal"):
        assert internal not in out


def test_a_subcommand_module_is_imported_only_when_the_command_line_may_run_it():
    """resolve and migrate (and the heal and attach engines they import) are not loaded to run
    `status`; --help, a wrong command and their own names still get every subcommand."""
    code = (
        "import sys\n"
        "from iscsimple.cli import main\n"
        "main.build_parser(['status', '--json'])\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('iscsimple.'))))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(res.stdout.split())
    assert "iscsimple.cli.main" in loaded
    assert not loaded & {"iscsimple.cli.resolve", "iscsimple.cli.migrate", "iscsimple.hotplug.attach"}, loaded

    every = {
        "status",
        "check-config",
        "attach",
        "detach",
        "convert-config",
        "install-hook",
        "bitmap-store",
        "resolve",
        "migrate-check",
        "accept-loss",
    }
    for argv in (["--help"], ["status", "-h"], ["no-such-command"], [], ["--debug"]):
        assert set(cli._subparsers(cli.build_parser(argv))) == every, argv
    assert set(cli._subparsers(cli.build_parser(["status"]))) == every - {
        "resolve",
        "migrate-check",
        "accept-loss",
    }
    assert "resolve" in cli._subparsers(cli.build_parser(["resolve", "vm1", "--keep", "local"]))
    assert "accept-loss" in cli._subparsers(cli.build_parser(["--debug", "accept-loss", "lun1@iqn.x"]))
