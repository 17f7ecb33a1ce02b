"""Bad inputs, by category, through every file and flag iscsimple reads.

Every case must end in a one-line error naming the file (and line) or the bad part, with
the README's exit code (CLI: 2 bad input, 1 an operation failed or a source unreadable;
agent: 2 bad flags; block-iscsimple: 1 with hotplug-status=error), never a traceback, never
a hang (special files are refused before they are read: every subprocess has a timeout),
and for the hotplug nothing half-done. The category is the first word of each test id
(`pytest --collect-only -q tests/test_bad_inputs.py` counts them).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fixturetree import CAPTURE_TARGET, materialize, register_capture_array
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsimple.cli import main as cli
from iscsimple.core.config import check_config, load_config
from iscsimple.core.errors import FileInputError, IscsimpleError, OperationError
from iscsimple.core.files import UnsafeFileError, ensure_dir, read_file
from iscsimple.core.iscsi import read_iscsi_sessions
from iscsimple.core.locking import hotplug_lock
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Attachment, Registry
from iscsimple.core.snapshot import HostSnapshot
from iscsimple.core.stale import StaleRecord, StaleRecords
from iscsimple.core.tab import read_tab
from tests.fakes.harness import IQN, make_hotplug

BIN = Path(sys.executable).parent
TIMEOUT = 30  # far above any honest run; a FIFO read would block forever


def run(
    tool: str, *args: str, env: dict | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [str(BIN / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "ISCSIMPLE_NO_SYSLOG": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{tool} {' '.join(args)} hung (> {timeout} s)")


def assert_clean_error(stderr: str, *fragments: str) -> None:
    """No traceback, no 'internal error', and every fragment on one line of its own."""
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    for fragment in fragments:
        assert any(fragment in line for line in stderr.splitlines()), f"{fragment!r} not in:\n{stderr}"


def no_hang(function, timeout: float = TIMEOUT):
    """Run function in a thread; fail (instead of blocking the suite) if it does not return."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{function} hung (> {timeout} s)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# -- special files -------------------------------------------------------------------------------

SPECIAL_KINDS = ("fifo", "directory", "chardev", "socket", "symlink-to-fifo", "dangling-symlink")


def make_special(path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "chardev":
        path.symlink_to("/dev/null")  # a character device, reached the way an operator's typo would
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "symlink-to-fifo":
        os.mkfifo(path.with_name(path.name + ".fifo"))
        path.symlink_to(path.name + ".fifo")
    elif kind == "dangling-symlink":
        path.symlink_to(path.name + ".nowhere")
    return path


@pytest.mark.parametrize("kind", SPECIAL_KINDS, ids=[f"special-read-{k}" for k in SPECIAL_KINDS])
def test_special_file_is_refused_before_reading(tmp_path, kind):
    path = make_special(tmp_path / "f", kind)
    with pytest.raises(OSError) as caught:
        no_hang(lambda: read_file(path))
    assert str(path) in str(caught.value) or caught.value.filename == str(path)


@pytest.mark.parametrize("kind", SPECIAL_KINDS, ids=[f"special-tab-{k}" for k in SPECIAL_KINDS])
def test_special_tab_check_config(tmp_path, kind):
    tab = make_special(tmp_path / "tab.conf", kind)
    result = run("iscsimple", "check-config", f"--tab={tab}", f"--config={tmp_path / 'none.toml'}")
    assert result.returncode == 2, result.stderr
    assert_clean_error(result.stderr, str(tab))


@pytest.mark.parametrize("kind", SPECIAL_KINDS[:4], ids=[f"special-config-{k}" for k in SPECIAL_KINDS[:4]])
def test_special_config_check_config_and_status(tmp_path, kind):
    config = make_special(tmp_path / "iscsimple.toml", kind)
    (tmp_path / "tab.conf").write_text("")
    result = run("iscsimple", "check-config", f"--tab={tmp_path / 'tab.conf'}", f"--config={config}")
    assert result.returncode == 2, result.stderr
    assert_clean_error(result.stderr, f"{config}: cannot read")
    result = run("iscsimple", "status", f"--config={config}", f"--state={tmp_path}", f"--records={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert_clean_error(result.stderr, f"{config}: cannot read")


@pytest.mark.parametrize("kind", SPECIAL_KINDS[:4], ids=[f"special-domucfg-{k}" for k in SPECIAL_KINDS[:4]])
@pytest.mark.parametrize("command", ["check-config", "convert-config"])
def test_special_domu_cfg(tmp_path, kind, command):
    cfg = make_special(tmp_path / "vm.cfg", kind)
    (tmp_path / "tab.conf").write_text("")
    result = run(
        "iscsimple", command, str(cfg), f"--tab={tmp_path / 'tab.conf'}", f"--config={tmp_path / 'x'}"
    )
    assert result.returncode == 2, result.stderr
    assert_clean_error(result.stderr, f"{cfg}: cannot read")


def test_special_config_agent_heal_policy(tmp_path):
    """The agent reads iscsimple.toml for its heal policy: a FIFO there must not hang it."""
    from iscsimple.exporter.safety import Safety

    config = make_special(tmp_path / "iscsimple.toml", "fifo")
    safety = no_hang(lambda: Safety.for_host(HostPaths(config=config, records=tmp_path, state=tmp_path)))
    assert not safety.healer.enabled


# -- config (iscsimple.toml) --------------------------------------------------------------------

SECONDS_KEYS = [
    ("iscsi", "login_timeout"),
    ("attach", "device_wait"),
    ("attach", "budget"),
    ("heal", "stable_seconds"),
    ("heal", "backoff_max_seconds"),
]
COUNT_KEYS = [
    ("iscsi", "replacement_timeout_mirrored"),
    ("iscsi", "replacement_timeout_unmirrored"),
    ("heal", "max_parallel"),
    (f'targets."{IQN}"', "replacement_timeout"),
]
BAD_NUMBERS = ["nan", "+nan", "-nan", "inf", "+inf", "-inf", "1e400", "-1e400", "-1", "0", "-0.0", "1e300",
               "-5", '"10"', "true", "[]", "{}", "9223372036854775807",
               "1" + "0" * 400, "-1" + "0" * 400, "0x" + "f" * 100]  # fmt: skip
BAD_COUNTS = [*BAD_NUMBERS, "2.5", "1.0"]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [(s, k, v) for s, k in SECONDS_KEYS for v in BAD_NUMBERS]
    + [(s, k, v) for s, k in COUNT_KEYS for v in BAD_COUNTS],
    ids=[f"config-{k}={v}"[:60] for s, k in SECONDS_KEYS for v in BAD_NUMBERS]
    + [f"config-{k}={v}"[:60] for s, k in COUNT_KEYS for v in BAD_COUNTS],
)
def test_config_bad_number(tmp_path, section, key, value):
    path = tmp_path / "iscsimple.toml"
    path.write_text(f"# timeouts\n[{section}]\n{key} = {value}\n")
    with pytest.raises(FileInputError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: ") and key in message and "\n" not in message, message
    assert caught.value.exit_code == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.floats(allow_nan=True, allow_infinity=True), which=st.sampled_from(SECONDS_KEYS))
def test_config_any_float_is_finite_and_positive_or_an_error(tmp_path, value, which):
    section, key = which
    path = tmp_path / "iscsimple.toml"
    path.write_text(f"[{section}]\n{key} = {value!r}\n".replace("inf", "inf").replace("nan", "nan"))
    try:
        config = load_config(path)
    except FileInputError as e:
        assert str(e).startswith(f"{path}:")
        return
    for number in (
        config.login_timeout,
        config.device_wait,
        config.attach_budget,
        config.heal_stable_seconds,
    ):
        assert 0 < number < 1e6


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 5000 + "]" * 5000 + "\n",
        "a = " + "[" * 200000 + "\n",
        "a = " + "{b = " * 3000 + "1" + "}" * 3000 + "\n",
        "[iscsi]\nportals = " + "[" * 100000 + "\n",
        "[heal]\nstable_seconds = " + "1" * 5000 + "\n",  # past int()'s digit limit: a ValueError
    ],
    ids=[
        "config-deep-array",
        "config-deep-unclosed",
        "config-deep-inline-table",
        "config-deep-portals",
        "config-number-5000-digits",
    ],
)
def test_config_deep_nesting(tmp_path, text):
    path = tmp_path / "iscsimple.toml"
    path.write_text(text)
    with pytest.raises(FileInputError) as caught:
        no_hang(lambda: load_config(path))
    assert str(caught.value).startswith(f"{path}")


