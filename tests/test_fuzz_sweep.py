"""A sweep of generated bad inputs through every entry point: `iscsimple`, `iscsimple-agent`, `block-iscsimple`.

Each case puts one bad input in place — a file the product reads replaced by a FIFO, a device,
a directory, a symlink, a huge or binary or garbled file; a flag, an environment variable or a
xenstore value with a generated bad value — runs one entry point in-process (fast: no
interpreter start-up) and checks the same contract everywhere:

- it returns within TIMEOUT (special files are refused before they are read);
- no exception escapes, nothing says "internal error", no log record carries a traceback;
- the exit code is the README's: 2 a usage error (bad flag), 1 an operation failed, 0 done
  (`remove` always tries; the agent's `--once` is 1 when a source was unreadable);
- a failure says, on one line, what was wrong: the file, flag or value;
- block-iscsimple: a failed add writes hotplug-status=error and a one-line hotplug-error,
  and leaves no session, array or registry entry behind.

Values come from seeded generators (SEED): the same cases on every run. The category is
the first word of each test id (`pytest --collect-only -q tests/test_fuzz_sweep.py`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import socket
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fixturetree import materialize, register_capture_array

from iscsimple.core.errors import one_line
from tests.fakes.harness import IQN, make_mirror_host

SEED = 20261130
TIMEOUT = 20.0  # far above any honest run here; a blocked read never returns


# -- running an entry point in-process -----------------------------------------------------------


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    logs: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)  # log records with exc_info

    @property
    def text(self) -> str:
        return "\n".join([self.stderr, self.stdout[-2000:], *self.logs])


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.tracebacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if record.exc_info:
            self.tracebacks.append(logging.Formatter().formatException(record.exc_info))


_CALL_LOCK = threading.Lock()  # one entry point at a time: they share sys.stdout/stderr and os.environ


def call(main, argv: list[str], env: dict[str, str] | None = None) -> Outcome:
    """main(argv) in a thread with stdout/stderr/env of its own; fails the test on a hang or an escape."""
    out, err = io.StringIO(), io.StringIO()
    out.buffer = io.BytesIO()  # type: ignore[attr-defined]  # the agent writes bytes
    collect = _Collect()
    root = logging.getLogger()
    result: dict = {}
    with _CALL_LOCK, _environ(env or {}):
        handlers, level = list(root.handlers), root.level
        root.addHandler(collect)

        def target() -> None:
            try:
                result["code"] = main(argv)
            except SystemExit as e:
                result["code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            except BaseException as e:  # reported below: an escape is the bug this sweep looks for
                result["escape"] = e

        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            thread.join(TIMEOUT)
        finally:
            sys.stdout, sys.stderr = saved
            for h in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(h)
            root.setLevel(level)
    if thread.is_alive():
        pytest.fail(f"hang: {argv} did not return within {TIMEOUT} s")
    if "escape" in result:
        e = result["escape"]
        raise AssertionError(f"traceback: {argv} raised {type(e).__name__}: {e}") from e
    stdout = out.getvalue() + out.buffer.getvalue().decode("utf-8", "replace")  # type: ignore[attr-defined]
    return Outcome(result.get("code"), stdout, err.getvalue(), collect.lines, collect.tracebacks)


@contextlib.contextmanager
def _environ(changes: dict[str, str | None]):
    saved = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def assert_clean(outcome: Outcome, codes: set[int], *names: str) -> None:
    """The contract: an allowed exit code, no traceback or 'internal error', and on a failure a
    line naming one of `names` (the file, flag or value that was bad)."""
    assert not outcome.tracebacks, "traceback in the log:\n" + outcome.tracebacks[0]
    for text in (outcome.stderr, *outcome.logs):
        assert "Traceback" not in text and "internal error" not in text, f"internal error: {text}"
    assert outcome.code in codes, f"exit code {outcome.code}, expected {sorted(codes)}:\n{outcome.text}"
    if outcome.code and names:
        lines = outcome.text.splitlines()
        assert any(any(n in line for n in names) for line in lines), f"no line names {names}:\n{outcome.text}"


def cli(argv: list[str], env: dict | None = None) -> Outcome:
    from iscsimple.cli.main import main

    return call(main, argv, env)


def agent(argv: list[str], env: dict | None = None) -> Outcome:
    from iscsimple.exporter.agent import main

    return call(main, argv, env)


def hotplug_main(argv: list[str], env: dict) -> Outcome:
    from iscsimple.hotplug.main import main

    return call(main, argv, env)


# -- bad files ------------------------------------------------------------------------------------

SPECIAL = ("fifo", "directory", "socket", "chardev", "dangling-symlink", "symlink-loop", "path-through-file")
CONTENT = ("huge", "binary", "not-utf8", "nul-bytes", "deep-json", "random-text", "empty", "bad-json-types")
STATE_KINDS = SPECIAL + CONTENT + ("symlink-to-good",)


def plant(path: Path, kind: str, rng: random.Random, good: bytes = b"") -> Path:
    """Put a bad `kind` of file at `path` (whatever was there is replaced). Returns the path read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        here = os.getcwd()
        os.chdir(path.parent)  # AF_UNIX paths are limited to 107 bytes
        try:
            s.bind(path.name)
        finally:
            os.chdir(here)
            s.close()
    elif kind == "chardev":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))  # /dev/zero: endless, never refused by EOF
    elif kind == "dangling-symlink":
        path.symlink_to(path.name + ".nowhere")
    elif kind == "symlink-loop":
        path.symlink_to(path.name)
    elif kind == "path-through-file":
        path.write_text("x")
        return path / "below"
    elif kind == "huge":
        with open(path, "wb") as f:
            f.write(good[:64] or b"{")
            f.truncate(40 * 1024 * 1024)  # sparse: cheap to make, far past every limit
    elif kind == "binary":
        path.write_bytes(rng.randbytes(rng.randrange(1, 600)))
    elif kind == "not-utf8":
        path.write_bytes(good.replace(b"1", b"\xff\xfe") + b"\xc3(\xa0\xa1" if good else b"\xc3(\xa0\xa1")
    elif kind == "nul-bytes":
        data = bytearray(good or b"x = 1\n")
        data[rng.randrange(len(data))] = 0
        path.write_bytes(bytes(data))
    elif kind == "deep-json":
        depth = rng.randrange(5000, 200000)
        path.write_bytes(b"[" * depth + b"]" * rng.choice((0, depth)))
    elif kind == "random-text":
        alphabet = "{}[]\":,=#\n \t'\\abcxyz019.-+eE\u00e9\u2028\x1b\x7f"
        path.write_text("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400))))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bad-json-types":
        value = rng.choice(["null", "[]", "5", '"x"', "true", '{"": {}}', "1e999", "-0", "{}"])
        path.write_text(value)
    elif kind == "symlink-to-good":
        real = path.with_name(path.name + ".real")
        real.write_bytes(good or b"{}")
        path.symlink_to(real.name)
    else:
        raise ValueError(kind)
    return path


def rng_for(*parts: object) -> random.Random:
    return random.Random(f"{SEED}:{':'.join(map(str, parts))}")


def ids(prefix: str, values) -> list[str]:
    return [f"{prefix}-{v}" for v in values]


# The full sweep (every case below) takes minutes here; the default suite runs a seeded sample that
# keeps every input class of every entry point. ISCSIMPLE_FUZZ=full runs all of it.
FULL = os.environ.get("ISCSIMPLE_FUZZ") == "full"


def sweep(argnames, values, ids, *, key=None, keep: float = 1.0):
    """pytest.mark.parametrize over `values`; outside a full sweep a seeded sample: one value per
    `key(value)` group (each input class stays covered), then a share `keep` of those."""
    values, ids = list(values), list(ids)
    chosen = list(range(len(values)))
    if not FULL:
        rng = rng_for("sample", *ids[:1])
        groups: dict = {}
        for i in chosen:
            groups.setdefault(key(values[i]) if key else i, []).append(i)
        chosen = [rng.choice(group) for group in groups.values()]
        if keep < 1:
            chosen = rng.sample(chosen, max(1, round(len(chosen) * keep)))
        chosen.sort()
    return pytest.mark.parametrize(argnames, [values[i] for i in chosen], ids=[ids[i] for i in chosen])


# -- a host with one mirror attached (the captured kernel state) -----------------------------------


@pytest.fixture
def host(tmp_path):
    """The captured in-sync mirror, its registry entry and the flags that point both tools at it."""
    root = materialize("04", tmp_path / "root")
    paths = register_capture_array(root)
    paths.records.mkdir(exist_ok=True)
    (root / "iscsimple.toml").write_text("[heal]\nenabled = false\n")
    (root / "tab.conf").write_text("test /dev/loop1\n")
    roots = [f"--path.sysfs={paths.sysfs}", f"--path.procfs={paths.procfs}", f"--path.devfs={paths.devfs}"]
    cli_flags = [
        *roots,
        f"--state={paths.state}",
        f"--records={paths.records}",
        f"--locks={root / 'locks'}",
        f"--config={root / 'iscsimple.toml'}",
        f"--tab={root / 'tab.conf'}",
    ]
    agent_flags = [
        *roots,
        f"--path.state={paths.state}",
        f"--path.records={paths.records}",
        f"--config.file={root / 'iscsimple.toml'}",
        "--once",
        "--no-udev",
    ]
    return root, paths, cli_flags, agent_flags


# -- operator files: tab, iscsimple.toml, domU .cfg, web config -----------------------------------

OPERATOR_KINDS = SPECIAL + CONTENT


@sweep("kind", OPERATOR_KINDS, ids("tab", OPERATOR_KINDS), keep=0.5)
def test_tab_file(host, kind):
    root, _, cli_flags, _ = host
    bad = plant(root / "tab.conf", kind, rng_for("tab", kind), b"test /dev/loop1\n")
    flags = [f for f in cli_flags if not f.startswith("--tab=")] + [f"--tab={bad}"]
    maybe_valid = {0} if kind in ("empty", "random-text") else set()
    assert_clean(cli(["check-config", *flags]), {2} | maybe_valid, str(bad))
    if kind not in ("empty",):
        assert_clean(cli(["attach", "MISSING+test", *flags]), {1, 2}, str(bad))


@sweep("kind", OPERATOR_KINDS, ids("config", OPERATOR_KINDS), keep=0.5)
def test_config_file(host, kind):
    root, _, cli_flags, agent_flags = host
    bad = plant(root / "iscsimple.toml", kind, rng_for("config", kind), b"[heal]\nenabled = false\n")
    flags = [f for f in cli_flags if not f.startswith("--config=")] + [f"--config={bad}"]
    if kind != "empty":  # an empty config is the defaults
        assert_clean(cli(["check-config", *flags]), {2}, str(bad))
        for argv in (["status"], ["migrate-check", "test"], ["resolve", "test", "--keep", "local"]):
            assert_clean(cli([*argv, *flags]), {1, 2}, str(bad))
    agent_argv = [f for f in agent_flags if not f.startswith("--config.file=")] + [f"--config.file={bad}"]
    outcome = agent(agent_argv)
    assert_clean(outcome, {0, 1})
    if kind != "empty":
        assert any(str(bad) in line for line in outcome.logs), outcome.text  # heal off, and why


@sweep("kind", OPERATOR_KINDS, ids("domucfg", OPERATOR_KINDS), keep=0.5)
def test_domu_cfg(host, kind):
    root, _, cli_flags, _ = host
    good = (
        b"disk = ['vdev=xvda,access=w,script=block-iscsimple,target=lun1@iqn.2001-04.com.example:s+test']\n"
    )
    bad = plant(root / "vm.cfg", kind, rng_for("cfg", kind), good)
    if kind == "empty":
        return
    # Unreadable: exit 2. Readable but garbled: xl's problem unless a disk entry of ours is in it.
    codes = {2} if kind in (*SPECIAL, "huge", "not-utf8") else {0, 2}
    assert_clean(cli(["check-config", str(bad), *cli_flags]), codes, str(bad))
    assert_clean(cli(["convert-config", str(bad), *cli_flags]), codes, str(bad))


@sweep("kind", OPERATOR_KINDS, ids("webconfig", OPERATOR_KINDS), keep=0.5)
def test_web_config(host, kind):
    root, _, _, agent_flags = host
    bad = plant(root / "web.yml", kind, rng_for("web", kind), b"basic_auth_users:\n  a: b\n")
    if kind == "empty":
        return
    assert_clean(agent([*agent_flags, f"--web.config.file={bad}"]), {2}, str(bad))


TLS_KINDS = ("fifo", "directory", "chardev", "dangling-symlink", "huge", "binary", "empty")
TLS_CASES = [(f, k) for f in ("cert_file", "key_file", "client_ca_file") for k in TLS_KINDS]


@sweep(("which", "kind"), TLS_CASES, [f"webconfig-tls-{f}-{k}" for f, k in TLS_CASES], key=lambda c: c[1])
def test_web_config_tls_files(host, which, kind):
    """The files the web config names: ssl reads them itself, so they are checked before it does."""
    root, _, _, agent_flags = host
    files = {name: root / f"{name}.pem" for name in ("cert_file", "key_file", "client_ca_file")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    bad = plant(files[which], kind, rng_for("tls", which, kind), files[which].read_bytes())
    web = root / "web.yml"
    web.write_text(
        "tls_server_config:\n"
        + "".join(f"  {name}: {path.name}\n" for name, path in files.items())
        + "  client_auth_type: RequireAndVerifyClientCert\n"
    )
    outcome = agent(
        [
            *[f for f in agent_flags if f != "--once"],
            f"--web.config.file={web}",
            "--web.listen-address=127.0.0.1:0",
        ]
    )
    # The placeholder certificate is no certificate either: the first unusable file is named.
    assert_clean(outcome, {2}, str(bad), *map(str, files.values()))


# -- iscsimple's own state: registry, stale records, statistics, markers, bitmaps, resumes ---------

STATE_FILES = {
    "registry": "run/attachments/vbd-1-51712.json",
    "registry-other": "run/attachments/vbd-7-51728.json",
    "stale": "lib/stale/test.json",
    "stats": "run/hotplug-stats.json",
    "marker": f"run/sessions/{IQN}.json",
    "bitmap-instance": "run/bitmaps/test.json",
    "bitmap-support": "run/bitmap-support.json",
    "resume": "run/resumes/test.json",
    "acceptances": "lib/accepted",
}
STATE_CASES = [(f, k) for f in STATE_FILES for k in STATE_KINDS]


@sweep(("which", "kind"), STATE_CASES, [f"state-{f}-{k}" for f, k in STATE_CASES], key=lambda c: c[1])
def test_state_file_status_and_agent(host, which, kind):
    root, _paths, cli_flags, agent_flags = host
    path = root / STATE_FILES[which]
    good = path.read_bytes() if path.is_file() else b"{}"
    bad = plant(path, kind, rng_for("state", which, kind), good)
    status = cli(["status", *cli_flags])
    assert_clean(status, {0, 1}, str(path), str(bad))
    if which.startswith("registry") and kind not in ("symlink-to-good",):
        # A registry entry that cannot be read is never silently dropped.
        assert status.code == 1 and any(str(path) in line for line in status.stderr.splitlines())
    if which == "stale" and kind not in ("path-through-file",):
        assert "ISCSI-STALE" in status.stdout, status.stdout  # unreadable record: stale, details unknown
    assert_clean(cli(["migrate-check", "test", *cli_flags]), {0, 1, 2}, str(path), str(bad))
    outcome = agent(agent_flags)
    assert_clean(outcome, {0, 1})
    if which.startswith("registry") and kind != "symlink-to-good":
        assert outcome.code == 1


# -- the kernel's views: /proc/mdstat, sysfs attributes, /dev/kmsg ----------------------------------

KERNEL_FILES = {
    "mdstat": "proc/mdstat",
    "md-array-state": "sys/devices/virtual/block/md127/md/array_state",
    "md-member-state": "sys/devices/virtual/block/md127/md/dev-sda/state",
    "md-sync-action": "sys/devices/virtual/block/md127/md/sync_action",
    "md-degraded": "sys/devices/virtual/block/md127/md/degraded",
    "md-size": "sys/devices/virtual/block/md127/size",
    "kmsg": "dev/kmsg",
    "mountinfo": "proc/self/mountinfo",
    "osrelease": "proc/sys/kernel/osrelease",
}
KERNEL_KINDS = ("fifo", "directory", "socket", "chardev", "dangling-symlink", "huge", "binary", "nul-bytes",
                "random-text", "empty")  # fmt: skip
KERNEL_CASES = [(f, k) for f in KERNEL_FILES for k in KERNEL_KINDS]


def _session_attrs(root: Path) -> list[Path]:
    sessions = sorted(root.glob("sys/devices/**/iscsi_session/session*"))
    connections = sorted(root.glob("sys/devices/**/iscsi_connection/connection*"))
    return [sessions[0] / "state", sessions[0] / "targetname", connections[0] / "persistent_address",
            connections[0] / "persistent_port"]  # fmt: skip


@sweep(("which", "kind"), KERNEL_CASES, [f"kernel-{f}-{k}" for f, k in KERNEL_CASES], key=lambda c: c[1])
def test_kernel_view(host, which, kind):
    root, _, cli_flags, agent_flags = host
    path = root / KERNEL_FILES[which]
    good = path.read_bytes() if path.is_file() else b""
    plant(path, kind, rng_for("kernel", which, kind), good)
    assert_clean(cli(["status", *cli_flags]), {0, 1}, str(root))
    assert_clean(agent(agent_flags), {0, 1})


SESSION_KINDS = ("fifo", "directory", "binary", "random-text", "empty", "huge")


@sweep("kind", SESSION_KINDS, ids("kernel-iscsi-session", SESSION_KINDS), keep=0.5)
def test_kernel_iscsi_session_attrs(host, kind):
    root, _, cli_flags, agent_flags = host
    for i, path in enumerate(_session_attrs(root)):
        plant(path, kind, rng_for("session", kind, i), path.read_bytes() if path.is_file() else b"")
    assert_clean(cli(["status", *cli_flags]), {0, 1}, str(root))
    assert_clean(agent(agent_flags), {0, 1})


# -- flags ------------------------------------------------------------------------------------------


def _null_device(tmp: Path) -> Path:
    """A character device of our own (never the host's /dev/null: a bug replacing it would break the machine)."""
    node = tmp / "a-null-device"
    if not node.exists():
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return node


def bad_path_values(tmp: Path, rng: random.Random) -> dict[str, str]:
    fifo = tmp / "a-fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    afile = tmp / "a-file"
    afile.write_text("x")
    return {
        "missing": str(tmp / "no" / "such"),
        "file": str(afile),
        "fifo": str(fifo),
        "through-file": str(afile / "x"),
        "long": "/" + "x" * 5000,
        "device": str(_null_device(tmp)),
        "control": str(tmp / "a\x1bb\nc"),
        "random": str(tmp / "".join(rng.choice("ab/.-~ \u00e9\t") for _ in range(20))),
    }


CLI_PATH_FLAGS = ("--path.tab", "--path.config", "--path.state", "--path.records", "--path.locks",
                  "--path.procfs", "--path.sysfs", "--path.devfs")  # fmt: skip
CLI_COMMANDS = (["status"], ["check-config"], ["migrate-check", "test"], ["attach", "MISSING+test"],
                ["detach", "MISSING+test"], ["resolve", "test", "--keep", "local", "--dry-run"])  # fmt: skip
PATH_KINDS = ("missing", "file", "fifo", "through-file", "long", "device", "control", "random")
CLI_FLAG_CASES = [(f, k) for f in CLI_PATH_FLAGS for k in PATH_KINDS]


@sweep(
    ("flag", "kind"), CLI_FLAG_CASES, [f"flags-cli{f[1:]}={k}" for f, k in CLI_FLAG_CASES], key=lambda c: c[1]
)
def test_cli_path_flag(host, flag, kind):
    root, _, cli_flags, _ = host
    value = bad_path_values(root, rng_for("cli-path", flag, kind))[kind]
    name = flag.removeprefix("--path.")
    flags = [f for f in cli_flags if not f.startswith((f"--{name}=", f"--path.{name}="))]
    named = (flag, "--" + name, value[:40], one_line(value)[:40])
    for command in CLI_COMMANDS:
        outcome = cli([*command, *flags, f"{flag}={value}"])
        # The flag matters to some commands only: those say what was wrong with it.
        matters = name in ("state", "records") or (command[0] == "status" and name in ("sysfs", "procfs"))
        assert_clean(outcome, {0, 1, 2}, *(named if matters else ()))
        if name in ("state", "records") and kind in ("missing", "file", "through-file", "long"):
            assert outcome.code == 2, f"{command}: {outcome.text}"  # a typo, not "nothing attached"


BAD_NUMBERS = ("nan", "inf", "-inf", "1e400", "-1", "0x10", "", " ", "1_0", "\u0661", "9" * 400, "1e-400")


@sweep("value", BAD_NUMBERS, ids("flags-cli-resolve-wait", range(len(BAD_NUMBERS))), keep=0.5)
def test_cli_number_flag(host, value):
    _root, _, cli_flags, _ = host
    outcome = cli(["resolve", "test", "--keep", "local", "--dry-run", f"--wait={value}", *cli_flags])
    assert_clean(outcome, {0, 1, 2}, "--wait", "wait")
    if value != "1e-400":
        assert outcome.code == 2, outcome.text


def random_argv(rng: random.Random) -> list[str]:
    words = ["status", "check-config", "attach", "detach", "resolve", "migrate-check", "accept-loss",
             "convert-config", "install-hook", "--keep", "local", "iscsi", "--json", "--wait", "--host",
             "--state", "--records", "--tab", "--config", "--path.sysfs", "--debug", "--", "-", "--x",
             "lun1@" + IQN, "MISSING+a", "+", "@", "a\x00b", "\u00e9", "=", "--state=", "-h"]  # fmt: skip
    return [rng.choice(words) for _ in range(rng.randrange(0, 6))]


ARGV_CASES = 40


@sweep("case", range(ARGV_CASES), ids("flags-cli-argv", range(ARGV_CASES)), keep=0.25)
def test_cli_random_argv(host, case):
    _root, _, cli_flags, _ = host
    argv = random_argv(rng_for("argv", case))
    if any(w in ("install-hook", "convert-config") for w in argv):
        argv = [w for w in argv if w not in ("install-hook", "convert-config")]  # they write files
    outcome = cli([*argv, *cli_flags])
    assert_clean(outcome, {0, 1, 2})
    if outcome.code == 2:
        assert outcome.stderr.strip() and len(outcome.stderr.strip().splitlines()) <= 3, outcome.stderr


AGENT_FLAGS = {
    "--refresh.interval": (*BAD_NUMBERS, "1e30h", "5x", "ms"),
    "--refresh.sweep-interval": ("nan", "0", "-1", "inf", "10y"),
    "--health.stall-after": ("nan", "0", "1e400", "abc"),
    "--textfile.interval": ("inf", "-5s", ""),
    "--demo.speed": ("nan", "0", "1e400", "x"),
    "--web.listen-address": ("", ":", "x:y", ":99999", "[::1", "256.1.1.1:1", ":-1", "a" * 300 + ":1"),
    "--log.level": ("trace", "", "INFO "),
}
AGENT_FLAG_CASES = [(f, v) for f, values in AGENT_FLAGS.items() for v in values]


@sweep(
    ("flag", "value"),
    AGENT_FLAG_CASES,
    [f"flags-agent{f[1:]}={i}" for i, (f, _) in enumerate(AGENT_FLAG_CASES)],
    key=lambda c: c[0],
)
def test_agent_value_flag(host, flag, value):
    _, _, _, agent_flags = host
    outcome = agent([*agent_flags, f"{flag}={value}"])
    assert_clean(outcome, {2}, flag)


AGENT_PATH_FLAGS = ("--path.procfs", "--path.sysfs", "--path.devfs", "--path.state", "--path.records",
                    "--config.file", "--textfile")  # fmt: skip
AGENT_PATH_CASES = [(f, k) for f in AGENT_PATH_FLAGS for k in PATH_KINDS]


@sweep(
    ("flag", "kind"),
    AGENT_PATH_CASES,
    [f"flags-agent{f[1:]}={k}" for f, k in AGENT_PATH_CASES],
    key=lambda c: c[1],
)
def test_agent_path_flag(host, flag, kind):
    root, _, _, agent_flags = host
    value = bad_path_values(root, rng_for("agent-path", flag, kind))[kind]
    flags = [f for f in agent_flags if not f.startswith(flag + "=")]
    outcome = agent([*flags, f"{flag}={value}"])
    assert_clean(outcome, {0, 1, 2}, flag, value[:40])
    if flag in ("--path.state", "--path.records", "--path.procfs", "--path.sysfs") and kind in (
        "missing",
        "file",
        "through-file",
    ):
        assert outcome.code == 2, outcome.text
    if flag == "--textfile" and kind != "device":
        assert outcome.code in (1, 2) or Path(value).is_file(), outcome.text


# -- block-iscsimple: environment, xenstore values, files, with a fake host -------------------------


@pytest.fixture
def xen(tmp_path):
    return make_mirror_host(tmp_path)


def run_hotplug(hp, command: str, vbd, env: dict | None = None) -> Outcome:
    return hotplug_main([command], {**hp.env, "XENBUS_PATH": vbd.xenbus_path, **(env or {})})


def assert_add_failed_cleanly(hp, vbd, outcome: Outcome, *names: str) -> None:
    assert_clean(outcome, {1}, *names)
    assert hp.xs(vbd, "hotplug-status") == "error", outcome.text
    error = hp.xs(vbd, "hotplug-error") or ""
    assert error and "\n" not in error and "internal error" not in error, error
    if names:
        assert any(n in error for n in names), f"hotplug-error names none of {names}: {error}"
    assert hp.host.session_targets() == [] and hp.host.md_arrays() == {}
    assert not list((hp.paths.state / "attachments").glob(f"{vbd.attachment_id}.json"))


def bad_specs(rng: random.Random, n: int) -> list[str]:
    pieces = ["lun", "1", "@", IQN, "+", "vm1", "MISSING", "iqn.", "eui.", "naa.", ":", "-", " ", "\t",
              "\u00e9", "\x00", "\x1b", "LUN", "99999", "/", "..", "%", "$(", "`", "\n"]  # fmt: skip
    specs = set()
    while len(specs) < n:
        spec = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 8)))
        specs.add(spec.replace("\x00", ""))  # xenstore holds no NUL
    return sorted(specs)


