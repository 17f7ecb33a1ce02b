"""The agent's HTTP server: landing page, /metrics, /-/healthy, /-/ready.

One asyncio event loop, in one thread, does all the socket work: accepting, TLS
handshakes, reading requests, writing responses. A connection costs a coroutine
and a socket, not a thread, so a burst of a thousand scrapers or clients that
dribble their request a byte at a time (slowloris) tie up no worker; every phase
(handshake, request head, idle keep-alive, response write) has a deadline, and the
number of open connections is capped well below the file descriptor limit, so a
flood cannot starve the agent's own reads of the host.

The endpoints (the agent's callables) run in the loop: they serve bodies the refresh
thread rendered from the last snapshot, so a scrape never reads the host and cannot
hang on a dead iSCSI disk, and costs a lookup and a socket write (handing each request
to a worker thread cost 3 ms a scrape on a loaded 2-core host, for nothing). bcrypt is
the one slow thing: checks run in a one-thread pool, as exporter-toolkit serialises
them behind a mutex, with verdicts cached (webconfig.BasicAuth), so clients with wrong
passwords use at most one core between them and never delay a client whose
credentials are cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import logging
import os
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

from iscsimple import __version__ as VERSION

from .webconfig import WebConfig

log = logging.getLogger(__name__)

SERVER = f"iscsimple-agent/{VERSION}"
TEXT = "text/plain; charset=utf-8"

# A response body: bytes; a list of byte strings; or any iterable of byte strings whose len()
# is its length in bytes (exposition.PlainBody, GzipBody: written as they are, never joined).
Body = bytes | list[bytes] | Sized


@dataclass(frozen=True)
class Limits:
    """Deadlines and bounds of the server; the defaults suit a Prometheus scraping every 15 s to 5 min."""

    # Linux caps the accept queue at net.core.somaxconn (4096 since 5.4).
    backlog: int = 4096
    # Open connections, counting those still in their handshake. At the cap the longest
    # waiting idle or unfinished one is dropped for the newcomer.
    max_connections: int = 10_000
    # Connect to the end of the first request head; from the first byte of a later one.
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0
    # Longer than any sane scrape interval, so Prometheus keeps its connection.
    idle_timeout: float = 330.0
    write_timeout: float = 30.0
    # Password checks queued behind the one bcrypt running; beyond, 503 at once.
    max_pending_password_checks: int = 64
    max_head_bytes: int = 16 * 1024
    max_headers: int = 100


@dataclass
class Endpoints:
    """What the server asks the agent for; plain callables so tests can serve anything.

    They are called in the server's event loop and must answer at once, from what is
    already rendered: while one runs, no other client is served (a slow call is logged)."""

    # (Accept header, gzip wanted) -> (body, content type); the body is already gzipped if asked.
    # A body given as pieces is written as it is, never joined whole (a plain body is megabytes).
    metrics: Callable[[str, bool], tuple[Body, str]]
    healthy: Callable[[], tuple[bool, str]]
    ready: Callable[[], tuple[bool, str]]
    summary: Callable[[], str] = lambda: ""


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return False  # HTTP/1.0 clients get one response per connection

    @property
    def has_body(self) -> bool:
        return "transfer-encoding" in self.headers or self.headers.get("content-length", "0").strip() != "0"


class _Connection:
    """An open connection and what it is doing, for the cap's choice of whom to drop."""

    __slots__ = ("busy", "since", "writer")

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.busy = False
        self.since = time.monotonic()


