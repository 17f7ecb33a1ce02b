"""Scenario 6: under Xen 4.17, the real libxl runs block-iscsimple.

Xen boots with the Debian kernel as dom0; `xl block-attach 0 ...` attaches a disk to dom0 itself (no domU
needed): libxl runs our script with `add`, blkback serves the md device, and blkfront in dom0 shows it as
/dev/xvdb. Reading /dev/xvdb therefore goes blkfront -> blkback -> md -> iSCSI.
"""

from __future__ import annotations

import pytest
from conftest import record
from storagebed import PORTAL
from xldriver import CLI, CONFIG, TAB

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:xen"
LABEL = "xen-disk"
MIB = 8


@pytest.fixture(scope="module")
def hook(xen_storage):
    """Installed as an operator does: `iscsimple install-hook --mdadm-names` writes the launcher
    /etc/xen/scripts/block-iscsimple (so disks say just script=block-iscsimple) and mdadm's names drop-in
    (arrays become md_LABEL in the kernel). Both land in dom0's overlay, never on the host."""
    res = xen_storage.guest.run([CLI, "install-hook", "--mdadm-names"], timeout=60)
    assert xen_storage.guest.read("/etc/xen/scripts/block-iscsimple") is not None, str(res)
    return "block-iscsimple"


def configure(bed, tab: dict[str, str]) -> None:
    g = bed.guest
    g.call("write", path=CONFIG, text=f'[iscsi]\nportals = ["{PORTAL}"]\n')
    g.call("write", path=TAB, text="".join(f"{label} {dev}\n" for label, dev in tab.items()))


def xenstore_backend(g) -> dict[str, str]:
    """The vbd backend keys of dom0's xvdb (devid 51728), from the real xenstored."""
    res = g.run(["xenstore-ls", "-f", "/local/domain/0/backend/vbd/0/51728"], check=False)
    out = {}
    for line in res.stdout.splitlines():
        key, _, value = line.partition(" = ")
        out[key.rsplit("/", 1)[1]] = value.strip().strip('"')
    return out


@pytest.fixture(autouse=True)
def no_vbd_left_behind(xen_bed):
    """A test that fails half-way (libxl killed a slow script) must not fail the next one with
    libxl's "device already exists in xenstore": detach what it left, as an operator would."""
    yield
    g = xen_bed.guest
    if xenstore_backend(g):
        g.run(["xl", "block-detach", "0", "xvdb"], timeout=90, check=False)
    if xenstore_backend(g):
        g.run(
            ["xenstore-rm", "/local/domain/0/backend/vbd/0/51728", "/local/domain/0/device/vbd/51728"],
            timeout=30,
            check=False,
        )


def test_xl_block_attach_runs_block_iscsimple_and_detach_tears_down(xen_bed, hook):
    bed, g = xen_bed, xen_bed.guest
    lun_dev = bed.make_disk("xen-iscsi", MIB)
    local = bed.make_disk("xen-local", MIB)
    want = g.call("fill", path=lun_dev, seed="xen-iscsi", length=MIB << 20)["sha256"]
    bed.export(IQN, {1: lun_dev})
    configure(bed, {LABEL: local})

    disk = f"format=raw,vdev=xvdb,access=rw,script={hook},target=lun1@{IQN}+{LABEL}"
    attach = g.run(["xl", "block-attach", "0", disk], timeout=90, check=False)
    record("xen: xl block-attach (wall in guest)", attach.seconds)
    assert attach.rc == 0, str(attach)
    g.wait_for("/sys/block/xvdb/size", "exists", timeout=30)

    keys = xenstore_backend(g)
    md = bed.md_name(LABEL)
    assert md == f"md_{LABEL}", "a named array (install-hook --mdadm-names)"
    major, minor = (int(x) for x in g.read(f"/sys/block/{md}/dev").strip().split(":"))
    assert keys["hotplug-status"] == "connected"
    assert keys["physical-device"] == f"{major:x}:{minor:x}"
    assert keys["state"] == "4"  # blkback connected
    sd = bed.lun_device(IQN, 1)
    assert bed.md_legs(md)[sd[5:]].startswith("in_sync,write_mostly")
    assert local[5:] in bed.md_legs(md)

    # The data the VM sees is the iSCSI LUN's, through blkfront -> blkback -> md -> iSCSI.
    assert g.call("sha256", path="/dev/xvdb", length=MIB << 20)["sha256"] == want

    detach = g.run(["xl", "block-detach", "0", "xvdb"], timeout=90, check=False)
    record("xen: xl block-detach (wall in guest)", detach.seconds)
    assert detach.rc == 0, str(detach)
    g.wait_for("/sys/block/xvdb", "absent", timeout=30)
    assert g.glob(f"/sys/block/{md}") == []
    assert bed.session(IQN) is None


def test_failing_attach_reports_our_hotplug_error_through_libxl(xen_bed, hook):
    bed, g = xen_bed, xen_bed.guest
    lun_dev = bed.make_disk("xen-iscsi-2", MIB)
    bed.export(IQN, {1: lun_dev})
    configure(bed, {})  # the label has no tab entry: an attach error, never a silent single-leg array

    disk = f"format=raw,vdev=xvdb,access=rw,script={hook},target=lun1@{IQN}+not-in-tab"
    attach = g.run(["xl", "block-attach", "0", disk], timeout=90, check=False)
    record("xen: failing xl block-attach (wall in guest)", attach.seconds)
    assert attach.rc != 0
    # libxl reads our hotplug-error from xenstore and reports it: "...child_death_cb: script: <text>".
    reported = [line.split(" script: ", 1)[1] for line in attach.stderr.splitlines() if " script: " in line]
    assert len(reported) == 1, attach.stderr
    assert "not-in-tab" in reported[0] and TAB in reported[0], reported[0]
    print("libxl reported:", reported[0])
    assert g.glob("/sys/block/md*") == []
    assert bed.session(IQN) is None
    assert g.glob("/sys/block/xvdb") == []