SPEC_CASES = bad_specs(rng_for("specs"), 30)


@sweep("spec", SPEC_CASES, ids("xenstore-params", range(len(SPEC_CASES))), keep=0.2)
def test_hotplug_params(xen, spec):
    from iscsimple.core.spec import SpecError, parse_spec

    try:
        parsed = parse_spec(spec)
    except SpecError:
        parsed = None
    if parsed is not None and parsed.label in (None, "vm1"):
        pytest.skip("the generator made a valid spec")  # deterministic: the same ones each run
    vbd = xen.vbd(spec)
    outcome = run_hotplug(xen, "add", vbd)
    assert_add_failed_cleanly(xen, vbd, outcome)
    assert_clean(run_hotplug(xen, "remove", vbd), {0})


LONG_SPECS = ("+" * 100000, "MISSING" * 30000, "lun" + "1" * 50000 + "@x", "a+" + "".join(map(chr, range(256, 2256))),
              f"lun1@{IQN}+" + "x" * 100000)  # fmt: skip


@sweep("spec", LONG_SPECS, ids("xenstore-params-long", range(len(LONG_SPECS))), keep=0.4)
def test_hotplug_params_long(xen, spec):
    """A spec of any length: the hotplug-error stays one short line."""
    vbd = xen.vbd(spec)
    outcome = run_hotplug(xen, "add", vbd)
    assert_add_failed_cleanly(xen, vbd, outcome)
    assert len(xen.xs(vbd, "hotplug-error")) < 2000


