"""iscsimple-agent: Prometheus exporter and health checks for mirrored iSCSI disks.

Entry point only: flags, logging, wiring. The parts:
- refresh.Refresher keeps one HostSnapshot (its thread is the only one that reads),
  deriving each from the previous one by re-reading what changed;
- events.* (udev, /proc/mdstat) say what changed; the apscheduler jobs ask for the
  poll of what the kernel does not announce and, rarely, a full sweep;
- health.HealthChecker and safety.Safety observe each snapshot;
- exposition.Renderer turns it into bytes; web.AgentHTTPServer serves them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import gzip
import ipaddress
import logging
import math
import os
import re
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from iscsimple import __version__ as VERSION
from iscsimple.core.atomic import write_atomic
from iscsimple.core.errors import InputError
from iscsimple.core.files import kind_of
from iscsimple.core.heal import Runner
from iscsimple.core.paths import (
    DEFAULT_RECORDS,
    DEFAULT_STATE,
    HostPaths,
    directory_problem,
    require_given_dirs,
)
from iscsimple.core.run import run
from iscsimple.core.snapshot import EVERYTHING, Changes, HostSnapshot, read_md_arrays_parts

from .aside import Aside
from .collectors import Context, default_collectors
from .events import ChangePoll, KernelLogWatcher, MdstatDiff, MdstatWatcher, UdevWatcher, udev_monitor
from .exposition import GzipBody, PlainBody, Rendered
from .health import HealthChecker
from .refresh import Refresher, Watcher
from .safety import Safety
from .webconfig import WebConfig, load_web_config

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from .web import AgentHTTPServer

log = logging.getLogger("iscsimple.agent")

# Port 9977: in the exporters' range 9100-9999 of the Prometheus "Default port allocations"
# wiki, with no exporter found on it in what we could search (see README "Agent").
DEFAULT_PORT = 9977
DEFAULT_LISTEN = f":{DEFAULT_PORT}"
# The full re-read behind the events and the poll. It costs about 0.6 ms of CPU per array
# (bench/scrape.py), so at thousands of arrays it is the largest cost of an idle agent.
DEFAULT_SWEEP = 1800.0
# While the kernel log announces session failures, a poll reads only the sessions that are not
# logged in (one may log in again silently), and every session's state once per this many polls
# (60 s at the default --refresh.interval): a net under the kernel's lines. It is a file per
# session, the largest part of an idle agent's cost.
SESSION_STATES_EVERY = 6


@dataclass
class AgentOptions:
    paths: HostPaths
    refresh_interval: float = 10.0  # the poll of sync progress and session states
    sweep_interval: float = DEFAULT_SWEEP
    stall_after: float = 300.0
    udev: bool = True
    mdstat_events: bool = True
    kernel_log_events: bool = True  # iSCSI connection failures from /dev/kmsg
    textfile: Path | None = None
    textfile_interval: float = 15.0
    watchers: list[Watcher] = field(default_factory=list)  # extra actions after each refresh
    # May run mdadm to heal stale iSCSI copies (policy in the config). mdadm acts on this host's
    # devices, so with another tree than /sys heal is on only with a runner acting on that tree.
    heal: bool = True
    heal_runner: Runner | None = None  # default: core.run.run (the real mdadm)


def first_full_read(refresher: Refresher) -> Rendered:
    """The start-up read of the whole host, without the cyclic garbage collector.

    It allocates millions of objects that all live on, and the collector would walk them
    again and again as they pile up (a fifth of the start-up at thousands of arrays); freed
    by reference counting, nothing it makes needs the collector. Afterwards they move to
    the permanent generation (gc.freeze): later collections skip them, and the heap pages
    the read's temporaries freed are given back (malloc_trim)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return refresher.refresh_now()
    finally:
        if enabled:
            gc.freeze()
            gc.enable()
        _trim_heap()


