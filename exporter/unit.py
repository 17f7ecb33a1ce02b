"""The agent's systemd unit: its writable paths come from HostPaths, never by hand.

Under `ProtectSystem=strict` everything is read-only but `ReadWritePaths=`. The agent
writes the stale-copy records, and its heal takes the hotplug's label lock (Xen's lock
directory) and may rewrite a registry entry; a path missing here once made every heal
fail with EROFS. So the unit's `ReadWritePaths=` block is rendered from `HostPaths`:

    python3 -m iscsimple.exporter.unit systemd/iscsimple-agent.service   # rewrite the block
    python3 -m iscsimple.exporter.unit --check systemd/iscsimple-agent.service

The package build renders the unit it installs the same way, and a test checks that the
committed unit is what this renders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iscsimple.core.paths import HostPaths

BEGIN = "# BEGIN ReadWritePaths, rendered from HostPaths by `python3 -m iscsimple.exporter.unit`"
END = "# END ReadWritePaths"

# Written by what the agent runs, not by iscsimple itself; "-": ignored if absent.
EXTRA_WRITABLE = (
    ("-/run/mdadm", "mdadm's map of running arrays, which --add may update"),
    ("-/var/lib/prometheus/node-exporter", "--textfile for node_exporter's textfile collector"),
)


def agent_writes(paths: HostPaths) -> list[tuple[Path, str]]:
    """Every directory the agent (detector, healer) writes in, and why."""
    return [
        (paths.records, "durable stale-copy records (StateDirectory= creates it)"),
        (paths.state, "the registry: a heal notes the LUN's new device name"),
        (paths.locks, "Xen's hotplug locks: a heal holds the label's lock"),
    ]


def _systemd_path(path: Path) -> str:
    # /var/run is a symlink to /run; systemd wants (and warns about) the real path.
    text = str(path)
    return "/run" + text[len("/var/run") :] if text == "/var/run" or text.startswith("/var/run/") else text


def read_write_block(paths: HostPaths) -> str:
    lines = [BEGIN]
    for path, why in agent_writes(paths):
        lines += [f"# {why}", f"ReadWritePaths={_systemd_path(path)}"]
    for path, why in EXTRA_WRITABLE:
        lines += [f"# {why}", f"ReadWritePaths={path}"]
    lines.append(END)
    return "\n".join(lines) + "\n"


def render(unit_text: str, paths: HostPaths) -> str:
    """`unit_text` with its ReadWritePaths block replaced by the one `paths` calls for."""
    start = unit_text.find(BEGIN)
    end = unit_text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the unit has no '{BEGIN}' ... '{END}' block")
    end = unit_text.index("\n", end) + 1
    return unit_text[:start] + read_write_block(paths) + unit_text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m iscsimple.exporter.unit", description=__doc__.split("\n")[0])
    p.add_argument("unit", type=Path)
    p.add_argument("--check", action="store_true", help="exit 1 if the block is not what HostPaths calls for")
    args = p.parse_args(argv)
    text = args.unit.read_text()
    rendered = render(text, HostPaths())
    if args.check:
        if rendered != text:
            print(f"{args.unit}: ReadWritePaths disagree with HostPaths; render it again", file=sys.stderr)
            return 1
        return 0
    if rendered != text:
        args.unit.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
