"""scripts/apt-install: daemons do not start during the install, and the host's own
/usr/sbin/policy-rc.d is never overwritten or deleted (a fake apt-get records what it saw)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "apt-install"


def run(tmp_path: Path, policy: Path, fail: bool = False) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "apt-get"
    fake.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = update ] && exit 0\ncat "{policy}" > "{tmp_path}/seen" 2>/dev/null\n'
        f"exit {1 if fail else 0}\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "ISCSIMPLE_POLICY_RC_D": str(policy)}
    return subprocess.run([str(SCRIPT), "somepackage"], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("fail", [False, True])
def test_writes_a_policy_during_the_install_and_removes_only_its_own(tmp_path, fail):
    policy = tmp_path / "policy-rc.d"
    r = run(tmp_path, policy, fail=fail)
    assert (r.returncode != 0) == fail
    assert "exit 101" in (tmp_path / "seen").read_text()
    assert not policy.exists()


def test_an_existing_policy_is_left_exactly_as_it_is(tmp_path):
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# the host's own\nexit 0\n")
    policy.chmod(0o700)
    assert run(tmp_path, policy).returncode == 0
    assert (tmp_path / "seen").read_text() == "#!/bin/sh\n# the host's own\nexit 0\n"
    assert policy.read_text() == "#!/bin/sh\n# the host's own\nexit 0\n"
    assert policy.stat().st_mode & 0o777 == 0o700


def test_demo_says_it_is_installing_on_its_first_run_only(tmp_path):
    """The first run's pip install is silent for seconds: the demo says what it is doing.
    (A stand-in venv whose pip 'installs' an agent that just prints its arguments.)"""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/bin/true")
    agent = venv / "bin" / "iscsimple-agent"
    pip = venv / "bin" / "pip"
    pip.write_text(f"#!/bin/sh\nprintf '#!/bin/sh\\necho agent \"$@\"\\n' > {agent}\nchmod +x {agent}\n")
    pip.chmod(0o755)
    demo = Path(__file__).resolve().parents[1] / "scripts" / "demo"
    env = {**os.environ, "ISCSIMPLE_VENV": str(venv)}
    first = subprocess.run([str(demo)], capture_output=True, text=True, env=env, timeout=60)
    assert "first run: installing iscsimple" in first.stderr
    assert first.stdout.strip() == "agent --demo"
    again = subprocess.run([str(demo)], capture_output=True, text=True, env=env, timeout=60)
    assert "installing" not in again.stderr and again.stdout.strip() == "agent --demo"