def _trim_heap() -> None:
    """Give the kernel back the heap pages the start-up freed: glibc keeps the free pages amid
    the heap that the reads' and the first render's temporaries left (a few hundred KiB at
    1000 arrays), and malloc_trim(0) releases every whole free page. Not glibc: nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Agent:
    """Everything but the HTTP server; usable in-process by tests, the demo and benchmarks."""

    def __init__(self, options: AgentOptions):
        self.options = options
        self.health = HealthChecker(stall_after=options.stall_after)
        paths = options.paths
        self.mdstat = MdstatDiff(paths.procfs / "mdstat")

        def read(previous: HostSnapshot | None, changes: Changes) -> HostSnapshot:
            if previous is None:
                self.mdstat.read()  # what later md events and polls are compared with
                # The md arrays are read in a child process meanwhile (exporter/aside.py).
                md_arrays = Aside(partial(read_md_arrays_parts, paths.sysfs))
                return HostSnapshot.read(paths, md_arrays.result)
            return previous.update(paths, changes)

        self.poll = ChangePoll(paths.sysfs, self.mdstat, sessions_every=SESSION_STATES_EVERY)
        self.refresher = Refresher(read, poll=self.poll)
        # Data safety (exporter/safety.py, docs/data-safety.md): stale-copy records, heal, their metrics.
        real_host = paths.sysfs == Path("/sys")
        heal = options.heal and (real_host or options.heal_runner is not None)
        self.safety = Safety.for_host(paths, heal=heal, runner=options.heal_runner or run)
        self.safety.mdstat = self.mdstat.latest  # every refresh after an md event or a poll read it
        self.refresher.collectors = default_collectors(
            Context(self.refresher.snapshot, self.health, self.safety)
        )
        self.refresher.watchers = [self.health, self.safety, *options.watchers]
        # Made by start(): `--once` never needs apscheduler or the web server, and importing them
        # is a large part of the agent's start-up (seconds on a slow or emulated CPU).
        self.scheduler: BackgroundScheduler | None = None
        self._watchers: list[UdevWatcher | MdstatWatcher | KernelLogWatcher] = []
        self.started = threading.Event()

    # -- life cycle ---------------------------------------------------------------

    def start(
        self, udev_monitor_factory=udev_monitor, on_first_read: Callable[[], object] | None = None
    ) -> Agent:
        """Read the host, then start the refresh thread, the event watchers and the schedule.

        `on_first_read` is called as soon as the first body is rendered (the web server starts
        serving it), before the rest starts."""
        first_full_read(self.refresher)  # ready before the first scrape
        self.refresher.start()
        if on_first_read is not None:
            on_first_read()
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(daemon=True)
        o = self.options
        if o.mdstat_events:
            self._watchers.append(
                MdstatWatcher(o.paths.procfs / "mdstat", self.refresher.request, diff=self.mdstat).start()
            )
        if o.kernel_log_events:
            kmsg = KernelLogWatcher(
                o.paths.devfs / "kmsg",
                self.refresher.request,
                kicks=self.safety.kicks,
                on_lost=self._kernel_log_lost,
            )
            self.poll.announced = kmsg.following
            self._watchers.append(kmsg.start())
        if o.udev:
            monitor = udev_monitor_factory()
            if monitor is not None:
                self._watchers.append(UdevWatcher(monitor, self.refresher.request).start())
        self.scheduler.add_job(
            self.refresher.request_poll, "interval", seconds=o.refresh_interval, id="poll", coalesce=True
        )
        self.scheduler.add_job(
            self.refresher.request,
            "interval",
            args=["full sweep", EVERYTHING],
            seconds=o.sweep_interval,
            id="sweep",
            coalesce=True,
        )
        if self.safety.probe.settings.configured:
            self.scheduler.add_job(
                self.safety.probe.run,
                "interval",
                seconds=self.safety.probe.INTERVAL,
                id="cluster-probe",
                next_run_time=datetime.now(),
                max_instances=1,
                coalesce=True,
            )
        if o.textfile is not None:
            self.scheduler.add_job(
                self.write_textfile, "interval", seconds=o.textfile_interval, id="textfile", coalesce=True
            )
        self.scheduler.start()
        self.started.set()
        return self

    def _kernel_log_lost(self) -> None:
        self.poll.want_sessions()
        self.refresher.request_poll("kernel log records lost")

    def stop(self) -> None:
        for watcher in self._watchers:
            watcher.stop()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.refresher.stop()

    # -- what the web server asks -----------------------------------------------------

    def metrics(self, accept: str, gzipped: bool = False) -> tuple[bytes, str]:
        body, content_type = self.metrics_pieces(accept, gzipped)
        return (body if isinstance(body, bytes) else b"".join(body)), content_type

    def metrics_pieces(self, accept: str, gzipped: bool = False) -> tuple[bytes | PlainBody | GzipBody, str]:
        """What the web server writes: a plain body as its pieces, never joined whole."""
        rendered = self.refresher.current
        if rendered is None:
            body = b"# no snapshot yet\n"
            return (gzip.compress(body) if gzipped else body), "text/plain; charset=utf-8"
        return rendered.gzipped(accept) if gzipped else rendered.pieces(accept)

    def healthy(self) -> tuple[bool, str]:
        if self.started.is_set() and not self.refresher.thread.is_alive():
            return False, "the refresh thread died; restart the agent"
        return True, "Healthy"

    def ready(self) -> tuple[bool, str]:
        rendered = self.refresher.current
        if rendered is None:
            return False, "not ready: the host has not been read yet"
        return (
            True,
            "Ready" if rendered.up else "Ready (some sources failed: see iscsimple_collector_success)",
        )

    def summary(self) -> str:
        rendered = self.refresher.current
        if rendered is None:
            return ""
        s = rendered.snapshot
        lines = []
        for a in s.arrays:
            flags = [f for f, on in (("LOCAL ONLY", a.local_only), ("unprotected", a.unprotected)) if on]
            lines.append(
                f"{a.label:<20} VM {a.domain or '?':<12} iscsi={a.iscsi.state:<10} local={a.local.state:<10} "
                f"{a.sync_action} {a.sync_completed_ratio:6.1%} {' '.join(flags)}"
            )
        for v in s.sessions:
            lines.append(f"session {v.target} {v.portal}: {v.state or 'gone'}")
        return "\n".join(lines) or "no iscsimple disks attached"

    def write_textfile(self) -> None:
        rendered = self.refresher.current
        if rendered is not None and self.options.textfile is not None:
            try:
                write_textfile(self.options.textfile, rendered.text)
            except OSError as e:  # a full disk, a directory removed: say so, try again next time
                log.error("cannot write the textfile %s: %s", self.options.textfile, e.strerror or e)


def textfile_problem(path: Path) -> str | None:
    """Why --textfile cannot be written (checked at start: a typo is a usage error, exit 2)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = directory_problem(path.parent)
        return f"cannot be created: its directory {parent}" if parent else None
    except OSError as e:
        return f"cannot be used ({e.strerror or e})"
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return None
    return f"is {kind_of(st.st_mode)}; give the path of a .prom file"


