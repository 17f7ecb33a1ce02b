"""Kernel events refresh the metrics at once, without waiting for the schedule."""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from iscsimple.exporter.agent import Agent, AgentOptions
from iscsimple.exporter.events import MdstatWatcher
from iscsimple.exporter.simhost import SimulatedHost

TARGET = "iqn.2003-01.org.example:filer"
HOUR = 3600.0


def local_only(agent: Agent, label: str) -> float:
    body, _ = agent.metrics("")
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "iscsimple_array_local_only" and s.labels["label"] == label:
                return s.value
    raise AssertionError(f"no local_only for {label}")


def wait_until(predicate, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout:.1f} s")


class FakeMonitor:
    """Stands in for pyudev.Monitor: poll(timeout) returns the next queued device or None."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()

    def poll(self, timeout=None):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


@pytest.fixture
def host(tmp_path):
    host = SimulatedHost(tmp_path / "host")
    host.attach("web1-disk", "web1", TARGET, 1)
    host.finish_resync("web1-disk")
    return host


def test_udev_event_refreshes_without_waiting_for_the_schedule(host):
    monitor = FakeMonitor()
    agent = Agent(AgentOptions(paths=host.paths, refresh_interval=HOUR, mdstat_events=False))
    agent.start(udev_monitor_factory=lambda: monitor)
    try:
        assert local_only(agent, "web1-disk") == 0
        host.expire_session(TARGET)  # the kernel changed; nobody told the agent yet
        time.sleep(0.3)
        assert local_only(agent, "web1-disk") == 0
        monitor.events.put(SimpleNamespace(action="change", subsystem="scsi", sys_name="0:0:0:1"))
        took = wait_until(lambda: local_only(agent, "web1-disk") == 1)
        assert took < 2.0
    finally:
        agent.stop()


class OobMdstat:
    """A file whose fileno signals POLLPRI like /proc/mdstat after an md event: a TCP socket
    receiving urgent data. read() consumes the urgent byte, as reading mdstat re-arms the poll,
    and returns the text of `mdstat` (what the watcher compares to tell which arrays changed)."""

    def __init__(self, sock: socket.socket, mdstat=None):
        self.sock = sock
        self.mdstat = mdstat
        self.reads = 0

    def fileno(self):
        return self.sock.fileno()

    def seek(self, _):
        raise OSError("not seekable")

    def read(self, size=-1):
        self.reads += 1
        try:
            urgent = self.sock.recv(1, socket.MSG_OOB | socket.MSG_DONTWAIT)
        except OSError:  # EINVAL/EAGAIN: no urgent byte pending
            urgent = b""
        return self.mdstat.read_bytes() if self.mdstat is not None else urgent

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


@pytest.fixture
def oob_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    listener.close()
    yield sender, receiver
    sender.close()


def test_mdstat_poll_event_refreshes_without_waiting_for_the_schedule(host, oob_pair):
    sender, receiver = oob_pair
    agent = Agent(AgentOptions(paths=host.paths, refresh_interval=HOUR, udev=False, mdstat_events=False))
    agent.start()
    fake = OobMdstat(receiver, host.paths.procfs / "mdstat")
    watcher = MdstatWatcher(
        host.paths.procfs / "mdstat", agent.refresher.request, opener=lambda: fake
    ).start()
    try:
        wait_until(lambda: fake.reads >= 1)  # read once at start, as mdadm --monitor does
        host.expire_session(TARGET)
        time.sleep(0.3)
        assert local_only(agent, "web1-disk") == 0
        sender.send(b"!", socket.MSG_OOB)  # md_wakeup: POLLPRI on the open file
        took = wait_until(lambda: local_only(agent, "web1-disk") == 1)
        assert took < 2.0
        assert fake.reads >= 2  # the event was acknowledged by reading again
    finally:
        watcher.stop()
        agent.stop()


def test_mdstat_watcher_ignores_plain_readability(tmp_path):
    """A regular file is always readable (POLLIN) but never signals POLLPRI: no spurious refreshes."""
    path = tmp_path / "mdstat"
    path.write_text("Personalities : [raid1] \nunused devices: <none>\n")
    events = []
    watcher = MdstatWatcher(path, events.append, poll_timeout=0.05).start()
    time.sleep(0.3)
    watcher.stop()
    assert events == []


def test_burst_of_events_is_coalesced(host):
    reads = []
    agent = Agent(AgentOptions(paths=host.paths, refresh_interval=HOUR, udev=False, mdstat_events=False))
    original = agent.refresher.read
    gate = threading.Event()

    def slow_read(previous, changes):
        reads.append(time.monotonic())
        gate.wait(1.0)
        return original(previous, changes)

    agent.refresher.read = slow_read
    agent.refresher.start()
    try:
        for i in range(100):
            agent.refresher.request(f"udev change sd{i}")
        gate.set()
        agent.refresher.wait_for_refresh(0, 5)
        time.sleep(0.3)
        assert 1 <= len(reads) <= 3
    finally:
        agent.stop()


# Records as /dev/kmsg gives them (PRIORITY,SEQ,USEC,FLAGS;TEXT then " KEY=value" lines), with the
# texts of the real capture (shared fixtures, kernel 6.1: dmesg of the outage).
KMSG_CONN_ERROR = (
    b"3,1021,44789918,-; connection%d:0: detected conn error (1020)\n SUBSYSTEM=iscsi_connection\n"
)
KMSG_TIMED_OUT = b"6,1030,64840221,-; session%d: session recovery timed out after 20 secs\n"


def test_kernel_log_names_the_failed_sessions():
    from iscsimple.exporter.events import sessions_in_kernel_log

    assert sessions_in_kernel_log((KMSG_CONN_ERROR % 3).decode()) == {"session3"}
    assert sessions_in_kernel_log((KMSG_TIMED_OUT % 12).decode()) == {"session12"}
    assert sessions_in_kernel_log("6,1,1,-;md/raid1:md127: Disk failure on sdb, disabling device.\n") == set()
    assert sessions_in_kernel_log("6,1,1,-; connection3:0: ping timeout of 5 secs expired\n") == set()


def test_kernel_log_watcher_rereads_the_session_then_follows_up():
    from iscsimple.exporter.events import KernelLogWatcher

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    seen = []
    follow_ups = (0.01, 0.05)
    watcher = KernelLogWatcher(
        "kmsg", lambda reason, changes: seen.append(changes), opener=lambda: read_end, follow_ups=follow_ups
    ).start()
    try:
        os.write(write_end, KMSG_CONN_ERROR % 4)
        wait_until(lambda: len(seen) >= 1 + len(follow_ups))
        assert all(c.sessions == frozenset({"session4"}) for c in seen)
    finally:
        watcher.stop()
        os.close(write_end)
    watcher.thread.join(5)
    assert not watcher.thread.is_alive()


def test_kernel_log_shows_a_session_failure_without_waiting_for_the_schedule(host):
    """The kernel logs the connection error a moment before the session's state turns FAILED:
    the watcher re-reads the session then, and again shortly after."""
    from iscsimple.exporter.events import KernelLogWatcher

    agent = Agent(
        AgentOptions(
            paths=host.paths, refresh_interval=HOUR, udev=False, mdstat_events=False, kernel_log_events=False
        )
    )
    agent.start()
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    watcher = KernelLogWatcher(
        host.paths.devfs / "kmsg", agent.refresher.request, opener=lambda: read_end
    ).start()
    try:
        session = agent.refresher.snapshot().array("web1-disk").session.name
        sid = int(session[len("session") :])
        os.write(write_end, KMSG_CONN_ERROR % sid)  # logged first...
        agent.refresher.wait_for_refresh(agent.refresher.refreshes, 5)
        host.fail_session(TARGET)  # ...the state changes a moment later: a follow-up sees it
        wait_until(lambda: local_only(agent, "web1-disk") == 1, timeout=10)
    finally:
        watcher.stop()
        os.close(write_end)
        agent.stop()


def test_kernel_log_watcher_reads_only_a_character_device(tmp_path):
    """A regular file or FIFO where /dev/kmsg should be is not followed (the poll still sees failures)."""
    from iscsimple.exporter.events import KernelLogWatcher

    regular = tmp_path / "kmsg"
    regular.write_bytes(KMSG_CONN_ERROR % 1)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    seen = []
    for path in (regular, fifo, tmp_path / "missing"):
        watcher = KernelLogWatcher(path, lambda reason, changes: seen.append(changes)).start()
        watcher.thread.join(5)
        assert not watcher.thread.is_alive()
    assert seen == []


def sample(agent: Agent, name: str, label: str) -> float | None:
    body, _ = agent.metrics("")
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and s.labels.get("label") == label:
                return s.value
    return None


@pytest.mark.parametrize("logged", ["while the agent runs", "before the agent started"])
def test_a_bitmap_md_dropped_is_exported_inactive_though_mdstat_still_shows_it(host, logged):
    """md kicks a bitmap file it cannot write and keeps "bitmap:" in /proc/mdstat: only the kernel
    log tells. The agent's bitmap gauge goes to 0 (a heal would copy the whole disk) at once, and
    also when the kick was logged before the agent started. A kick of an earlier array of the same
    name (logged before this one's bitmap was set up) does not count."""
    from iscsimple.core import bitmap
    from iscsimple.exporter.events import KernelLogWatcher

    label = "web1-disk"
    md = host.md_device(label)
    file = bitmap.prepare_file(host.paths, label)
    file.write_bytes(bytes(4096))
    attachment = host.registry.by_label(label)
    built_seq = 100
    bitmap.note_built(
        host.paths, label, md, 64 << 10, built_seq, attachment.local_kernel_name, attachment.iscsi_device
    )
    mdstat = host.paths.procfs / "mdstat"
    lines = mdstat.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{md} :")) + 2
    lines.insert(at, f"      bitmap: 1/1 pages [4KB], 64KB chunk, file: {file}\n")
    mdstat.write_text("".join(lines))
    kick = f"{md}: kicking failed bitmap file {file} from array!\n"
    kmsg = host.paths.devfs / "kmsg"
    backlog = f"4,90,1,-;{md}: kicking failed bitmap file /earlier from array!\n"  # an earlier instance
    if logged == "before the agent started":
        backlog += f"4,{built_seq + 50},9,-;{kick}"
    kmsg.write_text(backlog)
    agent = Agent(
        AgentOptions(
            paths=host.paths, refresh_interval=HOUR, udev=False, mdstat_events=False, kernel_log_events=False
        )
    )
    agent.start()
    assert sample(agent, "iscsimple_array_bitmap", label) == 1.0
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    watcher = KernelLogWatcher(
        kmsg, agent.refresher.request, opener=lambda: read_end, kicks=agent.safety.kicks
    ).start()
    try:
        if logged == "while the agent runs":
            time.sleep(0.2)
            assert sample(agent, "iscsimple_array_bitmap", label) == 1.0  # the earlier kick counts not
            os.write(write_end, f"4,{built_seq + 50},9,-;{kick}".encode())
        wait_until(lambda: sample(agent, "iscsimple_array_bitmap", label) == 0.0)
        assert f"file: {file}" in mdstat.read_text()
        assert sample(agent, "iscsimple_array_out_of_sync_bytes", label) is None
    finally:
        watcher.stop()
        os.close(write_end)
        agent.stop()


def test_session_states_are_read_less_often_only_while_the_kernel_log_announces_failures(host):
    """The poll reads every session's state on each call unless the kernel log is followed;
    then only the sessions not logged in on each call, every session once per `sessions_every`
    calls, and every session at the next call after kernel log records were lost."""
    from unittest import mock

    from iscsimple.core.snapshot import HostSnapshot
    from iscsimple.exporter import events

    snapshot = HostSnapshot.read(host.paths)
    session = snapshot.array("web1-disk").session.name
    following = [False]
    poll = events.ChangePoll(host.paths.sysfs, None, sessions_every=3)
    poll.announced = lambda: following[0]
    with mock.patch.object(events, "read_session_states", wraps=events.read_session_states) as reads:

        def reads_on(calls: int) -> list[bool]:
            """Per call: whether the logged-in session's state was read."""
            seen = []
            for _ in range(calls):
                poll(snapshot)
                seen.append(session not in reads.call_args.args[1])
            return seen

        assert reads_on(3) == [True, True, True]
        following[0] = True
        assert reads_on(6) == [False, False, True, False, False, True]
        poll.want_sessions()
        assert reads_on(2) == [True, False]
        following[0] = False  # the kernel log is no longer read: back to every poll
        assert reads_on(2) == [True, True]
    following[0] = True
    # A failure the kernel log did not name shows on the next full read, not before.
    host.fail_session(TARGET)
    assert [poll(snapshot).sessions for _ in range(3)] == [frozenset(), frozenset(), {session}]
    poll.want_sessions()
    assert poll(snapshot).sessions == {session}
    # A session that is not logged in is read on every poll: its login again shows at once.
    failed = HostSnapshot.read(host.paths)
    assert failed.array("web1-disk").session.state == "FAILED"
    assert poll(failed).sessions == frozenset()
    host.restore_session(TARGET)
    assert poll(failed).sessions == {session}


def test_the_poll_sees_a_session_appear_or_go_between_full_reads(host):
    from iscsimple.core.snapshot import HostSnapshot
    from iscsimple.exporter import events

    snapshot = HostSnapshot.read(host.paths)
    session = snapshot.array("web1-disk").session.name
    poll = events.ChangePoll(host.paths.sysfs, None, sessions_every=100)
    poll.announced = lambda: True
    assert poll(snapshot).sessions == frozenset()
    host.add_target("iqn.2003-01.org.example:second", "192.0.2.99:3260")
    appeared = poll(snapshot).sessions
    assert len(appeared) == 1 and session not in appeared
    host.detach("web1-disk")  # the last user of the target: logged out
    assert session in poll(snapshot).sessions


def test_kernel_log_watcher_says_whether_it_follows_and_reports_lost_records():
    from iscsimple.exporter.events import KernelLogWatcher

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    lost = []
    reads = iter([BrokenPipeError()])
    real_read = os.read

    def read(fd, size):
        if fd == read_end:
            error = next(reads, None)
            if error is not None:
                raise error
        return real_read(fd, size)

    from unittest import mock

    watcher = KernelLogWatcher(
        "kmsg", lambda *_: None, opener=lambda: read_end, on_lost=lambda: lost.append(1)
    )
    assert not watcher.following()
    with mock.patch("iscsimple.exporter.events.os.read", side_effect=read):
        watcher.start()
        try:
            wait_until(watcher.following)
            os.write(write_end, KMSG_CONN_ERROR % 4)
            wait_until(lambda: lost == [1])
        finally:
            watcher.stop()
            os.close(write_end)
        watcher.thread.join(5)
    assert not watcher.following()


def test_the_bitmap_pass_reads_the_md_events_text_and_looks_again_where_it_moved(host):
    """The bitmap pass takes its arrays' /proc/mdstat lines from the text the md event read (not
    a second read of the whole file). A bitmap line that appears when the array's view does not
    change (the text read when the view did was older) is seen at the next md event."""
    from unittest import mock

    from iscsimple.core import bitmap
    from iscsimple.core.snapshot import Changes

    label = "web1-disk"
    md = host.md_device(label)
    file = bitmap.prepare_file(host.paths, label)
    file.write_bytes(bytes(4096))
    attachment = host.registry.by_label(label)
    bitmap.note_built(
        host.paths, label, md, 64 << 10, 100, attachment.local_kernel_name, attachment.iscsi_device
    )
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False, kernel_log_events=False))
    agent.refresher.refresh_now()
    assert sample(agent, "iscsimple_array_bitmap", label) == 0.0  # no bitmap line in /proc/mdstat
    mdstat = host.paths.procfs / "mdstat"
    lines = mdstat.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{md} :")) + 2
    lines.insert(at, f"      bitmap: 1/1 pages [4KB], 64KB chunk, file: {file}\n")
    mdstat.write_text("".join(lines))
    before = agent.refresher.snapshot().array(label)
    with mock.patch.object(bitmap, "read_mdstat_arrays", side_effect=AssertionError("read again")):
        moved = agent.mdstat.read()  # the md event
        assert moved == {md}
        agent.refresher.refresh_now(Changes(md=frozenset(moved)))
    assert agent.refresher.snapshot().array(label) is before  # md's sysfs reads the same
    assert sample(agent, "iscsimple_array_bitmap", label) == 1.0


