"""iscsimple-agent's command line: --once, --textfile, promtool-clean exposition, clear errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from iscsimple.exporter.agent import _listen_address, _seconds, main
from iscsimple.exporter.simhost import SimulatedHost

TARGET = "iqn.2003-01.org.example:filer"
AGENT = [sys.executable, "-c", "from iscsimple.exporter.agent import main; raise SystemExit(main())"]


@pytest.fixture
def host(tmp_path):
    host = SimulatedHost(tmp_path / "host")
    host.attach("web1-disk", "web1", TARGET, 1)
    host.attach("db1-disk", "db1", TARGET, 2)
    host.finish_resync("db1-disk")
    host.expire_session(TARGET)
    host.record_hotplug("add", "success", 1.5)
    return host


def path_flags(host) -> list[str]:
    p = host.paths
    return [
        "--path.procfs", str(p.procfs), "--path.sysfs", str(p.sysfs),
        "--path.state", str(p.state), "--path.records", str(p.records),
    ]  # fmt: skip


def run_agent(*args, timeout=60):
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=timeout)


def samples(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_once_prints_the_exposition(host):
    r = run_agent("--once", *path_flags(host))
    assert r.returncode == 0, r.stderr
    s = samples(r.stdout)
    assert s[("iscsimple_array_local_only", (("domain", "db1"), ("label", "db1-disk")))] == 1
    assert s[("iscsimple_array_unprotected", (("domain", "web1"), ("label", "web1-disk")))] == 1
    assert s[("iscsimple_iscsi_session_up", (("portal", "192.0.2.10:3260"), ("target", TARGET)))] == 0
    assert s[("iscsimple_hotplug_operations_total", (("operation", "add"), ("result", "success")))] == 1
    assert s[("iscsimple_up", ())] == 1
    # State changes are logged in words on stderr, never mixed into the exposition.
    assert "db1-disk (VM db1) runs on its LOCAL leg alone" in r.stderr
    assert "runs on its LOCAL" not in r.stdout


def test_once_exits_1_when_a_source_failed(host):
    md = host.paths.sysfs / "block" / host.md_device("web1-disk") / "md"
    (md / "sync_action").unlink()
    r = run_agent("--once", *path_flags(host))
    assert r.returncode == 1
    assert "iscsimple_up 0.0" in r.stdout


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool missing: scripts/test installs prometheus"
)
def test_promtool_accepts_the_exposition(host, tmp_path):
    host.set_leg_errors("db1-disk", "local", 3)
    r = run_agent("--once", *path_flags(host))
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=r.stdout, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == ""  # not even lint warnings


def test_textfile_once_writes_atomically(host, tmp_path):
    out = tmp_path / "textfile" / "iscsimple.prom"
    out.parent.mkdir()
    r = run_agent("--once", "--textfile", str(out), *path_flags(host))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    s = samples(out.read_text())
    assert s[("iscsimple_array_local_only", (("domain", "db1"), ("label", "db1-disk")))] == 1
    assert [p.name for p in out.parent.iterdir()] == ["iscsimple.prom"]  # no temp files left


def test_textfile_is_rewritten_on_schedule(host, tmp_path):
    out = tmp_path / "iscsimple.prom"
    proc = subprocess.Popen(
        [*AGENT, "--web.listen-address", "127.0.0.1:0", "--textfile", str(out), "--textfile.interval", "200ms",
         "--refresh.interval", "200ms", *path_flags(host)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not out.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        host.restore_session(TARGET)
        key = ("iscsimple_iscsi_session_up", (("portal", "192.0.2.10:3260"), ("target", TARGET)))
        while samples(out.read_text()).get(key) != 1:
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--web.listen-address", "9977"], "is not HOST:PORT"),
        (["--refresh.interval", "soon"], "is not a duration"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--log.level", "loud"], "invalid choice"),
    ],
)
def test_bad_flags_exit_2_with_a_reason(args, message):
    r = run_agent(*args)
    assert r.returncode == 2
    assert message in r.stderr


def test_bad_web_config_exits_2(tmp_path):
    bad = tmp_path / "web.yml"
    bad.write_text("basic_auth_users:\n  prometheus: hunter2\n")
    r = run_agent("--web.config.file", str(bad), "--once")
    assert r.returncode == 2
    assert "not a bcrypt hash" in r.stderr and "htpasswd" in r.stderr


def test_missing_sysfs_exits_2(tmp_path):
    r = run_agent("--once", "--path.sysfs", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "--path.sysfs" in r.stderr and "does not exist" in r.stderr


def test_port_in_use_exits_2(host):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--web.listen-address", f"127.0.0.1:{port}", *path_flags(host)]) == 2


def test_flag_parsers():
    assert _listen_address(":9977") == ("", 9977)
    assert _listen_address("[::1]:9977") == ("::1", 9977)
    assert _seconds("500ms") == 0.5
    assert _seconds("2m") == 120
    assert _seconds("15") == 15


def test_demo_prints_its_url_and_serves_the_scenario(tmp_path):
    """`iscsimple-agent --demo` (the README's first command): URL printed, metrics served, story logged."""
    import socket as socketlib

    with socketlib.socket() as busy:  # the default port may be taken (a real agent): the demo still starts
        busy.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 9977))
            busy.listen()
        except OSError:
            pass
        proc = subprocess.Popen(
            [*AGENT, "--demo", "--demo.speed", "50"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines = []
        try:
            url = None
            deadline = time.monotonic() + 30
            while url is None:
                assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
                line = proc.stdout.readline()
                lines.append(line)
                if "iscsimple demo: open" in line:
                    url = line.split("open ")[1].split("/ ")[0]
            import requests

            seen_local_only = False
            while time.monotonic() < deadline and not seen_local_only:
                body = requests.get(f"{url}/metrics", timeout=5).text
                seen_local_only = 'iscsimple_array_local_only{domain="web1",label="web1-disk"} 1.0' in body
                time.sleep(0.05)
            assert seen_local_only
            assert "web1-disk" in requests.get(f"{url}/", timeout=5).text
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=10)
        log = "".join(lines) + out
        assert "demo: OUTAGE" in log
        assert "runs on its LOCAL leg alone" in log
        assert proc.returncode == 0


@pytest.mark.parametrize("kind", ["file", "symlink", "symlink-loop"])
def test_records_not_listable_at_start_are_never_safe_to_migrate(tmp_path, kind):
    """The agent's first read could not list records/stale (a file in its place, a symlink to a
    directory, a link loop): iscsimple_array_safe_to_migrate said 1, as if no record stood, and
    only collector_success said anything. Unknown is not safe: 0, with a metric and a log line."""
    host = SimulatedHost(tmp_path / "host")
    host.attach("web1-disk", "web1", TARGET, 1)
    host.finish_resync("web1-disk")
    safe = ("iscsimple_array_safe_to_migrate", (("domain", "web1"), ("label", "web1-disk")))
    readable = ("iscsimple_stale_records_readable", ())
    r = run_agent("--once", *path_flags(host))
    assert samples(r.stdout)[safe] == 1 and samples(r.stdout)[readable] == 1, r.stderr
    stale = host.paths.records / "stale"
    stale.parent.mkdir(parents=True, exist_ok=True)
    if stale.exists():
        shutil.rmtree(stale)
    if kind == "file":
        stale.write_text("not a directory")
    elif kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        stale.symlink_to(tmp_path / "elsewhere")
    else:
        stale.symlink_to("stale")
    r = run_agent("--once", *path_flags(host))
    s = samples(r.stdout)
    assert s[safe] == 0 and s[readable] == 0, r.stdout
    assert s[("iscsimple_collector_success", (("collector", "safety"),))] == 0
    assert "cannot read the stale-copy records" in r.stderr and str(stale) in r.stderr


def test_a_stop_signal_while_the_first_body_is_served_stops_the_agent_cleanly():
    """The web server serves from inside Agent.start (on_first_read), before the scheduler and the
    watchers: a SIGTERM then (systemd stopping it at once) must reach the agent's stop, not the
    default action that kills it (a CI run under Debian's python saw exit -15 so)."""
    import signal

    from iscsimple.exporter import agent as agent_module
    from iscsimple.exporter.web import WebConfig

    handlers_at_first_body = []
    events = []

    class StartingAgent:
        metrics_pieces = healthy = ready = summary = staticmethod(lambda *a: None)

        def start(self, on_first_read):
            on_first_read()  # serving from here on
            handler = signal.getsignal(signal.SIGTERM)
            handlers_at_first_body.append(handler)
            if callable(handler):
                handler(signal.SIGTERM, None)  # the SIGTERM arrives now

        def stop(self):
            events.append("stopped")

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # on_ready stops a run whose handler came too late, so the test ends either way
        rc = agent_module._serve(
            StartingAgent(),
            ("127.0.0.1", 0),
            WebConfig(),
            on_ready=lambda server: signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None),
        )
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert rc == 0 and events == ["stopped"]
    assert callable(handlers_at_first_body[0]), "SIGTERM still had its default action (death) while serving"