XENBUS_PATHS = ("", " ", "/", "backend", "backend/vbd", "backend/vbd/x/y", "backend/vbd/1/../../etc",
                "backend/vbd/-1/51712", "backend/vbd/1/51712/", "a b/c", "backend/vbd/1/" + "9" * 300,
                "backend/vbd/\u00e9/1", "backend/vbd/1/51712\n", "//", "backend/vbd/1/$(id)")  # fmt: skip


@sweep("value", XENBUS_PATHS, ids("env-XENBUS_PATH", range(len(XENBUS_PATHS))), keep=0.3)
@pytest.mark.parametrize("command", ["add", "remove"])
def test_hotplug_xenbus_path(xen, value, command):
    outcome = hotplug_main([command], {**xen.env, "XENBUS_PATH": value})
    assert_clean(outcome, {0, 1} if command == "remove" else {1})
    assert xen.host.session_targets() == [] and xen.host.md_arrays() == {}


@pytest.mark.parametrize("argv", [[], ["add", "remove"], ["start"], ["-x"], ["ADD"], [""]],
                         ids=ids("flags-hotplug-argv", range(6)))  # fmt: skip
def test_hotplug_argv(xen, argv):
    vbd = xen.vbd(f"lun1@{IQN}+vm1")
    outcome = hotplug_main(argv, {**xen.env, "XENBUS_PATH": vbd.xenbus_path})
    assert_clean(outcome, {1, 2}, "usage")
    assert xen.host.session_targets() == []


