"""The real HTTP server with the exporter-toolkit web config: TLS and bcrypt basic auth."""

from __future__ import annotations

import base64
import gzip
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import bcrypt
import pytest
import requests

from iscsimple.exporter.web import AgentHTTPServer, Endpoints
from iscsimple.exporter.webconfig import BasicAuth, WebConfig, WebConfigError, load_web_config

PASSWORD = "s3cret-scrape"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "agent.crt", d / "agent.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def write_config(directory: Path, tls_files, users=True) -> Path:
    cert, key = tls_files
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    text = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    if users:
        # Go's htpasswd writes $2y$; bcrypt libraries treat it like $2b$.
        text += f"basic_auth_users:\n  prometheus: '{hashed.replace('$2b$', '$2y$', 1)}'\n"
    text += "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    path = directory / "web.yml"
    path.write_text(text)
    return path


@pytest.fixture
def server(tmp_path, tls_files):
    config = load_web_config(write_config(tmp_path, tls_files))
    endpoints = Endpoints(
        metrics=lambda accept, gzipped: (
            gzip.compress(b"iscsimple_up 1\n") if gzipped else b"iscsimple_up 1\n",
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        healthy=lambda: (True, "Healthy"),
        ready=lambda: (True, "Ready"),
    )
    srv = AgentHTTPServer(("127.0.0.1", 0), endpoints, config)
    srv.serve_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_tls_and_basic_auth(server, tls_files):
    cert, _ = tls_files
    url = server.url
    assert url.startswith("https://127.0.0.1:")
    ok = requests.get(f"{url}/metrics", auth=("prometheus", PASSWORD), verify=str(cert), timeout=10)
    assert ok.status_code == 200
    assert ok.text == "iscsimple_up 1\n"
    assert ok.headers["X-Frame-Options"] == "deny"
    for auth in (None, ("prometheus", "wrong"), ("nobody", PASSWORD)):
        r = requests.get(f"{url}/metrics", auth=auth, verify=str(cert), timeout=10)
        assert r.status_code == 401, auth
        assert r.headers["WWW-Authenticate"].startswith("Basic")
        assert "iscsimple_up" not in r.text
    # Health endpoints are protected too (as in exporter-toolkit).
    assert requests.get(f"{url}/-/healthy", verify=str(cert), timeout=10).status_code == 401
    r = requests.get(f"{url}/-/healthy", auth=("prometheus", PASSWORD), verify=str(cert), timeout=10)
    assert (r.status_code, r.text) == (200, "Healthy\n")


def test_plain_http_to_the_tls_port_gets_nothing(server):
    port = server.server_address[1]
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", auth=("prometheus", PASSWORD), timeout=5)


def test_client_that_never_handshakes_does_not_block_others(server, tls_files):
    cert, _ = tls_files
    idle = socket.create_connection(server.server_address[:2])
    try:
        r = requests.get(f"{server.url}/metrics", auth=("prometheus", PASSWORD), verify=str(cert), timeout=5)
        assert r.status_code == 200
    finally:
        idle.close()


def test_untrusted_certificate_is_refused_by_a_verifying_client(server):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server.url}/metrics", timeout=5)  # system CAs do not know our cert


@pytest.mark.parametrize(
    "text, message",
    [
        ("tls_server_config:\n  cert_file: a.crt\n", "cert_file and key_file"),
        ("basic_auth_users:\n  prom: plaintext\n", "not a bcrypt hash"),
        ("tls_config:\n  cert_file: a\n", "unknown key"),
        (
            "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
            "cannot load the TLS certificate",
        ),
        ("tls_server_config: [\n", "not valid YAML"),
    ],
)
def test_bad_web_configs_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(WebConfigError, match=message):
        load_web_config(path)