def test_config_crafted_line_does_not_backtrack(tmp_path):
    """A table header with a long run of blanks used to make the line finder backtrack for tens of seconds."""
    path = tmp_path / "iscsimple.toml"
    filler = "[" + " " * 30000 + "x" + " " * 30000 + "\n"
    path.write_text(
        "[iscsi]\nlogin_timeout = nan\n" + ("#" + filler) * 20 + '[targets."a b"]\nreplacement_timeout = 5\n'
    )
    _config, errors = no_hang(lambda: check_config(path), timeout=20)
    assert len(errors) == 2 and all(str(e).startswith(f"{path}:") for e in errors)


def test_config_reports_every_error_at_once(tmp_path, capsys):
    config = tmp_path / "iscsimple.toml"
    config.write_text(
        "[iscsi]\nlogin_timeout = nan\nreplacement_timeout_mirrored = -1\n"
        "[attach]\ndevice_wait = inf\n[heal]\nmax_parallel = 0\nbogus = 1\n"
    )
    (tmp_path / "tab.conf").write_text("")
    code = cli.main(["check-config", f"--tab={tmp_path / 'tab.conf'}", f"--config={config}"])
    err = capsys.readouterr().err
    assert code == 2
    for line in (2, 3, 5, 7, 8):
        assert f"{config}:{line}: " in err, err
    assert "5 error(s)" in err
    with pytest.raises(FileInputError, match=r"and 4 more error\(s\)"):
        load_config(config)


@pytest.mark.parametrize(
    "portals",
    ['["-o delete"]', '["a b"]', '["x\\u0000y"]', '["\\n"]', '[""]', "[1]", '"192.0.2.1"'],
    ids=[
        "config-portal-option",
        "config-portal-blank",
        "config-portal-nul",
        "config-portal-newline",
        "config-portal-empty",
        "config-portal-number",
        "config-portal-string",
    ],
)
def test_config_bad_portals(tmp_path, portals):
    path = tmp_path / "iscsimple.toml"
    path.write_text(f"[iscsi]\nportals = {portals}\n")
    with pytest.raises(FileInputError, match=rf"^{path}:2: \[iscsi\] portals"):
        load_config(path)


# -- tab file ------------------------------------------------------------------------------------

BAD_TAB_LINES = {
    "nul-in-device": "vm1 /dev/vg0/v\x00m1\n",
    "nul-in-label": "v\x00m1 /dev/vg0/vm1\n",
    "control-char": "vm1 /dev/vg0/\x01vm1\n",
    "file-separator": "vm1\x1c/dev/vg0/vm1\n",
    "vertical-tab": "vm1 /dev/vg0/vm1\x0bextra\n",
    "escape": "vm1 /dev/vg0/\x1b[31mvm1\n",
    "three-columns": "vm1 /dev/vg0/vm1 extra\n",
    "relative": "vm1 vg0/vm1\n",
    "bad-label": "vm.1 /dev/vg0/vm1\n",
    "long-label": "a" * 200 + " /dev/vg0/x\n",
    "duplicate": "vm1 /dev/vg0/a\nvm1 /dev/vg0/b\n",
    "same-device": "vm1 /dev/vg0/a\nvm2 /dev/vg0//a\n",
}


