"""Fast checks of the harness itself (no qemu)."""

from pathlib import Path

import pytest
from vmharness import VmUnavailable, paths_to_keep


def test_paths_the_guest_hides_are_kept_once_others_not():
    keep = paths_to_keep(
        Path("/tmp/ci/checkout"), Path("/tmp/ci/checkout"), Path("/root/.cache/x"), Path("/run/y")
    )
    assert keep == ["/tmp/ci/checkout", "/run/y"]


def test_a_path_the_kernel_or_qemu_would_split_is_refused():
    for bad in ("/tmp/a b", "/tmp/a,b", "/tmp/a:b"):
        with pytest.raises(VmUnavailable, match="cannot be passed to the guest"):
            paths_to_keep(Path(bad))