class AgentHTTPServer:
    """Listens at construction (so a busy port fails at once); serve_in_thread() starts serving."""

    def __init__(
        self,
        address: tuple[str, int],
        endpoints: Endpoints,
        web_config: WebConfig | None = None,
        limits: Limits | None = None,
    ):
        self.endpoints = endpoints
        self.web_config = web_config or WebConfig()
        self.limits = limits or Limits()
        self.ssl_context: ssl.SSLContext | None = (
            self.web_config.tls.context() if self.web_config.tls else None
        )
        self.socket = _listen(address, self.limits.backlog)
        self.server_address = self.socket.getsockname()
        self.address_family = self.socket.family
        self.max_connections = min(self.limits.max_connections, _connection_budget())
        self._connections: dict[asyncio.StreamWriter, _Connection] = {}
        self._password_checks: dict[bytes, asyncio.Future[bool]] = {}
        self._bcrypt_pool = ThreadPoolExecutor(
            1, thread_name_prefix="http-bcrypt", initializer=_yield_the_cpu_to_other_threads
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.ssl_context else "http"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"

    # -- running ------------------------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._stopped.set()

    def serve_in_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self._thread

    def shutdown(self) -> None:
        """Stop serving and close every connection; returns when the loop has ended."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
            self._stopped.wait(10)

    def server_close(self) -> None:
        self.socket.close()
        self._bcrypt_pool.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(
            self._connected, sock=self.socket, backlog=self.limits.backlog, limit=self.limits.max_head_bytes
        )
        self._started.set()
        async with server:
            await self._stop.wait()
            server.close()
            for writer in list(self._connections):
                writer.transport.abort()
        await asyncio.sleep(0)  # let the aborted connections' tasks finish

    # -- one connection -----------------------------------------------------------------

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        if len(self._connections) >= self.max_connections and not self._drop_a_waiting_connection():
            log.debug("connection from %s refused: %d connections open", peer, len(self._connections))
            writer.transport.abort()
            return
        conn = self._connections[writer] = _Connection(writer)
        clean = False
        try:
            await self._converse(conn, reader, writer, peer)
            clean = True
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            log.debug("connection from %s ended: %s", peer, e.__class__.__name__)
        except OSError as e:
            log.debug("connection from %s ended: %s", peer, e)
        except Exception:
            log.exception("connection from %s failed", peer)
        finally:
            self._connections.pop(writer, None)
            if clean:
                writer.close()
            else:  # no TLS goodbye to a client that timed out or broke the protocol
                writer.transport.abort()

    def _drop_a_waiting_connection(self) -> bool:
        waiting = [c for c in self._connections.values() if not c.busy]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.since)
        del self._connections[oldest.writer]  # counted out now, not when its task has ended
        oldest.writer.transport.abort()
        return True

    async def _converse(
        self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        limits = self.limits
        # From connect to the end of the first request head: the handshake and the request
        # share one deadline, so a client that connects and says nothing is gone in time.
        async with asyncio.timeout(limits.handshake_timeout):
            if self.ssl_context is not None:
                await writer.start_tls(self.ssl_context)
            request = await self._next_request(reader, b"")
        while request is not None:
            conn.busy = True
            if isinstance(request, _BadRequest):
                body = f"{request}\n".encode()
                await self._write(
                    writer, _response(request.status, body, TEXT, False, self.web_config.headers, True)
                )
                return
            close = not request.keep_alive or request.has_body  # a body we do not read ends the connection
            await self._write(writer, await self._respond(request, close))
            log.debug("%s %s %s", peer, request.method, request.path)
            if close:
                return
            conn.busy, conn.since = False, time.monotonic()
            async with asyncio.timeout(limits.idle_timeout):
                start = await reader.read(1)
            if not start:
                return
            async with asyncio.timeout(limits.request_timeout):
                request = await self._next_request(reader, start)

    async def _next_request(
        self, reader: asyncio.StreamReader, start: bytes
    ) -> _Request | _BadRequest | None:
        """The next request, what is wrong with it, or None if the client closed before sending one."""
        try:
            head = await self._read_head(reader, start)
            return None if head is None else _parse_head(head)
        except _BadRequest as e:
            return e

    async def _read_head(self, reader: asyncio.StreamReader, start: bytes) -> list[bytes] | None:
        """The request line and header lines, or None if the client closed before sending one."""
        lines: list[bytes] = []
        size = 0
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                raise _BadRequest(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request header too large"
                ) from None
            if start:
                line, start = start + line, b""
            if not line:
                if lines:
                    raise _BadRequest(HTTPStatus.BAD_REQUEST, "the request ended in its header")
                return None
            if not line.endswith(b"\n"):
                raise _BadRequest(HTTPStatus.BAD_REQUEST, "the request ended in its header")
            size += len(line)
            if size > self.limits.max_head_bytes or len(lines) > self.limits.max_headers:
                raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request header too large")
            if line in (b"\r\n", b"\n"):
                if lines:
                    return lines
                continue  # blank lines before the request line are tolerated (RFC 9112 2.2)
            lines.append(line.rstrip(b"\r\n"))

    async def _write(self, writer: asyncio.StreamWriter, data: bytes | Iterable[bytes]) -> None:
        if isinstance(data, bytes):
            writer.write(data)
            async with asyncio.timeout(self.limits.write_timeout):
                await writer.drain()
            return
        # Pieces: a few hundred KiB at a time, each waiting for the socket to take the one before,
        # so a response never holds a copy of the whole body (nor does the transport's buffer).
        async with asyncio.timeout(self.limits.write_timeout):
            for chunk in _coalesced(data, WRITE_CHUNK):
                writer.write(chunk)
                await writer.drain()

    # -- one request --------------------------------------------------------------------

    async def _respond(self, request: _Request, close: bool) -> bytes | Iterable[bytes]:
        head = request.method == "HEAD"
        extra = self.web_config.headers

        def reply(
            status: HTTPStatus, body: Body, content_type: str = TEXT, more: dict | None = None
        ) -> bytes | Iterable[bytes]:
            return _response(status, body, content_type, head, {**extra, **(more or {})}, close)

        auth = self.web_config.auth
        if auth.required:
            verdict = await self._check_credentials(request.headers.get("authorization"))
            if verdict is None:
                return reply(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    b"Too many logins being checked; retry\n",
                    more={"Retry-After": "1"},
                )
            if not verdict:
                return reply(
                    HTTPStatus.UNAUTHORIZED,
                    b"Unauthorized\n",
                    more={"WWW-Authenticate": 'Basic realm="iscsimple-agent"'},
                )
        if request.method not in ("GET", "HEAD"):
            return reply(HTTPStatus.METHOD_NOT_ALLOWED, b"Only GET and HEAD\n", more={"Allow": "GET, HEAD"})
        endpoints = self.endpoints
        path = request.path
        try:
            if path == "/metrics":
                gzipped = accepts_gzip(request.headers.get("accept-encoding", ""))
                body, content_type = _call(endpoints.metrics, request.headers.get("accept", ""), gzipped)
                return reply(
                    HTTPStatus.OK, body, content_type, {"Content-Encoding": "gzip"} if gzipped else None
                )
            if path in ("/-/healthy", "/-/ready"):
                ok, text = _call(endpoints.healthy if path == "/-/healthy" else endpoints.ready)
                return reply(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, (text + "\n").encode())
            if path == "/":
                summary = _call(endpoints.summary)
                return reply(HTTPStatus.OK, _landing_page(summary).encode(), "text/html; charset=utf-8")
        except Exception:
            log.exception("%s failed", path)
            return reply(HTTPStatus.INTERNAL_SERVER_ERROR, b"Internal error: see the agent's log\n")
        return reply(HTTPStatus.NOT_FOUND, b"Not found: try /metrics\n")

    async def _check_credentials(self, authorization: str | None) -> bool | None:
        """True or False; None when too many unverified logins already wait for bcrypt."""
        auth = self.web_config.auth
        credentials = auth.parse_header(authorization)
        if credentials is None:
            return False
        key = auth.cache_key(*credentials)
        verdict = auth.cached(key)
        if verdict is not None:
            return verdict
        pending = self._password_checks.get(key)
        if pending is None:  # the same credentials on many connections cost one bcrypt
            if len(self._password_checks) >= self.limits.max_pending_password_checks:
                return None
            pending = asyncio.ensure_future(
                asyncio.get_running_loop().run_in_executor(self._bcrypt_pool, auth.verify, *credentials)
            )
            self._password_checks[key] = pending
            pending.add_done_callback(lambda _: self._password_checks.pop(key, None))
        return await asyncio.shield(pending)


SLOW_ENDPOINT = 0.1


def _call(function, *args):
    began = time.monotonic()
    try:
        return function(*args)
    finally:
        took = time.monotonic() - began
        if took > SLOW_ENDPOINT:
            log.warning(
                "%s took %.0f ms in the HTTP server's loop; it must serve prerendered data",
                function,
                took * 1000,
            )


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether gzip is acceptable by the header's q-values (RFC 9110 12.5.3); `gzip;q=0` refuses it."""
    explicit: float | None = None
    wildcard: float | None = None
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:  # also rejects nan
                    q = 0.0
        coding = coding.lower()
        if coding in ("gzip", "x-gzip"):
            explicit = q if explicit is None else max(explicit, q)
        elif coding == "*":
            wildcard = q
    if explicit is not None:
        return explicit > 0
    return wildcard is not None and wildcard > 0


def _parse_head(lines: list[bytes]) -> _Request:
    try:
        request_line = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "the request line is not ASCII") from None
    parts = request_line.split()
    if len(parts) != 3:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "expected: METHOD /path HTTP/1.1")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.0 or HTTP/1.1 only")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name or b"\t" in name:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return _Request(method, target.split("?", 1)[0], version, headers)


