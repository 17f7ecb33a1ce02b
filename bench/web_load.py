#!/usr/bin/env python3
"""Load benchmark of the agent's HTTP server, on 127.0.0.1 only.

Starts the real iscsimple-agent (a separate process) on a simulated host of --n
mirrored arrays and measures, from this process:

1. burst: --connections clients connect at once, each sends one scrape (Prometheus's
   Accept header, gzip, Connection: close) and reads the answer; how many get a 200
   within --timeout, and their latency (connect to last byte) p50/p99, over --rounds bursts;
2. held: --connections connections kept open (idle keep-alive after one scrape), and
   meanwhile one kept-alive client scrapes --scrapes times: latency p50/p99;
3. bad passwords: the agent with TLS and basic auth (bcrypt cost 10, as
   `htpasswd -nBC 10` makes); one good client scrapes for --duration seconds, alone and
   then while --bad-clients clients (another process; connected over TLS first, so
   their handshakes are not counted) send wrong passwords as fast as they are answered,
   each a new one: its latency p50/p99/max and the bad requests answered.

--source DIR runs the agent from another checkout (e.g. an older commit unpacked with
`git archive`), so before/after figures come from one client on one machine:

    .venv/bin/python bench/web_load.py
    git archive HEAD~1 | tar -x -C /tmp/old && .venv/bin/python bench/web_load.py --source /tmp/old
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bcrypt
import requests
import urllib3
from scrape import build_host  # bench/scrape.py: the same simulated host

from iscsimple.exporter.simhost import SimulatedHost

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
SCRAPE = (
    f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {PROMETHEUS_ACCEPT}\r\n"
    "Accept-Encoding: gzip\r\nUser-Agent: web_load\r\n"
).encode()
PASSWORD = "bench-scrape-password"


def package_layout(source: Path, into: Path) -> Path:
    """A directory to put first on PYTHONPATH so `import iscsimple` is `source`'s code
    (pyproject maps the top-level folders into one `iscsimple` package)."""
    package = into / "iscsimple"
    package.mkdir(parents=True)
    (package / "__init__.py").write_bytes((source / "iscsimple_ns" / "__init__.py").read_bytes())
    for name in ("core", "hotplug", "cli", "exporter"):
        if (source / name).is_dir():
            (package / name).symlink_to(source / name)
    return into


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, host: SimulatedHost, pythonpath: Path | None, web_config: Path | None = None):
        self.port = free_port()
        p = host.paths
        argv = [
            sys.executable, "-c", "from iscsimple.exporter.agent import main; raise SystemExit(main())",
            "--web.listen-address", f"127.0.0.1:{self.port}", "--no-udev", "--log.level", "error",
            "--path.procfs", str(p.procfs), "--path.sysfs", str(p.sysfs),
            "--path.state", str(p.state), "--path.records", str(p.records),
        ]  # fmt: skip
        if web_config is not None:
            argv += ["--web.config.file", str(web_config)]
        env = dict(os.environ)
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.scheme = "https" if web_config else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"

    def wait_ready(self, **request_options) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"agent exited: {self.proc.stderr.read().decode()}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2, **request_options).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise SystemExit("agent not ready after 60 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


def burst(port: int, n: int, timeout: float) -> tuple[int, list[float]]:
    """n connections at once, one scrape each (Connection: close); (200s within timeout, latencies)."""
    sel = selectors.DefaultSelector()
    request = SCRAPE + b"Connection: close\r\n\r\n"
    started = time.monotonic()
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE, [False, b""])
    answered, latencies = 0, []
    deadline = started + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.05):
            s, state = key.fileobj, key.data
            if not state[0]:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    sel.unregister(s)
                    s.close()
                    continue
                s.send(request)
                state[0] = True
                sel.modify(s, selectors.EVENT_READ, state)
                continue
            try:
                chunk = s.recv(1 << 18)
            except OSError:
                chunk = b""
            if chunk:
                state[1] += chunk
                continue
            sel.unregister(s)
            s.close()
            if state[1].startswith(b"HTTP/1.1 200") or state[1].startswith(b"HTTP/1.0 200"):
                answered += 1
                latencies.append(time.monotonic() - started)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    return answered, latencies


def hold_connections(port: int, n: int) -> list[socket.socket]:
    """n keep-alive connections that each scraped once and now sit idle."""
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        held.append(s)
    for s in held:
        s.sendall(SCRAPE + b"\r\n")
    for s in held:
        _read_response(s)
    return held


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(1 << 16)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        body += chunk
    return head


def scrape_latencies(session: requests.Session, url: str, count: int = 0, duration: float = 0.0, **options):
    latencies = []
    end = time.monotonic() + duration
    while (count and len(latencies) < count) or (duration and time.monotonic() < end):
        began = time.monotonic()
        r = session.get(f"{url}/metrics", headers={"Accept": PROMETHEUS_ACCEPT}, timeout=60, **options)
        latencies.append(time.monotonic() - began)
        if r.status_code != 200:
            raise SystemExit(f"good scrape got {r.status_code}")
    return latencies


def hammer(url: str, clients: int, duration: float) -> None:
    """Runs in its own process: `clients` threads sending wrong passwords, a new one each time.

    Each first opens its connection (TLS handshake, one request without credentials) and
    "ready" is printed when all have; then they hammer for `duration` and the number of
    bad requests answered is printed."""
    urllib3.disable_warnings()
    counts = [0] * clients
    connected = threading.Barrier(clients + 1)
    go = threading.Event()

    def client(i: int) -> None:
        with requests.Session() as s:
            s.get(f"{url}/-/healthy", verify=False, timeout=60)
            connected.wait()
            go.wait()
            end = time.monotonic() + duration
            while time.monotonic() < end:
                password = "".join(random.choices(string.ascii_letters, k=16))
                try:
                    s.get(f"{url}/metrics", auth=("prometheus", password), verify=False, timeout=60)
                    counts[i] += 1
                except requests.RequestException:
                    pass

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    connected.wait()
    print("ready", flush=True)
    go.set()
    for t in threads:
        t.join()
    print(sum(counts), flush=True)


def tls_config(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "agent.crt", directory / "agent.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    config = directory / "web.yml"
    config.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nbasic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    return config, cert


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, help="run the agent from this checkout (default: this one)")
    parser.add_argument("--n", type=int, default=100, help="arrays on the simulated host (default 100)")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="bursts (default 3)")
    parser.add_argument("--timeout", type=float, default=5.0, help="a burst client's patience, s (default 5)")
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--bad-clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--hammer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hammer:
        hammer(args.hammer, args.bad_clients, args.duration)
        return 0

    with tempfile.TemporaryDirectory(
        prefix="web-load-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
    ) as tmp:
        tmp = Path(tmp)
        pythonpath = package_layout(args.source.resolve(), tmp / "pkg") if args.source else None
        host = build_host(tmp / "host", args.n)
        print(f"agent from {args.source or REPO}; simulated host with {args.n} arrays", flush=True)

        agent = Agent(host, pythonpath)
        try:
            agent.wait_ready()
            results = [burst(agent.port, args.connections, args.timeout) for _ in range(args.rounds)]
            latencies = [x for _, lat in results for x in lat]
            print(
                f"burst: answered {', '.join(f'{a}/{args.connections}' for a, _ in results)} within "
                f"{args.timeout:g} s; latency p50 {ms(percentile(latencies, 50))} p99 {ms(percentile(latencies, 99))}",
                flush=True,
            )
            with requests.Session() as session:
                idle = scrape_latencies(session, agent.url, count=args.scrapes)
                held = hold_connections(agent.port, args.connections)
                try:
                    busy = scrape_latencies(session, agent.url, count=args.scrapes)
                finally:
                    for s in held:
                        s.close()
            print(
                f"scrape alone: p50 {ms(percentile(idle, 50))} p99 {ms(percentile(idle, 99))}; "
                f"with {args.connections} connections held open: p50 {ms(percentile(busy, 50))} "
                f"p99 {ms(percentile(busy, 99))}",
                flush=True,
            )
        finally:
            agent.stop()

        config, cert = tls_config(tmp)
        agent = Agent(host, pythonpath, config)
        try:
            options = {"verify": str(cert), "auth": ("prometheus", PASSWORD)}
            agent.wait_ready(**options)
            with requests.Session() as session:
                alone = scrape_latencies(session, agent.url, count=args.scrapes, **options)
                bad = subprocess.Popen(
                    [sys.executable, __file__, "--hammer", agent.url, "--bad-clients", str(args.bad_clients),
                     "--duration", str(args.duration)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                if bad.stdout.readline().strip() != "ready":
                    raise SystemExit("the bad clients did not connect")
                time.sleep(1.0)  # their first wrong passwords are queued
                attacked = scrape_latencies(session, agent.url, duration=args.duration - 2, **options)
                bad_requests = int(bad.communicate(timeout=args.duration + 120)[0].strip() or 0)
            print(
                f"TLS + basic auth, good client alone: p50 {ms(percentile(alone, 50))} p99 {ms(percentile(alone, 99))}; "
                f"while {args.bad_clients} clients send wrong passwords: p50 {ms(percentile(attacked, 50))} "
                f"p99 {ms(percentile(attacked, 99))} max {ms(max(attacked))} ({len(attacked)} scrapes; "
                f"{bad_requests} bad requests answered, {bad_requests / args.duration:.0f}/s)",
                flush=True,
            )
        finally:
            agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
