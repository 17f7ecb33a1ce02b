"""The cross-host guard (core/cluster.py) against a fake Prometheus on 127.0.0.1: the config,
the two questions and their bounds, the operator's acceptance, and where the guard acts —
the hotplug `add`, the agent's heal, `resolve --keep local` — plus its metrics and the
`migrate-check` / `accept-loss` commands."""

from __future__ import annotations

import io
import json
import socket
import time

import pytest
from fakeprometheus import FakePrometheus
from safetybed import LABEL, TARGET, FakeMdadm, SafetyBed, as_block_script_host
from test_heal import Host as HealHost
from test_safety_attach import XENBUS_PATH

from iscsimple.cli import main as cli
from iscsimple.cli.resolve import Resolver
from iscsimple.core.cluster import (
    Acceptance,
    Acceptances,
    ClusterGuard,
    ClusterSettings,
    ClusterUnreachable,
    check_before_attach,
    check_before_writing_lun,
)
from iscsimple.core.config import Config, ConfigError, load_config
from iscsimple.core.errors import OperationError
from iscsimple.core.registry import Registry
from iscsimple.core.safety import stale_record
from iscsimple.core.stale import StaleRecords
from iscsimple.hotplug import main as block_script
from iscsimple.hotplug import mdadm as hotplug_mdadm

SINCE = 1.7e9 + 0.25


@pytest.fixture
def prom():
    p = FakePrometheus()
    yield p
    p.stop()