def test_the_first_body_is_served_before_the_schedule_and_the_watchers_start(host):
    """Agent.start calls on_first_read (the web server starts serving) as soon as the first body
    is rendered, stale records and safety verdicts included; the scheduler and the event
    watchers start after it."""
    host.expire_session(TARGET)  # local-only: the first look writes a stale record
    agent = Agent(AgentOptions(paths=host.paths, refresh_interval=HOUR, udev=False))
    seen = []

    def on_first_read():
        body, _ = agent.metrics("")
        seen.append((agent.scheduler, list(agent._watchers), body))

    agent.start(on_first_read=on_first_read)
    try:
        assert len(seen) == 1
        scheduler, watchers, body = seen[0]
        assert scheduler is None and watchers == []
        assert b'iscsimple_array_iscsi_stale{domain="web1",label="web1-disk"} 1.0' in body
        assert local_only(agent, "web1-disk") == 1
        assert agent.scheduler is not None and agent.scheduler.running and agent._watchers
    finally:
        agent.stop()


class DescriptorMonitor(FakeMonitor):
    """A fake pyudev.Monitor with a descriptor that is readable while events are queued."""

    def __init__(self):
        super().__init__()
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK)

    def put(self, device) -> None:
        self.events.put(device)
        os.write(self.write_end, b"e")

    def fileno(self) -> int:
        return self.read_end

    def poll(self, timeout=None):
        assert timeout == 0, "the watcher waits in its own poll() and asks without waiting"
        try:
            os.read(self.read_end, 1)
        except BlockingIOError:
            return None
        return self.events.get_nowait()


