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
import functools
import hashlib
import hmac
import os
import re
import ssl
import stat
import string
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from iscsimple.core.errors import InputError
from iscsimple.core.files import kind_of, read_file

if TYPE_CHECKING:
    import yaml

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
_TLS_UNSUPPORTED = {"cipher_suites", "curve_preferences", "client_allowed_sans"}
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


# exporter-toolkit lets only these be added to responses (and pins some values), so a
# config cannot break responses with a Content-Length or smuggle in another header.
_EXTRA_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_HEADER_VALUE_CHARS = frozenset(string.printable) - set("\r\n\x0b\x0c")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_MAX_CONFIG_BYTES = 1024 * 1024


class WebConfigError(InputError):
    """The web config file is wrong; the message says which key and what to do, on one line."""

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


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


class BasicAuth:
    """basic_auth_users, checked with a cache of verdicts as exporter-toolkit keeps one.

    bcrypt is slow on purpose (~50 ms at cost 10), so verdicts are remembered under a keyed
    hash of the user, the password and the user's bcrypt hash: no password stays in memory,
    and a changed hash voids its verdicts. Successes and failures are kept apart, each
    bounded: clients trying wrong passwords only fill the failures and can never push out a
    good client's success, which would make its scrapes pay a bcrypt again. One bcrypt
    runs at a time (the toolkit holds a mutex), so wrong passwords cost at most one core.
    User names and passwords are bytes (UTF-8 in the config), compared in constant time.
    """

    GOOD_ENTRIES = 100
    BAD_ENTRIES = 1000

    def __init__(self, users: dict[str, bytes] | None = None):
        self.users: dict[bytes, bytes] = {user.encode(): hashed for user, hashed in (users or {}).items()}
        self._key = os.urandom(32)
        self._good: dict[bytes, None] = {}
        self._bad: dict[bytes, None] = {}
        self._lock = threading.Lock()
        self._bcrypt = threading.Lock()

    @property
    def required(self) -> bool:
        return bool(self.users)

    @staticmethod
    def parse_header(authorization: str | None) -> tuple[bytes, bytes] | None:
        """(user, password) from ``Basic base64(user:password)``, None if it is not that."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(token.strip().encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return None
        user, sep, password = decoded.partition(b":")
        return (user, password) if sep else None

    def cache_key(self, user: bytes, password: bytes) -> bytes:
        digest = hashlib.blake2b(key=self._key, digest_size=32)
        for part in (user, self._hash_of(user) or b"", password):
            digest.update(len(part).to_bytes(8, "big") + part)
        return digest.digest()

    def cached(self, key: bytes) -> bool | None:
        with self._lock:
            if key in self._good:
                return True
            if key in self._bad:
                return False
        return None

    def verify(self, user: bytes, password: bytes) -> bool:
        """Check with bcrypt (one check at a time) and remember the verdict."""
        key = self.cache_key(user, password)
        with self._bcrypt:
            verdict = self.cached(key)  # found meanwhile by a check of the same credentials
            if verdict is not None:
                return verdict
            hashed = self._hash_of(user)
            import bcrypt  # only an agent with basic_auth_users needs it (~0.5 MiB resident)

            try:
                # An unknown user costs the same bcrypt, so user names cannot be probed.
                ok = bcrypt.checkpw(password, hashed or _dummy_hash()) and hashed is not None
            except ValueError:  # a malformed hash, or a password bcrypt refuses (over 72 bytes)
                ok = False
        with self._lock:
            entries, limit = (self._good, self.GOOD_ENTRIES) if ok else (self._bad, self.BAD_ENTRIES)
            while len(entries) >= limit:
                del entries[next(iter(entries))]  # the oldest
            entries[key] = None
        return ok

    def check_header(self, authorization: str | None) -> bool:
        if not self.users:
            return True
        credentials = self.parse_header(authorization)
        if credentials is None:
            return False
        verdict = self.cached(self.cache_key(*credentials))
        return verdict if verdict is not None else self.verify(*credentials)

    def _hash_of(self, user: bytes) -> bytes | None:
        # Every name compared, in constant time each: how long this takes tells nothing.
        found = None
        for name, hashed in self.users.items():
            if hmac.compare_digest(name, user):
                found = hashed
        return found


@dataclass
class WebConfig:
    tls: TlsConfig | None = None
    headers: dict[str, str] = field(default_factory=dict)
    auth: BasicAuth = field(default_factory=BasicAuth)

    @property
    def auth_required(self) -> bool:
        return self.auth.required

    @property
    def cleartext_passwords(self) -> bool:
        """Allowed, as in the toolkit, but the agent warns: passwords then cross the network in clear."""
        return self.auth.required and self.tls is None

    def check_header(self, authorization: str | None) -> bool:
        return self.auth.check_header(authorization)


@functools.cache
def _dummy_hash() -> bytes:
    # Made on first use, not at import: hashing costs the agent's start-up ~0.1 s of CPU.
    import bcrypt

    return bcrypt.hashpw(b"iscsimple-dummy", bcrypt.gensalt(rounds=10))


def load_web_config(path: Path) -> WebConfig:
    """Parse --web.config.file; every problem is a one-line WebConfigError naming the file."""
    import yaml  # only with --web.config.file (~1.2 MiB resident otherwise for nothing)

    path = Path(path)
    text = _read_config(path)
    try:
        data = yaml.load(text, Loader=_strict_loader())  # a SafeLoader
    except yaml.YAMLError as e:
        raise WebConfigError(_yaml_problem(path, e)) from None
    except RecursionError:
        raise WebConfigError(f"--web.config.file {path} is nested too deeply to be a web config") from None
    except (ValueError, OverflowError) as e:  # a scalar no constructor can build: 2001-13-45, 5000 digits
        raise WebConfigError(
            f"--web.config.file {path} holds a value YAML cannot read: {str(e)[:120]}"
        ) from None
    if data is None:
        return WebConfig()
    if not isinstance(data, dict):
        raise WebConfigError(f"{path}: expected a mapping with tls_server_config / basic_auth_users")
    unknown = set(map(str, data)) - {"tls_server_config", "http_server_config", "basic_auth_users"}
    if unknown:
        raise WebConfigError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
            "allowed: tls_server_config, http_server_config, basic_auth_users"
        )
    config = WebConfig()
    tls = data.get("tls_server_config")
    if tls:
        config.tls = _parse_tls(path, path.parent, tls)
    config.headers = _parse_headers(path, data.get("http_server_config"))
    config.auth = BasicAuth(_parse_users(path, data.get("basic_auth_users")))
    return config


@functools.cache
def _strict_loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice, as Go's yaml.UnmarshalStrict does: with
        PyYAML the last one wins, so a second, empty tls_server_config would turn TLS off."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {str(key)[:80]!r} appears twice", key_node.start_mark
                    )
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _read_config(path: Path) -> str:
    try:
        data = read_file(path, max_bytes=_MAX_CONFIG_BYTES)
    except OSError as e:
        raise WebConfigError(f"cannot read --web.config.file {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WebConfigError(
            f"--web.config.file {path} is not UTF-8 text (byte {e.start}); YAML config files are UTF-8"
        ) from None


def _yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}"
    words = " ".join(filter(None, (getattr(error, "context", None), getattr(error, "problem", None))))
    return f"--web.config.file {where} is not valid YAML: {' '.join((words or str(error)).split())}"


def _parse_headers(path: Path, http: object) -> dict[str, str]:
    if http is None:
        return {}
    if not isinstance(http, dict) or set(map(str, http)) - {"http2", "headers"}:
        raise WebConfigError(f"{path}: http_server_config takes only 'http2' and 'headers'")
    if not isinstance(http.get("http2", True), bool):
        raise WebConfigError(f"{path}: http_server_config.http2 must be true or false")
    headers = http.get("headers")
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise WebConfigError(f"{path}: http_server_config.headers must be a mapping of header: value")
    parsed: dict[str, str] = {}
    for name, value in headers.items():
        canonical = next(
            (h for h in _EXTRA_HEADERS if isinstance(name, str) and h.lower() == name.lower()), None
        )
        if canonical is None:
            raise WebConfigError(
                f"{path}: http_server_config.headers: {str(name)[:80]!r} cannot be set; "
                f"allowed (as in exporter-toolkit): {', '.join(_EXTRA_HEADERS)}"
            )
        if not isinstance(value, str):
            raise WebConfigError(
                f"{path}: http_server_config.headers.{canonical} must be a string, not {_kind(value)}"
            )
        if any(c not in _HEADER_VALUE_CHARS for c in value):
            raise WebConfigError(
                f"{path}: http_server_config.headers.{canonical} must be printable ASCII on one line "
                "(no CR, LF or control characters)"
            )
        allowed = _EXTRA_HEADERS[canonical]
        if allowed and value not in allowed:
            raise WebConfigError(
                f"{path}: http_server_config.headers.{canonical} must be one of {', '.join(allowed)}"
            )
        parsed[canonical] = value.strip()
    return parsed


def _parse_users(path: Path, users: object) -> dict[str, bytes]:
    if users is None:
        return {}
    if not isinstance(users, dict):
        raise WebConfigError(f"{path}: basic_auth_users must be a mapping of user: bcrypt-hash")
    parsed: dict[str, bytes] = {}
    for user, hashed in users.items():
        if isinstance(user, bool) or not isinstance(user, str | int):
            raise WebConfigError(f"{path}: basic_auth_users: user names are strings, not {_kind(user)}")
        name = str(user)
        if ":" in name or not name:
            raise WebConfigError(f"{path}: basic_auth_users: user name {name!r} is empty or has a ':'")
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(
                f"{path}: basic_auth_users.{name} is not a bcrypt hash; "
                "make one with: htpasswd -nBC 10 '' | tr -d ':\\n'"
            )
        if not _BCRYPT_HASH.fullmatch(hashed):  # caught here, not as a 401 on every scrape
            raise WebConfigError(f"{path}: basic_auth_users.{name} is not a well-formed bcrypt hash")
        parsed[name] = hashed.encode("ascii")
    return parsed


def _kind(value: object) -> str:
    return {list: "a list", dict: "a mapping", bool: "true/false", type(None): "empty"}.get(
        type(value), type(value).__name__
    )


def _parse_tls(path: Path, base: Path, tls: object) -> TlsConfig:
    if not isinstance(tls, dict):
        raise WebConfigError(f"{path}: tls_server_config must be a mapping")
    unknown = set(map(str, tls)) - _TLS_KEYS
    if unknown:
        raise WebConfigError(f"{path}: unknown tls_server_config key(s) {', '.join(sorted(unknown))}")
    # Restrictions the agent cannot apply are refused: ignoring them would accept clients
    # (or ciphers) the operator meant to shut out.
    unsupported = sorted(set(tls) & _TLS_UNSUPPORTED)
    if unsupported:
        raise WebConfigError(
            f"{path}: tls_server_config {', '.join(unsupported)} is not supported by iscsimple-agent; "
            "remove it (the agent uses OpenSSL's defaults for TLS 1.2+)"
        )
    for key in ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version"):
        value = tls.get(key)
        if value is not None and not isinstance(value, str):
            raise WebConfigError(f"{path}: tls_server_config.{key} must be a string, not {_kind(value)}")
    for key in ("cert_file", "key_file"):
        if not tls.get(key):
            raise WebConfigError(
                f"{path}: tls_server_config needs both cert_file and key_file ({key} missing)"
            )
    auth = tls.get("client_auth_type") or "NoClientCert"
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{path}: client_auth_type {auth!r} is not one of {', '.join(_CLIENT_AUTH)}")
    for key in ("min_version", "max_version"):
        if tls.get(key) is not None and tls[key] not in _TLS_VERSIONS:
            raise WebConfigError(f"{path}: {key} {tls[key]!r} is not one of {', '.join(_TLS_VERSIONS)}")
    if auth in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven") and not tls.get("client_ca_file"):
        raise WebConfigError(f"{path}: client_auth_type {auth} needs client_ca_file")

    def resolve(key: str) -> Path:
        value = tls[key]
        if "\0" in value:
            raise WebConfigError(f"{path}: tls_server_config.{key} contains a NUL byte")
        file = Path(value) if Path(value).is_absolute() else base / value
        # ssl reads these itself: a FIFO or a device would hang the start, so refuse them first.
        what = {"cert_file": "certificate", "key_file": "key", "client_ca_file": "client CA"}[key]
        try:
            mode = file.stat().st_mode
        except OSError as e:
            raise WebConfigError(
                f"cannot load the TLS {what} {file} (tls_server_config.{key} in {path}): {e.strerror or e}"
            ) from None
        if not stat.S_ISREG(mode):
            raise WebConfigError(
                f"cannot load the TLS {what} {file} (tls_server_config.{key} in {path}): "
                f"it is {kind_of(mode)}, not a regular file"
            )
        return file

    config = TlsConfig(
        cert_file=resolve("cert_file"),
        key_file=resolve("key_file"),
        client_ca_file=resolve("client_ca_file") if tls.get("client_ca_file") else None,
        client_auth_type=auth,
        min_version=tls.get("min_version") or "TLS12",
        max_version=tls.get("max_version"),
    )
    config.context()  # fail at start-up, not at the first scrape
    return config
