"""The bounded command runner: argv only, timeouts kill the whole process group."""

import os
import subprocess
import sys
import time

import pytest

from iscsimple.core.run import CommandError, CommandTimeout, Deadline, DeadlineExceeded, process_started, run


def test_runs_argv_and_captures_output():
    result = run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert result.returncode == 0
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


@pytest.mark.parametrize("locale", ["C", "C.UTF-8"])
def test_output_that_is_not_utf8_is_replaced_not_an_exception(monkeypatch, locale):
    """A byte that is not UTF-8 in a command's output (a VM name in xenstore, an iSCSI name a filer
    offers) raised UnicodeDecodeError out of run(): the hotplug said 'internal error'."""
    monkeypatch.setenv("LC_ALL", locale)
    code = "import sys; sys.stdout.buffer.write(b'caf\\xe9\\n'); sys.stderr.buffer.write(b'bad \\xff name\\n'); sys.exit(2)"
    result = run([sys.executable, "-c", code], check=False)
    assert result.stdout == "caf\ufffd\n" and result.stderr == "bad \ufffd name\n"
    with pytest.raises(CommandError, match="bad \ufffd name"):
        run([sys.executable, "-c", code])


def test_refuses_a_shell_string():
    with pytest.raises(TypeError):
        run("echo hi")


def test_nonzero_exit_raises_with_last_stderr_line():
    with pytest.raises(CommandError) as e:
        run(
            [
                sys.executable,
                "-c",
                "import sys; print('first', file=sys.stderr); print('iscsiadm: no records found', file=sys.stderr); sys.exit(21)",
            ]
        )
    assert e.value.returncode == 21
    assert str(e.value).endswith("failed: iscsiadm: no records found")


def test_nonzero_exit_without_check_returns():
    assert run([sys.executable, "-c", "raise SystemExit(3)"], check=False).returncode == 3


def test_missing_program_is_an_operation_error():
    with pytest.raises(CommandError, match="cannot run no-such-program-here"):
        run(["no-such-program-here"])


def test_timeout_kills_the_command_and_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    # The command starts a grandchild that would outlive a plain kill of the direct child.
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as e:
        run([sys.executable, "-c", script], timeout=1.0)
    assert time.monotonic() - started < 10
    assert "did not finish within 1 s" in str(e.value)
    child = int(pidfile.read_text())
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild survived the timeout")


def test_deadline_bounds_each_command():
    deadline = Deadline(0.5)
    with pytest.raises(CommandTimeout):
        run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=20, deadline=deadline)


def test_spent_deadline_refuses_to_start():
    clock = iter([0.0, 100.0]).__next__
    deadline = Deadline(30, clock=clock)
    with pytest.raises(DeadlineExceeded, match="30 s budget is spent"):
        run(["true"], deadline=deadline)


def test_timeout_is_bounded_even_when_a_escaped_grandchild_holds_the_pipes():
    # A grandchild in its own session survives the group kill and keeps stdout/stderr
    # open; the runner must still return (it stands for a process stuck in the kernel).
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(8)'], start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        run([sys.executable, "-c", script], timeout=0.5)
    assert time.monotonic() - started < 4


def test_process_started_counts_from_the_fork_not_from_the_interpreter():
    # sh sleeps, then execs Python in the same process: as libxl's fork, then our start-up.
    code = "import time\nfrom iscsimple.core.run import process_started\nprint(time.monotonic() - process_started())"
    out = subprocess.run(
        ["sh", "-c", 'sleep 1.2; exec "$0" -c "$1"', sys.executable, code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert 1.2 <= float(out) < 30


def test_capped_deadline_says_why_it_is_spent():
    t = [0.0]
    deadline = Deadline(
        30, clock=lambda: t[0], not_after=-6 + 35, why="35 s have passed since libxl started the script"
    )
    t[0] = 36.0
    assert deadline.remaining() == -7.0
    with pytest.raises(DeadlineExceeded, match="gave up on true: 35 s have passed since libxl started"):
        run(["true"], deadline=deadline)


def test_reserving_keeps_back_time_and_the_reason():
    t = [0.0]
    deadline = Deadline(30, clock=lambda: t[0], not_after=20.0, why="libxl's time is nearly spent")
    forward = deadline.reserving(5)
    assert (forward.expires, deadline.expires) == (15.0, 20.0)
    t[0] = 16.0
    with pytest.raises(DeadlineExceeded, match="gave up on true: libxl's time is nearly spent"):
        run(["true"], deadline=forward)
    assert forward.reserving(5).expires == pytest.approx(16.1)  # never already spent when made


def test_a_cap_later_than_the_budget_changes_nothing():
    deadline = Deadline(30, clock=lambda: 100.0, not_after=200.0, why="never")
    assert deadline.expires == 130.0


def test_process_started_is_now_when_proc_is_unreadable(monkeypatch):
    import builtins

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/self/stat"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    before = time.monotonic()
    assert before <= process_started() <= time.monotonic()


def test_a_command_cut_short_by_the_deadline_says_the_budget_ran_out_not_the_command():
    """A command given only what was left of the budget, and killed there, did not fail on its own:
    the error names the budget (libxl's 40 s), so no message blames a filer that had 0.2 s."""
    why = "35 s have passed since libxl started the script (libxl kills it at 40 s)"
    deadline = Deadline(30, not_after=time.monotonic() + 0.2, why=why)
    with pytest.raises(CommandTimeout) as cut:
        run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=10, deadline=deadline)
    assert cut.value.spent == why and why in str(cut.value) and cut.value.timeout < 0.3
    with pytest.raises(CommandTimeout) as own:  # its own timeout, budget to spare: no budget named
        run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2, deadline=Deadline(30))
    assert own.value.spent is None and "within 0 s" in str(own.value)


def test_iscsiadm_and_mdadm_errors_name_the_spent_budget():
    from iscsimple.hotplug import iscsiadm, mdadm

    why = "35 s have passed since libxl started the script (libxl kills it at 40 s)"
    cut = CommandTimeout(["iscsiadm", "-m", "node", "-T", "iqn.x"], 0.04, "", spent=why)
    message = str(iscsiadm._explain(cut, "iqn.x"))
    assert why in message and "check that the filer" not in message
    own = CommandTimeout(["iscsiadm", "-m", "node", "-T", "iqn.x"], 15.0)
    assert "check that the filer is up" in str(iscsiadm._explain(own, "iqn.x"))

    def timed_out(argv, **kwargs):
        raise CommandTimeout(argv, 0.04, "", spent=why)

    with pytest.raises(mdadm.MdadmError) as stop:
        original, mdadm.run = mdadm.run, timed_out
        try:
            mdadm.stop("/dev/md/vm1", Deadline(30))
        finally:
            mdadm.run = original
    assert why in str(stop.value) and "the array may still be running" in str(stop.value)
