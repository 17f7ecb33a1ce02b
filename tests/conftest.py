"""Shared pytest fixtures. Keep each small; module-specific helpers live next to their tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fixturetree import materialize


@pytest.fixture
def kernel_state(tmp_path: Path) -> Callable[[str], Path]:
    """Factory: kernel_state("06") materialises that captured state and returns the fake root
    (with root/sys, root/proc/mdstat, root/dev)."""

    def make(name: str) -> Path:
        return materialize(name, tmp_path / "root" / name)

    return make
