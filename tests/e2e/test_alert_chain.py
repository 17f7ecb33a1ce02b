"""The whole chain with the real programs: iscsimple-agent on a simulated host →
Prometheus (alerts/ rule files, 1s scrape and evaluation) → Alertmanager (the
example config) → a webhook receiver in the test.

Scenario: attach and resync two VMs (nothing may alert), an iSCSI outage (the
headline alert must reach the receiver within 60s, with its labels), recovery
(it resolves). Then every query of every dashboard panel must return data.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from alertchain import (
    Agent,
    Alertmanager,
    Notification,
    Prometheus,
    WebhookReceiver,
    alertmanager_config,
    wait_until,
)
from dashboard_queries import panel_queries

from iscsimple.exporter.simhost import SimulatedHost

pytestmark = pytest.mark.e2e

TARGET = "iqn.2026-01.org.example:filer1"
VMS = {"vm1-disk": ("vm1", 1), "vm2-disk": ("vm2", 2)}
HEADLINE = "IscsimpleArrayLocalOnly"
STATED_SECONDS = 60  # alerts/iscsimple.rules.yml: a real outage pages within 60s
ATTACH_PHASE_SECONDS = 25  # longer than the 15s for: of every fast alert, plus evaluation


def firing(notification: Notification, alertname: str) -> list[dict]:
    return [
        a for a in notification.alerts if a["labels"]["alertname"] == alertname and a["status"] == "firing"
    ]


@pytest.fixture
def chain(tmp_path: Path, receiver: WebhookReceiver):
    host = SimulatedHost(tmp_path / "host")
    host.add_target(TARGET)
    for label, (domain, lun) in VMS.items():
        host.attach(label, domain, TARGET, lun, size_bytes=1 << 30)
        host.record_hotplug("add", "success", 1.5 + lun)
    daemons = []
    try:
        agent = Agent(tmp_path / "agent", host.paths)
        daemons.append(agent)
        # Shorter group_interval than shipped only so the resolved notification comes
        # quickly; routes, group_wait and inhibitions are the example's.
        alertmanager = Alertmanager(tmp_path / "am", alertmanager_config(receiver, group_interval="2s"))
        daemons.append(alertmanager)
        prometheus = Prometheus(tmp_path / "prometheus", [agent.address], alertmanager.url)
        daemons.append(prometheus)
        yield host, agent, prometheus, alertmanager
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        for daemon in daemons:
            print(f"--- {daemon.name} log (tail) ---\n{daemon.log_tail(10)}")


def test_outage_pages_within_60s_and_resolves(chain, receiver: WebhookReceiver):
    host, agent, prometheus, alertmanager = chain
    started = time.time()
    events: list[tuple[float, str]] = [(started, "attach: local legs recover from iSCSI")]
    _wait_for_first_scrape(prometheus)

    # -- attach and resync: the local legs recover from iSCSI; nothing may alert.
    phase_end = time.monotonic() + ATTACH_PHASE_SECONDS
    steps = 10
    for step in range(1, steps + 1):
        for label in VMS:
            host.advance_resync(label, step / (steps + 1), speed_kib=50_000)
        time.sleep(ATTACH_PHASE_SECONDS / (steps + 2))
        assert prometheus.firing() == [], "an alert fired during a normal attach and resync"
        agent.check_alive()
    for label in VMS:
        host.finish_resync(label)
    time.sleep(max(0.0, phase_end - time.monotonic()))
    assert prometheus.firing() == []
    assert receiver.notifications == [], "a notification was sent during attach and resync"
    assert _query_value(prometheus, "sum(iscsimple_array_unprotected)") == 0

    # -- the iSCSI target fails.
    failed_at = time.monotonic()
    host.fail_session(TARGET)
    events.append((time.time(), "iSCSI session FAILED"))
    page = receiver.wait_for(
        lambda n: n.path == "/page" and len(firing(n, HEADLINE)) == len(VMS),
        timeout=STATED_SECONDS,
        what=f"{HEADLINE} for both VMs at the pager",
        since=failed_at,
    )
    seconds = page.received - failed_at
    print(f"\noutage-to-notification: {seconds:.1f}s (session FAILED -> webhook received the page)")
    assert seconds <= STATED_SECONDS

    assert page.body["groupLabels"] == {"target": TARGET}, "one page per target"
    by_label = {a["labels"]["label"]: a for a in firing(page, HEADLINE)}
    for label, (domain, lun) in VMS.items():
        labels = by_label[label]["labels"]
        assert labels == {
            "alertname": HEADLINE,
            "severity": "critical",
            "job": "iscsimple",
            "instance": agent.address,
            "label": label,
            "domain": domain,
            "device": host.md_device(label),
            "target": TARGET,
            "lun": str(lun),
        }
        assert "Do NOT migrate" in by_label[label]["annotations"]["description"]
        assert by_label[label]["annotations"]["runbook_url"].endswith(f"/docs/runbooks/{HEADLINE}.md")

    # The replacement timeout expires: md fails the iSCSI legs. The agent records that the
    # iSCSI copies are stale; that alert fires but is inhibited while the local-only page stands.
    host.expire_session(TARGET)
    events.append((time.time(), "md fails the iSCSI legs"))

    def stale_alerts() -> list[dict]:
        alerts = [a for a in alertmanager.alerts() if a["labels"]["alertname"] == "IscsimpleArrayIscsiStale"]
        return alerts if {a["labels"]["label"] for a in alerts} == set(VMS) else []

    stale = wait_until(stale_alerts, timeout=STATED_SECONDS, what="IscsimpleArrayIscsiStale for both VMs")
    assert all(a["status"]["inhibitedBy"] for a in stale), "the local-only page already says it"
    time.sleep(2)  # a few scrapes of the full outage state (the README's picture shows it)

    # -- the target is back; the mirrors heal (iSCSI legs recover from the local legs).
    recovered_at = time.monotonic()
    events.append((time.time(), "target back, heal"))
    host.restore_session(TARGET)
    for label in VMS:
        host.heal(label)
        host.advance_resync(label, 0.5)
    time.sleep(2)
    for label in VMS:
        host.finish_resync(label)
    resolved = receiver.wait_for(
        lambda n: (
            n.path == "/page"
            and {
                a["labels"]["label"]
                for a in n.alerts
                if a["labels"]["alertname"] == HEADLINE and a["status"] == "resolved"
            }
            == set(VMS)
        ),
        timeout=STATED_SECONDS,
        what=f"{HEADLINE} resolved at the pager",
        since=recovered_at,
    )
    print(f"recovery-to-resolved: {resolved.received - recovered_at:.1f}s")
    # Healed: the agent clears the stale records, and nothing fires any more.
    wait_until(lambda: prometheus.firing() == [], timeout=30, what="no alert firing after the heal")
    assert _query_value(prometheus, "sum(iscsimple_array_iscsi_stale)") == 0
    pages = [n for n in receiver.notifications if n.path == "/page"]
    assert not any(
        a["labels"]["alertname"] == "IscsimpleArrayIscsiStale" and a["status"] == "firing"
        for n in pages
        for a in n.alerts
    ), "the stale alert was inhibited all along"

    # No host-level session page while the whole target was down (inhibited).
    session_pages = [
        (round(n.received - failed_at, 1), a["status"])
        for n in receiver.notifications
        if n.path == "/page"
        for a in n.alerts
        if a["labels"]["alertname"] == "IscsimpleIscsiSessionDown" and a["status"] == "firing"
    ]
    assert session_pages == []
    # Every rule evaluated without error all along (a failing join would silence alerts).
    unhealthy = [
        (rule["name"], rule.get("lastError"))
        for group in prometheus.rule_groups()
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert unhealthy == []

    _check_dashboard_queries(prometheus, start=started, end=time.time(), events=events)


def _wait_for_first_scrape(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(prometheus.query("iscsimple_array_info")) == len(VMS):
            return
        prometheus.check_alive()
        time.sleep(0.2)
    pytest.fail("Prometheus never scraped the agent's arrays")


def _query_value(prometheus: Prometheus, expr: str) -> float:
    result = prometheus.query(expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def _check_dashboard_queries(
    prometheus: Prometheus, start: float, end: float, events: list[tuple[float, str]]
) -> None:
    """Every query of every panel, with the variables at "All", over the scenario."""
    queries = panel_queries()
    assert queries
    empty = []
    peak: dict[str, float] = {}
    results = {}
    for q in queries:
        # A 1s scrape interval: Grafana's $__rate_interval would be 4s; 10s leaves room.
        result = prometheus.query_range(q.promql(rate_interval="10s"), start, end, step="1s")
        results[(q.panel, q.ref)] = result
        values = [float(v) for series in result for _, v in series["values"]]
        if not values:
            empty.append(f"{q.panel} [{q.ref}]: {q.expr}")
        else:
            peak[q.panel] = max(values)
    print(f"dashboard: {len(queries) - len(empty)}/{len(queries)} panel queries returned data")
    assert empty == [], "panel queries without data:\n" + "\n".join(empty)
    # The headline panels saw the scenario: both VMs unprotected while resyncing, then local-only.
    assert peak["Unprotected VMs"] == len(VMS)
    assert peak["VMs on local mirror only"] == len(VMS)
    assert peak["iSCSI sessions down"] == 1

    # The data behind the README's dashboard picture (grafana/render_preview.py draws it).
    capture = os.environ.get("ISCSIMPLE_DASHBOARD_CAPTURE")
    if capture:
        data = {
            "start": start,
            "end": end,
            "events": events,
            "results": [
                {"panel": panel, "ref": ref, "result": result} for (panel, ref), result in results.items()
            ],
        }
        Path(capture).write_text(json.dumps(data))
