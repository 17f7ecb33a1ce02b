"""iscsimple.toml: defaults, every key, the replacement-timeout rule, and FILE:LINE errors."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsimple.core.config import Config, ConfigError, load_config

IQN = "iqn.2001-04.com.example:storage"

FULL = f"""\
# every key iscsimple reads
[iscsi]
portals = ["192.0.2.10:3260", "[2001:db8::10]:3260"]
login_timeout = 20
replacement_timeout_mirrored = 3
replacement_timeout_unmirrored = 180

[targets."{IQN}"]
replacement_timeout = 10

[attach]
device_wait = 12.5
budget = 30

[heal]
enabled = false
stable_seconds = 10
backoff_max_seconds = 600
"""


def _load(tmp_path, text):
    path = tmp_path / "iscsimple.toml"
    path.write_text(text)
    return path, load_config(path)


def test_missing_file_means_defaults(tmp_path):
    assert load_config(tmp_path / "none.toml") == Config()


def test_every_key(tmp_path):
    path, config = _load(tmp_path, FULL)
    assert config == Config(
        portals=("192.0.2.10:3260", "[2001:db8::10]:3260"),
        login_timeout=20.0,
        replacement_timeout_mirrored=3,
        replacement_timeout_unmirrored=180,
        target_replacement_timeout={IQN: 10},
        device_wait=12.5,
        attach_budget=30.0,
        heal_enabled=False,
        heal_stable_seconds=10.0,
        heal_backoff_max_seconds=600.0,
        path=str(path),
    )


def test_replacement_timeout_rule(tmp_path):
    _, config = _load(tmp_path, FULL)
    # Mirrored: short, so md fails the iSCSI leg fast and the VM continues on the local leg.
    assert config.replacement_timeout("iqn.2001-04.com.example:other", mirrored=True) == 3
    # Unmirrored: long, to ride out a short outage (nothing to fail over to).
    assert config.replacement_timeout("iqn.2001-04.com.example:other", mirrored=False) == 180
    # A per-target value wins over both.
    assert config.replacement_timeout(IQN, mirrored=True) == 10
    assert config.replacement_timeout(IQN, mirrored=False) == 10
    assert Config().replacement_timeout(IQN, mirrored=True) == 5
    assert Config().replacement_timeout(IQN, mirrored=False) == 120


# text → (line or None, fragments)
INVALID = {
    "[iscsi]\nportal = []\n": (2, ["unknown key 'portal' in [iscsi]", "portals"]),
    "\n[isci]\nportals = []\n": (2, ["unknown section [isci]", "iscsi"]),
    "heal = true\n": (1, ["[heal] must be a table"]),
    "debug = true\n": (1, ["unknown key 'debug' outside any section"]),
    "[iscsi]\nlogin_timeout = true\n": (2, ["login_timeout must be a number"]),
    "[iscsi]\nreplacement_timeout_mirrored = 2.5\n": (
        2,
        ["replacement_timeout_mirrored has the wrong type (float)"],
    ),
    "[iscsi]\n\n\nreplacement_timeout_unmirrored = 0\n": (
        4,
        ["replacement_timeout_unmirrored must be positive"],
    ),
    "[iscsi]\nportals = ['192.0.2.1', 3260]\n": (2, ["portals must be a list"]),
    "[iscsi]\nportals = [\n  '',\n]\n": (2, ["portals must be a list"]),
    "[attach]\nbudget = 40\n": (2, ["budget must be between 0 and 35", "libxl kills"]),
    "[attach]\nbudget = 20\ndevice_wait = 25\n": (
        3,
        ["device_wait must be positive and below the budget (20 s)"],
    ),
    "[heal]\nenabled = 1\n": (2, ["enabled has the wrong type"]),
    "[heal]\nenabled = true\nstable_seconds = 0\n": (3, ["[heal] stable_seconds must be positive"]),
    "[iscsi\n": (1, ["not valid TOML"]),
    "[iscsi]\nportals = [\n": (2, ["not valid TOML"]),
    "targets = 5\n": (1, ["targets must be tables"]),
    f'[targets."{IQN}"]\nreplacement_timeout = -1\n': (2, ["replacement_timeout must be a positive integer"]),
    f'[targets."{IQN}"]\nreplacement = 10\n': (1, ["may only set replacement_timeout"]),
    f'[iscsi]\n[targets."{IQN.upper()}"]\nreplacement_timeout = 5\n': (2, ["upper-case", "lower case"]),
    f'[targets."lun1@{IQN}"]\nreplacement_timeout = 5\n': (1, ["iSCSI target name alone"]),
    f'[targets."{IQN}+vm1"]\nreplacement_timeout = 5\n': (1, ["iSCSI target name alone"]),
    '[targets."storage"]\nreplacement_timeout = 5\n': (1, ["'storage' is not an iSCSI name"]),
}


@pytest.mark.parametrize("text", sorted(INVALID))
def test_invalid(tmp_path, text):
    line, fragments = INVALID[text]
    path = tmp_path / "iscsimple.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert caught.value.exit_code == 2


def test_unreadable(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "dir.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "bin.toml")


KEYS = st.sampled_from(
    ["[iscsi]", "[attach]", "[heal]", "[targets]", f'[targets."{IQN}"]', "[x]", "portals", "budget",
     "device_wait", "enabled", "replacement_timeout", "replacement_timeout_mirrored", "login_timeout",
     " = ", "=", "1", "0", "-3", "2.5", "true", '"a"', "[", "]", "[]", '["h:1"]', "\n", "#", "targets"]
)  # fmt: skip


@given(st.one_of(st.lists(KEYS, max_size=30).map("".join), st.text(max_size=200)))
def test_fuzz_config_or_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "iscsimple.toml"
    path.write_text(text)
    try:
        config = load_config(path)
    except ConfigError as e:
        assert str(e).startswith(f"{path}")
        return
    assert config.attach_budget > 0 and config.replacement_timeout_mirrored > 0
    assert all(isinstance(p, str) for p in config.portals)
