"""An add SIGKILLed during its login (libxl kills the script at 40 s, not its children), then remove: no
session may stay behind. The moment is made exact with an `iscsiadm` wrapper first on the script's PATH:
for `--login` it marks when it starts and when the real login returned, and holds until the test lets it
go, so the script can be killed (1) after the login went through but before iscsiadm returned, and (2)
while the login is still to come (a slow target), so that the session appears only after remove began."""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import record
from xldriver import BLOCK_SCRIPT, STATE, XL_ENV, Vbd, Xl

pytestmark = pytest.mark.vm

IQN = "iqn.2026-11.test.local:killed-login"
LABEL = "killed-login"
MIB = 8
HOOK = "/tmp/hook"
WRAPPER = """#!/bin/sh
case " $* " in
*" --login "*)
    touch {hook}/login.started
    if [ -e {hook}/hold ]; then while [ ! -e {hook}/go ]; do sleep 0.2; done; fi
    {real} "$@"; rc=$?
    touch {hook}/login.done
    while [ ! -e {hook}/release ]; do sleep 0.2; done
    exit $rc ;;
esac
exec {real} "$@"
"""


def install_wrapper(g) -> None:
    real = shutil.which("iscsiadm", path=XL_ENV["PATH"])
    assert real, "iscsiadm not found"
    g.run(["rm", "-rf", HOOK])
    g.call("write", path=f"{HOOK}/bin/iscsiadm", text=WRAPPER.format(hook=HOOK, real=real))
    g.run(["chmod", "755", f"{HOOK}/bin/iscsiadm"])


def killed_add(bed, xl: Xl, vbd: Vbd, when: str) -> None:
    """Start the add with the wrapper and SIGKILL the script itself once the wrapper reached `when`."""
    g = bed.guest
    xl.prepare(vbd, f"lun1@{IQN}+{LABEL}")
    env = {**xl.env(vbd), "PATH": f"{HOOK}/bin:{XL_ENV['PATH']}"}
    g.spawn("add", [BLOCK_SCRIPT, "add"], env=env, log="/tmp/killed-add.log")
    g.wait_for(f"{HOOK}/{when}", "exists", timeout=60)
    g.call("signal", name="add", sig="KILL", group=False)
    assert g.wait_proc("add", timeout=30)["rc"] == -9
    [entry] = g.glob(f"{STATE}/attachments/*.json")
    assert '"attaching"' in g.read(entry)
    assert g.read(f"{STATE}/sessions/{IQN}.json") is not None, "no marker of the login on disk"


def test_remove_after_an_add_killed_during_its_login_leaves_no_session(bed):
    g, xl = bed.guest, Xl(bed)
    backing = bed.make_disk("killed-lun", MIB)
    local = bed.make_disk("killed-local", MIB)
    bed.export(IQN, {1: backing})
    xl.configure({LABEL: local}, "login_timeout = 40\n")
    install_wrapper(g)

    # (1) The login went through; iscsiadm has not returned when the script dies.
    vbd = Vbd(21, 51712)
    killed_add(bed, xl, vbd, "login.done")
    assert bed.session(IQN) is not None
    res = xl.remove(vbd)
    record("killed login: remove after the login went through", res.seconds)
    assert res.rc == 0, str(res)
    assert bed.sessions() == {}, f"the session leaked: {res.stderr}"
    assert g.glob(f"{STATE}/attachments/*") == [] and g.glob(f"{STATE}/sessions/*") == []
    g.call("write", path=f"{HOOK}/release", text="")

    # (2) Killed before the (slow) login happened: remove starts with no session, one appears meanwhile.
    g.run(["rm", "-f", f"{HOOK}/release", f"{HOOK}/login.started", f"{HOOK}/login.done"])
    # The login is held until remove says it waits for it: how long the guest takes to start remove
    # (seconds under TCG) must not decide whether the login is still to come.
    g.call("write", path=f"{HOOK}/hold", text="")
    vbd = Vbd(21, 51728)
    killed_add(bed, xl, vbd, "login.started")
    assert bed.sessions() == {}
    started = time.monotonic()
    xl.spawn_remove("killed-remove", vbd)
    g.wait_for("/tmp/killed-remove.log", "contains", "waiting for it to end", timeout=90)
    g.call("write", path=f"{HOOK}/go", text="")
    done = g.wait_proc("killed-remove", timeout=90)
    stderr = g.read("/tmp/killed-remove.log") or ""
    record("killed login: remove while the login was still to come", time.monotonic() - started)
    assert done["rc"] == 0, stderr
    g.call("write", path=f"{HOOK}/release", text="")
    g.wait_for(f"{HOOK}/login.done", "exists", timeout=30)
    assert bed.sessions() == {}, f"the session leaked: {stderr}"
    assert g.glob(f"{STATE}/attachments/*") == [] and g.glob(f"{STATE}/sessions/*") == []