ENV_VARS = ("ISCSIMPLE_CONFIG", "ISCSIMPLE_TAB", "ISCSIMPLE_STATE", "ISCSIMPLE_RECORDS", "ISCSIMPLE_LOCKS",
            "ISCSIMPLE_SYSFS", "ISCSIMPLE_PROCFS", "ISCSIMPLE_DEVFS", "ISCSIMPLE_XENSTORE_FILE")  # fmt: skip
ENV_KINDS = ("empty", "missing", "file", "fifo", "through-file", "control", "relative")
ENV_CASES = [(v, k) for v in ENV_VARS for k in ENV_KINDS]


@sweep(("var", "kind"), ENV_CASES, [f"env-{v}-{k}" for v, k in ENV_CASES], key=lambda c: c[1])
def test_hotplug_environment(xen, var, kind):
    tmp = xen.host.base
    # relative: to the current directory, but inside the fake host (the product makes it absolute)
    relative = os.path.relpath(tmp / "rel" / "dir")
    values = {**bad_path_values(tmp, rng_for("env", var, kind)), "empty": "", "relative": relative}
    vbd = xen.vbd(f"lun1@{IQN}+vm1")
    value = values[kind]
    outcome = run_hotplug(xen, "add", vbd, {var: value})
    if var == "ISCSIMPLE_XENSTORE_FILE" and kind != "empty":
        assert_clean(outcome, {1})  # nowhere to report it but the log
        assert xen.host.session_targets() == [] and xen.host.md_arrays() == {}
        return
    if outcome.code == 0:  # the variable did not matter (e.g. empty means the default)
        assert_clean(run_hotplug(xen, "remove", vbd), {0})
        return
    assert_add_failed_cleanly(xen, vbd, outcome)
    assert_clean(run_hotplug(xen, "remove", vbd, {var: value}), {0, 1})


