"""Bad --web.config.file inputs: each a one-line WebConfigError naming the file, exit 2, no hang."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsimple.exporter.agent import main
from iscsimple.exporter.webconfig import WebConfigError, load_web_config

HASH = "$2y$04$Z1XUXe0FCNpZMI/w5bhT3OhxvFlnCofcBFDBqxI1zoXLeBx.QpZ1i"  # bcrypt of "x", cost 4


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=localhost", "-keyout", str(d / "k.key"), "-out", str(d / "c.crt")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return d / "c.crt", d / "k.key"


def refused(path: Path, *fragments: str) -> str:
    """load_web_config(path) must raise a one-line WebConfigError naming the file and saying `fragments`."""
    with pytest.raises(WebConfigError) as caught:
        load_web_config(path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


BAD_TEXTS = [
    # headers: lists, mappings, CR/LF, control characters, not in the allow-list, pinned values
    ("http_server_config:\n  headers:\n    X-Frame-Options: [deny]\n", "must be a string, not a list"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: {a: b}\n", "must be a string, not a mapping"),
    ('http_server_config:\n  headers:\n    X-Frame-Options: "deny\\r\\nSet-Cookie: a=b"\n', "no CR, LF"),
    ('http_server_config:\n  headers:\n    Content-Security-Policy: "a\\nb"\n', "no CR, LF"),
    ('http_server_config:\n  headers:\n    Content-Security-Policy: "a\\u0000b"\n', "control characters"),
    ('http_server_config:\n  headers:\n    Content-Security-Policy: "dé"\n', "printable ASCII"),
    ("http_server_config:\n  headers:\n    Content-Length: '0'\n", "cannot be set"),
    ("http_server_config:\n  headers:\n    Set-Cookie: a=b\n", "cannot be set"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow-all\n", "must be one of deny, sameorigin"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: true\n", "must be a string, not true/false"),
    ("http_server_config:\n  headers:\n    ? [a]\n    : b\n", "not valid YAML"),
    ("http_server_config:\n  headers: [a, b]\n", "mapping of header: value"),
    ("http_server_config:\n  headers: text\n", "mapping of header: value"),
    ("http_server_config: [headers]\n", "takes only 'http2' and 'headers'"),
    ("http_server_config:\n  http2: maybe\n", "http2 must be true or false"),
    # users
    ("basic_auth_users: [prometheus]\n", "mapping of user: bcrypt-hash"),
    ("basic_auth_users:\n  prom: plaintext\n", "not a bcrypt hash"),
    ("basic_auth_users:\n  prom: [a]\n", "not a bcrypt hash"),
    ("basic_auth_users:\n  prom: 12\n", "not a bcrypt hash"),
    ("basic_auth_users:\n  prom: $2y$10$short\n", "not a well-formed bcrypt hash"),
    ("basic_auth_users:\n  prom: $2y$99$" + "a" * 53 + "\n", "not a well-formed bcrypt hash"),
    (f"basic_auth_users:\n  'a:b': '{HASH}'\n", "has a ':'"),
    (f"basic_auth_users:\n  '': '{HASH}'\n", "is empty"),
    (f"basic_auth_users:\n  ? [a]\n  : '{HASH}'\n", "not valid YAML"),
    (f"basic_auth_users:\n  true: '{HASH}'\n", "user names are strings"),
    (f"basic_auth_users:\n  prom: '{HASH}'\nbasic_auth_users: {{}}\n", "appears twice"),
    # tls
    ("tls_server_config:\n  cert_file: a.crt\n", "cert_file and key_file"),
    ("tls_server_config: [a]\n", "must be a mapping"),
    ("tls_server_config:\n  cert_file: [a]\n  key_file: b\n", "cert_file must be a string"),
    ("tls_server_config:\n  cert_file: 5\n  key_file: b\n", "cert_file must be a string, not int"),
    (
        "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: [TLS12]\n",
        "min_version must be a string",
    ),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS99\n", "is not one of"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: {a: 1}\n", "must be a string"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Whatever\n", "is not one of"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: [x]\n", "not supported"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n", "not supported"),
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "cannot load the TLS certificate"),
    ('tls_server_config:\n  cert_file: "a\\0b"\n  key_file: k\n', "NUL"),
    ("tls_config:\n  cert_file: a\n", "unknown key"),
    ("tls_server_config:\n  cert_file: a\ntls_server_config: {}\n", "appears twice"),
    # the file as a whole
    ("[1, 2]\n", "expected a mapping"),
    ("just text\n", "expected a mapping"),
    ("tls_server_config: [\n", "not valid YAML"),
    ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("a: &x [1]\nb: *x\n", "unknown key"),
    ("[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
    ('"key\\nwith newline": 1\n', "unknown key"),
    ("\t\x01\n", "not valid YAML"),
    # scalars whose constructor raises ValueError, not a YAMLError (the agent died with a traceback)
    ("tls_server_config:\n  cert_file: 2001-13-45\n  key_file: b\n", "value YAML cannot read"),
    ("tls_server_config:\n  cert_file: " + "1" * 5000 + "\n  key_file: b\n", "value YAML cannot read"),
]


@pytest.mark.parametrize("text, fragment", BAD_TEXTS)
def test_bad_web_configs_are_one_line_errors(tmp_path, text, fragment):
    path = tmp_path / "web.yml"
    path.write_text(text, encoding="utf-8")
    refused(path, fragment)


@pytest.mark.parametrize("data", [b"\xff\xfe\x00t\x00l\x00s", b"basic_auth_users:\n  caf\xe9: x\n", b"\xc3"])
def test_a_web_config_that_is_not_utf8_is_a_one_line_error(tmp_path, data):
    path = tmp_path / "web.yml"
    path.write_bytes(data)
    refused(path, "not UTF-8")


def load_in_thread(path: Path, timeout: float = 5.0):
    """load_web_config in a thread: (result or exception, still running after `timeout`)."""
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_attempt(path)), daemon=True)
    thread.start()
    thread.join(timeout)
    return (outcome[0] if outcome else None), thread.is_alive()


def _attempt(path: Path):
    try:
        return load_web_config(path)
    except Exception as e:
        return e


def _unblock(fifo: Path) -> None:
    """Open the FIFO's other end so a reader stuck on it (the old behaviour) can finish."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def test_a_fifo_as_web_config_is_refused_before_reading(tmp_path):
    fifo = tmp_path / "web.yml"
    os.mkfifo(fifo)
    try:
        result, hung = load_in_thread(fifo)
    finally:
        _unblock(fifo)
    assert not hung, "load_web_config blocked on a FIFO"
    assert isinstance(result, WebConfigError), result
    assert "regular file" in str(result) and str(fifo) in str(result)