def write_textfile(path: Path, text: bytes) -> None:
    """For node_exporter's textfile collector: the file must appear whole (it reads *.prom)."""
    write_atomic(
        path, text, mode=0o644, fsync=False, private_dir=False
    )  # node_exporter's directory, not ours


# -- command line -----------------------------------------------------------------------


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    bad = argparse.ArgumentTypeError(
        f"{text!r} is not HOST:PORT (e.g. :{DEFAULT_PORT}, 127.0.0.1:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT})"
    )
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 <= int(port) <= 65535:
        raise bad
    if host.startswith("[") or host.endswith("]"):  # an IPv6 address in brackets
        if not (host.startswith("[") and host.endswith("]")):
            raise bad
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
        return host, int(port)
    if host and not _HOSTNAME.fullmatch(host):  # "" = every address, IPv4 and IPv6
        raise bad
    if host and host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise bad from None
    return host, int(port)


MAX_INTERVAL = 7 * 24 * 3600.0  # a week: anything longer is a typo, and nan/inf stop the scheduler


_DECIMAL = re.compile(r"[0-9]{1,12}(\.[0-9]{0,9})?|\.[0-9]{1,9}")


def _seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)]:
            number = text[: -len(unit)]
            break
    else:
        unit, number = "s", text
    try:
        if not _DECIMAL.fullmatch(number):  # not float(): it takes "1_0", "nan", 1e400 and non-ASCII digits
            raise ValueError(number)
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 15s, 500ms or 2m") from None
    if not math.isfinite(value) or not 0 < value <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most {MAX_INTERVAL:g}s")
    return value


