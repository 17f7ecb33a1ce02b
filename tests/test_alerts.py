"""The alert rules, their promtool unit tests, runbooks and the example Alertmanager config.

promtool and amtool come from Debian's `prometheus` and `prometheus-alertmanager`
packages (scripts/test installs them); a missing tool is a failure, not a skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "alerts"
RULES = ALERTS / "iscsimple.rules.yml"
UNIT_TESTS = sorted((ALERTS / "tests").glob("*.yml"))
RUNBOOKS = REPO / "docs" / "runbooks"
ALERTMANAGER_EXAMPLE = ALERTS / "alertmanager.example.yml"
RUNBOOK_SECTIONS = ("Meaning", "Impact", "Diagnosis", "Mitigation")
TIMEOUT = 60


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package {package} (scripts/test does)")
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


ALERT_NAMES = [rule["alert"] for rule in alert_rules()]


def seconds(duration: str) -> float:
    """A Prometheus duration such as 1m30s or 15s."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(int(n) * units[u] for n, u in parts)


def test_promtool_check_rules():
    result = run([tool("promtool", "prometheus"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules()) + 6} rules found" in result.stdout


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(unit_test):
    result = run([tool("promtool", "prometheus"), "test", "rules", str(unit_test)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_resolves_and_stays_silent_during_attach():
    """Each alert: expected firing at some time, expected silent later in the same
    test group (resolves), and expected silent at every time of the attach+resync test."""
    fires: set[str] = set()
    resolves: set[str] = set()
    for path in UNIT_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            firing_at: dict[str, float] = {}
            for case in group.get("alert_rule_test", []):
                name, at = case["alertname"], seconds(case["eval_time"])
                assert name in ALERT_NAMES, f"{path.name}: unknown alert {name}"
                if case.get("exp_alerts"):
                    fires.add(name)
                    firing_at[name] = min(at, firing_at.get(name, at))
                elif name in firing_at and at > firing_at[name]:
                    resolves.add(name)
    assert set(ALERT_NAMES) - fires == set(), "alerts never tested firing"
    # Absence of any data cannot "resolve" within one group for IscsimpleAgentDown's absent() arm,
    # but its up == 0 arm does; every alert must have a resolve case.
    assert set(ALERT_NAMES) - resolves == set(), "alerts never tested resolving"

    attach = yaml.safe_load((ALERTS / "tests" / "attach_resync.yml").read_text())["tests"][0]
    silent_times: dict[str, set[str]] = {}
    for case in attach["alert_rule_test"]:
        assert case["exp_alerts"] == [], "attach_resync.yml expects silence only"
        silent_times.setdefault(case["alertname"], set()).add(case["eval_time"])
    assert set(silent_times) == set(ALERT_NAMES)
    assert all(len(times) >= 5 for times in silent_times.values())


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_follows_mixin_conventions(rule):
    name = rule["alert"]
    assert re.fullmatch(r"Iscsimple[A-Z][A-Za-z]+", name)
    assert rule["labels"]["severity"] in ("critical", "warning")
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    assert "{{" not in annotations["summary"], "summary is a static sentence"
    assert "{{" in annotations["description"], "description names the VM/array/target"
    assert annotations["runbook_url"].endswith(f"/docs/runbooks/{name}.md")
    assert "for" in rule, "every alert states its for: duration, even 0s"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_runbook_exists_with_sections(rule):
    name = rule["alert"]
    path = RUNBOOKS / f"{name}.md"
    assert path.is_file(), f"missing runbook {path.relative_to(REPO)}"
    text = path.read_text()
    assert text.startswith(f"# {name}\n")
    headings = re.findall(r"^## (\w+)", text, flags=re.M)
    assert [h for h in headings if h in RUNBOOK_SECTIONS] == list(RUNBOOK_SECTIONS)
    # The reason for the for: duration is written down.
    assert f"`for: {rule['for']}`" in text, "runbook states the alert's for: duration and why"
    # Real commands, not prose only.
    assert "```" in text


def test_headline_alert_reaches_alertmanager_within_60s_by_budget():
    """The documented budget: agent refresh + scrape + evaluation + for <= 60s."""
    headline = next(r for r in alert_rules() if r["alert"] == "IscsimpleArrayLocalOnly")
    agent_refresh, scrape, evaluation = 10, 15, 15  # agent's --refresh.interval default
    assert agent_refresh + scrape + evaluation + seconds(headline["for"]) <= 60
    group_wait = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())["route"]["routes"][0]["group_wait"]
    assert agent_refresh + scrape + evaluation + seconds(headline["for"]) + seconds(group_wait) <= 60


def test_amtool_check_config():
    result = run([tool("amtool", "prometheus-alertmanager"), "check-config", str(ALERTMANAGER_EXAMPLE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ({"alertname": "IscsimpleArrayLocalOnly", "severity": "critical", "target": "iqn.x:t"}, "page"),
        ({"alertname": "IscsimpleIscsiTargetDown", "severity": "critical", "target": "iqn.x:t"}, "page"),
        ({"alertname": "IscsimpleAgentDown", "severity": "critical", "instance": "xen1"}, "page"),
        ({"alertname": "IscsimpleResyncStalled", "severity": "warning", "label": "vm1"}, "ticket"),
        ({"alertname": "SomethingElse"}, "ticket"),
    ],
)
def test_alertmanager_routes_by_severity(labels, receiver):
    argv = [
        tool("amtool", "prometheus-alertmanager"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_EXAMPLE}",
        f"--verify.receivers={receiver}",
        *(f"{k}={v}" for k, v in labels.items()),
    ]
    result = run(argv)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_alerts_of_one_target_are_one_group():
    """A filer going away: the target's alerts share one group key (group_by: [target])."""
    config = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())
    target_route = config["route"]["routes"][0]
    assert target_route["group_by"] == ["target"]
    assert 'target!=""' in target_route["matchers"]
    headline_inhibitors = [
        rule
        for rule in config["inhibit_rules"]
        if any("IscsimpleArrayLocalOnly" in m for m in rule["target_matchers"])
    ]
    # Only "both legs gone" (a worse page about the same VM) may silence the headline.
    assert all(
        rule["source_matchers"] == ['alertname="IscsimpleArrayBothLegsGone"'] for rule in headline_inhibitors
    )