@pytest.mark.parametrize("which", ["cert_file", "key_file", "client_ca_file"])
def test_a_fifo_as_tls_file_is_refused_before_reading(tmp_path, tls_pair, which):
    cert, key = tls_pair
    fifo = tmp_path / "special"
    os.mkfifo(fifo)
    files = {"cert_file": cert, "key_file": key, "client_ca_file": cert, which: fifo}
    path = tmp_path / "web.yml"
    path.write_text(
        "tls_server_config:\n"
        + "".join(f"  {k}: {v}\n" for k, v in files.items())
        + "  client_auth_type: RequireAndVerifyClientCert\n"
    )
    try:
        result, hung = load_in_thread(path)
    finally:
        for _ in range(3):
            _unblock(fifo)
    assert not hung, f"load_web_config blocked on a FIFO as {which}"
    assert isinstance(result, WebConfigError), result
    assert "not a regular file" in str(result) and which in str(result)


def test_special_files_and_directories_are_refused(tmp_path, tls_pair):
    refused(tmp_path, "regular file")
    refused(Path("/dev/null"), "regular file")
    _, key = tls_pair
    path = tmp_path / "web.yml"
    path.write_text(f"tls_server_config:\n  cert_file: {tmp_path}\n  key_file: {key}\n")
    refused(path, "not a regular file")