HOTPLUG_STATE = ("registry-other", "stale", "stats", "marker", "bitmap-support", "resume")
HOTPLUG_STATE_PATHS = {
    "registry-other": "run-iscsimple/attachments/vbd-7-51728.json",
    "stale": "var-lib-iscsimple/stale/vm1.json",
    "stats": "run-iscsimple/hotplug-stats.json",
    "marker": f"run-iscsimple/sessions/{IQN}.json",
    "bitmap-support": "run-iscsimple/bitmap-support.json",
    "resume": "run-iscsimple/resumes/vm1.json",
}
HOTPLUG_KINDS = (
    "fifo",
    "directory",
    "chardev",
    "symlink-loop",
    "huge",
    "binary",
    "deep-json",
    "bad-json-types",
)
HOTPLUG_CASES = [(f, k) for f in HOTPLUG_STATE for k in HOTPLUG_KINDS]


@sweep(
    ("which", "kind"), HOTPLUG_CASES, [f"hotplug-state-{f}-{k}" for f, k in HOTPLUG_CASES], key=lambda c: c[1]
)
def test_hotplug_state_file(xen, which, kind):
    path = xen.host.base / HOTPLUG_STATE_PATHS[which]
    plant(path, kind, rng_for("hotplug-state", which, kind), b"{}")
    vbd = xen.vbd(f"lun1@{IQN}+vm1")
    outcome = run_hotplug(xen, "add", vbd)
    if which in ("registry-other", "stale"):  # safety signals: the add is refused, naming the file
        assert_add_failed_cleanly(xen, vbd, outcome, str(path))
        return
    if which == "marker" and kind in ("directory", "chardev", "fifo"):
        # The marker says "our session" before the login: not writable, no login (no session leak).
        assert_add_failed_cleanly(xen, vbd, outcome, str(path))
        return
    assert_clean(outcome, {0})  # statistics, markers, caches never fail an add
    assert xen.xs(vbd, "hotplug-status") == "connected"
    removed = run_hotplug(xen, "remove", vbd)
    assert_clean(removed, {0})
    assert xen.host.md_arrays() == {}
    if which != "marker":
        assert xen.host.session_targets() == []  # we logged in: we log out


