"""The story `iscsimple-agent --demo` plays on a SimulatedHost (exporter/simhost.py).

VMs attach, their local legs recover, a filer fails and comes back. The heal is
the agent's own: `demo_options` wires the agent's Healer to the simulated host's
mdadm (`SimulatedHost.mdadm`) with heal on, as on a real host, and writes a
`[heal] stable_seconds` scaled to the demo's speed into the simulated host's
config. The scenario only waits for the heal; if the agent does not heal in time
(heal disabled, or no agent), it says so and heals as an operator would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .simhost import SimulatedHost

log = logging.getLogger("iscsimple.demo")

DEMO_TARGET_A = "iqn.2003-01.org.example.filer1:vmstore"
DEMO_TARGET_B = "iqn.2003-01.org.example.filer2:vmstore"
DEMO_PORTALS = {DEMO_TARGET_A: "192.0.2.10:3260", DEMO_TARGET_B: "192.0.2.11:3260"}
DEMO_VMS = (
    ("web1-disk", "web1", DEMO_TARGET_A, 1, "xvda"),
    ("db1-disk", "db1", DEMO_TARGET_A, 2, "xvda"),
    ("mail1-disk", "mail1", DEMO_TARGET_B, 1, "xvda"),
)
# Scenario seconds (divided by the demo's speed): how long the returned session must look
# healthy before the agent heals, and how long the scenario waits for that heal.
HEAL_STABLE_SECONDS = 10.0
HEAL_WAIT_SECONDS = 60.0


def demo_options(host: SimulatedHost, speed: float = 1.0) -> dict:
    """AgentOptions fields for an agent watching `host`: heal on, its mdadm calls acting on the
    simulated kernel, and the [heal] wait scaled to the demo's speed (written to host's config)."""
    host.paths.config.parent.mkdir(parents=True, exist_ok=True)
    host.paths.config.write_text(
        "# written by the demo: heal as on a real host, faster\n"
        f"[heal]\nenabled = true\nstable_seconds = {HEAL_STABLE_SECONDS / speed:g}\n"
    )
    return {
        "paths": host.paths,
        "heal": True,
        "heal_runner": host.mdadm,
        "udev": False,
        "mdstat_events": False,
    }


class DemoScenario:
    """Plays, in a loop: VMs attach, local legs recover, filer1 fails (VMs on local legs
    alone), filer1 returns, the iSCSI legs heal, the VMs are detached."""

    def __init__(self, host: SimulatedHost, speed: float = 1.0, sleep: Callable[[float], None] | None = None):
        self.host = host
        self.speed = speed
        self._stop = threading.Event()
        self._sleep = sleep or (lambda s: self._stop.wait(s / self.speed))

    def stop(self) -> None:
        self._stop.set()

    def _pause(self, seconds: float) -> None:
        self._sleep(seconds)
        if self._stop.is_set():
            raise _Stopped

    def run_forever(self) -> None:
        round_ = 1
        while not self._stop.is_set():
            log.info("demo round %d starts", round_)
            try:
                self.play_once()
            except _Stopped:
                return
            round_ += 1

    def _wait_until(self, done: Callable[[], bool], seconds: float) -> bool:
        """Pause in 1 s steps (scenario time) until `done()`; False when `seconds` passed first."""
        for _ in range(int(seconds)):
            if done():
                return True
            self._pause(1)
        return done()

    def _say(self, text: str, *args) -> None:
        log.info("demo: " + text, *args)

    def _recover(self, labels: list[str], seconds: float) -> None:
        steps = 5
        for i in range(1, steps + 1):
            if self._stop.is_set():
                return
            for label in labels:
                self.host.advance_resync(label, i / (steps + 1), speed_kib=40_000 + 5_000 * i)
            self._pause(seconds / steps)
        for label in labels:
            self.host.finish_resync(label)

    def play_once(self) -> None:
        h = self.host
        for target, portal in DEMO_PORTALS.items():
            h.add_target(target, portal)
        for label, domain, target, lun, vbd in DEMO_VMS:
            if self._stop.is_set():
                return
            self._say("starting VM %s: attaching %s (LUN %d of %s)", domain, label, lun, target)
            started = time.monotonic()
            h.attach(label, domain, target, lun, size_bytes=8 << 30, vbd=vbd)
            h.record_hotplug("add", "success", 1.2 + (time.monotonic() - started))
        self._say("local legs are copying from iSCSI (VMs depend on iSCSI alone until done)")
        self._recover([v[0] for v in DEMO_VMS], 20)
        self._say("all mirrors in sync: every VM is protected")
        self._pause(15)
        self._say("OUTAGE: %s stops answering; its session goes FAILED", DEMO_TARGET_A)
        h.fail_session(DEMO_TARGET_A)
        self._pause(5)
        self._say(
            "replacement timeout expired: md fails the iSCSI legs; web1 and db1 run on local disks alone"
        )
        h.expire_session(DEMO_TARGET_A)
        self._pause(40)
        self._say("%s is back: session LOGGED_IN, iSCSI legs still faulty (stale copy)", DEMO_TARGET_A)
        h.restore_session(DEMO_TARGET_A)
        healed = [v[0] for v in DEMO_VMS if v[2] == DEMO_TARGET_A]
        self._say(
            "the agent heals %s once the session has looked healthy for [heal] stable_seconds",
            ", ".join(healed),
        )
        if not self._wait_until(
            lambda: all(h.iscsi_leg_recovering(label) for label in healed), HEAL_WAIT_SECONDS
        ):
            self._say(
                "the agent did not heal within %.0f s (is [heal] enabled?): healing as an operator would",
                HEAL_WAIT_SECONDS,
            )
            for label in healed:
                if not h.iscsi_leg_recovering(label):
                    h.heal(label)
        else:
            self._say("the agent re-added the iSCSI legs write-mostly: they copy from the local legs")
        self._recover(healed, 20)
        self._say("healed: all mirrors in sync again")
        self._pause(15)
        for label, domain, *_ in DEMO_VMS:
            if self._stop.is_set():
                return
            self._say("stopping VM %s: detaching %s", domain, label)
            h.detach(label)
            h.record_hotplug("remove", "success", 0.4)
        self._pause(5)


class _Stopped(Exception):
    """Raised out of a pause when the demo is stopped mid-story."""
