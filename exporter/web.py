"""The agent's HTTP server: landing page, /metrics, /-/healthy, /-/ready.

A thread per connection (ThreadingHTTPServer), TLS and basic auth from the
exporter-toolkit web config. The TLS handshake runs in the connection's thread
with a timeout, so a client that connects and says nothing cannot stall others.
Handlers never read the host: /metrics serves the bytes rendered from the last
snapshot, which is why a scrape cannot hang on a dead iSCSI device.
"""

from __future__ import annotations

import html
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from iscsimple import __version__ as VERSION

from .webconfig import WebConfig

log = logging.getLogger(__name__)

CONNECTION_TIMEOUT = 30.0


@dataclass
class Endpoints:
    """What the server asks the agent for; plain callables so tests can serve anything."""

    # (Accept header, gzip wanted) -> (body, content type); the body is already gzipped if asked.
    metrics: Callable[[str, bool], tuple[bytes, str]]
    healthy: Callable[[], tuple[bool, str]]
    ready: Callable[[], tuple[bool, str]]
    summary: Callable[[], str] = lambda: ""


class AgentHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], endpoints: Endpoints, web_config: WebConfig | None = None):
        self.endpoints = endpoints
        self.web_config = web_config or WebConfig()
        self.ssl_context: ssl.SSLContext | None = (
            self.web_config.tls.context() if self.web_config.tls else None
        )
        host = address[0]
        if host == "":  # all addresses, IPv4 and IPv6, as Go's ":PORT" does
            address = ("::", address[1]) if socket.has_ipv6 else ("0.0.0.0", address[1])
            host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__(address, _Handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
        super().server_bind()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.ssl_context else "http"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"

    def get_request(self):
        sock, addr = self.socket.accept()
        sock.settimeout(CONNECTION_TIMEOUT)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request, client_address):
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address[0], e)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address[0], exc_info=True)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: AgentHTTPServer
    server_version = f"iscsimple-agent/{VERSION}"
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one segment: without this, Nagle + the client's delayed ACK
    # add ~40 ms to every keep-alive scrape.
    disable_nagle_algorithm = True
    wbufsize = 1 << 16

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._serve(head=False)

    def do_HEAD(self):
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        config = self.server.web_config
        if config.auth_required and not config.check_header(self.headers.get("Authorization")):
            self._send(
                401,
                b"Unauthorized\n",
                "text/plain; charset=utf-8",
                head,
                {"WWW-Authenticate": 'Basic realm="iscsimple-agent"'},
            )
            return
        path = self.path.split("?", 1)[0]
        endpoints = self.server.endpoints
        if path == "/metrics":
            gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
            body, content_type = endpoints.metrics(self.headers.get("Accept", ""), gzipped)
            self._send(200, body, content_type, head, {"Content-Encoding": "gzip"} if gzipped else None)
        elif path in ("/-/healthy", "/-/ready"):
            ok, text = endpoints.healthy() if path == "/-/healthy" else endpoints.ready()
            self._send(200 if ok else 503, (text + "\n").encode(), "text/plain; charset=utf-8", head)
        elif path == "/":
            self._send(200, _landing_page(endpoints.summary()).encode(), "text/html; charset=utf-8", head)
        else:
            self._send(404, b"Not found: try /metrics\n", "text/plain; charset=utf-8", head)

    def _send(
        self, code: int, body: bytes, content_type: str, head: bool, extra: dict[str, str] | None = None
    ):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**self.server.web_config.headers, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _landing_page(summary: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>iscsimple agent</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}}pre{{background:#f4f4f4;padding:1em}}</style>
</head><body>
<h1>iscsimple agent {html.escape(VERSION)}</h1>
<p>Watches the mirrored iSCSI disks of this Xen host: tells you when a VM runs on its local
mirror alone because iSCSI failed, when a mirror is not in sync, and when a session is down.</p>
<ul>
<li><a href="metrics">/metrics</a> &mdash; Prometheus metrics</li>
<li><a href="-/healthy">/-/healthy</a> &mdash; the agent is alive</li>
<li><a href="-/ready">/-/ready</a> &mdash; the agent has read the host at least once</li>
</ul>
<h2>Now</h2>
<pre>{html.escape(summary) or "no snapshot yet"}</pre>
</body></html>
"""