def test_missing_and_huge_files_are_one_line_errors(tmp_path):
    refused(tmp_path / "missing.yml", "cannot read")
    huge = tmp_path / "huge.yml"
    huge.write_bytes(b"#" * (2 * 1024 * 1024))
    refused(huge, "larger than")


def test_good_configs_still_load(tmp_path, tls_pair):
    cert, key = tls_pair
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  prefer_server_cipher_suites: true\n"
        "http_server_config:\n  http2: false\n  headers:\n    x-frame-options: sameorigin\n"
        "    Strict-Transport-Security: max-age=31536000; includeSubDomains\n"
        f"basic_auth_users:\n  prometheus: '{HASH}'\n  42: '{HASH}'\n"
    )
    config = load_web_config(path)
    assert config.headers == {
        "X-Frame-Options": "sameorigin",
        "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    }
    assert config.auth.users.keys() == {b"prometheus", b"42"}
    assert config.tls is not None and config.tls.cert_file == cert
    (tmp_path / "empty.yml").write_text("")
    empty = load_web_config(tmp_path / "empty.yml")
    assert (empty.tls, empty.headers, empty.auth.required) == (None, {}, False)


@pytest.mark.parametrize(
    "text",
    [
        "http_server_config:\n  headers:\n    X-Frame-Options: [deny]\n",
        "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: [TLS12]\n",
        "basic_auth_users:\n  prom: $2y$10$short\n",
    ],
)
def test_the_agent_exits_2_with_one_line_for_a_bad_web_config(tmp_path, capsys, text):
    path = tmp_path / "web.yml"
    path.write_text(text)
    assert main(["--web.config.file", str(path), "--once"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iscsimple-agent: ") and "\n" not in err and str(path) in err, err


def test_the_agent_exits_2_for_a_fifo_web_config(tmp_path):
    fifo = tmp_path / "web.yml"
    os.mkfifo(fifo)
    result = subprocess.run(
        ["iscsimple-agent", "--web.config.file", str(fifo), "--once"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "regular file" in result.stderr


# Anything YAML can say, in the shape of a web config: loads, or a one-line WebConfigError.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "deny",
            "nosniff",
            "TLS12",
            "TLS13",
            HASH,
            "NoClientCert",
            "RequestClientCert",
            "\r\n",
            "a\nb",
            "\x00",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
TLS_KEYS = st.sampled_from(
    ["cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version",
     "cipher_suites", "prefer_server_cipher_suites", "cert", "tls_config"]
)  # fmt: skip
HEADER_NAMES = st.sampled_from(
    ["X-Frame-Options", "x-content-type-options", "Content-Security-Policy", "Server"]
)
CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        "tls_server_config": st.one_of(st.dictionaries(TLS_KEYS, VALUES, max_size=4), VALUES),
        "http_server_config": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "http2": VALUES,
                    "headers": st.one_of(st.dictionaries(HEADER_NAMES, VALUES), VALUES),
                },
            ),
            VALUES,
        ),
        "basic_auth_users": st.one_of(
            st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans()), VALUES, max_size=3),
            VALUES,
        ),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=CONFIGS)
def test_any_config_shape_loads_or_is_a_one_line_error(tmp_path, data):
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        load_web_config(path)
    except WebConfigError as e:
        assert "\n" not in str(e) and str(path) in str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_any_bytes_load_or_are_a_one_line_error(tmp_path, data):
    path = tmp_path / "web.yml"
    path.write_bytes(data)
    try:
        load_web_config(path)
    except WebConfigError as e:
        assert "\n" not in str(e) and str(path) in str(e)
