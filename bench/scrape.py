#!/usr/bin/env python3
"""Scrape benchmark: iscsimple-agent vs node_exporter's md collector on the same host tree.

For each N it builds a SimulatedHost with N mirrored arrays on N iSCSI sessions
(a mix of recovering, in-sync and local-only arrays), starts the real agent as a
separate process and scrapes it the way Prometheus does (its Accept header,
gzip, one kept-alive connection), and reports:

- scrape latency p50/p90 (client-side, request sent → body read);
- CPU per scrape (the server process's utime+stime over the scrapes / scrapes);
- RSS of the server process after the scrapes;
- refresh: what one full read of the host + render costs the agent (it happens on
  events and on the --refresh.interval schedule, not per scrape).

At the N given by --compare (default 1000) it runs
`prometheus-node-exporter --collector.disable-defaults --collector.mdadm` on the
same tree in the same run. node_exporter reads /proc/mdstat on every scrape; the
agent serves the bytes rendered from its last snapshot, so a scrape never touches
the host. Usage:

    .venv/bin/python bench/scrape.py                 # N = 10 100 1000 5000
    .venv/bin/python bench/scrape.py --n 100 --scrapes 50
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from iscsimple.core.snapshot import HostSnapshot
from iscsimple.exporter.agent import Agent, AgentOptions
from iscsimple.exporter.demo import SimulatedHost
from iscsimple.exporter.exposition import render

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_host(root: Path, n: int) -> SimulatedHost:
    host = SimulatedHost(root)
    with host.batch():
        for i in range(n):
            target = f"iqn.2003-01.org.example.filer:lun-{i:05d}"
            host.add_target(target, f"192.0.2.{10 + i % 200}:3260")
            host.attach(f"vm{i:05d}-disk", f"vm{i:05d}", target, 1, size_bytes=(8 + i % 64) << 30)
            if i % 4 == 0:
                host.advance_resync(f"vm{i:05d}-disk", (i % 97) / 100, speed_kib=50_000 + i)
            else:
                host.finish_resync(f"vm{i:05d}-disk")
            if i % 10 == 3:
                host.expire_session(target)  # local-only
            if i % 10 == 7:
                host.fail_session(target)
    for i in range(n):
        host.record_hotplug("add", "success", 1.0 + i % 5)
        if i > 20:
            break
    return host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/metrics")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not answer")


def scrape_loop(port: int, pid: int, scrapes: int, pause: float = 0.0) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
    for _ in range(3):  # warm up
        conn.request("GET", "/metrics", headers=headers)
        conn.getresponse().read()
    latencies = []
    cpu_before = cpu_seconds(pid)
    size = 0
    for _ in range(scrapes):
        if pause:
            time.sleep(pause)
        started = time.perf_counter()
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        body = response.read()
        latencies.append(time.perf_counter() - started)
        assert response.status == 200, response.status
        size = len(body)
    cpu = (cpu_seconds(pid) - cpu_before) / scrapes
    conn.close()
    q = statistics.quantiles(latencies, n=10)
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p90_ms": q[8] * 1000,
        "cpu_ms": cpu * 1000,
        "rss_mib": rss_mib(pid),
        "gzip_kib": size / 1024,
    }


def run_server(argv: list[str], port: int, scrapes: int, pause: float = 0.0) -> dict:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        return scrape_loop(port, proc.pid, scrapes, pause)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def agent_argv(host: SimulatedHost, port: int, refresh: str = "1h") -> list[str]:
    p = host.paths
    return [
        sys.executable, "-c", "from iscsimple.exporter.agent import main; raise SystemExit(main())",
        "--web.listen-address", f"127.0.0.1:{port}", "--no-udev", "--refresh.interval", refresh,
        "--path.procfs", str(p.procfs), "--path.sysfs", str(p.sysfs), "--path.state", str(p.state),
        "--path.records", str(p.records), "--log.level", "error",
    ]  # fmt: skip


def node_exporter_argv(host: SimulatedHost, port: int, binary: str) -> list[str]:
    return [
        binary, "--collector.disable-defaults", "--collector.mdadm", "--web.disable-exporter-metrics",
        f"--path.procfs={host.paths.procfs}", f"--path.sysfs={host.paths.sysfs}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=error",
    ]  # fmt: skip


def refresh_cost(host: SimulatedHost, runs: int) -> dict:
    """The agent's per-refresh work, in this process: read every source, run the watchers
    (state-change log, health checks, data-safety detector), render the exposition."""
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False, heal=False))
    agent.refresher.refresh_now()
    reads, watches, renders = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        snapshot = HostSnapshot.read(host.paths)
        t1 = time.perf_counter()
        agent.refresher._snapshot = snapshot
        for watcher in agent.refresher.watchers:
            watcher(snapshot)
        t2 = time.perf_counter()
        render(snapshot, agent.refresher.collectors)
        t3 = time.perf_counter()
        reads.append(t1 - t0)
        watches.append(t2 - t1)
        renders.append(t3 - t2)
    return {
        "read_ms": statistics.median(reads) * 1000,
        "watch_ms": statistics.median(watches) * 1000,
        "render_ms": statistics.median(renders) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument(
        "--compare", type=int, nargs="*", default=[1000], help="N at which to run node_exporter"
    )
    parser.add_argument(
        "--node-exporter", default=shutil.which("prometheus-node-exporter") or "node_exporter"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the in-process agent would log every degraded array
    # sysfs and procfs live in memory: so does our tree when /dev/shm is there.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    rows = []
    for n in args.n:
        with tempfile.TemporaryDirectory(prefix="iscsimple-bench-", dir=base) as tmp:
            started = time.monotonic()
            host = build_host(Path(tmp), n)
            built = time.monotonic() - started
            scrapes = max(20, args.scrapes if n <= 1000 else args.scrapes // 2)
            ours = run_server(agent_argv(host, port := free_port()), port, scrapes)
            # Worst case: the refresh thread re-reads the host back to back (1 s interval) and
            # competes with the HTTP thread for the GIL.
            # Scrapes spread over several refreshes (CPU/scrape then includes refresh work, not shown).
            busy = run_server(agent_argv(host, port := free_port(), refresh="1s"), port, scrapes, pause=0.03)
            ours["busy_p50_ms"], ours["busy_p90_ms"] = busy["p50_ms"], busy["p90_ms"]
            cost = refresh_cost(host, runs=3 if n >= 1000 else 10)
            row = {"n": n, "ours": ours, "refresh": cost, "node": None, "built_s": built}
            if n in args.compare and shutil.which(args.node_exporter):
                row["node"] = run_server(
                    node_exporter_argv(host, port := free_port(), args.node_exporter), port, scrapes
                )
            rows.append(row)
            print(f"N={n}: built in {built:.1f} s, {scrapes} scrapes each", file=sys.stderr, flush=True)
            print_table([row], header=len(rows) == 1)
    print_verdicts(rows)
    return 0


def print_table(rows: list[dict], header: bool = True) -> None:
    if header:
        print(
            "| N arrays+sessions | scrape p50 | scrape p90 | p50 / p90 while refreshing | CPU/scrape | RSS | body (gzip) "
            "| refresh: read | refresh: checks | refresh: render | node_exporter md p50 / p90 / CPU / RSS |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        o, c, ne = r["ours"], r["refresh"], r["node"]
        node = (
            f"{ne['p50_ms']:.2f} / {ne['p90_ms']:.2f} ms / {ne['cpu_ms']:.2f} ms / {ne['rss_mib']:.0f} MiB"
            if ne
            else "-"
        )
        print(
            f"| {r['n']} | {o['p50_ms']:.2f} ms | {o['p90_ms']:.2f} ms | "
            f"{o['busy_p50_ms']:.2f} / {o['busy_p90_ms']:.2f} ms | {o['cpu_ms']:.2f} ms | "
            f"{o['rss_mib']:.0f} MiB | {o['gzip_kib']:.0f} KiB | {c['read_ms']:.0f} ms | {c['watch_ms']:.0f} ms | {c['render_ms']:.0f} ms | {node} |",
            flush=True,
        )


def print_verdicts(rows: list[dict]) -> None:
    for r in rows:
        if r["node"]:
            ratio = r["ours"]["p50_ms"] / r["node"]["p50_ms"]
            verdict = "meets" if ratio <= 0.5 else "MISSES"
            print(f"\nN={r['n']}: our p50 is {ratio:.2f}x node_exporter's ({verdict} the <= 0.5x target)")


if __name__ == "__main__":
    raise SystemExit(main())
