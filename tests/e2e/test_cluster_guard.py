"""The cross-host guard's PromQL against a real Prometheus (1 s scrapes) of two stand-in agents.

What the fake in tests/fakeprometheus.py assumes is checked here on the real thing: a
stale report comes back while its host is up; it stays (as the host's last report) when
the host stops answering; it goes once the host answers again without it; it comes back
(as the last report) while that host's agent, up, cannot read its stale-copy records
(`iscsimple_stale_records_readable` 0) and goes once it can, and such a host's use of a
LUN it has no report of comes back as unknown; a LUN's attachment counts
only while its host is up; this host's own series never count.
"""

from __future__ import annotations

import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from alertchain import Prometheus, free_port, wait_until

from iscsimple.core.cluster import ClusterGuard, ClusterSettings

pytestmark = pytest.mark.e2e

TARGET = "iqn.2001-04.com.example:filer"
SINCE = 1700000000.5


class StandInAgent:
    """Serves a settable exposition text on 127.0.0.1; stop() makes its scrapes fail."""

    def __init__(self) -> None:
        self.text = ""
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = agent.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:
                pass

        self.port = free_port()
        self.handler = Handler
        self.server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def exposition(
    host: str, *, stale: bool, attached: bool, readable: int | None = None, lun2: bool = False
) -> str:
    labels = f'host="{host}",target="{TARGET}",lun="1",label="web1-root",domain="web1"'
    lines = []
    if stale:
        lines += [
            "# TYPE iscsimple_lun_stale_since_seconds gauge",
            f"iscsimple_lun_stale_since_seconds{{{labels}}} {SINCE}",
        ]
    if attached or lun2:
        lines += ["# TYPE iscsimple_lun_attached gauge"]
    if attached:
        lines += [f"iscsimple_lun_attached{{{labels}}} 1"]
    if lun2:  # a LUN this host never reported stale
        labels2 = f'host="{host}",target="{TARGET}",lun="2",label="web2-root",domain="web2"'
        lines += [f"iscsimple_lun_attached{{{labels2}}} 1"]
    lines += ["# TYPE iscsimple_cluster_guard_configured gauge", "iscsimple_cluster_guard_configured 1"]
    if readable is not None:  # None: an agent older than the metric
        lines += [
            "# TYPE iscsimple_stale_records_readable gauge",
            f"iscsimple_stale_records_readable {readable}",
        ]
    return "\n".join(lines) + "\n"


def test_guard_queries_on_a_real_prometheus(tmp_path):
    a, b = StandInAgent(), StandInAgent()
    a.text = exposition("hosta", stale=True, attached=True)
    b.text = exposition("hostb", stale=True, attached=True)  # this host's own: never counted
    prometheus = Prometheus(tmp_path / "prom", [a.address, b.address], f"http://127.0.0.1:{free_port()}")
    try:
        guard = ClusterGuard(ClusterSettings(prometheus_url=prometheus.url, host_name="hostb", timeout=3))

        def up(address: str, value: str) -> bool:
            return any(r["value"][1] == value for r in prometheus.query(f'up{{instance="{address}"}}'))

        wait_until(lambda: up(a.address, "1") and up(b.address, "1"), 30, "both stand-ins scraped")
        wait_until(lambda: guard.stale_elsewhere(TARGET, 1).reports, 30, "hosta's stale report")
        result = guard.stale_elsewhere(TARGET, 1)
        assert [(r.host, r.label, r.since, r.down) for r in result.reports] == [
            ("hosta", "web1-root", SINCE, False)
        ]
        assert result.seconds < 1.0
        assert [r.host for r in guard.attached_elsewhere(TARGET, 1).reports] == ["hosta"]
        assert guard.stale_elsewhere(TARGET, 2).reports == []
        print(f"guard query against a real Prometheus: {result.seconds * 1000:.1f} ms")

        a.stop()  # host A crashed: its scrapes fail, its series go stale in Prometheus
        wait_until(lambda: up(a.address, "0"), 30, "hosta down")
        deadline = time.monotonic() + 15
        while True:  # the report never goes away; it becomes "down" once Prometheus marks it stale
            reports = guard.stale_elsewhere(TARGET, 1).reports
            assert [(r.host, r.since) for r in reports] == [("hosta", SINCE)]
            if reports[0].down or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert reports[0].down
        assert guard.attached_elsewhere(TARGET, 1).reports == []  # a crashed host writes nothing

        a.text = exposition("hosta", stale=False, attached=False)  # back, healed (record cleared)
        a.start()
        wait_until(lambda: up(a.address, "1"), 30, "hosta up again")
        time.sleep(1.5)
        assert guard.stale_elsewhere(TARGET, 1).reports == []  # an agent without the readable metric

        # Host A's agent restarts unable to read its stale-copy records: up, no stale series.
        a.text = exposition("hosta", stale=False, attached=True, readable=0, lun2=True)
        wait_until(lambda: guard.stale_elsewhere(TARGET, 1).reports, 30, "hosta's last report again")
        reports = guard.stale_elsewhere(TARGET, 1).reports
        assert [(r.host, r.since, r.records_unreadable, r.down) for r in reports] == [
            ("hosta", SINCE, True, False)
        ]
        assert [r.host for r in guard.attached_elsewhere(TARGET, 1).reports] == ["hosta"]
        lun2 = guard.stale_elsewhere(TARGET, 2)  # used there, never reported stale: unknown
        assert lun2.reports == [] and [(u.host, u.label, u.domain, u.since) for u in lun2.unknown] == [
            ("hosta", "web2-root", "web2", None)
        ]
        assert guard.stale_elsewhere(TARGET, 3).unknown == []

        a.text = exposition("hosta", stale=False, attached=True, readable=1, lun2=True)  # readable: no record
        wait_until(lambda: not guard.stale_elsewhere(TARGET, 1).reports, 30, "hosta readable again")
        time.sleep(1.5)
        assert guard.stale_elsewhere(TARGET, 1).reports == []
        assert guard.stale_elsewhere(TARGET, 2).unknown == []
    finally:
        prometheus.stop()
        for agent in (a, b):
            with contextlib.suppress(Exception):
                agent.stop()
