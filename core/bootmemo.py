"""Facts remembered for one boot: small JSON files in the volatile state directory, keyed by the
kernel's boot id, so a costly probe (bitmap support) or a failure said once (the RAM store) is not
repeated by every hotplug of the boot, and nothing of an earlier boot is taken for this one."""

from __future__ import annotations

import contextlib
import json

from .atomic import write_atomic
from .errors import StateFileError
from .files import load_state_json, read_file
from .paths import HostPaths


def boot_id(paths: HostPaths) -> str | None:
    """The kernel's id of this boot: what a RAM store, an array instance and their records live for."""
    try:
        text = read_file(paths.procfs / "sys" / "kernel" / "random" / "boot_id", max_bytes=4096)
    except OSError:
        return None
    return text.decode("ascii", "replace").strip() or None


def recall(paths: HostPaths, name: str) -> dict | None:
    """What `remember` kept under `name` this boot; None when absent, unreadable, corrupt, of
    another boot, or when the boot cannot be told (then nothing is remembered: probe again)."""
    with contextlib.suppress(StateFileError, OSError):
        data = load_state_json(paths.state / name)
        current = boot_id(paths)
        if isinstance(data, dict) and current is not None and data.get("boot_id") == current:
            return data
    return None


def remember(paths: HostPaths, name: str, data: dict) -> None:
    """Keeps `data` for this boot. Never raises: a memo only saves work (the state directory may be
    read-only or full; the next call probes again)."""
    with contextlib.suppress(OSError):
        write_atomic(
            paths.state / name,
            json.dumps({**data, "boot_id": boot_id(paths)}) + "\n",
            mode=0o644,
            fsync=False,
        )
