"""The exporter-toolkit web configuration file (``--web.config.file``).

The same YAML format node_exporter and every official exporter read, so operators
can reuse theirs::

    tls_server_config:
      cert_file: agent.crt        # relative paths are relative to this file
      key_file: agent.key
      client_ca_file: ca.crt      # optional, with client_auth_type
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}
    basic_auth_users:
      prometheus: $2y$10$...      # bcrypt hash, e.g. from `htpasswd -nBC 10 "" | tr -d ':\\n'`

Unknown keys are errors, as in the toolkit: a typo must not silently turn TLS off.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import yaml

from iscsimple.core.errors import InputError

_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_auth_type",
    "min_version",
    "max_version",
    "cipher_suites",
    "curve_preferences",
    "prefer_server_cipher_suites",
    "client_allowed_sans",
}
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


class WebConfigError(InputError):
    """The web config file is wrong; the message says which key and what to do."""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _TLS_VERSIONS[self.min_version]
        if self.max_version:
            ctx.maximum_version = _TLS_VERSIONS[self.max_version]
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(
                f"cannot load the TLS certificate {self.cert_file} / key {self.key_file}: {e}"
            ) from None
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(self.client_ca_file)
            except (OSError, ssl.SSLError) as e:
                raise WebConfigError(f"cannot load client_ca_file {self.client_ca_file}: {e}") from None
        return ctx


@dataclass
class WebConfig:
    tls: TlsConfig | None = None
    headers: dict[str, str] = field(default_factory=dict)
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    _cache: dict[tuple[str, bytes], bool] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def auth_required(self) -> bool:
        return bool(self.users)

    @property
    def cleartext_passwords(self) -> bool:
        """Allowed, as in the toolkit, but the agent warns: passwords then cross the network in clear."""
        return bool(self.users) and self.tls is None

    def check_password(self, user: str, password: str) -> bool:
        """bcrypt is slow on purpose (~50 ms); remember verdicts so scrapes stay fast,
        keyed by a hash of the password so no plain password is kept in memory."""
        key = (user, hashlib.sha256(password.encode()).digest())
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        hashed = self.users.get(user)
        if hashed is None:
            # Spend the same time as for a real user so user names cannot be probed.
            bcrypt.checkpw(password.encode(), _DUMMY_HASH)
            ok = False
        else:
            try:
                ok = bcrypt.checkpw(password.encode(), hashed)
            except ValueError:
                ok = False
        with self._lock:
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[key] = ok
        return ok

    def check_header(self, authorization: str | None) -> bool:
        if not self.users:
            return True
        if not authorization or not authorization.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        if not sep:
            return False
        ok = self.check_password(user, password)
        # Compare the user too in constant time (the dict lookup above is not).
        return ok and any(hmac.compare_digest(user, u) for u in self.users)


_DUMMY_HASH = bcrypt.hashpw(b"iscsimple-dummy", bcrypt.gensalt(rounds=10))


def load_web_config(path: Path) -> WebConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise WebConfigError(f"cannot read --web.config.file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise WebConfigError(f"--web.config.file {path} is not valid YAML: {e}") from None
    if data is None:
        return WebConfig()
    if not isinstance(data, dict):
        raise WebConfigError(f"{path}: expected a mapping with tls_server_config / basic_auth_users")
    unknown = set(data) - {"tls_server_config", "http_server_config", "basic_auth_users"}
    if unknown:
        raise WebConfigError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
            "allowed: tls_server_config, http_server_config, basic_auth_users"
        )
    config = WebConfig()
    base = path.parent
    tls = data.get("tls_server_config")
    if tls:
        config.tls = _parse_tls(path, base, tls)
    http = data.get("http_server_config") or {}
    if not isinstance(http, dict) or set(http) - {"http2", "headers"}:
        raise WebConfigError(f"{path}: http_server_config takes only 'http2' and 'headers'")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise WebConfigError(f"{path}: http_server_config.headers must be a mapping of header: value")
    config.headers = {str(k): str(v) for k, v in headers.items()}
    users = data.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise WebConfigError(f"{path}: basic_auth_users must be a mapping of user: bcrypt-hash")
    for user, hashed in users.items():
        hashed = str(hashed)
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(
                f"{path}: basic_auth_users.{user} is not a bcrypt hash; "
                "make one with: htpasswd -nBC 10 '' | tr -d ':\\n'"
            )
        config.users[str(user)] = hashed.encode()
    return config


def _parse_tls(path: Path, base: Path, tls: object) -> TlsConfig:
    if not isinstance(tls, dict):
        raise WebConfigError(f"{path}: tls_server_config must be a mapping")
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise WebConfigError(f"{path}: unknown tls_server_config key(s) {', '.join(sorted(unknown))}")
    for key in ("cert_file", "key_file"):
        if not tls.get(key):
            raise WebConfigError(
                f"{path}: tls_server_config needs both cert_file and key_file ({key} missing)"
            )
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{path}: client_auth_type {auth!r} is not one of {', '.join(_CLIENT_AUTH)}")
    for key in ("min_version", "max_version"):
        if tls.get(key) is not None and tls[key] not in _TLS_VERSIONS:
            raise WebConfigError(f"{path}: {key} {tls[key]!r} is not one of {', '.join(_TLS_VERSIONS)}")
    if auth in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven") and not tls.get("client_ca_file"):
        raise WebConfigError(f"{path}: client_auth_type {auth} needs client_ca_file")

    def resolve(value: object) -> Path:
        p = Path(str(value))
        return p if p.is_absolute() else base / p

    config = TlsConfig(
        cert_file=resolve(tls["cert_file"]),
        key_file=resolve(tls["key_file"]),
        client_ca_file=resolve(tls["client_ca_file"]) if tls.get("client_ca_file") else None,
        client_auth_type=auth,
        min_version=tls.get("min_version") or "TLS12",
        max_version=tls.get("max_version"),
    )
    config.context()  # fail at start-up, not at the first scrape
    return config
