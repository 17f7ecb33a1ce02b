"""The PromQL of every panel of grafana/dashboards/iscsimple.json, ready to run.

Grafana replaces the dashboard variables before it sends a query; so does this
module: every host, target and VM ("All" is `.*`, as the dashboard's allValue).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "grafana" / "dashboards" / "iscsimple.json"


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str  # as in the dashboard
    instant: bool

    def promql(self, rate_interval: str = "1m") -> str:
        expr = self.expr.replace("$__rate_interval", rate_interval)
        return re.sub(r"\$(host|target|vm)\b", ".*", expr)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(board: dict | None = None) -> list[PanelQuery]:
    board = board or dashboard()
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"], bool(target.get("instant")))
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]
