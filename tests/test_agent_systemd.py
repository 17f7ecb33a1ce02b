"""The systemd unit the package ships: hardened, starting the installed binary, and letting
the agent write everything it writes (a heal that cannot take its lock must never happen
because the sandbox forgot a path)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from safetybed import LABEL, FakeMdadm, SafetyBed

from iscsimple.core.paths import HostPaths
from iscsimple.core.stale import StaleRecords
from iscsimple.exporter import unit
from iscsimple.exporter.safety import Safety

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "iscsimple-agent.service"


def directives(text: str | None = None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNIT.read_text() if text is None else text).splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_is_hardened():
    d = directives()
    assert d["ProtectSystem"] == ["strict"]
    # mdadm's ioctls for heal, and /dev/kmsg (proof of an uninterrupted bitmap for a partial heal)
    assert d["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN CAP_SYSLOG"]
    assert "/dev/kmsg r" in d["DeviceAllow"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules", "RestrictNamespaces"):
        assert d[key] == ["yes"], key
    assert "AF_NETLINK" in d["RestrictAddressFamilies"][0]  # udev events


def test_unit_starts_the_binary_the_package_installs():
    # debian/rules keeps pybuild's console scripts in /usr/bin (block-iscsimple alone moves to sbin).
    assert directives()["ExecStart"] == ["/usr/bin/iscsimple-agent $ARGS"]
    assert directives()["EnvironmentFile"] == ["-/etc/default/iscsimple-agent"]


def test_read_write_paths_are_rendered_from_host_paths():
    text = UNIT.read_text()
    assert unit.render(text, HostPaths()) == text, "run: python3 -m iscsimple.exporter.unit " + str(UNIT)
    writable = directives()["ReadWritePaths"]
    defaults = HostPaths()
    for path in (defaults.records, defaults.state, Path("/run/xen-hotplug")):
        assert str(path) in writable
    # /var/run is a symlink: systemd is given the real path.
    assert not any(p.lstrip("-").startswith("/var/run") for p in writable)


def test_render_follows_host_paths():
    moved = HostPaths(records=Path("/srv/iscsimple"), locks=Path("/var/run/locks"))
    rendered = directives(unit.render(UNIT.read_text(), moved))["ReadWritePaths"]
    assert "/srv/iscsimple" in rendered and "/run/locks" in rendered
    assert "/var/lib/iscsimple" not in rendered


def test_tmpfiles_create_the_run_directories_the_unit_binds():
    """ReadWritePaths= on a missing directory fails the unit: the package creates them at boot."""
    tmpfiles = (UNIT.parents[1] / "debian" / "iscsimple.tmpfiles").read_text()
    created = {line.split()[1] for line in tmpfiles.splitlines() if line.startswith("d ")}
    required = {p for p in directives()["ReadWritePaths"] if p.startswith("/run/")}
    assert required <= created


class _Writes:
    """Every path this process opens for writing, creates, renames or removes (audit hooks)."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "os.chmod")
    active: list[Path] | None = None
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.active is None:
            return
        paths: list[object] = []
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and set(mode) & set("wax+")) or (
                mode is None and isinstance(flags, int) and flags & cls.WRITE_FLAGS
            ):
                paths = [path]
        elif event in cls.EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                cls.active.append(Path(os.fsdecode(p)).absolute())

    def __enter__(self) -> list[Path]:
        if not _Writes.installed:
            sys.addaudithook(_Writes.hook)
            _Writes.installed = True
        _Writes.active = []
        return _Writes.active

    def __exit__(self, *exc) -> None:
        _Writes.active = None


def test_everything_the_heal_writes_is_inside_the_unit_read_write_paths(tmp_path):
    """The detector and a heal of a renamed LUN (record written, lock taken, registry rewritten,
    record cleared), wired as the agent wires them: each write lands in a directory
    `unit.agent_writes` names, which are the unit's ReadWritePaths."""
    bed = SafetyBed(tmp_path)
    paths = bed.paths.with_(locks=tmp_path / "xen-hotplug")
    fake_mdadm = FakeMdadm(bed)
    recorder = _Writes()

    def mdadm(argv, **kwargs):  # a separate process in reality, not the agent's own writes
        saved, _Writes.active = _Writes.active, None
        try:
            return fake_mdadm(argv, **kwargs)
        finally:
            _Writes.active = saved

    safety = Safety.for_host(paths, runner=mdadm, stable_seconds=0)
    allowed = [p for p, _ in unit.agent_writes(paths)]
    writes: list[Path] = []

    def refresh() -> None:
        snapshot = bed.snapshot()  # the simulated kernel's tree is written here, not recorded
        with recorder as written:
            safety.observe(snapshot)
        writes.extend(written)

    bed.fail_iscsi()
    refresh()
    assert StaleRecords(paths).get(LABEL) is not None
    bed.session_back(block="sdb", dev="8:16")  # the LUN came back under a new name
    refresh()
    assert safety.healer.results["success"] == 1, safety.healer.results
    bed.finish_recovery()
    refresh()
    assert StaleRecords(paths).get(LABEL) is None
    assert writes
    outside = [w for w in writes if not any(w.is_relative_to(d) for d in allowed)]
    assert outside == []
    for directory in allowed:  # and each allowed directory is really needed
        assert any(w.is_relative_to(directory) for w in writes), directory


@pytest.mark.parametrize("name", ["records", "state", "locks"])
def test_each_written_host_path_is_in_the_unit(name):
    block = unit.read_write_block(HostPaths())
    path = str(getattr(HostPaths(), name)).replace("/var/run/", "/run/")
    assert f"ReadWritePaths={path}\n" in block
