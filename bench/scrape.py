#!/usr/bin/env python3
"""Cost benchmark: iscsimple-agent beside node_exporter's md collector, same tree, same run.

For each N it builds a SimulatedHost with N mirrored arrays on N iSCSI sessions (¼
recovering, ⅒ local-only, ⅒ with a FAILED session; nothing moves unless the benchmark
moves it) and measures:

- start: the agent as a separate process at its defaults; seconds until the first
  /metrics answers 200 (time to first metrics), and the CPU seconds it used by then;
- at rest: both servers run side by side, each scraped every 15 s as Prometheus does (its
  Accept header, gzip, one kept-alive connection); CPU seconds per minute of each process over
  two windows of --rest seconds: the first right after the first scrape (the first minute
  after start), the second after it (steady state). The agent's full sweep (default every
  30 min) does not fall in them: its cost is measured in-process and added pro rata to the
  steady figure. The tree is left alone for a few seconds before the servers start, as a
  host's registry is older than the agent (a file written within 2 s is read again);
- scrape: --scrapes back-to-back scrapes of each: latency p50/p90 (request sent → body
  read), then RSS of each process;
- one change (in-process Agent on the same tree): a leg fails (md fails the iSCSI leg and
  the session goes FREE) or a recovery moves, for --changes different arrays; the CPU of
  what the agent does for it: diff /proc/mdstat (the md event), update the snapshot from
  the changes the md event and the poll name, run the watchers, render. Reported as the
  median; the first gzip scrape after it (compressing the body) is shown apart;
- sweep: one full re-read (every array and session) with nothing changed.

    .venv/bin/python bench/scrape.py                  # N = 1000 5000
    .venv/bin/python bench/scrape.py --n 100 --rest 30
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import http.client
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from iscsimple.core.snapshot import EVERYTHING, Changes
from iscsimple.exporter.agent import DEFAULT_SWEEP, Agent, AgentOptions, first_full_read
from iscsimple.exporter.simhost import SimulatedHost

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
HEADERS = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCRAPE_INTERVAL = 15.0
RACY_SECONDS = 2.5  # core.files: a file whose stat is this close to its mtime is read again


def build_host(root: Path, n: int) -> SimulatedHost:
    host = SimulatedHost(root)
    with host.batch():
        for i in range(n):
            target = target_of(i)
            host.add_target(target, f"192.0.2.{10 + i % 200}:3260")
            host.attach(label_of(i), f"vm{i:05d}", target, 1, size_bytes=(8 + i % 64) << 30)
            if i % 4 == 0:
                host.advance_resync(label_of(i), (i % 97) / 100, speed_kib=50_000 + i)
            else:
                host.finish_resync(label_of(i))
            if i % 10 == 3:
                host.expire_session(target)  # local-only
            if i % 10 == 7:
                host.fail_session(target)
    for i in range(21):
        host.record_hotplug("add", "success", 1.0 + i % 5)
    return host


def label_of(i: int) -> str:
    return f"vm{i:05d}-disk"


def target_of(i: int) -> str:
    return f"iqn.2003-01.org.example.filer:lun-{i:05d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """A process's CPU time (all its threads, ended ones included), and that of the children it
    waited for (the agent reads the md arrays at start in a child process). Its own from its
    CPU-time clock in ns where the C library gives it, else /proc/PID/stat in clock ticks (10 ms:
    10 ms/min of resolution over a 60-s window, as coarse as the figures it has to tell apart)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK
    clock = ctypes.c_int()
    stamp = _Timespec()
    if (
        _LIBC is not None
        and _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0
        and _LIBC.clock_gettime(clock.value, ctypes.byref(stamp)) == 0
    ):
        return stamp.tv_sec + stamp.tv_nsec / 1e9 + children
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, name: str, argv: list[str], port: int):
        self.name, self.port = name, port
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.first_metrics = self._wait_ready()
        # Its CPU by then: what the start costs whatever else the machine runs meanwhile.
        self.first_metrics_cpu = self.cpu()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def _wait_ready(self, timeout: float = 300) -> float:
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                conn.request("GET", "/metrics")
                if conn.getresponse().status == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not answer")

    def scrape(self) -> tuple[float, int]:
        started = time.perf_counter()
        self.conn.request("GET", "/metrics", headers=HEADERS)
        response = self.conn.getresponse()
        body = response.read()
        assert response.status == 200, response.status
        return time.perf_counter() - started, len(body)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> None:
        self.conn.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def agent_argv(host: SimulatedHost, port: int) -> list[str]:
    p = host.paths
    return [
        sys.executable, "-c", "from iscsimple.exporter.agent import main; raise SystemExit(main())",
        "--web.listen-address", f"127.0.0.1:{port}", "--no-udev",
        "--path.procfs", str(p.procfs), "--path.sysfs", str(p.sysfs), "--path.state", str(p.state),
        "--path.records", str(p.records), "--log.level", "error",
    ]  # fmt: skip