def test_relative_paths_are_relative_to_the_config_file(tmp_path, tls_files):
    cert, key = tls_files
    (tmp_path / "c.crt").write_bytes(cert.read_bytes())
    (tmp_path / "k.key").write_bytes(key.read_bytes())
    path = tmp_path / "web.yml"
    path.write_text("tls_server_config:\n  cert_file: c.crt\n  key_file: k.key\n  min_version: TLS13\n")
    config = load_web_config(path)
    assert config.tls.cert_file == tmp_path / "c.crt"
    assert config.tls.context().minimum_version == ssl.TLSVersion.TLSv1_3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_agent_serves_tls_with_auth(tmp_path, tls_files):
    """The installed entry point, as systemd would run it, against a simulated host."""
    from iscsimple.exporter.simhost import SimulatedHost

    host = SimulatedHost(tmp_path / "host")
    host.attach("web1-disk", "web1", "iqn.2003-01.org.example:filer", 1)
    cert, _ = tls_files
    port = _free_port()
    p = host.paths
    proc = subprocess.Popen(
        [
            sys.executable, "-c", "from iscsimple.exporter.agent import main; raise SystemExit(main())",
            "--web.listen-address", f"127.0.0.1:{port}",
            "--web.config.file", str(write_config(tmp_path, tls_files)),
            "--path.procfs", str(p.procfs), "--path.sysfs", str(p.sysfs),
            "--path.state", str(p.state), "--path.records", str(p.records),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = requests.get(
                    f"https://127.0.0.1:{port}/metrics",
                    auth=("prometheus", PASSWORD),
                    verify=str(cert),
                    timeout=5,
                )
                break
            except requests.exceptions.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert r.status_code == 200
        assert 'iscsimple_array_unprotected{domain="web1",label="web1-disk"} 1.0' in r.text
        assert "iscsimple_up 1.0" in r.text
        assert (
            requests.get(f"https://127.0.0.1:{port}/metrics", verify=str(cert), timeout=5).status_code == 401
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out.decode()
    assert b"listening on https://127.0.0.1" in out


def test_empty_host_listens_on_ipv4_and_ipv6():
    endpoints = Endpoints(
        metrics=lambda accept, gzipped: (b"x 1\n", "text/plain"),
        healthy=lambda: (True, "Healthy"),
        ready=lambda: (True, "Ready"),
    )
    try:
        srv = AgentHTTPServer(("", 0), endpoints)
    except OSError as e:
        pytest.fail(f"cannot listen on all addresses: {e}")
    srv.serve_in_thread()
    try:
        port = srv.server_address[1]
        assert requests.get(f"http://127.0.0.1:{port}/-/healthy", timeout=5).text == "Healthy\n"
        if srv.address_family == socket.AF_INET6:
            assert requests.get(f"http://[::1]:{port}/-/ready", timeout=5).text == "Ready\n"
    finally:
        srv.shutdown()
        srv.server_close()


# -- basic auth: bytes, cache, and what wrong passwords may cost ---------------------------------


def serving(config: WebConfig, limits=None) -> AgentHTTPServer:
    """A started server whose /metrics says `x 1`."""
    endpoints = Endpoints(
        metrics=lambda accept, gzipped: (gzip.compress(b"x 1\n") if gzipped else b"x 1\n", "text/plain"),
        healthy=lambda: (True, "Healthy"),
        ready=lambda: (True, "Ready"),
    )
    srv = AgentHTTPServer(("127.0.0.1", 0), endpoints, config, limits=limits)
    srv.serve_in_thread()
    return srv


def plain_server(users: dict[str, bytes], limits=None) -> AgentHTTPServer:
    return serving(WebConfig(auth=BasicAuth(users)), limits)


def bcrypt_hash(password: bytes) -> bytes:
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds=4))


def test_a_non_ascii_user_name_locks_nobody_out(tmp_path, tls_files):
    cert, key = tls_files
    green = bcrypt_hash("grün".encode()).decode()
    (tmp_path / "web.yml").write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "basic_auth_users:\n"
        f"  jürgen: '{green}'\n"
        f"  prometheus: '{bcrypt_hash(PASSWORD.encode()).decode()}'\n",
        encoding="utf-8",
    )
    srv = serving(load_web_config(tmp_path / "web.yml"))
    try:
        url = f"{srv.url}/metrics"
        for auth in ((b"prometheus", PASSWORD.encode()), ("jürgen".encode(), "grün".encode())):
            r = requests.get(url, auth=auth, verify=str(cert), timeout=10)
            assert (r.status_code, r.text) == (200, "x 1\n"), auth
        for auth in (
            (b"j\xfcrgen", "grün".encode()),
            ("jürgen".encode(), b"gr\xfcn"),
        ):  # latin-1: other bytes
            assert requests.get(url, auth=auth, verify=str(cert), timeout=10).status_code == 401
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_password_that_is_not_utf8_is_compared_as_bytes():
    srv = plain_server({"prometheus": bcrypt_hash(b"p\xe4ss")})
    try:
        url = f"{srv.url}/metrics"
        assert requests.get(url, auth=(b"prometheus", b"p\xe4ss"), timeout=5).status_code == 200
        assert requests.get(url, auth=(b"prometheus", b"p\xc3\xa4ss"), timeout=5).status_code == 401
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    "header, parsed",
    [
        ("Basic " + base64.b64encode(b"u:p:w").decode(), (b"u", b"p:w")),
        ("basic " + base64.b64encode(b"u:").decode(), (b"u", b"")),
        ("BASIC  " + base64.b64encode(b"\xff:\x00").decode(), (b"\xff", b"\x00")),
        ("Basic " + base64.b64encode(b"no-colon").decode(), None),
        ("Basic not base64!", None),
        ("Basic ü", None),
        ("Bearer abc", None),
        ("", None),
        (None, None),
    ],
)
def test_authorization_headers_are_parsed_as_bytes(header, parsed):
    assert BasicAuth.parse_header(header) == parsed


