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


def test_the_first_read_gives_the_freed_heap_back_and_works_without_glibc(tmp_path, monkeypatch):
    """first_full_read ends with malloc_trim(0) (the start-up's temporaries leave free pages
    amid the heap); where libc has no malloc_trim (not glibc) the read is the same."""
    import ctypes

    from iscsimple.exporter import agent as agent_module
    from iscsimple.exporter.simhost import SimulatedHost

    host = SimulatedHost(tmp_path)
    host.attach("vm1-disk", "vm1", "iqn.2003-01.org.example:t", 1)
    trims = []

    class Libc:
        def __init__(self, name):
            assert name == "libc.so.6"

        def malloc_trim(self, pad):
            trims.append(pad)
            return 1

    monkeypatch.setattr(ctypes, "CDLL", Libc)
    agent = agent_module.Agent(agent_module.AgentOptions(paths=host.paths, udev=False, mdstat_events=False))
    body = agent_module.first_full_read(agent.refresher).text
    assert trims == [0] and b'label="vm1-disk",local_device' in body

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    again = agent_module.Agent(agent_module.AgentOptions(paths=host.paths, udev=False, mdstat_events=False))
    assert b'label="vm1-disk",local_device' in agent_module.first_full_read(again.refresher).text