def idle_watchers(tmp_path):
    """The three watchers, idle: an mdstat that never signals, a kernel log with no new records,
    a udev monitor with no events."""
    from iscsimple.exporter.events import KernelLogWatcher, UdevWatcher

    mdstat = tmp_path / "mdstat"
    mdstat.write_text("Personalities : [raid1] \nunused devices: <none>\n")
    kmsg_read, kmsg_write = os.pipe2(os.O_NONBLOCK)
    monitor = DescriptorMonitor()
    seen = []
    watchers = [
        MdstatWatcher(mdstat, lambda reason, changes: seen.append(changes)),
        KernelLogWatcher(
            tmp_path / "kmsg", lambda reason, changes: seen.append(changes), opener=lambda: kmsg_read
        ),
        UdevWatcher(monitor, lambda reason, changes: seen.append(changes)),
    ]
    return watchers, monitor, seen, kmsg_write


def test_idle_watchers_sleep_until_an_event_or_stop(tmp_path):
    """No timer wakes an idle watcher (each wake-up is CPU an idle agent spends all day): each
    makes one poll() call and sleeps in it; stop() still ends every one at once."""
    from unittest import mock

    from iscsimple.exporter import events

    calls = []
    real_poll = select.poll

    class CountingPoll:
        def __init__(self):
            self.real = real_poll()

        def register(self, *args):
            self.real.register(*args)

        def poll(self, timeout=None):
            calls.append((threading.current_thread().name, timeout))
            return self.real.poll(timeout)

    watchers, monitor, seen, kmsg_write = idle_watchers(tmp_path)
    with mock.patch.object(events.select, "poll", CountingPoll):
        for w in watchers:
            w.start()
        time.sleep(1.5)
        assert sorted(calls) == [("kmsg", None), ("mdstat", None), ("udev", None)]
        monitor.put(SimpleNamespace(action="change", subsystem="block", sys_name="sdb"))
        wait_until(lambda: seen == [events.Changes(devices=frozenset({"sdb"}))])
        stopped = time.monotonic()
        for w in watchers:
            w.stop()
        for w in watchers:
            w.thread.join(2.0)
            assert not w.thread.is_alive(), w.name
        assert time.monotonic() - stopped < 1.0
    os.close(kmsg_write)


def test_a_udev_socket_error_ends_the_watcher_with_a_warning(caplog):
    from iscsimple.exporter.events import UdevWatcher

    monitor = DescriptorMonitor()
    os.close(monitor.write_end)  # the read end now polls POLLHUP
    watcher = UdevWatcher(monitor, lambda reason, changes: None).start()
    watcher.thread.join(2.0)
    assert not watcher.thread.is_alive()
    assert "udev monitor failed" in caplog.text and "relying on the schedule" in caplog.text
