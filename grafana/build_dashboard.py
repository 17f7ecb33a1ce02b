"""Builds grafana/dashboards/iscsimple.json with grafana-foundation-sdk.

    python grafana/build_dashboard.py           # rewrite the JSON
    python grafana/build_dashboard.py --check   # exit 1 if the JSON is out of date

The dashboard goes from the fleet (stats and per-target trends) to a host and a VM
(the `host`, `target` and `vm` variables narrow every panel). Panels read the
agent's metrics and the recording rules of alerts/iscsimple.rules.yml, which must
be loaded in the same Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, common, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard as DashboardBuilder
from grafana_foundation_sdk.builders.dashboard import (
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BigValueColorMode, BigValueGraphMode, VizOrientation
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "iscsimple.json"
UID = "iscsimple"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

HOST = 'instance=~"$host"'
TARGET = 'target=~"$target"'
# Selects the arrays of the chosen hosts, targets and VMs; joined into per-array
# expressions so that every panel honours all three variables.
ARRAYS = f'group by (job, instance, label, domain, target) (iscsimple_array_info{{{HOST}, {TARGET}, domain=~"$vm"}})'


def per_array(expr: str) -> str:
    """`expr` (labelled by job, instance, label) restricted to the selected arrays, with domain and target."""
    return f"({expr})\n  * on (job, instance, label) group_left (domain, target)\n{ARRAYS}"


def query(expr: str, legend: str = "__auto", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    return q.instant() if instant else q.range()


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in steps])
    )


def count_stat(title: str, description: str, expr: str, bad: str = "red") -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(query(expr))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .color_mode(BigValueColorMode.BACKGROUND)
        .graph_mode(BigValueGraphMode.AREA)
        .thresholds(thresholds((None, "green"), (1, bad)))
        .decimals(0)
        .height(4)
        .span(4)
    )


def series(
    title: str, description: str, *queries: prometheus.Dataquery, unit: str = "short"
) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
    for q in queries:
        panel = panel.with_target(q)
    return panel.height(8).span(12)


def build() -> DashboardBuilder:
    fleet_stats = [
        count_stat(
            "VMs on local mirror only",
            "VMs whose disk is served by the local leg alone because iSCSI failed. "
            "Their iSCSI copy is going stale: do not migrate, stop or move them.",
            f'sum(iscsimple:array_local_only:with_info{{{HOST}, {TARGET}, domain=~"$vm"}}) or vector(0)',
        ),
        count_stat(
            "Stale iSCSI copies",
            "Arrays with a stale-copy record: the local leg holds writes the iSCSI copy lacks "
            "until the mirror is healed. Do not move these VMs.",
            f'sum(iscsimple:array_iscsi_stale:with_info{{{HOST}, {TARGET}, domain=~"$vm"}}) or vector(0)',
        ),
        count_stat(
            "Unprotected VMs",
            "VMs whose local leg is missing, faulty or still recovering: they depend on iSCSI alone. "
            "Normal for a while after attach.",
            f'sum(iscsimple:array_unprotected:with_info{{{HOST}, {TARGET}, domain=~"$vm"}}) or vector(0)',
            bad="orange",
        ),
        count_stat(
            "iSCSI sessions down",
            "Sessions the hosts' registries expect that are not logged in.",
            f"count(iscsimple_iscsi_session_up{{{HOST}, {TARGET}}} == 0) or vector(0)",
        ),
        count_stat(
            "Resyncs running",
            "Arrays with a leg recovering or waiting to recover (local leg after attach, iSCSI leg during a heal).",
            f"sum({per_array('iscsimple:array_resyncing:bool')}) or vector(0)",
            bad="blue",
        ),
        (
            stat.Panel()
            .title("Agents down")
            .description("iscsimple-agent scrape targets that Prometheus cannot scrape: blind hosts.")
            .datasource(DATASOURCE)
            .with_target(query(f'count(up{{job="iscsimple", {HOST}}} == 0) or vector(0)'))
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
            .color_mode(BigValueColorMode.BACKGROUND)
            .graph_mode(BigValueGraphMode.NONE)
            .thresholds(thresholds((None, "green"), (1, "red")))
            .decimals(0)
            .height(4)
            .span(4)
        ),
    ]

    dashboard = (
        DashboardBuilder("iscsimple: mirrored iSCSI disks")
        .uid(UID)
        .description("Xen VM disks on iSCSI LUNs mirrored onto local disks: fleet, host and VM views.")
        .tags(["iscsimple", "iscsi", "md", "xen"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .link(
            DashboardLink("Runbooks")
            .type(DashboardLinkType.LINK)
            .url("https://github.com/iscsimple/iscsimple/tree/main/docs/runbooks")
            .target_blank(True)
        )
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("host")
            .label("Host")
            .datasource(DATASOURCE)
            .query('label_values(up{job="iscsimple"}, instance)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_variable(
            QueryVariable("target")
            .label("iSCSI target")
            .datasource(DATASOURCE)
            .query(f"label_values(iscsimple_iscsi_session_up{{{HOST}}}, target)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_variable(
            QueryVariable("vm")
            .label("VM")
            .datasource(DATASOURCE)
            .query(f"label_values(iscsimple_array_info{{{HOST}, {TARGET}}}, domain)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_row(Row("Fleet"))
    )
    for panel in fleet_stats:
        dashboard = dashboard.with_panel(panel)

    dashboard = (
        dashboard.with_panel(
            series(
                "VMs on local mirror only, by target",
                "How many VMs run on their local leg alone, per iSCSI target: a whole filer failing shows as "
                "one target jumping to all its VMs.",
                query(
                    f'sum by (target) (iscsimple:array_local_only:with_info{{{HOST}, {TARGET}, domain=~"$vm"}})',
                    legend="{{target}}",
                ),
            )
        )
        .with_panel(
            series(
                "Unprotected VMs, by host",
                "VMs depending on iSCSI alone (local leg missing, faulty or recovering), per host.",
                query(
                    f'sum by (instance) (iscsimple:array_unprotected:with_info{{{HOST}, {TARGET}, domain=~"$vm"}})',
                    legend="{{instance}}",
                ),
            )
        )
        .with_row(Row("iSCSI sessions"))
        .with_panel(
            bargauge.Panel()
            .title("Hosts logged in, by target and portal")
            .description(
                "Per target and portal: how many hosts have a logged-in session (of those expecting one)."
            )
            .datasource(DATASOURCE)
            .with_target(
                query(
                    f"sum by (target, portal) (iscsimple_iscsi_session_up{{{HOST}, {TARGET}}})",
                    legend="{{target}} via {{portal}}",
                    instant=True,
                )
            )
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
            .orientation(VizOrientation.HORIZONTAL)
            .decimals(0)
            .min(0)
            .height(8)
            .span(12)
        )
        .with_panel(
            series(
                "Session state, by host, target and portal",
                "1 = logged in, 0 = down (FAILED/FREE or gone). Flapping shows as a comb.",
                query(
                    f"iscsimple_iscsi_session_up{{{HOST}, {TARGET}}}",
                    legend="{{instance}} {{target}} {{portal}}",
                ),
            )
        )
        .with_panel(
            series(
                "LUNs not running, by target and SCSI state",
                "SCSI devices of iSCSI LUNs in another state than running (blocked while a session "
                "recovers, transport-offline after the replacement timeout).",
                query(
                    f'count by (target, state) (iscsimple_iscsi_lun_state{{{HOST}, {TARGET}, state!="running"}} == 1)',
                    legend="{{target}} {{state}}",
                ),
            )
        )
        .with_row(Row("Resync"))
        .with_panel(
            bargauge.Panel()
            .title("Resync progress")
            .description(
                "Completed fraction of each array's running resync or recovery; 100% when idle and in sync."
            )
            .datasource(DATASOURCE)
            .with_target(
                query(
                    per_array("iscsimple_array_sync_completed_ratio"),
                    legend="{{domain}} {{label}} ({{instance}})",
                    instant=True,
                )
            )
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
            .unit("percentunit")
            .min(0)
            .max(1)
            .orientation(VizOrientation.HORIZONTAL)
            .thresholds(thresholds((None, "orange"), (1, "green")))
            .height(8)
            .span(12)
        )
        .with_panel(
            series(
                "Resync ETA",
                "Time the running resyncs still need at their current speed (0 when idle). "
                "IscsimpleResyncTooSlow opens a ticket above 6 hours.",
                query(
                    per_array("iscsimple_array_sync_remaining_seconds"),
                    legend="{{domain}} {{label}} ({{instance}})",
                ),
                unit="s",
            )
        )
        .with_panel(
            series(
                "Resync speed",
                "md's resync/recovery speed per array (throttled to speed_limit_min while the VM is busy).",
                query(
                    per_array("iscsimple_array_sync_speed_bytes_per_second"),
                    legend="{{domain}} {{label}} ({{instance}})",
                ),
                unit="Bps",
            )
        )
        .with_row(Row("Legs"))
        .with_panel(
            table.Panel()
            .title("Leg states")
            .description("The state md reports for each leg of each array (one row per leg).")
            .datasource(DATASOURCE)
            .with_target(
                query(per_array("iscsimple_leg_state == 1"), instant=True).format(PromQueryFormat.TABLE)
            )
            .height(8)
            .span(12)
        )
        .with_panel(
            table.Panel()
            .title("Write-mostly legs")
            .description(
                "1 where md's write-mostly flag is set. It belongs on the iSCSI leg, so that reads come from the "
                "local disk (IscsimpleWriteMostlyWrongLeg)."
            )
            .datasource(DATASOURCE)
            .with_target(
                query(per_array("iscsimple_leg_write_mostly"), instant=True).format(PromQueryFormat.TABLE)
            )
            .height(8)
            .span(12)
        )
        .with_panel(
            series(
                "Corrected read errors per leg",
                "md's count of read errors it corrected on each leg.",
                query(per_array("iscsimple_leg_errors"), legend="{{domain}} {{label}} {{leg}}"),
            )
        )
        .with_row(Row("Hotplug and agent"))
        .with_panel(
            series(
                "Hotplug operations, by operation and result",
                "block-iscsimple add/remove (and CLI attach/detach) per interval; failures open a ticket.",
                query(
                    f"sum by (operation, result) (increase(iscsimple_hotplug_operations_total{{{HOST}}}[$__rate_interval]))",
                    legend="{{operation}} {{result}}",
                ),
            )
        )
        .with_panel(
            series(
                "Last hotplug duration",
                "How long the latest add/remove took, per host: attach includes the iSCSI login.",
                query(
                    f"iscsimple_hotplug_last_duration_seconds{{{HOST}}}",
                    legend="{{instance}} {{operation}}",
                ),
                unit="s",
            )
        )
        .with_panel(
            series(
                "Heal operations, by result",
                "The agent's heals of stale mirrors (iSCSI leg re-added write-mostly); failures page.",
                query(
                    f"sum by (result) (increase(iscsimple_heal_operations_total{{{HOST}}}[$__rate_interval]))",
                    legend="{{result}}",
                ),
            )
        )
        .with_panel(
            series(
                "Collector duration",
                "Time each of the agent's collectors takes per refresh; collector failures open a ticket.",
                query(
                    f"iscsimple_collector_duration_seconds{{{HOST}}}",
                    legend="{{instance}} {{collector}}",
                ),
                unit="s",
            )
        )
    )
    return dashboard


def render() -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.name} is out of date: run python grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