def settings(prom: FakePrometheus | None, **kw) -> ClusterSettings:
    url = prom.url if prom is not None else f"http://127.0.0.1:{closed_port()}"
    return ClusterSettings(prometheus_url=url, host_name="hostb", **kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# -- config ------------------------------------------------------------------------------------------


def test_cluster_config_defaults_and_values(tmp_path):
    assert load_config(tmp_path / "missing.toml").cluster == ClusterSettings()
    assert not ClusterSettings().configured
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[cluster]\nprometheus_url = "http://127.0.0.1:9090/"\ntimeout = 1.5\n'
        'on_unreachable = "proceed"\nhost_name = "xen1"\nlookback = "3d"\n'
    )
    c = load_config(cfg).cluster
    assert (c.prometheus_url, c.timeout, c.on_unreachable, c.host, c.lookback) == (
        "http://127.0.0.1:9090/",
        1.5,
        "proceed",
        "xen1",
        "3d",
    )
    assert c.configured and ClusterSettings().on_unreachable == "refuse"


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("timeout = 5", "at most 3"),
        ("timeout = 0", "above 0"),
        ('on_unreachable = "ignore"', "refuse, proceed"),
        ('prometheus_url = "prometheus:9090"', "http://"),
        ('lookback = "forever"', "duration"),
        ('host_name = "a b"', "host_name"),
        ("colour = 1", "unknown key 'colour'"),
    ],
)
def test_cluster_config_errors_name_the_line(tmp_path, line, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[heal]\nenabled = true\n[cluster]\n{line}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert f"{cfg}:4:" in str(e.value) and words in str(e.value)


# -- the two questions -----------------------------------------------------------------------------


def test_stale_report_of_another_host_refuses_and_names_host_disk_and_commands(prom, tmp_path):
    prom.host("hosta").stale[(TARGET, 1, LABEL)] = SINCE
    prom.host("hostb").stale[(TARGET, 1, LABEL)] = SINCE  # this host's own: its local record decides
    prom.host("hostc").stale[(TARGET, 2, "other")] = SINCE  # another LUN
    verdict = check_before_attach(settings(prom), SafetyBed(tmp_path).paths, TARGET, 1)
    assert not verdict.allowed and verdict.outcome == "refused"
    assert [r.host for r in verdict.reports] == ["hosta"]
    assert "host hosta" in verdict.reason and LABEL in verdict.reason and f"lun1@{TARGET}" in verdict.reason
    assert f"iscsimple resolve {LABEL} --keep local" in verdict.reason
    assert f"iscsimple accept-loss lun1@{TARGET} --host hosta" in verdict.reason
    assert 'host!="hostb"' in prom.queries[-1] and "last_over_time" in prom.queries[-1]


def test_a_host_that_went_down_still_counts_with_its_last_report(prom, tmp_path):
    a = prom.host("hosta")
    a.stale[(TARGET, 1, LABEL)] = SINCE
    a.up = False
    verdict = check_before_attach(settings(prom), SafetyBed(tmp_path).paths, TARGET, 1)
    assert not verdict.allowed and verdict.reports[0].down
    assert "down now" in verdict.reason


def test_a_host_that_cannot_read_its_records_counts_with_its_last_report(prom, tmp_path):
    """hosta's agent restarted while it cannot read its stale-copy records: it exports no stale
    series and its `up` is 1. Only up == 0 kept a last report: the attach was clear and built the
    mirror from the stale iSCSI copy. Now its last report counts, and the refusal says what to do."""
    a = prom.host("hosta")
    a.stale[(TARGET, 1, LABEL)] = SINCE  # its last report, before the restart
    a.records_readable = False
    paths = SafetyBed(tmp_path).paths
    verdict = check_before_attach(settings(prom), paths, TARGET, 1)
    assert not verdict.allowed and verdict.outcome == "refused"
    (report,) = verdict.reports
    assert report.records_unreadable and not report.down and report.since == SINCE
    assert "host hosta" in verdict.reason and "cannot read its stale-copy records" in verdict.reason
    assert "make its stale-copy records directory" in verdict.reason and "--keep local" not in verdict.reason
    assert f"iscsimple accept-loss lun1@{TARGET} --host hosta" in verdict.reason
    assert "unless on(instance, job) (up == 1)" in prom.queries[-1]
    Acceptances(paths).put(Acceptance("hosta", TARGET, 1, SINCE, LABEL))  # accept-loss covers it
    assert check_before_attach(settings(prom), paths, TARGET, 1).outcome == "accepted"


@pytest.mark.parametrize("readable", [True, None], ids=["exports-1", "older-agent"])
def test_a_running_host_that_reads_its_records_counts_with_what_it_reports_now(prom, tmp_path, readable):
    a = prom.host("hosta")
    a.records_readable = readable
    a.attached.add((TARGET, 1, LABEL))
    assert check_before_attach(settings(prom), SafetyBed(tmp_path).paths, TARGET, 1).outcome == "clear"
    a.stale[(TARGET, 1, LABEL)] = SINCE
    verdict = check_before_attach(settings(prom), SafetyBed(tmp_path).paths, TARGET, 1)
    assert not verdict.allowed and not verdict.reports[0].last and "--keep local" in verdict.reason


@pytest.mark.parametrize("policy", ["refuse", "proceed"])
def test_a_host_using_the_lun_that_cannot_read_its_records_and_has_no_report_is_cannot_tell(
    prom, tmp_path, policy, caplog
):
    """hosta uses the LUN, cannot read its records and reported no stale copy within lookback (its
    record, if any, was written while it could not export it): the cluster view is unknown, and
    the attach was clear. Now on_unreachable decides, and the refusal says what to do."""
    a = prom.host("hosta")
    a.records_readable = False
    a.attached.add((TARGET, 1, LABEL))
    prom.host("hostc").attached.add((TARGET, 1, "other"))  # reads its records: attached is normal
    paths = SafetyBed(tmp_path).paths
    verdict = check_before_attach(settings(prom, on_unreachable=policy), paths, TARGET, 1)
    assert [r.host for r in verdict.reports] == ["hosta"]
    if policy == "refuse":
        assert not verdict.allowed and verdict.outcome == "unreachable_refused"
        assert verdict.reason.startswith(
            f"cannot tell whether another host holds newer writes of lun1@{TARGET}"
        )
        assert f"host hosta [hosta:9977] uses lun1@{TARGET} as {LABEL} (vm)" in verdict.reason
        assert (
            "cannot read its stale-copy records" in verdict.reason
            and "within [cluster] lookback" in verdict.reason
        )
        assert "On host hosta: make its stale-copy records directory" in verdict.reason
        assert "on_unreachable = proceed" in verdict.reason
    else:
        assert verdict.allowed and verdict.outcome == "unreachable_proceeded"
        assert "CLUSTER GUARD CANNOT TELL: host hosta" in caplog.text
    a.attached = {(TARGET, 2, LABEL)}  # another LUN: this one is not its to know
    assert check_before_attach(settings(prom, on_unreachable=policy), paths, TARGET, 1).outcome == "clear"


def test_a_report_of_a_host_that_cannot_read_its_records_speaks_for_it(prom, tmp_path):
    """Its last report within lookback refuses (or, accepted, lets the attach go on): not 'cannot tell'."""
    a = prom.host("hosta")
    a.records_readable = False
    a.attached.add((TARGET, 1, LABEL))
    a.stale[(TARGET, 1, LABEL)] = SINCE
    paths = SafetyBed(tmp_path).paths
    assert check_before_attach(settings(prom), paths, TARGET, 1).outcome == "refused"
    Acceptances(paths).put(Acceptance("hosta", TARGET, 1, SINCE, LABEL))
    assert check_before_attach(settings(prom), paths, TARGET, 1).outcome == "accepted"


def test_the_unknown_arm_is_no_report(tmp_path):
    """A count of a host's series of the LUN (marked unknown) is never read as a stale since."""
    labels = {"host": "hosta", "label": LABEL, "instance": "hosta:9977", "iscsimple_last_report": "unknown"}
    result = _guard_answering(_vector({"metric": labels, "value": [0, "2"]})).stale_elsewhere(TARGET, 1)
    assert result.reports == [] and [(u.host, u.since) for u in result.unknown] == [("hosta", None)]


@pytest.mark.parametrize("why", ["down", "records_unreadable"])
def test_a_current_report_wins_over_a_last_report_of_the_same_disk(tmp_path, why):
    """An agent that cannot read its records still exports the records it read before: Prometheus
    answers that current report and the last one (marked) — one report, the current one."""
    labels = {"host": "hosta", "label": LABEL, "instance": "hosta:9977"}
    marked = {**labels, "iscsimple_last_report": why}
    for order in ((labels, marked), (marked, labels)):
        body = _vector(*({"metric": m, "value": [0, str(SINCE)]} for m in order))
        (report,) = _guard_answering(body).stale_elsewhere(TARGET, 1).reports
        assert not report.last
    (report,) = (
        _guard_answering(_vector({"metric": marked, "value": [0, str(SINCE)]}))
        .stale_elsewhere(TARGET, 1)
        .reports
    )
    assert (report.down, report.records_unreadable) == (why == "down", why == "records_unreadable")


def test_no_report_is_clear_and_the_query_time_is_measured(prom, tmp_path):
    prom.host("hosta").attached.add((TARGET, 1, LABEL))  # attached elsewhere is normal at add (migration)
    verdict = check_before_attach(settings(prom), SafetyBed(tmp_path).paths, TARGET, 1)
    assert verdict.allowed and verdict.outcome == "clear" and 0 < verdict.seconds < 1


def test_guard_off_without_a_url_asks_nobody(tmp_path):
    verdict = check_before_attach(ClusterSettings(), SafetyBed(tmp_path).paths, TARGET, 1)
    assert verdict.allowed and verdict.outcome == "off"


def test_acceptance_covers_exactly_the_accepted_report(prom, tmp_path):
    paths = SafetyBed(tmp_path).paths
    prom.host("hosta").stale[(TARGET, 1, LABEL)] = SINCE
    Acceptances(paths).put(Acceptance("hosta", TARGET, 1, SINCE, LABEL))
    verdict = check_before_attach(settings(prom), paths, TARGET, 1)
    assert verdict.allowed and verdict.outcome == "accepted"
    prom.host("hosta").stale[(TARGET, 1, LABEL)] = SINCE + 3600  # a later outage on the same host
    assert not check_before_attach(settings(prom), paths, TARGET, 1).allowed
    path = next((paths.records / "accepted-loss").iterdir())
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("where", ["accepted-loss", "records-root"])
def test_acceptances_behind_a_symlinked_directory_are_refused_not_followed(prom, tmp_path, where):
    """Only the acceptance files were opened O_NOFOLLOW: a symlink in place of the directory (or of
    the records root) was followed, and what it pointed to accepted a loss. Now: a clear error."""
    paths = SafetyBed(tmp_path).paths
    prom.host("hosta").stale[(TARGET, 1, LABEL)] = SINCE
    Acceptances(paths).put(Acceptance("hosta", TARGET, 1, SINCE, LABEL))
    assert check_before_attach(settings(prom), paths, TARGET, 1).outcome == "accepted"
    link = paths.records / "accepted-loss" if where == "accepted-loss" else paths.records
    link.rename(tmp_path / "elsewhere")
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OperationError, match=f"cannot read .*{link}: is a symbolic link"):
        check_before_attach(settings(prom), paths, TARGET, 1)


