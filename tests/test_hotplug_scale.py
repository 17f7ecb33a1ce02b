"""More than 511 arrays: mdadm 4.2 numbers at most 512 (md127..md0, md511..md128), then needs names.

The fake mdadm follows mdadm 4.2's create_mddev(): with `CREATE names=yes` in
mdadm.conf or mdadm.conf.d/*.conf it makes md_NAME, else the next free number, else
"No avail md devices - aborting".
"""

from __future__ import annotations

import time

import pytest

from iscsimple.core.spec import parse_spec
from iscsimple.hotplug.attach import attach
from iscsimple.hotplug.mdadm import NAMES_DROPIN
from tests.fakes.harness import make_hotplug


@pytest.fixture
def hotplug(tmp_path):
    return make_hotplug(tmp_path)


@pytest.mark.slow
def test_attach_beyond_511_arrays_fails_clearly_without_names_and_works_with_them(hotplug, monkeypatch):
    host = hotplug.host
    host.build_arrays([f"other{n}" for n in range(508)], [None, None])  # other arrays on this host
    vbds = []
    for n in range(5):
        hotplug.mirror(f"vm{n}", size=8 << 20)
        vbds.append(hotplug.vbd(f"MISSING+vm{n}", domid=n + 1))

    for vbd in vbds[:4]:  # the last four free numbers
        hotplug.add(vbd)
    assert len(host.md_arrays()) == 512
    result = hotplug.run("add", vbds[4])

    assert result.returncode == 1
    error = hotplug.xs(vbds[4], "hotplug-error")
    assert "no free md device number left" in error
    assert f"put 'CREATE names=yes' into {NAMES_DROPIN}" in error
    assert hotplug.registry().get(vbds[4].attachment_id) is None

    host.enable_md_names()  # the install step
    hotplug.add(vbds[4])
    assert hotplug.registry().get(vbds[4].attachment_id).md_device == "md_vm4"
    assert hotplug.xs(vbds[4], "physical-device") == "9:200"  # minor 512, in hex
    assert hotplug.command_lines()[-1].startswith("mdadm --build /dev/md/vm4 ")  # the command is unchanged

    # And on: through the Python API (what `iscsimple attach` runs), in-process to keep this quick.
    monkeypatch.setenv("PATH", hotplug.env["PATH"])
    monkeypatch.setenv("ISCSIMPLE_FAKE_HOST", hotplug.env["ISCSIMPLE_FAKE_HOST"])
    config = hotplug.config()
    started = time.monotonic()
    for n in range(5, 45):
        hotplug.mirror(f"vm{n}", size=8 << 20)
        attachment = attach(parse_spec(f"MISSING+vm{n}"), hotplug.paths, config)
        assert attachment.md_device == f"md_vm{n}"
    assert len(host.md_arrays()) == 553
    print(f"40 attaches beyond 512 arrays: {time.monotonic() - started:.1f} s")
