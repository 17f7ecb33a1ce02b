"""A stand-in for Prometheus's `/api/v1/query` on 127.0.0.1, for the cross-host guard's tests.

It answers the two queries core/cluster.py sends the way Prometheus does for a model of
hosts: each host is up or down and reports LUN series. An up host's series come back
as they are; a down host's stale reports come back as its last report (marked
`iscsimple_last_report="down"`); a down host's attachments not at all. A host whose agent
cannot read its stale-copy records (`records_readable` False: it restarted so and reports
no stale series) has its stale reports come back as its last report (marked
`iscsimple_last_report="records_unreadable"`) only when the query asks for
`iscsimple_stale_records_readable == 0` — as on Prometheus, where the series are gone — and
its attachments of the LUN come back marked `iscsimple_last_report="unknown"` when the query
asks for any `iscsimple_lun_.+` series of such a host. The real
PromQL is checked against a real Prometheus in tests/e2e/test_cluster_guard.py.
It can also answer slowly, with an error, or with garbage, and records every query.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SELECTOR = re.compile(r'(iscsimple_lun_\w+)\{target="([^"]*)",lun="(\d+)",host!="([^"]*)"\}')


@dataclass
class FakeHostReport:
    host: str
    up: bool = True
    records_readable: bool | None = (
        None  # iscsimple_stale_records_readable: None = not exported (older agent)
    )
    stale: dict[tuple[str, int, str], float] = field(default_factory=dict)  # (target, lun, label) -> since
    attached: set[tuple[str, int, str]] = field(default_factory=set)


class FakePrometheus:
    def __init__(self) -> None:
        self.hosts: dict[str, FakeHostReport] = {}
        self.queries: list[str] = []
        self.delay = 0.0
        self.mode = "ok"  # ok | error | garbage
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                self._answer(form.get("query", [""])[0])

            def do_GET(self) -> None:
                form = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                self._answer(form.get("query", [""])[0])

            def _answer(self, query: str) -> None:
                fake.queries.append(query)
                time.sleep(fake.delay)
                if fake.mode == "error":
                    body, status = b'{"status":"error","error":"boom"}', 503
                elif fake.mode == "garbage":
                    body, status = b"<html>not prometheus</html>", 200
                else:
                    body, status = json.dumps(fake.evaluate(query)).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (timeout test)
                    self.wfile.write(body)

            def log_message(self, format, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def host(self, name: str) -> FakeHostReport:
        return self.hosts.setdefault(name, FakeHostReport(name))

    def evaluate(self, query: str) -> dict:
        now = time.time()
        if query == "vector(1)":
            result = [{"metric": {}, "value": [now, "1"]}]
        else:
            m = SELECTOR.search(query)
            if m is None:
                return {"status": "error", "errorType": "bad_data", "error": f"fake cannot parse {query!r}"}
            metric, target, lun, me = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            result = []
            for h in self.hosts.values():
                if h.host == me:
                    continue
                labels = {"job": "iscsimple", "instance": f"{h.host}:9977", "host": h.host}
                if metric == "iscsimple_lun_stale_since_seconds":
                    unreadable = h.up and h.records_readable is False
                    if unreadable and "(iscsimple_stale_records_readable == 0)" not in query:
                        continue  # its agent exports no stale series now: only its last report tells
                    for (t, n, label), since in h.stale.items():
                        if (t, n) == (target, lun):
                            series = {**labels, "target": t, "lun": str(n), "label": label, "domain": "vm"}
                            series["__name__"] = metric
                            if not h.up:
                                series["iscsimple_last_report"] = "down"
                            elif unreadable:
                                series["iscsimple_last_report"] = "records_unreadable"
                            result.append({"metric": series, "value": [now, repr(since)]})
                    if unreadable and '__name__=~"iscsimple_lun_.+"' in query:
                        for t, n, label in sorted(h.attached):
                            if (t, n) == (target, lun):
                                series = {**labels, "label": label, "domain": "vm"}
                                series["iscsimple_last_report"] = "unknown"
                                result.append({"metric": series, "value": [now, "1"]})
                elif metric == "iscsimple_lun_attached" and h.up:
                    for t, n, label in h.attached:
                        if (t, n) == (target, lun):
                            series = {
                                "__name__": metric,
                                **labels,
                                "target": t,
                                "lun": str(n),
                                "label": label,
                            }
                            result.append({"metric": series, "value": [now, "1"]})
        return {"status": "success", "data": {"resultType": "vector", "result": result}}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