def test_corrupt_acceptance_is_a_clear_error(prom, tmp_path):
    paths = SafetyBed(tmp_path).paths
    (paths.records / "accepted-loss").mkdir(parents=True)
    (paths.records / "accepted-loss" / "x.json").write_text("{not json")
    prom.host("hosta").stale[(TARGET, 1, LABEL)] = SINCE
    with pytest.raises(OperationError, match="unreadable accepted-loss record"):
        check_before_attach(settings(prom), paths, TARGET, 1)


def test_attached_elsewhere_refuses_writing_the_lun(prom):
    prom.host("hosta").attached.add((TARGET, 1, LABEL))
    verdict = check_before_writing_lun(settings(prom), TARGET, 1)
    assert not verdict.allowed and "in use elsewhere" in verdict.reason and "host hosta" in verdict.reason
    prom.host("hosta").up = False  # a crashed host writes nothing
    assert check_before_writing_lun(settings(prom), TARGET, 1).allowed


@pytest.mark.parametrize("policy", ["refuse", "proceed"])
def test_unreachable_follows_the_policy(tmp_path, policy, caplog):
    verdict = check_before_attach(settings(None, on_unreachable=policy), SafetyBed(tmp_path).paths, TARGET, 1)
    if policy == "refuse":
        assert not verdict.allowed and verdict.outcome == "unreachable_refused"
        assert "on_unreachable = proceed" in verdict.reason
    else:
        assert verdict.allowed and verdict.outcome == "unreachable_proceeded"
        assert "CLUSTER GUARD UNREACHABLE" in caplog.text


