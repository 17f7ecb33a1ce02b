"""The whole exposition of a known host, compared with a committed file (like node_exporter's
collector/fixtures/e2e-output.txt): any change of a metric name, label, help text, order or
value shows up in review as a diff of tests/fixtures/exposition/e2e-output.txt.

Regenerate after an intended change with:
    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_exposition_golden.py
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from iscsimple import __version__ as VERSION
from iscsimple.core.snapshot import Changes
from iscsimple.exporter.agent import Agent, AgentOptions
from iscsimple.exporter.simhost import SimulatedHost

GOLDEN = Path(__file__).parent / "fixtures" / "exposition" / "e2e-output.txt"
OPENMETRICS = "application/openmetrics-text;version=1.0.0"
# Samples whose value is a time or a duration of this run.
VARYING = re.compile(
    r"^(iscsimple_collector_duration_seconds|iscsimple_last_refresh_timestamp_seconds|"
    r"iscsimple_lun_stale_since_seconds)(\{.*\})? .*$",
    re.MULTILINE,
)


def known_host(root: Path) -> SimulatedHost:
    host = SimulatedHost(root)
    a, b = "iqn.2003-01.org.example:a", "iqn.2003-01.org.example:b"
    host.add_target(a, "192.0.2.10:3260")
    host.add_target(b, "192.0.2.11:3260")
    host.attach("web1-root", "web1", a, 1, size_bytes=8 << 30)
    host.finish_resync("web1-root")
    host.attach("web2-root", "web2", a, 2, size_bytes=16 << 30)
    host.advance_resync("web2-root", 0.25, speed_kib=50_000)
    host.attach("db1-data", "db1", b, 1, size_bytes=32 << 30)
    host.finish_resync("db1-data")
    host.expire_session(b)  # db1-data runs on its local leg alone; its iSCSI copy goes stale
    host.set_leg_errors("web1-root", "local", 3)
    host.record_hotplug("add", "success", 2.5)
    host.record_hotplug("add", "failure", 40.0)
    return host


def normalised(body: bytes) -> str:
    text = VARYING.sub(lambda m: f"{m[1]}{m[2] or ''} <varies>", body.decode())
    return text.replace(f'host="{socket.gethostname()}"', 'host="HOST"').replace(
        f'version="{VERSION}"', 'version="VERSION"'
    )


def test_exposition_matches_the_golden_file(tmp_path):
    host = known_host(tmp_path / "host")
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False, heal=False))
    agent.refresher.refresh_now()  # the stale record its watchers write is read back before the render
    text = normalised(agent.metrics(OPENMETRICS)[0])
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "exposition changed: see the module doc to regenerate"


def test_the_refresh_after_start_finds_nothing_to_render_again(tmp_path):
    """The first look writes a stale record for the local-only array; it is read back before the
    first render, so the next refresh derives no new view (no re-encoding in the first minute)."""
    host = known_host(tmp_path / "host")
    agent = Agent(AgentOptions(paths=host.paths, udev=False, mdstat_events=False, heal=False))
    first = agent.refresher.refresh_now()
    assert [r.label for r in first.snapshot.stale] == ["db1-data"]
    assert first.snapshot.array("db1-data").stale is not None
    second = agent.refresher.refresh_now(Changes())
    assert second.snapshot.changed_since(first.snapshot) == frozenset()
    assert second.openmetrics_pieces[:-1] == first.openmetrics_pieces[:-1]
