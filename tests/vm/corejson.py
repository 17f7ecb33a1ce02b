"""core's readers of md and iSCSI sysfs as plain JSON, the same code run on the guest's live /sys and on
a capture materialised by tests/fixturetree.py: they must read the same."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from iscsimple.core.iscsi import read_iscsi_sessions
from iscsimple.core.md import read_md_arrays


def read(sysfs: Path) -> dict:
    md = read_md_arrays(sysfs)
    iscsi = read_iscsi_sessions(sysfs)
    return json.loads(
        json.dumps(
            {
                "md": {name: dataclasses.asdict(a) for name, a in md.arrays.items()},
                "md_errors": md.errors,
                "iscsi": [dataclasses.asdict(s) for s in iscsi.sessions],
                "iscsi_errors": iscsi.errors,
            },
            default=sorted,  # frozensets of member state flags
        )
    )


if __name__ == "__main__":
    print(json.dumps(read(Path(sys.argv[1]))))
