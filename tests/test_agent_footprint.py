"""What the agent loads at start-up that most hosts never use costs resident memory on every dom0."""

from __future__ import annotations

import subprocess
import sys


def test_web_config_libraries_load_only_with_a_web_config():
    code = (
        "import sys\n"
        "from iscsimple.exporter import agent\n"
        "print(sorted(m for m in ('yaml', 'bcrypt') if m in sys.modules))\n"
        "from iscsimple.exporter.webconfig import WebConfig\n"
        "WebConfig()\n"
        "print(sorted(m for m in ('yaml', 'bcrypt') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out == ["[]", "[]"]


def test_a_web_config_still_parses_and_refuses_a_key_given_twice(tmp_path):
    from iscsimple.exporter.webconfig import WebConfigError, load_web_config

    config = tmp_path / "web.yml"
    config.write_text("http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    assert load_web_config(config).headers == {"X-Frame-Options": "deny"}
    config.write_text("tls_server_config: {}\ntls_server_config: {}\n")
    try:
        load_web_config(config)
    except WebConfigError as e:
        assert "appears twice" in str(e)
    else:
        raise AssertionError("a key given twice was accepted")


def test_scheduler_and_web_server_load_only_when_the_agent_serves():
    """`iscsimple-agent --once` (and every import of the agent) starts without apscheduler and the
    HTTP server: a large part of its start-up on a slow CPU."""
    code = (
        "import sys\n"
        "from iscsimple.exporter import agent\n"
        "print(sorted(m for m in ('apscheduler', 'iscsimple.exporter.web') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == ["[]"]
