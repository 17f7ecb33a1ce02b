"""An unreadable registry entry is a safety signal in the hotplug's decisions, never "nothing there".

It may describe the mirror of the LABEL being attached, or a disk on the target whose session
the last remove would log out: an attach is refused naming the file and what to do, and a
remove keeps the session logged in.
"""

from __future__ import annotations

import pytest

from iscsimple.core.errors import StateFileError
from iscsimple.core.registry import Attachment, Registry
from tests.fakes.harness import IQN, make_hotplug

CORRUPTIONS = {
    "garbage": "{not json",
    "label-number": '{"id": "vbd-9-1", "spec": "x", "lun": 0, "target": null, "label": 5}',
    "null": "null",
}


@pytest.fixture
def hotplug(tmp_path):
    return make_hotplug(tmp_path)


def plant(hp, content: str, name: str = "vbd-9-51712.json"):
    directory = hp.paths.state / "attachments"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(content)
    return path


@pytest.mark.parametrize("content", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_registry_queries_raise_instead_of_skipping(tmp_path, content):
    from iscsimple.core.paths import HostPaths

    paths = HostPaths(state=tmp_path / "run")
    registry = Registry(paths)
    registry.put(Attachment(id="cli-a", spec="s", lun=0, target=IQN, label="a"))
    bad = registry.directory / "vbd-9-1.json"
    bad.write_text(content)
    with pytest.raises(StateFileError, match=f"cannot tell whether b is attached: {bad}"):
        registry.by_label("b")
    with pytest.raises(StateFileError, match=f"cannot tell which disks use {IQN}: {bad}"):
        registry.using_target(IQN)
    users = registry.users_of(IQN)
    assert [a.id for a in users.attachments] == ["cli-a"] and users.unreadable[0].startswith(str(bad))


@pytest.mark.parametrize("content", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_attach_refused_while_an_entry_is_unreadable(hotplug, content):
    hotplug.host.add_target(IQN, luns={1: 64 << 20})
    hotplug.mirror("vm1")
    bad = plant(hotplug, content)
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")
    result = hotplug.run("add", vbd)
    assert result.returncode == 1
    assert hotplug.xs(vbd, "hotplug-status") == "error"
    error = hotplug.xs(vbd, "hotplug-error")
    assert (
        "cannot tell whether vm1 is attached" in error and str(bad) in error and "remove that file" in error
    )
    assert "\n" not in error and "Traceback" not in result.stderr and "internal error" not in error
    assert hotplug.host.commands() == [] and hotplug.host.session_targets() == []
    assert hotplug.host.md_arrays() == {}


def test_plain_lun_attach_refused_while_an_entry_is_unreadable(hotplug):
    """No LABEL: the LUN check is the one that must not read an unreadable entry as "LUN free"."""
    hotplug.host.add_target(IQN, luns={1: 64 << 20})
    bad = plant(hotplug, "{not json")
    vbd = hotplug.vbd(f"lun1@{IQN}")
    result = hotplug.run("add", vbd)
    assert result.returncode == 1
    error = hotplug.xs(vbd, "hotplug-error")
    assert f"cannot tell which disks use {IQN}" in error and str(bad) in error
    assert hotplug.host.session_targets() == []


def test_remove_keeps_the_session_an_unreadable_entry_may_use(hotplug):
    hotplug.host.add_target(IQN, luns={1: 64 << 20, 2: 64 << 20})
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")
    hotplug.add(vbd)
    bad = plant(hotplug, "{not json")
    result = hotplug.run("remove", vbd)
    assert result.returncode == 0, result.stderr
    assert hotplug.host.md_arrays() == {}
    assert hotplug.host.session_targets() == [IQN]  # it may be another disk's
    assert not any("--logout" in line for line in hotplug.command_lines())
    assert "stays logged in" in result.stderr and str(bad) in result.stderr
    assert hotplug.registry().get(vbd.attachment_id) is None
    bad.unlink()  # sorted out: the next last remove logs out as usual


@pytest.mark.parametrize("content", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_remove_of_a_disk_whose_own_entry_is_unreadable_says_what_stays(hotplug, content):
    """The remove cannot know what to undo: it fails (libxl shows it) naming the file and saying
    that the mirror and the session stay, and how to clear up (before: only the parse error)."""
    hotplug.host.add_target(IQN, luns={1: 64 << 20})
    hotplug.mirror("vm1")
    vbd = hotplug.vbd(f"lun1@{IQN}+vm1")
    hotplug.add(vbd)
    own = plant(hotplug, content, f"{vbd.attachment_id}.json")
    result = hotplug.run("remove", vbd)
    assert result.returncode == 1
    error = hotplug.xs(vbd, "hotplug-error")
    assert error.startswith(f"cannot detach {vbd.attachment_id}: {own}") and "\n" not in error
    assert "stays as it is" in error and "iscsimple status" in error and "remove that file" in error
    assert list(hotplug.host.md_arrays()) and hotplug.host.session_targets() == [IQN]  # nothing guessed