HOTPLUG_FILE_KINDS = ("fifo", "directory", "huge", "binary", "nul-bytes", "random-text")


@sweep("kind", HOTPLUG_FILE_KINDS, ids("hotplug-tab", HOTPLUG_FILE_KINDS), keep=0.5)
def test_hotplug_tab_and_config(xen, kind):
    """The tab file and iscsimple.toml, each bad in turn: the add fails naming the file."""
    for path in (xen.paths.tab, xen.paths.config):
        good = path.read_bytes()
        bad = plant(path, kind, rng_for("hotplug-files", path.name, kind), good)
        vbd = xen.vbd(f"lun1@{IQN}+vm1")
        outcome = run_hotplug(xen, "add", vbd)
        if outcome.code == 0:  # random text that happens to parse
            assert_clean(run_hotplug(xen, "remove", vbd), {0})
        else:
            assert_add_failed_cleanly(xen, vbd, outcome, str(bad))
        plant(path, "empty", rng_for("restore"))
        path.write_bytes(good)


STATE_DIRS = {"state": "run-iscsimple", "records": "var-lib-iscsimple", "locks": "run-xen-hotplug"}
DIR_KINDS = ("mode-0777", "mode-0757", "sticky-1777", "foreign-owner", "symlink", "file")
DIR_CASES = [(d, k) for d in STATE_DIRS for k in DIR_KINDS]


