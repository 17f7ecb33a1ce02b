"""The real-kernel bed's measured figures: printed at the end of a run, with or without xdist workers."""

from __future__ import annotations

import json
from pathlib import Path

CACHE = Path(__file__).resolve().parent / "vm" / ".cache" / "timings.json"
WORKER_OUTPUT_KEY = "vm_timings"


def report(terminalreporter, timings: dict[str, float]) -> None:
    if not timings:
        return
    terminalreporter.section("real-kernel test bed: measured figures (seconds)")
    for name, seconds in timings.items():
        terminalreporter.write_line(f"{seconds:8.2f}  {name}")
    CACHE.parent.mkdir(exist_ok=True)
    CACHE.write_text(json.dumps(timings, indent=1) + "\n")