@pytest.mark.parametrize("name", sorted(BAD_TAB_LINES), ids=[f"tab-{n}" for n in sorted(BAD_TAB_LINES)])
def test_tab_bad_line(tmp_path, name):
    path = tmp_path / "tab.conf"
    path.write_text("# comment\n" + BAD_TAB_LINES[name])
    with pytest.raises(FileInputError) as caught:
        read_tab(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and "\n" not in message.replace("\\n", ""), message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe", b"vm1 /dev/vg0/\xe9\n", b"\x00" * 100],
    ids=["tab-utf16-bom", "tab-latin1", "tab-nuls"],
)
def test_tab_binary(tmp_path, data):
    path = tmp_path / "tab.conf"
    path.write_bytes(data)
    with pytest.raises(FileInputError, match=f"^{path}"):
        read_tab(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_tab_any_text_parses_or_names_the_line(tmp_path, text):
    path = tmp_path / "tab.conf"
    path.write_text(text)
    try:
        tab = read_tab(path)
    except FileInputError as e:
        assert str(e).startswith(f"{path}")
        return
    for entry in tab.entries.values():
        assert entry.device is None or ("\0" not in entry.device and entry.device.isprintable())


# -- registry entries (state files) --------------------------------------------------------------

GOOD_ENTRY = {
    "id": "vbd-1-51712",
    "spec": f"lun1@{CAPTURE_TARGET}+test",
    "lun": 1,
    "target": CAPTURE_TARGET,
    "label": "test",
    "state": "attached",
    "portal": "127.0.0.1:3260",
    "iscsi_device": "sda",
    "local_device": "/dev/loop1",
    "local_kernel_name": "loop1",
    "md_device": "md127",
    "md_path": "/dev/md/test",
}
BAD_ENTRY_FIELDS = {
    "label": [5, "", "a/b", "../x", "x" * 100, ["a"]],
    "lun": [-1, "1", 1.5, True, 2**70],
    "target": ["-o", "iqn.bad name", 5, "../../etc"],
    "iscsi_device": ["../sda", "-sda", "sd a", 7, "", "/dev/sda"],
    "md_device": ["md127/../../x", "", 1],
    "local_device": ["relative", "/dev/../etc/passwd", "/dev/vg\x00x", 3],
    "md_path": ["md/test", "/dev/md/./test"],
    "portal": ["-p", "a b", 3260],
    "id": ["other-id", 5, "x" * 100000],
    "state": ["ATTACHED!", 1],
    "domain_id": [-1, "1"],
    "write_mostly_leg": ["both"],
    "created": ["yesterday", None],
    "last": [5, {"operation": 5, "result": "x", "seconds": 1, "at": 1}],
    "we_logged_in": ["yes"],
}
BAD_ENTRIES = [(f, v) for f, values in BAD_ENTRY_FIELDS.items() for v in values]


def _registry_paths(tmp_path: Path) -> HostPaths:
    paths = HostPaths(state=tmp_path / "run", records=tmp_path / "lib", sysfs=tmp_path / "sys")
    (paths.state / "attachments").mkdir(parents=True)
    paths.records.mkdir()
    return paths


@pytest.mark.parametrize(
    ("field", "value"), BAD_ENTRIES, ids=[f"registry-{f}={v!r}"[:60] for f, v in BAD_ENTRIES]
)
def test_registry_bad_field_is_reported_not_dropped(tmp_path, field, value):
    paths = _registry_paths(tmp_path)
    entry = paths.state / "attachments" / "vbd-1-51712.json"
    entry.write_text(json.dumps({**GOOD_ENTRY, field: value}))
    read = Registry(paths).read_all()
    assert read.attachments == []
    (error,) = read.errors
    assert error.startswith(f"{entry}: ") and "\n" not in error
    assert len(error) < len(str(entry)) + 400  # a value is quoted short, never echoed whole
    with pytest.raises(OperationError, match=f"^{entry}: "):
        Registry(paths).get("vbd-1-51712")
    snapshot = HostSnapshot.read(paths)
    assert not snapshot.sources["registry"].ok


WHOLE_FILE_CASES = {
    "null": b"null",
    "list": b"[]",
    "number": b"5",
    "empty-object": b"{}",
    "empty-file": b"",
    "garbage": b"\x00\xffgarbage",
    "truncated": b'{"id": "vbd-1-51712", "spec": ',
    "deep": b"[" * 100000 + b"]" * 100000,
    "huge-number": b'{"lun": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize(
    "name", sorted(WHOLE_FILE_CASES), ids=[f"registry-file-{n}" for n in sorted(WHOLE_FILE_CASES)]
)
def test_registry_corrupt_file(tmp_path, name):
    paths = _registry_paths(tmp_path)
    entry = paths.state / "attachments" / "vbd-1-51712.json"
    entry.write_bytes(WHOLE_FILE_CASES[name])
    read = Registry(paths).read_all()
    assert read.attachments == [] and len(read.errors) == 1 and read.errors[0].startswith(str(entry))


@pytest.mark.parametrize("kind", SPECIAL_KINDS, ids=[f"registry-special-{k}" for k in SPECIAL_KINDS])
def test_registry_special_file(tmp_path, kind):
    paths = _registry_paths(tmp_path)
    entry = make_special(paths.state / "attachments" / "vbd-1-51712.json", kind)
    read = no_hang(lambda: Registry(paths).read_all())
    assert read.attachments == []
    assert len(read.errors) == 1 and read.errors[0].startswith(str(entry))


def test_registry_symlink_is_not_followed(tmp_path):
    paths = _registry_paths(tmp_path)
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps(GOOD_ENTRY))
    (paths.state / "attachments" / "vbd-1-51712.json").symlink_to(real)
    read = Registry(paths).read_all()
    assert read.attachments == [] and "symbolic link" in read.errors[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from([*sorted(GOOD_ENTRY), "domain_name", "vbd", "replacement_timeout", "updated"]),
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=5,
    ),
)
def test_registry_any_value_is_valid_or_reported(tmp_path_factory, field, value):
    paths = _registry_paths(tmp_path_factory.mktemp("reg"))
    entry = paths.state / "attachments" / "vbd-1-51712.json"
    entry.write_text(json.dumps({**GOOD_ENTRY, field: value}))
    read = Registry(paths).read_all()
    assert len(read.attachments) + len(read.errors) == 1
    if read.attachments:
        a = read.attachments[0]
        for name in ("iscsi_device", "md_device", "local_kernel_name"):
            assert getattr(a, name) is None or (
                "/" not in getattr(a, name) and not getattr(a, name).startswith("-")
            )
        assert isinstance(a.lun, int) and not isinstance(a.lun, bool) and a.lun >= 0


@pytest.fixture(params=["04"])
def captured(request, tmp_path):
    """A captured mirror (in sync; `indirect` for another state) with its registry entry, and
    the CLI/agent flags for it."""
    root = materialize(request.param, tmp_path / "root")
    paths = register_capture_array(root)
    paths.records.mkdir(exist_ok=True)
    flags = [f"--path.sysfs={paths.sysfs}", f"--path.procfs={paths.procfs}", f"--path.devfs={paths.devfs}"]
    cli_flags = [
        *flags,
        f"--state={paths.state}",
        f"--records={paths.records}",
        f"--config={root / 'none.toml'}",
    ]
    agent_flags = [
        *flags,
        f"--path.state={paths.state}",
        f"--path.records={paths.records}",
        "--once",
        "--no-udev",
    ]
    return paths, cli_flags, agent_flags


@pytest.mark.parametrize(
    "content",
    ['{"label": 5}', "null", "garbage"],
    ids=["registry-status-label5", "registry-status-null", "registry-status-garbage"],
)
def test_registry_corrupt_entry_in_status_and_agent(captured, content):
    paths, cli_flags, agent_flags = captured
    bad = paths.state / "attachments" / "vbd-2-51712.json"
    bad.write_text(content)
    result = run("iscsimple", "status", *cli_flags)
    assert result.returncode == 1
    assert_clean_error(result.stderr, str(bad))
    assert "test" in result.stdout  # the good entry is still shown
    result = run("iscsimple-agent", *agent_flags)
    assert result.returncode == 1
    assert_clean_error(result.stderr)
    assert 'iscsimple_collector_success{collector="arrays"} 0' in result.stdout
    assert "iscsimple_array_info{" in result.stdout  # the readable mirror is still exported