@sweep(("which", "kind"), DIR_CASES, [f"rootstate-{d}-{k}" for d, k in DIR_CASES], key=lambda c: c[1])
def test_hotplug_state_directory_others_could_bend(xen, which, kind):
    """A state directory another user could plant links or files in: the add refuses it, naming it."""
    directory = xen.host.base / STATE_DIRS[which]
    directory.mkdir(mode=0o755, exist_ok=True)
    if kind.startswith(("mode-", "sticky-")):
        os.chmod(directory, int(kind.rsplit("-", 1)[1], 8))
    elif kind == "foreign-owner":
        os.chown(directory, 4242, 4242)
    elif kind == "symlink":
        real = directory.with_name(directory.name + ".real")
        directory.rename(real)
        directory.symlink_to(real.name)
    elif kind == "file":
        directory.rmdir()
        directory.write_text("")
    vbd = xen.vbd(f"lun1@{IQN}+vm1")
    outcome = run_hotplug(xen, "add", vbd)
    if which == "records" and kind != "file":
        # Only read at add (stale records): never written there, nothing to bend.
        assert_clean(outcome, {0, 1}, str(directory))
        if outcome.code == 0:
            assert_clean(run_hotplug(xen, "remove", vbd), {0})
        return
    assert_add_failed_cleanly(xen, vbd, outcome, str(directory))


