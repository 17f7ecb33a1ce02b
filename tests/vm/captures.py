"""Captures of real kernel states for the fast suite.

Every capture is checked on the spot: core's readers must read it (materialised by tests/fixturetree.py)
exactly as they read the live /sys it came from. With ISCSIMPLE_SAVE_CAPTURES=1 it is also copied into
tests/fixtures/kernel-6.1-hotplug/NN_state/, in the layout of ../shared/fixtures/kernel-6.1-raid1-iscsi.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from corejson import read as core_read
from fixturetree import materialize

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kernel-6.1-hotplug"


def save_capture(bed, name: str, tmp_path: Path, keep: bool = True) -> Path:
    """keep=False: checked only (a state the shared fixtures already hold)."""
    live = bed.core_reading()
    captured_dir = bed.capture(name)
    captured = core_read(materialize(captured_dir, tmp_path / name) / "sys")
    assert live["md_errors"] == [] and live["iscsi_errors"] == []
    assert captured == live, f"capture {name} does not read like the live /sys"
    if keep and os.environ.get("ISCSIMPLE_SAVE_CAPTURES") == "1":
        dest = FIXTURES / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(captured_dir, dest)
    return captured_dir