# -- hotplug statistics (state file) -------------------------------------------------------------

STATS_CASES = {
    "null": "null",
    "list": "[]",
    "string": '"x"',
    "totals-number": '{"totals": 5}',
    "totals-add-number": '{"totals": {"add": 5}}',
    "count-string": '{"totals": {"add": {"success": "many"}}}',
    "count-negative": '{"totals": {"add": {"success": -1}}}',
    "last-seconds-string": '{"last_seconds": {"add": "x"}}',
    "last-at-list": '{"last_at": []}',
    "deep": "[" * 50000,
    "garbage": "\x00\x01",
}


@pytest.mark.parametrize("name", sorted(STATS_CASES), ids=[f"stats-{n}" for n in sorted(STATS_CASES)])
def test_stats_corrupt_never_fail_an_operation(tmp_path, name):
    paths = _registry_paths(tmp_path)
    stats = paths.state / "hotplug-stats.json"
    stats.write_text(STATS_CASES[name])
    registry = Registry(paths)
    assert registry.read_stats().totals == {}
    with registry.timed_operation("add"):
        pass
    assert registry.read_stats().totals == {"add": {"success": 1}}  # rewritten whole


@pytest.mark.parametrize(
    "kind",
    ["fifo", "directory", "symlink-to-fifo"],
    ids=["stats-special-fifo", "stats-special-directory", "stats-special-symlink"],
)
def test_stats_special_file_never_fails_an_operation(tmp_path, kind):
    paths = _registry_paths(tmp_path)
    make_special(paths.state / "hotplug-stats.json", kind)
    registry = Registry(paths)
    no_hang(registry.read_stats)
    no_hang(lambda: registry.record_operation("add", "success", 1.0))


@pytest.mark.parametrize("corruption", ["null", "directory"], ids=["stats-add-null", "stats-add-directory"])
def test_stats_corrupt_add_still_succeeds(tmp_path, corruption):
    hp = make_hotplug(tmp_path)
    hp.host.add_target(IQN, luns={1: 64 << 20})
    hp.mirror("vm1")
    stats = hp.paths.state / "hotplug-stats.json"
    hp.paths.state.mkdir(parents=True, exist_ok=True)
    if corruption == "directory":
        stats.mkdir()
    else:
        stats.write_text(corruption)
    vbd = hp.vbd(f"lun1@{IQN}+vm1")
    result = hp.run("add", vbd, timeout=TIMEOUT * 2)
    assert result.returncode == 0, result.stderr
    assert hp.xs(vbd, "hotplug-status") == "connected"
    assert_clean_error(result.stderr)


# -- stale records (state files, a data-safety signal) -------------------------------------------

STALE_CASES = {
    "garbage": b"\x00garbage",
    "empty-object": b"{}",
    "null": b"null",
    "list": b"[]",
    "other-label": json.dumps({"label": "other", "since": 1.0, "reason": "x"}).encode(),
    "since-string": json.dumps({"label": "vm1", "since": "yesterday", "reason": "x"}).encode(),
    "since-nan": b'{"label": "vm1", "since": NaN, "reason": "x"}',
    "reason-number": json.dumps({"label": "vm1", "since": 1.0, "reason": 5}).encode(),
    "deep": b"[" * 100000,
    "truncated": b'{"label": "vm1", "since": 1',
    # Numbers no float holds: math.isfinite() raised OverflowError, and status lost every record.
    "since-400-digits": b'{"label": "vm1", "since": 1' + b"0" * 400 + b', "reason": "x"}',
    "recorded-negative-400-digits": b'{"label": "vm1", "since": 1, "recorded": -1'
    + b"0" * 400
    + b', "reason": "x"}',
    "lun-infinity": b'{"label": "vm1", "since": 1, "lun": Infinity, "reason": "x"}',
}


def _stale_records(tmp_path: Path) -> tuple[StaleRecords, Path]:
    records = StaleRecords(HostPaths(records=tmp_path / "lib"))
    records.directory.mkdir(parents=True)
    good = StaleRecord("good", 1.0, "md1", "vm", 1, CAPTURE_TARGET, 1, "sda", "/dev/x", "seen")
    records.put(good)
    return records, records.directory / "vm1.json"


@pytest.mark.parametrize("name", sorted(STALE_CASES), ids=[f"stale-{n}" for n in sorted(STALE_CASES)])
def test_stale_unreadable_record_is_stale_with_unknown_details(tmp_path, name):
    records, path = _stale_records(tmp_path)
    path.write_bytes(STALE_CASES[name])
    record = records.get("vm1")
    assert record is not None and record.unreadable and str(path) in record.describe()
    listed, errors = records.read_all()
    assert sorted(r.label for r in listed) == ["good", "vm1"]  # one bad record hides nothing
    assert len(errors) == 1 and str(path) in errors[0]


@pytest.mark.parametrize("kind", SPECIAL_KINDS, ids=[f"stale-special-{k}" for k in SPECIAL_KINDS])
def test_stale_special_file_is_stale_with_unknown_details(tmp_path, kind):
    records, path = _stale_records(tmp_path)
    make_special(path, kind)
    record = no_hang(lambda: records.get("vm1"))
    assert record is not None and record.unreadable
    assert sorted(r.label for r in records.list()) == ["good", "vm1"]


@pytest.mark.parametrize("name", ["bad name.json", "a.b.json", ("x" * 60) + ".json", "\u00fc.json"],
                         ids=["stale-name-blank", "stale-name-dot", "stale-name-long", "stale-name-unicode"])  # fmt: skip
def test_stale_odd_file_name_is_reported(tmp_path, name):
    records, _ = _stale_records(tmp_path)
    (records.directory / name).write_text("{}")
    listed, errors = records.read_all()
    assert [r.label for r in listed] == ["good"]
    assert len(errors) == 1 and name in errors[0]


def test_stale_unreadable_record_refuses_the_attach_naming_the_file(tmp_path):
    hp = make_hotplug(tmp_path)
    hp.host.add_target(IQN, luns={1: 64 << 20})
    hp.mirror("vm1")
    record = hp.paths.records / "stale" / "vm1.json"
    record.parent.mkdir(parents=True)
    record.write_text("garbage")
    vbd = hp.vbd(f"lun1@{IQN}+vm1")
    result = hp.run("add", vbd, timeout=TIMEOUT * 2)
    assert result.returncode == 1
    error = hp.xs(vbd, "hotplug-error")
    assert "refusing to attach vm1" in error and str(record) in error and "\n" not in error
    assert hp.xs(vbd, "hotplug-status") == "error"
    assert hp.host.commands() == []  # refused before touching iSCSI or md
    assert Registry(hp.paths).list() == []


