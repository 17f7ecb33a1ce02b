"""exporter/aside.py: a function run in a forked child while the caller works, its result
pickled back; run in the caller's process whenever a child cannot be used.

A fork is only made in a process with one thread (the agent at its start): the cases that
fork run in a fresh interpreter, as pytest's own process may run threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from functools import partial

from iscsimple.core.snapshot import HostSnapshot, read_md_arrays_parts
from iscsimple.exporter.aside import Aside
from iscsimple.exporter.simhost import SimulatedHost


def run_alone(code: str) -> str:
    """`code` in a new interpreter (one thread); what it prints."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_function_runs_in_a_child_and_its_result_comes_back():
    out = run_alone(
        "import os\n"
        "from iscsimple.exporter.aside import Aside\n"
        "aside = Aside(lambda: (os.getpid(), os.getppid(), {'x': [1, 2.5, 'three']}))\n"
        "assert aside.pid is not None\n"
        "child, parent, value = aside.result()\n"
        "print(child != os.getpid(), parent == os.getpid(), value)\n"
    )
    assert out == "True True {'x': [1, 2.5, 'three']}"


def test_a_child_that_fails_or_cannot_send_its_answer_leaves_the_work_to_the_caller():
    out = run_alone(
        "import os, logging\n"
        "from iscsimple.exporter.aside import Aside\n"
        "me = os.getpid()\n"
        "dies = Aside(lambda: os.getpid() if os.getpid() == me else os._exit(3))\n"
        "unpicklable = Aside(lambda: os.getpid() if os.getpid() == me else (lambda: 1))\n"
        "raises = Aside(lambda: os.getpid() if os.getpid() == me else 1 // 0)\n"
        "print([a.pid is not None and a.result() == me for a in (dies, unpicklable, raises)])\n"
    )
    assert out == "[True, True, True]"


def test_with_other_threads_running_no_child_is_made():
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        aside = Aside(os.getpid)
        assert aside.pid is None
        assert aside.result() == os.getpid()
    finally:
        stop.set()
        other.join()


def test_md_arrays_read_in_a_child_make_the_snapshot_a_plain_read_makes(tmp_path):
    """What the agent's start does (exporter/agent.py): the md arrays from a child."""
    host = SimulatedHost(tmp_path)
    for i in range(3):
        host.attach(f"vm{i}-disk", f"vm{i}", "iqn.2003-01.org.example:t", i + 1)
    host.finish_resync("vm1-disk")
    host.expire_session("iqn.2003-01.org.example:t")
    (host.paths.sysfs / "block" / host.md_device("vm2-disk") / "md" / "degraded").write_text("x\n")
    plain = HostSnapshot.read(host.paths)
    assert plain.md.errors  # the garbled attribute is an error line, from the child as here
    roots = ", ".join(
        f"{name}={str(getattr(host.paths, name))!r}"
        for name in ("procfs", "sysfs", "devfs", "state", "records")
    )
    out = run_alone(
        "import pickle, sys\n"
        "from functools import partial\n"
        "from pathlib import Path\n"
        "from iscsimple.core.paths import HostPaths\n"
        "from iscsimple.core.snapshot import HostSnapshot, read_md_arrays_parts\n"
        "from iscsimple.exporter.aside import Aside\n"
        f"paths = HostPaths(**{{k: Path(v) for k, v in dict({roots}).items()}})\n"
        "aside = Aside(partial(read_md_arrays_parts, paths.sysfs))\n"
        "assert aside.pid is not None\n"
        "snapshot = HostSnapshot.read(paths, aside.result)\n"
        "sys.stdout.write(pickle.dumps((snapshot.md, snapshot.arrays[:], snapshot.md_errors)).hex())\n"
    )
    import pickle

    md, arrays, md_errors = pickle.loads(bytes.fromhex(out))
    assert md == plain.md and list(arrays) == list(plain.arrays) and md_errors == plain.md_errors
    # In this process (other threads or not), the same through the caller.
    assert (
        HostSnapshot.read(host.paths, Aside(partial(read_md_arrays_parts, host.paths.sysfs)).result).md
        == plain.md
    )
