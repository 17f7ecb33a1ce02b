"""Draws a picture of the dashboard from real query results, for the README.

Not Grafana's rendering (no Grafana in Debian to run here): matplotlib places each
panel of grafana/dashboards/iscsimple.json at its gridPos and draws the data the
end-to-end test's Prometheus returned for the panel's queries during its scenario
(attach and resync, iSCSI outage, recovery). Stats, bar gauges and tables show the
moment of the outage (the dashed line in the time series).

    ISCSIMPLE_DASHBOARD_CAPTURE=/tmp/capture.json pytest tests/e2e/test_alert_chain.py
    python grafana/render_preview.py /tmp/capture.json grafana/dashboard-preview.png

Needs matplotlib (pip install matplotlib); nothing else in the project does.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "iscsimple.json"
COLUMNS, ROW_HEIGHT = 24, 0.42  # Grafana's grid: 24 columns; inches per grid row
BACKGROUND, PANEL, TEXT, MUTED = "#111217", "#181b1f", "#ccccdc", "#8e8e8e"
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a"]


def legend(format_: str, labels: dict[str, str]) -> str:
    if format_ in ("", "__auto"):
        return (
            ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("job", "__name__"))
            or "value"
        )
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), format_)


def value_at(series: dict, when: float) -> float | None:
    """The series' value at `when`, or None if it had no sample then (gone, as in Grafana)."""
    near = [float(v) for t, v in series["values"] if when - 2 <= float(t) <= when]
    return near[-1] if near else None


def threshold_color(panel: dict, value: float) -> str:
    steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
    color = "green"
    for step in steps:
        if step.get("value") is None or value >= step["value"]:
            color = step["color"]
    return {"green": "#37872d", "red": "#c4162a", "orange": "#fa6400", "blue": "#1f60c4"}.get(color, color)


def fmt(value: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{value:.0%}"
    if unit == "s":
        return f"{value:.0f}s" if value < 120 else f"{value / 60:.0f}min"
    if unit == "Bps":
        return f"{value / 1e6:.0f} MB/s"
    return f"{value:g}"


def draw(capture: dict, board: dict, output: Path) -> None:
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width, height = 16.0, rows * ROW_HEIGHT
    fig = plt.figure(figsize=(width, height), facecolor=BACKGROUND)
    start = capture["start"]
    events = [(t - start, text) for t, text in capture["events"]]
    outage = next(t for t, text in events if "FAILED" in text)
    snapshot = start + next(t for t, text in events if "back" in text) - 1
    results = {(r["panel"], r["ref"]): r["result"] for r in capture["results"]}

    for panel in panels:
        pos = panel["gridPos"]
        left, w = pos["x"] / COLUMNS, pos["w"] / COLUMNS
        top, h = pos["y"] / rows, pos["h"] / rows
        box = [left + 0.003, 1 - top - h + 0.003, w - 0.006, h - 0.006]
        if panel["type"] == "row":
            fig.text(
                left + 0.005,
                1 - top - h / 2,
                panel["title"],
                color=TEXT,
                fontsize=13,
                weight="bold",
                va="center",
            )
            continue
        if panel["type"] in ("timeseries", "bargauge"):  # room for tick labels and the title
            box = [box[0] + 0.035, box[1] + 0.012, box[2] - 0.04, box[3] - 0.03]
        ax = fig.add_axes(box, facecolor=PANEL)
        ax.set_title(panel["title"], color=TEXT, fontsize=9, loc="left")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors=MUTED, labelsize=7)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        series = [
            (legend(t.get("legendFormat", ""), s["metric"]), s)
            for t in panel["targets"]
            for s in results.get((panel["title"], t["refId"]), [])
        ]
        if panel["type"] == "stat":
            value = sum(value_at(s, snapshot) or 0 for _, s in series)
            ax.set_facecolor(threshold_color(panel, value))
            ax.text(0.5, 0.45, fmt(value, unit), color="white", fontsize=26, ha="center", va="center",
                    transform=ax.transAxes, weight="bold")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
        elif panel["type"] == "timeseries":
            for i, (name, s) in enumerate(series[:8]):
                xs = [float(t) - start for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                ax.plot(xs, ys, color=COLORS[i % len(COLORS)], linewidth=1.4, label=name[:60])
            ax.axvline(snapshot - start, color=MUTED, linestyle="--", linewidth=0.8)
            ax.axvspan(outage, snapshot - start + 1, color="#c4162a", alpha=0.12)
            ax.set_xlabel("seconds into the scenario", color=MUTED, fontsize=7)
            ax.legend(fontsize=6, loc="upper left", facecolor=PANEL, edgecolor=PANEL, labelcolor=TEXT)
        elif panel["type"] == "bargauge":
            bars = [(name, value_at(s, snapshot) or 0.0) for name, s in series]
            values = [v for _, v in bars]
            limit = panel.get("fieldConfig", {}).get("defaults", {}).get("max") or max([1.0, *values])
            ax.barh(range(len(bars)), values, height=0.45, color=[threshold_color(panel, v) for v in values])
            for i, (name, v) in enumerate(bars):
                ax.text(0, i + 0.3, name[:70], color=TEXT, fontsize=7)
                ax.text(limit * 1.01, i, fmt(v, unit), color=TEXT, va="center", fontsize=9, weight="bold")
            ax.set_xlim(0, limit * 1.12)
            ax.set_ylim(-0.5, len(bars) - 0.2)
            ax.set_yticks([])
        elif panel["type"] == "table":
            ax.set_xticks([])
            ax.set_yticks([])
            rows_ = [
                s["metric"] | {"Value": fmt(value_at(s, snapshot), unit)}
                for _, s in series
                if value_at(s, snapshot) is not None
            ]
            columns = [
                c
                for c in ("instance", "domain", "label", "target", "leg", "state", "Value")
                if any(c in r for r in rows_)
            ]
            cells = [[str(r.get(c, ""))[:28] for c in columns] for r in rows_[:8]]
            if cells:
                table = ax.table(cellText=cells, colLabels=columns, loc="upper center", cellLoc="left")
                table.auto_set_font_size(False)
                table.set_fontsize(7)
                for cell in table.get_celld().values():
                    cell.set_facecolor(PANEL)
                    cell.set_edgecolor("#2c3235")
                    cell.get_text().set_color(TEXT)
    fig.text(0.5, 0.003, "Drawn with matplotlib from the end-to-end scenario's Prometheus data; not a Grafana screenshot. "
             "Stats, gauges and tables: during the outage (dashed line).", color=MUTED, fontsize=8, ha="center")  # fmt: skip
    fig.savefig(output, dpi=80, facecolor=BACKGROUND)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the dashboard from captured query results.")
    parser.add_argument(
        "capture", type=Path, help="JSON written by the e2e test (ISCSIMPLE_DASHBOARD_CAPTURE)"
    )
    parser.add_argument("output", type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    draw(json.loads(args.capture.read_text()), json.loads(DASHBOARD.read_text()), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