@pytest.mark.parametrize("captured", ["06"], indirect=True)  # iSCSI leg faulty: the record stands
@pytest.mark.parametrize(
    "content",
    ["{", '{"label": "test", "since": 1' + "0" * 400 + ', "reason": "x"}'],
    ids=["stale-status-truncated", "stale-status-since-400-digits"],
)
def test_stale_unreadable_record_in_status_and_metrics(captured, content):
    paths, cli_flags, agent_flags = captured
    record = paths.records / "stale" / "test.json"
    record.parent.mkdir(parents=True)
    record.write_text(content)
    result = run("iscsimple", "status", *cli_flags)
    assert result.returncode == 1
    assert "ISCSI-STALE" in result.stdout
    assert_clean_error(result.stderr, str(record))
    result = run("iscsimple-agent", *agent_flags)
    assert 'iscsimple_array_iscsi_stale{domain="' in result.stdout
    assert next(
        line for line in result.stdout.splitlines() if line.startswith("iscsimple_array_iscsi_stale{")
    ).endswith(" 1.0")


@pytest.mark.parametrize("captured", ["06"], indirect=True)
@pytest.mark.parametrize(
    "since", [1e308, -1e308, -(2**63)], ids=["stale-date-1e308", "stale-date--1e308", "stale-date-int64"]
)
def test_stale_record_dated_beyond_any_calendar_is_still_shown(captured, since):
    """A readable record whose time no date can show (time.localtime raised OverflowError:
    status and migrate-check said 'internal error' instead of the record)."""
    paths, cli_flags, _ = captured
    record = paths.records / "stale" / "test.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"label": "test", "since": since, "reason": "md failed it"}))
    result = run("iscsimple", "status", *cli_flags)
    assert_clean_error(result.stderr)
    assert "ISCSI-STALE" in result.stdout
    result = run("iscsimple", "migrate-check", "test", *cli_flags)
    assert result.returncode == 1 and "NOT safe to migrate" in result.stdout
    assert "not a date" in result.stdout
    assert_clean_error(result.stderr)


@pytest.mark.parametrize(
    "dry_run", [[], ["--dry-run"]], ids=["stale-resolve-local", "stale-resolve-local-dry-run"]
)
def test_stale_unreadable_record_of_a_stopped_mirror_is_never_cleared_by_keep_local(captured, dry_run):
    """An unreadable record has no target: `resolve --keep local` took that for "no iSCSI leg",
    cleared the record (exit 0) and let the next attach rebuild the local leg from the stale LUN."""
    paths, cli_flags, _ = captured
    record = paths.records / "stale" / "other.json"
    record.parent.mkdir(parents=True)
    record.write_text("{garbage")
    result = run("iscsimple", "resolve", "other", "--keep", "local", *dry_run, *cli_flags)
    assert result.returncode == 1, result.stdout
    assert_clean_error(result.stderr, "refusing to resolve other", str(record))
    assert "record is cleared" not in result.stdout
    assert record.read_text() == "{garbage"


def test_stale_unreadable_record_keep_iscsi_says_no_lun_is_named(captured):
    """What --keep iscsi will do, for a record without details: it printed '(LUN None of None)'."""
    paths, cli_flags, _ = captured
    record = paths.records / "stale" / "other.json"
    record.parent.mkdir(parents=True)
    record.write_text("{garbage")
    result = run("iscsimple", "resolve", "other", "--keep", "iscsi", "--dry-run", *cli_flags)
    assert result.returncode == 0 and "dry run: nothing done" in result.stdout
    assert "None" not in result.stdout and "the record names none" in result.stdout
    assert record.exists()


@pytest.mark.parametrize("captured", ["06"], indirect=True)  # the array runs, its iSCSI leg faulty
def test_stale_unreadable_record_of_a_running_mirror_heals_the_registrys_lun(captured):
    """The running array's registry entry names the LUN: --keep local plans the heal of that LUN
    (here: its session is down, so it cannot) instead of clearing the record as "no iSCSI leg"."""
    paths, cli_flags, _ = captured
    record = paths.records / "stale" / "test.json"
    record.parent.mkdir(parents=True)
    record.write_text("{garbage")
    result = run("iscsimple", "resolve", "test", "--keep", "local", "--dry-run", *cli_flags)
    assert result.returncode == 1, result.stdout
    assert_clean_error(
        result.stderr, f"cannot heal test now: no logged-in session to {CAPTURE_TARGET} has LUN 1"
    )
    assert record.read_text() == "{garbage"


@pytest.mark.parametrize("where", ["stale", "records-root"])
def test_stale_records_behind_a_symlinked_directory_are_refused_not_followed(tmp_path, where):
    """Only the record files were opened O_NOFOLLOW: a symlink in place of records/stale (or of
    the records root iscsimple makes) was followed, its records read and written as root's. Now it
    is refused: every LABEL's record is unknown (stands, details unknown), a listing or a write
    fails naming it, and a snapshot says the records cannot be read."""
    paths = HostPaths(records=tmp_path / "lib")
    records = StaleRecords(paths)
    records.put(StaleRecord("vm1", 1.7e9, "md127", "web1", 1, CAPTURE_TARGET, 1, "sda", None, "seen"))
    link = records.directory if where == "stale" else paths.records
    elsewhere = tmp_path / "elsewhere"
    link.rename(elsewhere)
    link.symlink_to(elsewhere)
    for label in ("vm1", "other"):
        record = records.get(label)
        assert record is not None and record.unreadable, record
        assert "symbolic link" in record.reason and str(link) in record.reason
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        records.read_all()
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        records.put(StaleRecord("vm2", 1.7e9, "md126", "web2", 2, CAPTURE_TARGET, 2, "sdb", None, "seen"))
    assert sorted(p.name for p in elsewhere.rglob("*.json")) == ["vm1.json"]
    error = HostSnapshot.read(paths).records_error
    assert error is not None and "symbolic link" in error and str(link) in error