class CountingCheckpw:
    """bcrypt.checkpw that records how many run at once and with which passwords."""

    def __init__(self, real, delay: float = 0.0, gate: threading.Event | None = None):
        self.real, self.delay, self.gate = real, delay, gate
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.passwords: list[bytes] = []

    def __call__(self, password, hashed):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.passwords.append(password)
        try:
            if self.gate is not None:
                self.gate.wait(10)
            time.sleep(self.delay)
            return self.real(password, hashed)
        finally:
            with self.lock:
                self.running -= 1


def test_wrong_passwords_get_one_bcrypt_at_a_time_and_never_a_cached_good_client(monkeypatch, tls_files):
    checkpw = CountingCheckpw(bcrypt.checkpw, delay=0.02)
    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    srv = plain_server({"prometheus": bcrypt_hash(PASSWORD.encode())})
    url = f"{srv.url}/metrics"
    try:
        good = requests.Session()
        assert good.get(url, auth=("prometheus", PASSWORD), timeout=10).status_code == 200
        statuses: list[int] = []

        def hammer(n: int) -> None:
            with requests.Session() as s:
                for i in range(6):
                    statuses.append(s.get(url, auth=("prometheus", f"wrong-{n}-{i}"), timeout=30).status_code)

        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        good_statuses = [
            good.get(url, auth=("prometheus", PASSWORD), timeout=10).status_code for _ in range(20)
        ]
        for t in threads:
            t.join(60)
    finally:
        srv.shutdown()
        srv.server_close()
    assert good_statuses == [200] * 20
    assert sorted(set(statuses)) == [401] and len(statuses) == 72
    assert checkpw.most == 1
    assert checkpw.passwords.count(PASSWORD.encode()) == 1  # later good scrapes came from the cache


def test_the_same_unverified_credentials_on_many_connections_cost_one_bcrypt(monkeypatch):
    gate = threading.Event()
    checkpw = CountingCheckpw(bcrypt.checkpw, gate=gate)
    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    srv = plain_server({"prometheus": bcrypt_hash(PASSWORD.encode())})
    try:
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    requests.get(f"{srv.url}/metrics", auth=("prometheus", "wrong"), timeout=10).status_code
                )
            )
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)
        gate.set()
        for t in threads:
            t.join(20)
    finally:
        gate.set()
        srv.shutdown()
        srv.server_close()
    assert results == [401] * 8
    assert checkpw.passwords == [b"wrong"]


