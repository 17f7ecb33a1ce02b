"""core.bootmemo: facts kept for one boot. A memo of another boot, a corrupt or planted file, or a
boot that cannot be told is never taken for this boot's (the caller probes again)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from test_bitmap import host

from iscsimple.core import bitmap, bootmemo


def test_a_memo_is_recalled_in_its_boot_only(tmp_path):
    paths = host(tmp_path)
    bootmemo.remember(paths, "probe.json", {"answer": 42})
    assert bootmemo.recall(paths, "probe.json") == {"answer": 42, "boot_id": "boot-1"}
    assert stat.S_IMODE(os.stat(paths.state / "probe.json").st_mode) == 0o644
    (paths.procfs / "sys/kernel/random/boot_id").write_text("boot-2\n")
    assert bootmemo.recall(paths, "probe.json") is None


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'"boot-1"', b"\xff\xfe", json.dumps({"answer": 1}).encode()],
)
def test_a_corrupt_memo_is_no_memo(tmp_path, content):
    paths = host(tmp_path)
    paths.state.mkdir(mode=0o755)
    (paths.state / "probe.json").write_bytes(content)
    assert bootmemo.recall(paths, "probe.json") is None


def test_a_planted_symlink_is_neither_followed_nor_recalled(tmp_path):
    paths = host(tmp_path)
    paths.state.mkdir(mode=0o755)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"answer": 1, "boot_id": "boot-1"}))
    (paths.state / "probe.json").symlink_to(elsewhere)
    assert bootmemo.recall(paths, "probe.json") is None


def test_nothing_is_remembered_when_the_boot_cannot_be_told(tmp_path):
    paths = host(tmp_path)
    (paths.procfs / "sys/kernel/random/boot_id").unlink()
    bootmemo.remember(paths, "probe.json", {"answer": 42})
    assert bootmemo.recall(paths, "probe.json") is None
    calls = []
    probe = lambda: calls.append(1) or bitmap.BitmapSupport(True, "probed")  # noqa: E731
    bitmap.cached_support(paths, probe)
    bitmap.cached_support(paths, probe)
    assert calls == [1, 1]


def test_remember_never_raises_on_an_unwritable_state_directory(tmp_path):
    paths = host(tmp_path)
    paths.state.write_text("a file where the directory should be")
    bootmemo.remember(paths, "probe.json", {"answer": 42})
    assert bootmemo.recall(paths, "probe.json") is None


def test_a_cached_support_with_a_bad_chunk_is_probed_again(tmp_path):
    paths = host(tmp_path)
    bootmemo.remember(paths, bitmap.SUPPORT_MEMO, {"supported": True, "reason": "", "chunk_bytes": True})
    calls = []
    probe = lambda: calls.append(1) or bitmap.BitmapSupport(False, "probed")  # noqa: E731
    assert bitmap.cached_support(paths, probe).reason == "probed" and calls == [1]