def node_exporter_argv(host: SimulatedHost, port: int, binary: str) -> list[str]:
    return [
        binary, "--collector.disable-defaults", "--collector.mdadm", "--web.disable-exporter-metrics",
        f"--path.procfs={host.paths.procfs}", f"--path.sysfs={host.paths.sysfs}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=error",
    ]  # fmt: skip


def at_rest(servers: list[Server], seconds: float) -> dict[str, float]:
    """CPU seconds per minute of each server over `seconds`, each scraped every 15 s."""
    before = {s.name: s.cpu() for s in servers}
    started = time.monotonic()

    def scraper(server: Server) -> None:
        while time.monotonic() - started < seconds - 0.5:
            server.scrape()
            time.sleep(max(0.0, SCRAPE_INTERVAL - (time.monotonic() - started) % SCRAPE_INTERVAL))

    threads = [threading.Thread(target=scraper, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    return {s.name: (s.cpu() - before[s.name]) * 60 / elapsed for s in servers}


def scrape_latency(server: Server, scrapes: int) -> dict[str, float]:
    latencies, size = [], 0
    for _ in range(scrapes):
        took, size = server.scrape()
        latencies.append(took)
    q = statistics.quantiles(latencies, n=10)
    return {"p50_ms": statistics.median(latencies) * 1000, "p90_ms": q[8] * 1000, "gzip_kib": size / 1024}


def change_costs(host: SimulatedHost, n: int, changes: int) -> dict[str, float]:
    """In-process: the agent's CPU for one changed array, as the refresh thread spends it."""
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False, heal=False))
    first_full_read(agent.refresher)  # as Agent.start does (its heap frozen afterwards)
    agent.metrics(PROMETHEUS_ACCEPT, gzipped=True)
    mdstat = agent.mdstat

    # CPU by phase of each kind of change: the md event, then the refresh's own (Refresher.cpu).
    phases: dict[str, dict[str, list[float]]] = {"leg fails": {}, "recovery moves": {}}

    def reflect(kind: str, change, names: Changes) -> tuple[float, float]:
        change()
        started = time.process_time()
        md = mdstat.read()  # the md event: which arrays' lines changed
        md_event = time.process_time() - started
        rendered = agent.refresher.refresh_now(Changes(md=frozenset(md)) | names)
        refresh = time.process_time() - started
        for phase, seconds in {"md event": md_event, **agent.refresher.cpu}.items():
            phases[kind].setdefault(phase, []).append(seconds)
        started = time.process_time()
        rendered.gzipped(PROMETHEUS_ACCEPT)
        return refresh, time.process_time() - started

    fail, recover, gzips = [], [], []
    # Arrays idle and in sync with a logged-in session (i % 4 in 1..3, not 3 or 7 mod 10).
    picks = [i for i in range(n) if i % 4 and i % 10 not in (3, 7)]
    step = max(1, len(picks) // changes)
    for i in picks[::step][:changes]:
        session = agent.refresher.snapshot().array(label_of(i)).session.name
        cost, gz = reflect(
            "leg fails", lambda i=i: host.expire_session(target_of(i)), Changes(sessions=frozenset({session}))
        )
        fail.append(cost)
        gzips.append(gz)
        assert agent.refresher.snapshot().array(label_of(i)).local_only
    syncing = [i for i in range(n) if i % 4 == 0 and i % 10 not in (3, 7)]
    step = max(1, len(syncing) // changes)
    for i in syncing[::step][:changes]:
        cost, _ = reflect(
            "recovery moves", lambda i=i: host.advance_resync(label_of(i), 0.99, speed_kib=40_000), Changes()
        )
        recover.append(cost)
    started = time.process_time()
    agent.refresher.refresh_now(EVERYTHING)
    sweep = time.process_time() - started
    started = time.process_time()
    agent.refresher.refresh_now(Changes())
    idle = time.process_time() - started
    return {
        "fail_ms": statistics.median(fail) * 1000,
        "recover_ms": statistics.median(recover) * 1000,
        "gzip_ms": statistics.median(gzips) * 1000,
        "sweep_s": sweep,
        "idle_ms": idle * 1000,
        "phases": {
            kind: {phase: statistics.median(values) * 1000 for phase, values in by_phase.items()}
            for kind, by_phase in phases.items()
        },
    }


def measure(n: int, args) -> dict:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # sysfs and procfs live in memory
    with tempfile.TemporaryDirectory(prefix="iscsimple-bench-", dir=base) as tmp:
        started = time.monotonic()
        host = build_host(Path(tmp), n)
        row: dict = {"n": n, "built_s": time.monotonic() - started}
        time.sleep(RACY_SECONDS)
        servers = [Server("agent", agent_argv(host, port := free_port()), port)]
        try:
            if shutil.which(args.node_exporter):
                binary = args.node_exporter
                servers.append(Server("node", node_exporter_argv(host, port := free_port(), binary), port))
            row["first_metrics_s"] = servers[0].first_metrics
            row["first_metrics_cpu_s"] = servers[0].first_metrics_cpu
            for s in servers:
                s.scrape()  # the first scrape after start (compresses the first body) is not "rest"
            row["first_minute"] = at_rest(servers, args.rest)
            row["rest"] = at_rest(servers, args.rest)
            row["scrape"] = {s.name: scrape_latency(s, args.scrapes) for s in servers}
            row["rss"] = {s.name: s.rss() for s in servers}
        finally:
            for s in servers:
                s.stop()
        row["change"] = change_costs(host, n, args.changes)
        return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--rest", type=float, default=60.0, help="seconds at rest (default 60)")
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--changes", type=int, default=15, help="changed arrays measured (default 15)")
    parser.add_argument(
        "--node-exporter", default=shutil.which("prometheus-node-exporter") or "node_exporter"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the in-process agent would log every degraded array
    print(
        "| N | agent CPU at rest, steady (+ sweep) / first minute | node_exporter CPU at rest, steady / first "
        "minute | ratio steady (first minute) | scrape p50 agent / node_exporter "
        "| ratio | one change: leg fails / recovery moves (+ first gzip scrape) | full sweep | RSS agent / "
        "node_exporter | first /metrics |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.n:
        r = measure(n, args)
        c, rest, first, sc = r["change"], r["rest"], r["first_minute"], r["scrape"]
        sweep_per_min = c["sweep_s"] * 60 / DEFAULT_SWEEP
        ours = rest["agent"] + sweep_per_min
        node, node_first = rest.get("node"), first.get("node")
        ratio = f"{ours / node:.2f} ({first['agent'] / node_first:.2f})" if node and node_first else "-"
        p50 = sc["agent"]["p50_ms"]
        node_p50 = sc["node"]["p50_ms"] if "node" in sc else None
        print(
            f"| {n} | {ours * 1000:.0f} ms/min ({sweep_per_min * 1000:.0f}) / {first['agent'] * 1000:.0f} | "
            f"{(node or float('nan')) * 1000:.0f} / {(node_first or float('nan')) * 1000:.0f} ms/min | {ratio} | "
            f"{p50:.2f} / {node_p50 or float('nan'):.2f} ms | {p50 / node_p50 if node_p50 else float('nan'):.3f} | "
            f"{c['fail_ms']:.2f} / {c['recover_ms']:.2f} ms (+{c['gzip_ms']:.0f} ms) | {c['sweep_s']:.2f} s | "
            f"{r['rss']['agent']:.0f} / {r['rss'].get('node', float('nan')):.0f} MiB | "
            f"{r['first_metrics_s']:.2f} s ({r['first_metrics_cpu_s']:.2f} CPU-s) |",
            flush=True,
        )
        print(
            f"  N={n}: built in {r['built_s']:.0f} s; body {sc['agent']['gzip_kib']:.0f} KiB gzip; "
            f"a refresh with nothing changed {c['idle_ms']:.2f} ms",
            file=sys.stderr,
            flush=True,
        )
        for kind, by_phase in c["phases"].items():
            print(
                f"  N={n}: one change ({kind}), median CPU by phase: "
                + ", ".join(f"{phase} {ms:.2f} ms" for phase, ms in by_phase.items()),
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