def test_a_slow_prometheus_is_bounded_by_the_timeout(prom):
    prom.delay = 2.0
    start = time.monotonic()
    with pytest.raises(ClusterUnreachable):
        ClusterGuard(settings(prom, timeout=0.5)).stale_elsewhere(TARGET, 1)
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("mode", ["error", "garbage"])
def test_a_broken_answer_is_unreachable_never_clear(prom, mode):
    prom.mode = mode
    with pytest.raises(ClusterUnreachable):
        ClusterGuard(settings(prom)).stale_elsewhere(TARGET, 1)


# -- the hotplug add ---------------------------------------------------------------------------------


@pytest.fixture
def add_host(tmp_path, monkeypatch, prom):
    """A host with a LABEL free to attach (no local record), its config pointing at the fake."""
    bed = SafetyBed(tmp_path)
    bed.stop()
    bed.write()
    Registry(bed.paths).remove(bed.attachment.id)
    calls: list[list[str]] = []

    def no_tools(argv, **kwargs):
        calls.append(list(argv))
        raise OperationError("simulated: no real tools in this test")

    monkeypatch.setattr(hotplug_mdadm, "run", no_tools)
    monkeypatch.setattr("iscsimple.hotplug.iscsiadm.run", no_tools)
    xs = as_block_script_host(bed, monkeypatch, XENBUS_PATH, f"lun1@{TARGET}+{LABEL}")

    def configure(policy="refuse", url=None):
        bed.paths.config.write_text(
            f'[cluster]\nprometheus_url = "{url or prom.url}"\nhost_name = "hostb"\non_unreachable = "{policy}"\n'
        )

    configure()
    return bed, xs, calls, configure


def _stats(bed) -> dict:
    return json.loads((bed.paths.state / "hotplug-stats.json").read_text())["totals"]


def test_add_refused_by_the_cluster_guard_runs_nothing(add_host, prom):
    bed, xs, calls, _ = add_host
    prom.host("hosta").stale[(TARGET, 1, LABEL)] = SINCE
    assert block_script.main(["add"]) == 1
    assert calls == []  # refused before any login or mdadm
    error = xs.read(f"{XENBUS_PATH}/hotplug-error")
    assert "host hosta" in error and f"lun1@{TARGET}" in error and "accept-loss" in error
    assert Registry(bed.paths).list() == []
    assert _stats(bed)["cluster_guard"] == {"refused": 1}


def test_add_goes_on_when_the_cluster_is_clear(add_host, prom):
    bed, _xs, calls, _ = add_host
    block_script.main(["add"])
    assert calls and calls[0][0] == "iscsiadm"  # went on to the host (the fake tools then fail it)
    assert _stats(bed)["cluster_guard"] == {"clear": 1}


