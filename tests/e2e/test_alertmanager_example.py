"""The example Alertmanager config in the real Alertmanager: a filer going away is one
page per target, host-level session alerts are inhibited, tickets go elsewhere."""

from __future__ import annotations

import time

import pytest
from alertchain import Alertmanager, alertmanager_config

pytestmark = pytest.mark.e2e

TARGET = "iqn.2026-01.org.example:filer1"


def alert(name: str, severity: str, **labels: str) -> dict:
    return {
        "labels": {"alertname": name, "severity": severity, "job": "iscsimple", **labels},
        "annotations": {"summary": name},
    }


@pytest.fixture
def alertmanager(tmp_path, receiver):
    am = Alertmanager(tmp_path / "am", alertmanager_config(receiver))
    yield am
    am.stop()


def test_a_target_outage_is_one_page_without_the_host_session_alerts(alertmanager, receiver):
    posted = time.monotonic()
    alertmanager.post_alerts(
        [
            alert("IscsimpleIscsiTargetDown", "critical", target=TARGET),
            alert("IscsimpleIscsiSessionDown", "critical", instance="xen1", target=TARGET, portal="p"),
            alert("IscsimpleIscsiSessionDown", "critical", instance="xen2", target=TARGET, portal="p"),
            *(
                alert(
                    "IscsimpleArrayLocalOnly",
                    "critical",
                    instance=host,
                    label=f"{vm}-disk",
                    domain=vm,
                    target=TARGET,
                )
                for host, vm in (("xen1", "vm1"), ("xen1", "vm2"), ("xen2", "vm3"))
            ),
            alert(
                "IscsimpleArrayIscsiStale",
                "critical",
                instance="xen1",
                label="vm1-disk",
                domain="vm1",
                target=TARGET,
            ),
            alert("IscsimpleResyncStalled", "warning", instance="xen2", label="vm9-disk"),
        ]
    )
    page = receiver.wait_for(lambda n: n.path == "/page", timeout=30, what="the page")
    waited = page.received - posted
    assert 4 <= waited <= 30, f"page after {waited:.1f}s; the target route's group_wait is 5s (tickets: 1m)"
    assert page.body["groupLabels"] == {"target": TARGET}
    sent = sorted((a["labels"]["alertname"], a["labels"].get("domain", "")) for a in page.alerts)
    assert sent == [
        ("IscsimpleArrayLocalOnly", "vm1"),
        ("IscsimpleArrayLocalOnly", "vm2"),
        ("IscsimpleArrayLocalOnly", "vm3"),
        ("IscsimpleIscsiTargetDown", ""),
    ]

    inhibited = {
        (a["labels"]["alertname"], a["labels"].get("instance")): a["status"]["inhibitedBy"]
        for a in alertmanager.alerts()
    }
    assert inhibited[("IscsimpleIscsiSessionDown", "xen1")]
    assert inhibited[("IscsimpleIscsiSessionDown", "xen2")]
    assert inhibited[("IscsimpleArrayIscsiStale", "xen1")]
    assert not inhibited[("IscsimpleArrayLocalOnly", "xen1")]

    # The warning waits for its ticket route (group_wait 1m), never on the pager.
    time.sleep(2)
    pages = [n for n in receiver.notifications if n.path == "/page"]
    assert len(pages) == 1, "one page for the whole target"
    assert all(a["labels"]["severity"] == "critical" for a in pages[0].alerts)


def test_no_working_leg_replaces_the_vm_s_other_pages(alertmanager, receiver):
    vm = {"instance": "xen1", "label": "vm4-disk", "domain": "vm4"}
    alertmanager.post_alerts(
        [
            alert("IscsimpleArrayBothLegsGone", "critical", **vm),
            alert("IscsimpleArrayLocalOnly", "critical", target=TARGET, **vm),
        ]
    )
    page = receiver.wait_for(lambda n: n.path == "/page", timeout=30, what="the page")
    assert [a["labels"]["alertname"] for a in page.alerts] == ["IscsimpleArrayBothLegsGone"]
    time.sleep(3)  # the local-only alert's own group (by target) would have flushed by now
    assert len(receiver.notifications) == 1