@pytest.mark.parametrize("kind", ["file", "symlink-loop"])
def test_stale_records_that_cannot_be_listed_make_migrate_check_say_not_known(captured, kind):
    """The records directory unreadable (a file in its place, a link loop): migrate-check said
    'safe to migrate', exit 0, as if no record stood; an unreadable record of another LABEL
    does not block this one (it stands as that LABEL's record)."""
    paths, cli_flags, _ = captured
    (paths.records / "stale").mkdir()
    (paths.records / "stale" / "other.json").write_text("{")
    result = run("iscsimple", "migrate-check", "test", *cli_flags)
    assert result.returncode == 0 and "safe to migrate" in result.stdout, result.stdout + result.stderr
    stale = paths.records / "stale"
    (stale / "other.json").unlink()
    stale.rmdir()
    if kind == "file":
        stale.write_text("x")
    else:
        stale.symlink_to("stale")
    result = run("iscsimple", "migrate-check", "test", *cli_flags)
    assert result.returncode == 1, result.stdout
    assert_clean_error(result.stderr)
    assert any("NOT known to be safe" in line and str(stale) in line for line in result.stdout.splitlines())


@pytest.mark.parametrize("captured", ["06"], indirect=True)  # a stale record stands for test
@pytest.mark.parametrize("everything", [False, True], ids=["update-refresh", "update-sweep"])
def test_a_state_directory_unreadable_mid_run_keeps_what_the_agent_knew(captured, everything):
    """The agent derives each snapshot from the last (HostSnapshot.update). A records or registry
    directory that could not be read (here: a file in its place) read as "no records" and "nothing
    attached": iscsimple_array_iscsi_stale went to 0 and the arrays left /metrics while the danger
    stood. Now the last records and entries stand, and each source's error names its directory."""
    import shutil

    from iscsimple.core.snapshot import Changes

    paths, _, _ = captured
    StaleRecords(paths).put(
        StaleRecord("test", 1.7e9, "md127", "web1", 1, CAPTURE_TARGET, 1, "sda", None, "seen")
    )
    before = HostSnapshot.read(paths)
    assert before.array("test").stale is not None
    for directory in (paths.records / "stale", paths.state / "attachments"):
        shutil.rmtree(directory)
        directory.write_text("not a directory")
    after = before.update(paths, Changes(everything=everything))
    view = after.array("test")
    assert view is not None and view.stale is not None and view.stale.label == "test"
    assert str(paths.records / "stale") in after.sources["stale"].errors[0]
    assert str(paths.state / "attachments") in after.sources["registry"].errors[0]
    assert HostSnapshot.read(paths).array("test") is None  # a first read knows nothing to keep


@pytest.mark.parametrize("everything", [False, True], ids=["update-refresh", "update-sweep"])
def test_records_not_listable_make_no_array_safe_to_migrate_until_read_again(captured, everything):
    """A records directory that cannot be listed (a file in its place) left the snapshot with no
    trace of it but its source's error: the agent's safe_to_migrate said 1 for every array. Now the
    snapshot says why (records_error), on a first read and on an update, until a read succeeds."""
    from iscsimple.core.safety import migrate_blockers
    from iscsimple.core.snapshot import Changes

    paths, _, _ = captured
    stale = paths.records / "stale"
    stale.mkdir(parents=True, exist_ok=True)
    good = HostSnapshot.read(paths)
    assert good.records_error is None
    assert migrate_blockers(good.array("test"), records_error=good.records_error) == []
    aside = paths.records / "aside"
    stale.rename(aside)
    stale.write_text("not a directory")
    first = HostSnapshot.read(paths)
    assert first.records_error is not None and str(stale) in first.records_error
    reasons = migrate_blockers(first.array("test"), records_error=first.records_error)
    assert any("the stale-copy records cannot be read" in r and str(stale) in r for r in reasons)
    bad = good.update(paths, Changes(everything=everything))
    assert bad.records_error is not None and str(stale) in bad.records_error
    still = bad.update(paths, Changes(everything=everything))  # nothing moved: still unknown
    assert still.records_error == bad.records_error
    stale.unlink()
    aside.rename(stale)
    assert still.update(paths, Changes(everything=everything)).records_error is None
    assert first.update(paths, Changes(everything=everything)).records_error is None


# -- numbers no float holds, in every state file ---------------------------------------------------

_BIG = "1" + "0" * 400  # an int of 401 digits: math.isfinite() / float() raise OverflowError on it
_NOW = 1.7e9