@pytest.mark.parametrize(("policy", "goes_on"), [("refuse", False), ("proceed", True)])
def test_add_with_prometheus_unreachable(add_host, policy, goes_on):
    bed, xs, calls, configure = add_host
    configure(policy, url=f"http://127.0.0.1:{closed_port()}")
    assert block_script.main(["add"]) == 1
    assert bool(calls) == goes_on
    assert _stats(bed)["cluster_guard"] == {f"unreachable_{'proceeded' if goes_on else 'refused'}": 1}
    if not goes_on:
        assert "cannot tell whether another host" in xs.read(f"{XENBUS_PATH}/hotplug-error")


# -- the heal and resolve on the host with the record -------------------------------------------------


def test_heal_skipped_while_another_host_uses_the_lun(tmp_path, prom):
    host = HealHost(tmp_path)
    host.safety.healer.cluster = settings(prom)
    prom.host("hosta").attached.add((TARGET, 1, LABEL))
    host.bed.fail_iscsi()
    host.refresh()
    host.bed.session_back()
    host.refresh()
    host.refresh(after=31)
    assert host.mdadm.calls == []
    assert host.results.get("skipped_in_use_elsewhere") == 1
    prom.host("hosta").attached.clear()  # the VM stopped there
    host.refresh(after=31)
    host.refresh(after=31)
    assert len(host.mdadm.calls) == 3 and host.results["success"] == 1


def test_resolve_keep_local_refused_while_another_host_uses_the_lun(tmp_path, monkeypatch, prom):
    bed = SafetyBed(tmp_path)
    monkeypatch.setattr(hotplug_mdadm, "run", FakeMdadm(bed))
    bed.fail_iscsi()
    StaleRecords(bed.paths).put(stale_record(bed.view()))
    bed.session_back()
    prom.host("hosta").attached.add((TARGET, 1, LABEL))
    resolver = Resolver(bed.paths, Config(cluster=settings(prom)), out=lambda _: None)
    with pytest.raises(OperationError, match="in use elsewhere: host hosta"):
        resolver.keep_local(LABEL, dry_run=False, wait=0)
    assert StaleRecords(bed.paths).get(LABEL) is not None


# -- metrics -----------------------------------------------------------------------------------------


def test_metrics_for_the_other_hosts_guard(tmp_path, prom):
    host = HealHost(tmp_path)
    host.safety.healer.cluster = settings(prom)
    host.safety.probe.settings = host.safety.healer.cluster
    host.safety.probe.guard = ClusterGuard(host.safety.healer.cluster)
    text = host.exposition()
    lun = f'domain="vm1",host="hostb",label="{LABEL}",lun="1",target="{TARGET}"'
    assert f"iscsimple_lun_attached{{{lun}}} 1.0" in text
    assert f'iscsimple_array_safe_to_migrate{{domain="vm1",label="{LABEL}"}} 1.0' in text
    assert "iscsimple_lun_stale_since_seconds{" not in text
    assert "iscsimple_cluster_guard_configured 1.0" in text
    assert "iscsimple_cluster_guard_reachable" not in text  # not probed yet
    host.safety.probe.run()
    host.bed.fail_iscsi()
    text = host.exposition()
    assert f"iscsimple_lun_stale_since_seconds{{{lun}}} 1.7e+09" in text
    assert f'iscsimple_array_safe_to_migrate{{domain="vm1",label="{LABEL}"}} 0.0' in text
    assert "iscsimple_cluster_guard_reachable 1.0" in text
    assert "iscsimple_cluster_guard_query_seconds " in text
    prom.stop()
    host.safety.probe.run()
    assert "iscsimple_cluster_guard_reachable 0.0" in host.exposition()


# -- the operator commands ---------------------------------------------------------------------------


def _cli(bed, *args) -> int:
    p = bed.paths
    common = ["--config", str(p.config), "--records", str(p.records), "--state", str(p.state)]
    common += ["--path.sysfs", str(p.sysfs), "--path.devfs", str(p.devfs), "--path.procfs", str(p.procfs)]
    return cli.main([*args, *common])


