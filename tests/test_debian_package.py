"""The .deb that scripts/build-deb makes with Debian's tooling: what it installs, where, as
what, and that systemd accepts its unit as installed. Builds the package once per session
(marker `deb`: needs the build dependencies, which scripts/build-deb installs as root)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from iscsimple import __version__

pytestmark = pytest.mark.deb

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=120)
    return root


def control(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def test_version_matches_the_project(deb):
    changelog = subprocess.run(
        ["dpkg-parsechangelog", "-S", "Version", "-l", str(REPO / "debian" / "changelog")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert changelog == __version__ == control(deb, "Version")


def test_depends_on_debian_12_packages(deb):
    depends = control(deb, "Depends")
    for package in (
        "python3-prometheus-client (>= 0.16)",
        "python3-apscheduler (>= 3.9)",
        "python3-bcrypt (>= 3.2)",
        "python3-pyudev",
        "python3-yaml",
        "open-iscsi",
        "mdadm",
    ):
        assert package in depends


def test_installs_commands_hook_unit_and_data(root):
    for path, executable in (
        ("usr/bin/iscsimple", True),
        ("usr/bin/iscsimple-agent", True),
        ("usr/sbin/block-iscsimple", True),
        ("etc/xen/scripts/block-iscsimple", True),
        ("etc/xen/scripts/block-iscsimple-tab.conf", False),
        ("etc/iscsimple/iscsimple.toml", False),
        ("etc/default/iscsimple-agent", False),
        ("lib/systemd/system/iscsimple-agent.service", False),
        ("lib/systemd/system/iscsimple-bitmap-store.service", False),
        ("usr/lib/tmpfiles.d/iscsimple.conf", False),
        ("usr/share/iscsimple/alerts/iscsimple.rules.yml", False),
        ("usr/share/iscsimple/grafana/iscsimple.json", False),
        ("usr/share/doc/iscsimple/runbooks/IscsimpleHealFailing.md", False),
        ("usr/share/doc/iscsimple/data-safety.md", False),
        ("usr/share/doc/iscsimple/copyright", False),
        ("usr/share/bash-completion/completions/iscsimple", False),
    ):
        f = root / path
        assert f.is_file(), path
        assert bool(f.stat().st_mode & 0o111) == executable, path
    # The Xen hook is the launcher install-hook writes, naming the packaged entry point.
    hook = (root / "etc/xen/scripts/block-iscsimple").read_text()
    assert 'exec /usr/sbin/block-iscsimple "$@"' in hook
    # Installed console scripts run Debian's interpreter.
    assert (root / "usr/bin/iscsimple-agent").read_text().startswith("#! /usr/bin/python3") or (
        root / "usr/bin/iscsimple-agent"
    ).read_text().startswith("#!/usr/bin/python3")


def test_conffiles(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "ctl")], check=True, timeout=60)
    conffiles = set((tmp_path / "ctl" / "conffiles").read_text().split())
    assert conffiles == {
        "/etc/default/iscsimple-agent",
        "/etc/iscsimple/iscsimple.toml",
        "/etc/xen/scripts/block-iscsimple",
        "/etc/xen/scripts/block-iscsimple-tab.conf",
    }
    postinst = (tmp_path / "ctl" / "postinst").read_text()
    assert "deb-systemd-helper enable 'iscsimple-agent.service'" in postinst  # dh_installsystemd
    assert "deb-systemd-helper enable 'iscsimple-bitmap-store.service'" in postinst
    assert "systemd-tmpfiles" in postinst and "iscsimple.conf" in postinst


def test_runbook_urls_point_at_the_shipped_runbooks(root):
    rules = (root / "usr/share/iscsimple/alerts/iscsimple.rules.yml").read_text()
    urls = [line.split("runbook_url:", 1)[1].strip() for line in rules.splitlines() if "runbook_url:" in line]
    assert urls
    for url in urls:
        assert url.startswith("file:///usr/share/doc/iscsimple/runbooks/"), url
        assert (root / url.removeprefix("file:///")).is_file(), url  # uncompressed, linkable


def test_man_pages_generated_from_the_parsers(root):
    for command, option, section in (
        ("iscsimple", "--path.records", 1),
        ("iscsimple-agent", "--web.listen-address", 1),
        ("block-iscsimple", "--version", 8),  # in /usr/sbin
    ):
        text = gzip.decompress(
            (root / f"usr/share/man/man{section}/{command}.{section}.gz").read_bytes()
        ).decode()
        assert text.startswith(f'.TH {command} "{section}"'), text[:80]
        name = text.split(".SH NAME\n", 1)[1].splitlines()[0]
        assert name.startswith(f"{command} \\- "), name  # whatis/apropos
        assert option.replace("-", "\\-") in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_installed_unit(root, tmp_path):
    """The unit exactly as installed, in a root holding the package and the host's systemd
    units (sysinit.target...): ExecStart must name a binary the package ships. (The man page
    it documents is checked above: systemd would look for it in the host's man path.)"""
    image = tmp_path / "root"
    shutil.copytree(root, image, symlinks=True)
    shutil.copytree("/lib/systemd/system", image / "lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    unit = image / "lib/systemd/system/iscsimple-agent.service"
    assert unit.read_text() == (root / "lib/systemd/system/iscsimple-agent.service").read_text()
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={image}", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "iscsimple-agent.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_installed_commands_report_their_version(root):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root / "usr/lib/python3/dist-packages")}
    for command in ("usr/bin/iscsimple", "usr/bin/iscsimple-agent", "usr/sbin/block-iscsimple"):
        r = subprocess.run(
            ["/usr/bin/python3", str(root / command), "--version"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert r.returncode == 0 and r.stdout.strip().endswith(__version__), (command, r.stdout, r.stderr)
