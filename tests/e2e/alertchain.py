"""Real Prometheus, Alertmanager and iscsimple-agent processes on loopback, and a
webhook receiver, for the end-to-end alert tests.

Binaries come from Debian's `prometheus` and `prometheus-alertmanager` packages
(scripts/test installs them); a missing one fails the test with the package name.
Every process gets a free port and a temp storage dir, and is stopped by the test.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "alerts" / "iscsimple.rules.yml"
ALERTMANAGER_EXAMPLE = REPO / "alerts" / "alertmanager.example.yml"
HTTP_TIMEOUT = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package {package} (scripts/test does)")
    return path


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return response.read()


def http_post_json(url: str, payload: Any) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        return response.read()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            result = condition()
            if result:
                return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Daemon:
    """A child process with its output in a log file, shown when it dies early."""

    def __init__(self, name: str, argv: list[str], log: Path):
        self.name = name
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, url: str, timeout: float = 30) -> None:
        def ready() -> bool:
            self.check_alive()
            try:
                http_get(url)
            except OSError:
                return False
            return True

        wait_until(ready, timeout, f"{self.name} at {url}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log_file.close()


@dataclass(frozen=True)
class Notification:
    received: float  # time.monotonic()
    path: str
    body: dict[str, Any]

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return self.body.get("alerts", [])


class WebhookReceiver:
    """Alertmanager's webhook receiver: records every notification it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notifications: list[Notification] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                with receiver._lock:
                    receiver._notifications.append(Notification(time.monotonic(), self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    @property
    def notifications(self) -> list[Notification]:
        with self._lock:
            return list(self._notifications)

    def wait_for(
        self, match: Callable[[Notification], bool], timeout: float, what: str, since: float = 0.0
    ) -> Notification:
        def found() -> Notification | None:
            return next((n for n in self.notifications if n.received >= since and match(n)), None)

        return wait_until(found, timeout, what, interval=0.05)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def alertmanager_config(receiver: WebhookReceiver, group_interval: str | None = None) -> dict[str, Any]:
    """The example config with its receivers pointed at `receiver` (/page, /ticket).
    Routes, group_wait and inhibitions stay as shipped; a shorter group_interval
    only speeds up the follow-up and resolved notifications."""
    config = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())
    for entry in config["receivers"]:
        for webhook in entry["webhook_configs"]:
            webhook["url"] = receiver.url(urllib.parse.urlparse(webhook["url"]).path)
    if group_interval is not None:
        for route in [config["route"], *config["route"].get("routes", [])]:
            route["group_interval"] = group_interval
    return config


class Alertmanager(Daemon):
    def __init__(self, workdir: Path, config: dict[str, Any]):
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir / "alertmanager.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [
            binary("prometheus-alertmanager", "prometheus-alertmanager"),
            f"--config.file={config_file}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address={self.url.removeprefix('http://')}",
            "--cluster.listen-address=",  # no gossip port: a single instance
            "--log.level=warn",
        ]
        super().__init__("alertmanager", argv, workdir / "alertmanager.log")
        self.wait_ready(f"{self.url}/-/ready")

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        http_post_json(f"{self.url}/api/v2/alerts", alerts)

    def alerts(self) -> list[dict[str, Any]]:
        return json.loads(http_get(f"{self.url}/api/v2/alerts"))


class Prometheus(Daemon):
    """Prometheus with iscsimple's rule files, scraping `agents` as job "iscsimple"."""

    def __init__(
        self,
        workdir: Path,
        agents: list[str],
        alertmanager: str,
        interval: str = "1s",
        port: int | None = None,
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(RULES)],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager.removeprefix("http://")]}]}]
            },
            "scrape_configs": [{"job_name": "iscsimple", "static_configs": [{"targets": agents}]}],
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.url = f"http://127.0.0.1:{port or free_port()}"
        argv = [
            binary("prometheus", "prometheus"),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={self.url.removeprefix('http://')}",
            "--log.level=warn",
        ]
        super().__init__("prometheus", argv, workdir / "prometheus.log")
        self.wait_ready(f"{self.url}/-/ready")

    def _api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        except urllib.error.HTTPError as e:
            pytest.fail(f"Prometheus /api/v1/{path} {params}: {e.code} {e.read().decode(errors='replace')}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self._api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        return self._api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self._api("rules")["groups"]

    def firing(self) -> list[dict[str, str]]:
        return [r["metric"] for r in self.query('ALERTS{alertstate="firing"}')]


class Agent(Daemon):
    """The real iscsimple-agent process reading a simulated host's tree."""

    def __init__(self, workdir: Path, paths: Any, refresh_interval: str | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_port()}"
        argv = [
            agent_command(),
            f"--web.listen-address={self.address}",
            f"--path.procfs={paths.procfs}",
            f"--path.sysfs={paths.sysfs}",
            f"--path.state={paths.state}",
            f"--path.records={paths.records}",
            "--no-udev",  # the host's real udev events are not the simulated host's
        ]
        if refresh_interval is not None:
            argv.append(f"--refresh.interval={refresh_interval}")
        super().__init__("iscsimple-agent", argv, workdir / "agent.log")
        self.wait_ready(f"http://{self.address}/metrics")


def agent_command() -> str:
    """The console script installed beside this interpreter (pip install -e .)."""
    beside = Path(sys.executable).parent / "iscsimple-agent"
    if beside.exists():
        return str(beside)
    found = shutil.which("iscsimple-agent")
    if found is None:
        pytest.fail("iscsimple-agent not installed: pip install -e . (scripts/test does)")
    return found