# -- xenstore values besides params: the domain's name, the guest device, the id remove undoes -------

XS_VALUES = ("\x1b[2Jevil", "a\nb", "x" * 5000, "", " ", "\u202etxt.exe", "../../etc", "-rf", "\t")
XS_CASES = [(key, i) for key in ("name", "dev", "iscsimple-id") for i in range(len(XS_VALUES))]


@sweep(("key", "index"), XS_CASES, [f"xenstore-{k}-{i}" for k, i in XS_CASES], key=lambda c: c[1])
def test_hotplug_xenstore_values(xen, key, index):
    """What libxl (or a guest's tools) left in xenstore reaches the registry, status and logs: the
    disk still attaches and detaches, and status prints no control character from it."""
    vbd = xen.vbd(f"lun1@{IQN}+vm1")
    where = f"/local/domain/{vbd.domid}/name" if key == "name" else f"{vbd.xenbus_path}/{key}"
    xen.host.xenstore_write(where, XS_VALUES[index])
    outcome = run_hotplug(xen, "add", vbd)
    assert_clean(outcome, {0})
    xen.paths.records.mkdir(exist_ok=True)
    status = cli(["status", f"--state={xen.paths.state}", f"--records={xen.paths.records}",
                  f"--path.sysfs={xen.paths.sysfs}", f"--path.devfs={xen.paths.devfs}",
                  f"--path.procfs={xen.paths.procfs}", f"--config={xen.paths.config}"])  # fmt: skip
    assert_clean(status, {0, 1})
    assert not any(c in status.stdout for c in "\x1b\u202e\t"), status.stdout
    assert_clean(run_hotplug(xen, "remove", vbd), {0})
    assert xen.host.md_arrays() == {} and xen.host.session_targets() == []


# -- md bitmap files (read when a degraded mirror's heal may be partial) ----------------------------

BITMAP_KINDS = ("fifo", "directory", "chardev", "symlink-to-good", "huge", "binary", "empty")


@sweep("kind", BITMAP_KINDS, ids("bitmapfile", BITMAP_KINDS))
def test_bitmap_file(tmp_path, kind):
    from iscsimple.core.bitmap import BitmapFileError, read_bitmap_file

    path = plant(tmp_path / "bitmap", kind, rng_for("bitmap", kind), b"bitm" + bytes(300))

    def read(_argv):
        try:
            read_bitmap_file(path)
        except BitmapFileError as e:
            return str(e)
        return None

    message = call(read, []).code  # call() fails the test on a hang or any other exception
    assert message and str(path) in message and "\n" not in message


SHOWN_FIELDS = [
    ("domain_name", "\x1b[2Jx"),
    ("vbd", "xvda\n"),
    ("spec", "\x1b]0;t\x07"),
    ("xenbus_path", "\u202eb"),
]


@sweep(("field", "value"), SHOWN_FIELDS, [f"state-registry-shown-{f}" for f, _ in SHOWN_FIELDS])
def test_registry_shown_values(host, field, value):
    """Registry values status prints: a control character makes the entry unreadable (reported),
    never something written to the operator's terminal."""
    _, paths, cli_flags, _ = host
    entry = paths.state / "attachments" / "vbd-1-51712.json"
    entry.write_text(json.dumps({**json.loads(entry.read_text()), field: value}))
    status = cli(["status", *cli_flags])
    assert_clean(status, {1}, str(entry))
    assert value not in status.stdout and "\x1b" not in status.stdout