def _response(
    status: HTTPStatus,
    body: Body,
    content_type: str,
    head: bool,
    headers: dict[str, str],
    close: bool,
) -> bytes | Iterable[bytes]:
    length = sum(map(len, body)) if isinstance(body, list) else len(body)
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Server: {SERVER}",
        f"Date: {formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
    ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if close:
        lines.append("Connection: close")
    # Headers and body leave in one write: split, Nagle + the client's delayed ACK cost ~40 ms
    # (pieces: the headers leave with the first of them, see _coalesced).
    top = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if head:
        return top
    return top + body if isinstance(body, bytes) else itertools.chain((top,), body)


# Bytes of a body in pieces written at once. Under glibc's mmap threshold (128 KiB at first): a
# bigger run is mmapped, and freeing it raises the threshold, after which runs come from the heap
# and the resident memory keeps what they took.
WRITE_CHUNK = 64 * 1024


def _coalesced(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The pieces joined into runs of at least `size` bytes (the last one shorter), in order."""
    run: list[bytes] = []
    length = 0
    for piece in pieces:
        run.append(piece)
        length += len(piece)
        if length >= size:
            yield b"".join(run)
            run, length = [], 0
    if run:
        yield b"".join(run)


def _listen(address: tuple[str, int], backlog: int) -> socket.socket:
    host, port = address
    if host == "":  # all addresses, IPv4 and IPv6, as Go's ":PORT" does
        host = "::" if socket.has_ipv6 else "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _yield_the_cpu_to_other_threads() -> None:
    """Run this thread at the lowest CPU priority (Linux: a thread has its own nice value).

    Wrong passwords keep the bcrypt thread busy; at nice 19 it takes only the CPU the
    event loop (and the rest of the host) leaves, so scrapes stay fast on a busy host."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _connection_budget() -> int:
    """Connections the descriptor limit allows, leaving room for the agent's own reads of the host.

    The soft limit is raised to the hard one first, as Go's runtime does for every Go
    exporter (systemd's default soft limit is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(64, soft - 256) if soft != resource.RLIM_INFINITY else 1 << 20


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