def test_migrate_check(tmp_path, capsys, prom):
    bed = SafetyBed(tmp_path)
    assert _cli(bed, "migrate-check", "vm1") == 0
    assert "safe to migrate" in capsys.readouterr().out
    assert _cli(bed, "migrate-check", "nosuchvm") == 2
    bed.paths.config.write_text(f'[cluster]\nprometheus_url = "{prom.url}"\nhost_name = "hostb"\n')
    prom.host("hostc").stale[(TARGET, 1, LABEL)] = SINCE
    assert _cli(bed, "migrate-check", LABEL) == 1
    assert "destination's attach would refuse" in capsys.readouterr().out
    prom.host("hostc").stale.clear()
    bed.fail_iscsi()
    bed.write()
    assert _cli(bed, "migrate-check", "vm1") == 1
    out = capsys.readouterr().out
    assert "NOT safe to migrate" in out and "faulty" in out


def test_accept_loss(tmp_path, capsys, prom):
    bed = SafetyBed(tmp_path)
    bed.paths.config.write_text(f'[cluster]\nprometheus_url = "{prom.url}"\nhost_name = "hostb"\n')
    prom.host("hosta").stale[(TARGET, 1, LABEL)] = SINCE
    spec = f"lun1@{TARGET}"
    assert _cli(bed, "accept-loss", spec, "--host", "hosta") == 2  # not confirmed: nothing done
    assert not (bed.paths.records / "accepted-loss").exists()
    assert "since 2023-11-14 22:13:20 UTC" in capsys.readouterr().out
    assert _cli(bed, "accept-loss", spec, "--host", "hosta", "--yes-discard-writes-on-that-host") == 0
    assert (
        check_before_attach(load_config(bed.paths.config).cluster, bed.paths, TARGET, 1).outcome == "accepted"
    )
    assert _cli(bed, "accept-loss", "lun1@iqn.2001-04.com.example:nope", "--host", "hosta") == 0
    assert "nothing to accept" in capsys.readouterr().out


class _Answer(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _guard_answering(body: bytes) -> ClusterGuard:
    return ClusterGuard(settings(None), urlopen=lambda request, timeout: _Answer(body))


def _vector(*samples) -> bytes:
    return json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": list(samples)}}
    ).encode()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100000,
        _vector({"metric": ["host", "hosta"], "value": [0, "1"]}),
        _vector({"metric": "x", "value": [0, "1"]}),
    ],
    ids=["deep-nesting", "metric-list", "metric-string"],
)
def test_a_malformed_answer_is_unreachable_not_a_traceback(body):
    """RecursionError (deep nesting) and AttributeError (labels not an object) escaped the guard:
    the hotplug said 'internal error' instead of following on_unreachable."""
    with pytest.raises(ClusterUnreachable):
        _guard_answering(body).stale_elsewhere(TARGET, 1)


@pytest.mark.parametrize("since", ["1e308", "-1e300"])
def test_a_stale_report_dated_beyond_any_calendar_still_refuses_in_words(tmp_path, since):
    """time.gmtime() raised OverflowError on such a sample while the refusal was worded."""
    body = _vector({"metric": {"host": "hosta", "label": LABEL, "instance": "hosta"}, "value": [0, since]})
    verdict = check_before_attach(
        settings(None), SafetyBed(tmp_path).paths, TARGET, 1, guard=_guard_answering(body)
    )
    assert not verdict.allowed and verdict.outcome == "refused"
    assert "host hosta" in verdict.reason and "not a date" in verdict.reason


@pytest.mark.parametrize(
    ("field", "value"),
    [("lun", True), ("lun", 1.9), ("lun", "1"), ("host", None), ("host", ["hosta"]), ("since", str(SINCE))],
)
def test_an_acceptance_of_the_wrong_types_waives_nothing(prom, tmp_path, field, value):
    """An acceptance lets an attach build over another host's stale report: `lun: true` or 1.9 read
    as LUN 1, `host: null` as "None", a since string as a time (int()/str()/float() converted them)."""
    paths = SafetyBed(tmp_path).paths
    prom.host("hosta").stale[(TARGET, 1, LABEL)] = SINCE
    path = Acceptances(paths).put(Acceptance("hosta", TARGET, 1, SINCE, LABEL))
    assert check_before_attach(settings(prom), paths, TARGET, 1).allowed  # as written: it waives
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(OperationError, match=f"{path}: unreadable accepted-loss record .*{field}"):
        check_before_attach(settings(prom), paths, TARGET, 1)