def _speed(text: str) -> float:
    try:
        if not _DECIMAL.fullmatch(text):
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0 < value <= 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most 1e6")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iscsimple-agent",
        description="Prometheus exporter and health checks for Xen VM disks mirrored from iSCSI onto local disks.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--web.listen-address",
        dest="listen",
        type=_listen_address,
        default=None,
        help=f"address to serve metrics on (default {DEFAULT_LISTEN}; the demo uses 127.0.0.1)",
    )
    p.add_argument(
        "--web.config.file",
        dest="web_config",
        type=Path,
        help="exporter-toolkit web config (YAML): TLS cert/key and basic_auth_users with bcrypt hashes",
    )
    p.add_argument(
        "--path.procfs", dest="procfs", type=Path, default=Path("/proc"), help="procfs mount point"
    )
    p.add_argument("--path.sysfs", dest="sysfs", type=Path, default=Path("/sys"), help="sysfs mount point")
    p.add_argument(
        "--path.state",
        dest="state",
        type=Path,
        default=None,
        help=f"the hotplug script's registry of attachments (default {DEFAULT_STATE})",
    )
    p.add_argument(
        "--path.records",
        dest="records",
        type=Path,
        default=None,
        help=f"durable records (stale iSCSI copies), must survive reboots (default {DEFAULT_RECORDS})",
    )
    p.add_argument(
        "--config.file",
        dest="config",
        type=Path,
        default=HostPaths.from_env().config,
        help="iscsimple.toml: heal policy and the cross-host guard (default $ISCSIMPLE_CONFIG or %(default)s)",
    )
    p.add_argument("--path.devfs", dest="devfs", type=Path, default=Path("/dev"), help=argparse.SUPPRESS)
    p.add_argument(
        "--refresh.interval",
        dest="refresh_interval",
        type=_seconds,
        default=10.0,
        help="look for sync progress and session state changes this often (events refresh at once); "
        "default 10s",
    )
    p.add_argument(
        "--refresh.sweep-interval",
        dest="sweep_interval",
        type=_seconds,
        default=DEFAULT_SWEEP,
        help="re-read every array and session this often, whatever the events said; default 30m",
    )
    p.add_argument(
        "--health.stall-after",
        dest="stall_after",
        type=_seconds,
        default=300.0,
        help="flag a resync/recovery without progress for this long; default 5m",
    )
    p.add_argument("--once", action="store_true", help="print the metrics to stdout (or --textfile) and exit")
    p.add_argument(
        "--textfile",
        type=Path,
        help="also write the metrics to this .prom file atomically, for node_exporter's textfile collector",
    )
    p.add_argument(
        "--textfile.interval",
        dest="textfile_interval",
        type=_seconds,
        default=15.0,
        help="how often to write --textfile; default 15s",
    )
    p.add_argument("--no-udev", dest="udev", action="store_false", help="do not watch udev events")
    p.add_argument(
        "--demo",
        action="store_true",
        help="run on a simulated host that plays attach, resync, an iSCSI outage and recovery",
    )
    p.add_argument(
        "--demo.speed",
        dest="demo_speed",
        type=_speed,
        default=1.0,
        help="play the demo scenario this many times faster; default 1",
    )
    p.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        choices=["debug", "info", "warn", "error"],
        help="default info",
    )
    p.add_argument("--version", action="version", version=f"iscsimple-agent {VERSION}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level={"warn": logging.WARNING}.get(args.log_level, getattr(logging, args.log_level.upper())),
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # one line per job run is noise
    try:
        web_config = load_web_config(args.web_config) if args.web_config else WebConfig()
    except InputError as e:
        print(f"iscsimple-agent: {e}", file=sys.stderr)
        return 2
    if args.demo:
        return _run_demo(args, web_config)

    given = {name: f"--path.{name}" for name in ("state", "records") if getattr(args, name) is not None}
    paths = HostPaths(
        procfs=args.procfs,
        sysfs=args.sysfs,
        devfs=args.devfs,
        state=args.state or DEFAULT_STATE,
        records=args.records or DEFAULT_RECORDS,
        config=args.config,
    )
    try:
        require_given_dirs(paths, given)
    except InputError as e:
        print(f"iscsimple-agent: {e}", file=sys.stderr)
        return 2
    for flag, path in (
        ("--path.procfs", args.procfs),
        ("--path.sysfs", args.sysfs),
        ("--path.devfs", args.devfs),
    ):
        problem = directory_problem(path)
        if problem:
            print(f"iscsimple-agent: {flag} {path} {problem}; point it at the host's mount", file=sys.stderr)
            return 2
    if args.textfile is not None:
        problem = textfile_problem(args.textfile)
        if problem:
            print(f"iscsimple-agent: --textfile {args.textfile} {problem}", file=sys.stderr)
            return 2
    options = AgentOptions(
        paths=paths,
        refresh_interval=args.refresh_interval,
        sweep_interval=args.sweep_interval,
        stall_after=args.stall_after,
        # udev reports this machine's devices: meaningless when reading another tree.
        udev=args.udev and args.sysfs == Path("/sys"),
        textfile=args.textfile,
        textfile_interval=args.textfile_interval,
    )
    agent = Agent(options)
    if args.once:
        agent.safety.probe.run()  # a one-shot report says whether the cross-host guard answers too
        rendered = first_full_read(agent.refresher)
        if args.textfile:
            try:
                write_textfile(args.textfile, rendered.text)
            except OSError as e:
                print(
                    f"iscsimple-agent: cannot write --textfile {args.textfile}: {e.strerror or e}",
                    file=sys.stderr,
                )
                return 1
        else:
            sys.stdout.buffer.write(rendered.text)
            sys.stdout.flush()
        return 0 if rendered.up else 1
    return _serve(agent, args.listen or _listen_address(DEFAULT_LISTEN), web_config)


def _serve(
    agent: Agent, listen: tuple[str, int], web_config: WebConfig, on_ready=None, any_port_if_busy=False
) -> int:
    from .web import AgentHTTPServer, Endpoints

    endpoints = Endpoints(agent.metrics_pieces, agent.healthy, agent.ready, agent.summary)
    try:
        try:
            server = AgentHTTPServer(listen, endpoints, web_config)
        except OSError:
            if not any_port_if_busy:
                raise
            # The demo must start even where a real agent already holds the default port.
            server = AgentHTTPServer((listen[0], 0), endpoints, web_config)
    except OSError as e:
        print(
            f"iscsimple-agent: cannot listen on {listen[0]}:{listen[1]}: {e.strerror or e}; "
            "choose another with --web.listen-address",
            file=sys.stderr,
        )
        return 2
    if web_config.cleartext_passwords:
        log.warning("basic_auth_users without tls_server_config: passwords cross the network in clear")
    # Before the start: it serves the first body while the rest starts, and a SIGTERM then (systemd
    # stopping it at once) must stop it as cleanly as later, not kill it.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start(on_first_read=server.serve_in_thread)  # serving the first body while the rest starts
    log.info("iscsimple-agent %s listening on %s/metrics", VERSION, server.url)
    if on_ready is not None:
        on_ready(server)
    stop.wait()
    log.info("stopping")
    server.shutdown()
    agent.stop()
    return 0


def _run_demo(args, web_config: WebConfig) -> int:
    from .demo import DemoScenario, demo_options
    from .simhost import SimulatedHost

    with tempfile.TemporaryDirectory(prefix="iscsimple-demo-", ignore_cleanup_errors=True) as tmp:
        holder: dict[str, Agent] = {}

        def on_change(_what: str) -> None:
            # The simulated kernel's "uevent": refresh at once, as udev/mdstat would.
            if "agent" in holder:
                holder["agent"].refresher.request("demo host changed")

        host = SimulatedHost(Path(tmp), on_change=on_change)
        agent = Agent(
            AgentOptions(
                refresh_interval=min(args.refresh_interval, 5.0 / args.demo_speed),
                stall_after=min(args.stall_after, 120.0),
                textfile=args.textfile,
                textfile_interval=args.textfile_interval,
                **demo_options(host, args.demo_speed),
            )
        )
        holder["agent"] = agent
        scenario = DemoScenario(host, speed=args.demo_speed)
        listen = args.listen or ("127.0.0.1", DEFAULT_PORT)

        def on_ready(server: AgentHTTPServer) -> None:
            print(
                f"\n  iscsimple demo: open {server.url}/ and {server.url}/metrics\n",
                file=sys.stderr,
                flush=True,
            )
            # Every root the CLI needs, records included (without them status would read the real
            # /var/lib/iscsimple and show no ISCSI-STALE while /metrics does).
            roots = " ".join(
                f"--path.{name} {getattr(host.paths, name)}"
                for name in ("procfs", "sysfs", "devfs", "state", "records")
            )
            log.info("demo host tree in %s; to look at it: iscsimple status %s", tmp, roots)
            player.start()

        player = threading.Thread(target=scenario.run_forever, name="demo", daemon=True)
        try:
            return _serve(agent, listen, web_config, on_ready=on_ready, any_port_if_busy=args.listen is None)
        finally:
            scenario.stop()
            if player.is_alive():
                player.join(timeout=5)  # let it finish its step before the tree is removed