def _plant_state(paths: HostPaths, rel: str, text: str) -> Path:
    path = paths.state / rel if not rel.startswith("records/") else paths.records / rel[len("records/") :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _read_registry(paths, path):
    read = Registry(paths).read_all()
    assert read.attachments == [] and len(read.errors) == 1 and read.errors[0].startswith(str(path))


def _read_stats(paths, path):
    assert Registry(paths).read_stats().totals == {}
    Registry(paths).record_operation("add", "success", 1.0)
    assert Registry(paths).read_stats().totals == {"add": {"success": 1}}


def _read_resume(paths, path):
    from iscsimple.core.heal import PendingResumes

    found, errors = PendingResumes(paths).read_all()
    assert found == {} and str(path) in errors["vm1"]


def _read_marker(paths, path):
    from iscsimple.hotplug.session import SessionMarker, read_marker

    assert read_marker(paths, IQN) == SessionMarker(IQN, None)  # unreadable: still ours


def _read_acceptance(paths, path):
    from iscsimple.core.cluster import Acceptances

    with pytest.raises(OperationError, match="unreadable accepted-loss record"):
        Acceptances(paths).for_lun(IQN, 1)


def _read_instance(paths, path):
    from iscsimple.core.bitmap import BitmapFileError, read_instance

    with pytest.raises(BitmapFileError, match="bitmap record of vm1"):
        read_instance(paths, "vm1")


def _read_support(paths, path):
    from iscsimple.core.bitmap import BitmapSupport, cached_support

    (paths.procfs / "sys" / "kernel" / "random").mkdir(parents=True)
    (paths.procfs / "sys" / "kernel" / "random" / "boot_id").write_text("b\n")
    probed = BitmapSupport(True, "probed", 65536)
    assert cached_support(paths, lambda: probed) == probed


OUT_OF_RANGE_STATE = {
    "registry": ("attachments/vbd-1-51712.json", {**GOOD_ENTRY, "created": "@"}, _read_registry),
    "registry-last": ("attachments/vbd-1-51712.json",
                      {**GOOD_ENTRY, "last": {"operation": "add", "result": "success", "seconds": "@", "at": 1}},
                      _read_registry),
    "stats": ("hotplug-stats.json", {"totals": {"add": {"success": "@"}}}, _read_stats),
    "resume": ("resumes/vm1.json", {"label": "vm1", "attachment_id": "vbd-1-2", "attachment_created": "@",
                                    "md_device": "md127", "member": "dm-3", "dev": "253:3"}, _read_resume),
    "marker": (f"sessions/{IQN}.json", {"target": IQN, "portal": None, "logged_in_at": "@"}, _read_marker),
    "acceptance": ("records/accepted-loss/x.json",
                   {"host": "b", "target": IQN, "lun": 1, "since": "@", "label": "vm1"}, _read_acceptance),
    "bitmap-instance": ("bitmaps/vm1.json", {"label": "vm1", "md_device": "md127", "file": "x", "file_inode": "@",
                                             "file_dev": 1, "file_ctime_ns": 1, "chunk_bytes": 65536, "boot_id": None,
                                             "kmsg_seq": None, "local_device": None, "local_rdev_ino": None,
                                             "iscsi_wwid": None, "iscsi_size_bytes": None, "iscsi_source": True},
                        _read_instance),
    "bitmap-support": ("bitmap-support.json", {"supported": True, "reason": "", "chunk_bytes": "@",
                                               "boot_id": "b"}, _read_support),
}  # fmt: skip
OUT_OF_RANGE_CASES = [
    (w, n) for w in OUT_OF_RANGE_STATE for n in (_BIG, "-" + _BIG, "Infinity", "NaN", "1e400")
]


@pytest.mark.parametrize(
    ("which", "number"), OUT_OF_RANGE_CASES, ids=[f"state-number-{w}-{n[:6]}" for w, n in OUT_OF_RANGE_CASES]
)
def test_state_number_out_of_range_is_a_corrupt_file(tmp_path, which, number):
    """Every state file is read by files.load_state_json, which takes a number beyond 2**64, NaN
    or Infinity for a corrupt file: each reader then does what it does with one (an error line,
    counting from zero, "ours", a probe again), never an OverflowError."""
    rel, data, check = OUT_OF_RANGE_STATE[which]
    paths = HostPaths(state=tmp_path / "run", records=tmp_path / "lib", procfs=tmp_path / "proc")
    path = _plant_state(paths, rel, json.dumps(data).replace('"@"', number))
    check(paths, path)


# -- sysfs ----------------------------------------------------------------------------------------


def _connection_dir(sysfs: Path) -> Path:
    (found,) = list(sysfs.glob("devices/**/iscsi_connection/connection*"))
    return found


SYSFS_CASES = ("no-persistent-address", "no-connection-dir", "empty-targetname", "binary-state",
               "empty-persistent-address", "binary-address", "garbage-port")  # fmt: skip


@pytest.mark.parametrize("case", SYSFS_CASES, ids=[f"sysfs-{c}" for c in SYSFS_CASES])
def test_sysfs_broken_session(captured, case):
    paths, cli_flags, agent_flags = captured
    connection = _connection_dir(paths.sysfs)
    session = next(paths.sysfs.glob("devices/**/iscsi_session/session*"))
    if case == "no-persistent-address":
        (connection / "persistent_address").unlink()
    elif case == "no-connection-dir":
        import shutil

        shutil.rmtree(connection.parent.parent)
    elif case == "empty-targetname":
        (session / "targetname").write_text("\n")
    elif case == "binary-state":
        (session / "state").write_bytes(b"\xff\xfe\x00")
    elif case == "empty-persistent-address":
        (connection / "persistent_address").write_text("")
    elif case == "binary-address":
        (connection / "persistent_address").write_bytes(b"\x1b[2J127.0.0.1")
    elif case == "garbage-port":
        (connection / "persistent_port").write_bytes(b"12x")
    result = read_iscsi_sessions(paths.sysfs)
    if case != "no-connection-dir":
        assert result.errors and all(str(paths.sysfs) in e for e in result.errors)
    out = run("iscsimple-agent", *agent_flags)
    assert_clean_error(out.stderr)
    assert "iscsimple_iscsi_session_up" in out.stdout
    status = run("iscsimple", "status", *cli_flags)
    assert status.returncode in (0, 1)
    assert_clean_error(status.stderr)


# -- flags ----------------------------------------------------------------------------------------

BAD_DURATIONS = [
    "nan",
    "inf",
    "-inf",
    "1e400",
    "1e400s",
    "nanms",
    "infm",
    "-1",
    "0",
    "0s",
    "",
    "s",
    "1e30h",
    "abc",
]
AGENT_DURATION_FLAGS = ["--refresh.interval", "--health.stall-after", "--textfile.interval"]


@pytest.mark.parametrize(
    ("flag", "value"),
    [(f, v) for f in AGENT_DURATION_FLAGS for v in BAD_DURATIONS]
    + [("--demo.speed", v) for v in ("nan", "inf", "0", "-1", "1e400", "x")],
    ids=[f"flags-{f.lstrip('-')}={v}" for f in AGENT_DURATION_FLAGS for v in BAD_DURATIONS]
    + [f"flags-demo.speed={v}" for v in ("nan", "inf", "0", "-1", "1e400", "x")],
)
def test_flags_agent_bad_number(flag, value):
    from iscsimple.exporter import agent

    with pytest.raises(SystemExit) as caught:
        agent.build_parser().parse_args([f"{flag}={value}"])
    assert caught.value.code == 2


def test_flags_agent_bad_number_in_one_line():
    result = run("iscsimple-agent", "--refresh.interval=nan", "--once")
    assert result.returncode == 2
    assert_clean_error(result.stderr, "--refresh.interval")


@pytest.mark.parametrize(
    "flag", ["--path.state", "--path.records"], ids=["flags-agent-path.state", "flags-agent-path.records"]
)
def test_flags_agent_missing_state_directory(captured, flag):
    paths, _, agent_flags = captured
    missing = paths.state.parent / "typo"
    result = run("iscsimple-agent", *agent_flags, f"{flag}={missing}")
    assert result.returncode == 2
    assert_clean_error(result.stderr, f"{flag} {missing}")
    assert result.stdout == ""


@pytest.mark.parametrize("flag", ["--state", "--records"], ids=["flags-cli-state", "flags-cli-records"])
@pytest.mark.parametrize("command", ["status", "attach"])
def test_flags_cli_missing_state_directory(tmp_path, flag, command, capsys):
    args = ["status"] if command == "status" else ["attach", f"lun1@{IQN}+vm1"]
    code = cli.main([*args, f"{flag}={tmp_path / 'typo'}", f"--config={tmp_path / 'none'}"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = err.splitlines()
    assert f"--path.{flag[2:]} {tmp_path / 'typo'}" in line  # named as the agent and README do


# -- root-owned state -----------------------------------------------------------------------------


@pytest.fixture
def umask000():
    old = os.umask(0)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_root_state_modes_under_umask_000(tmp_path, umask000):
    paths = HostPaths(
        state=tmp_path / "run" / "iscsimple", records=tmp_path / "lib" / "iscsimple", locks=tmp_path / "locks"
    )
    Registry(paths).put(Attachment(id="cli-vm1", spec="MISSING+vm1", lun=0, target=None, label="vm1"))
    Registry(paths).record_operation("add", "success", 1.0)
    StaleRecords(paths).put(StaleRecord("vm1", 1.0, None, None, None, None, None, None, None, "seen"))
    with hotplug_lock(paths.locks, "iscsimple-label-vm1"):
        assert _mode(paths.locks / "iscsimple-label-vm1") == 0o600
    for directory in (tmp_path / "run", paths.state, paths.state / "attachments", paths.records,
                      paths.records / "stale", paths.locks):  # fmt: skip
        assert _mode(directory) == 0o755, directory
    assert _mode(paths.state / "attachments" / "cli-vm1.json") == 0o644
    assert _mode(paths.state / "hotplug-stats.json") == 0o644
    assert _mode(paths.state / ".hotplug-stats.lock") == 0o600
    assert _mode(paths.records / "stale" / "vm1.json") == 0o600


def test_root_state_planted_stats_lock_symlink_is_not_followed(tmp_path):
    paths = _registry_paths(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (paths.state / ".hotplug-stats.lock").symlink_to(victim)
    Registry(paths).record_operation("remove", "success", 1.0)  # a warning, never a failure
    assert victim.read_text() == "precious"


def test_root_state_planted_lock_symlink_is_refused(tmp_path):
    locks = tmp_path / "locks"
    locks.mkdir()
    target = tmp_path / "created-through-the-link"
    (locks / "iscsimple-label-vm1").symlink_to(target)
    with pytest.raises(OperationError, match="symbolic link"), hotplug_lock(locks, "iscsimple-label-vm1"):
        pass
    assert not target.exists()


@pytest.mark.parametrize(
    "mode",
    [0o777, 0o775, 0o757, 0o1777],
    ids=["rootstate-dir-0777", "rootstate-dir-0775", "rootstate-dir-0757", "rootstate-dir-1777"],
)
def test_root_state_directory_writable_by_others_is_refused(tmp_path, mode):
    paths = _registry_paths(tmp_path)
    os.chmod(paths.state, mode)
    with pytest.raises(UnsafeFileError, match="writable by group or others"):
        Registry(paths).put(Attachment(id="cli-vm1", spec="MISSING+vm1", lun=0, target=None, label="vm1"))
    assert not (paths.state / "attachments" / "cli-vm1.json").exists()


def test_root_state_directory_owned_by_another_user_is_refused(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    owner = os.stat(directory).st_uid
    with pytest.raises(UnsafeFileError, match="owned by uid"):
        ensure_dir(directory, trusted={owner + 4242})
    if os.geteuid() == 0:
        os.chown(directory, 4242, 4242)
        with pytest.raises(UnsafeFileError, match="owned by uid 4242"):
            ensure_dir(directory)


def test_root_state_state_dir_symlink_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "run").symlink_to(real)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        ensure_dir(tmp_path / "run")


def test_root_state_convert_write_keeps_owner_and_mode_under_umask_000(tmp_path, umask000):
    cfg = tmp_path / "vm.cfg"
    cfg.write_text("disk = ['iscsimple:lun0@iqn.2001-04.com.example:storage+web1,xvda2,w']\n")
    os.chmod(cfg, 0o640)
    if os.geteuid() == 0:
        os.chown(cfg, 4242, 4243)
    before = os.stat(cfg)
    assert cli.main(["convert-config", str(cfg), "--write"]) == 0
    after = os.lstat(cfg)
    assert stat.S_ISREG(after.st_mode) and stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert "script=block-iscsimple" in cfg.read_text()


# -- the hotplug with bad inputs: error in xenstore, nothing half-done -----------------------------

HOTPLUG_CASES = (
    "config-fifo",
    "tab-fifo",
    "config-deep",
    "config-nan-login",
    "tab-nul-device",
    "config-directory",
)


@pytest.mark.parametrize("case", HOTPLUG_CASES, ids=[f"hotplug-{c}" for c in HOTPLUG_CASES])
def test_hotplug_add_bad_input_fails_cleanly(tmp_path, case):
    hp = make_hotplug(tmp_path)
    hp.host.add_target(IQN, luns={1: 64 << 20})
    hp.mirror("vm1")
    if case == "config-fifo":
        hp.paths.config.unlink()
        os.mkfifo(hp.paths.config)
    elif case == "config-directory":
        hp.paths.config.unlink()
        hp.paths.config.mkdir()
    elif case == "tab-fifo":
        hp.paths.tab.unlink()
        os.mkfifo(hp.paths.tab)
    elif case == "config-deep":
        hp.set_config("[iscsi]\nportals = " + "[" * 100000 + "]" * 100000 + "\n")
    elif case == "config-nan-login":
        hp.set_config("[iscsi]\nlogin_timeout = nan\n")
    elif case == "tab-nul-device":
        hp.paths.tab.write_bytes(b"vm1 /dev/vg0/v\x00m1\n")
    vbd = hp.vbd(f"lun1@{IQN}+vm1")
    result = hp.run("add", vbd, timeout=TIMEOUT * 2)
    assert result.returncode == 1
    assert hp.xs(vbd, "hotplug-status") == "error"
    error = hp.xs(vbd, "hotplug-error")
    assert error and "\n" not in error and "internal error" not in error and "Traceback" not in result.stderr
    where = hp.paths.tab if case.startswith("tab") else hp.paths.config
    assert str(where) in error, error
    assert hp.host.session_targets() == [] and Registry(hp.paths).list() == []
    assert hp.host.md_arrays() == {}


def test_errors_are_iscsimple_errors():
    """Every bad-input error above is an IscsimpleError: the CLI maps it to its exit code."""
    assert issubclass(FileInputError, IscsimpleError) and issubclass(UnsafeFileError, OperationError)


def test_registry_device_node_is_reported_and_never_opened(tmp_path, monkeypatch):
    paths = _registry_paths(tmp_path)
    (paths.state / "attachments" / "vbd-1-51712.json").write_text(json.dumps(GOOD_ENTRY))
    node = paths.state / "attachments" / "vbd-2-51712.json"
    try:
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    opened: list[str] = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *, dir_fd=None):
        opened.append(os.path.basename(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", recording_open)
    read = Registry(paths).read_all()
    monkeypatch.undo()
    assert [a.id for a in read.attachments] == ["vbd-1-51712"]
    assert read.errors == [f"{node}: unreadable: is a character device, not a regular file"]
    assert node.name not in opened