def test_too_many_logins_waiting_for_bcrypt_get_503_at_once(monkeypatch):
    from iscsimple.exporter.web import Limits

    gate = threading.Event()
    monkeypatch.setattr(bcrypt, "checkpw", CountingCheckpw(bcrypt.checkpw, gate=gate))
    srv = plain_server({"prometheus": bcrypt_hash(PASSWORD.encode())}, Limits(max_pending_password_checks=1))
    try:
        waiting = threading.Thread(
            target=lambda: requests.get(f"{srv.url}/metrics", auth=("prometheus", "first"), timeout=10)
        )
        waiting.start()
        time.sleep(0.3)
        r = requests.get(f"{srv.url}/metrics", auth=("prometheus", "second"), timeout=5)
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
    finally:
        gate.set()
        waiting.join(10)
        srv.shutdown()
        srv.server_close()


def test_failed_logins_never_push_a_good_login_out_of_the_cache(monkeypatch):
    checkpw = CountingCheckpw(lambda password, hashed: password == b"right")
    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    auth = BasicAuth({"prometheus": bcrypt_hash(b"right")})
    good = "Basic " + base64.b64encode(b"prometheus:right").decode()
    assert auth.check_header(good)
    for i in range(3 * BasicAuth.BAD_ENTRIES):
        assert not auth.check_header("Basic " + base64.b64encode(f"prometheus:wrong{i}".encode()).decode())
    assert auth.check_header(good)
    assert checkpw.passwords.count(b"right") == 1
    assert len(auth._bad) <= BasicAuth.BAD_ENTRIES and len(auth._good) <= BasicAuth.GOOD_ENTRIES
    # A wrong password seen before costs no second bcrypt.
    calls = len(checkpw.passwords)
    assert not auth.check_header(
        "Basic " + base64.b64encode(f"prometheus:wrong{3 * BasicAuth.BAD_ENTRIES - 1}".encode()).decode()
    )
    assert len(checkpw.passwords) == calls


def test_an_unknown_user_costs_a_bcrypt_like_a_known_one(monkeypatch):
    checkpw = CountingCheckpw(bcrypt.checkpw)
    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    auth = BasicAuth({"prometheus": bcrypt_hash(b"right")})
    assert not auth.check_header("Basic " + base64.b64encode(b"nobody:right").decode())
    assert checkpw.passwords == [b"right"]


def test_client_certificates_are_required_and_verified(tmp_path, tls_files):
    cert, key = tls_files
    ca_key, ca_crt = tmp_path / "ca.key", tmp_path / "ca.crt"
    client_key, client_csr, client_crt = tmp_path / "c.key", tmp_path / "c.csr", tmp_path / "c.crt"
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
         "-keyout", str(ca_key), "-out", str(ca_crt)],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=prometheus", "-keyout", str(client_key),
         "-out", str(client_csr)],
        ["x509", "-req", "-in", str(client_csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-out", str(client_crt)],
    ):  # fmt: skip
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)
    (tmp_path / "web.yml").write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        f"  client_ca_file: {ca_crt}\n  client_auth_type: RequireAndVerifyClientCert\n"
    )
    srv = serving(load_web_config(tmp_path / "web.yml"))
    try:
        url = f"{srv.url}/metrics"
        r = requests.get(url, cert=(str(client_crt), str(client_key)), verify=str(cert), timeout=10)
        assert (r.status_code, r.text) == (200, "x 1\n")
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url, verify=str(cert), timeout=10)
        # A certificate the CA did not sign is refused too.
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url, cert=(str(cert), str(key)), verify=str(cert), timeout=10)
    finally:
        srv.shutdown()
        srv.server_close()
