"""`iscsimple install-hook`: make xl find this installation's block-iscsimple.

xl runs ``/etc/xen/scripts/block-iscsimple`` (``script=block-iscsimple`` in a disk
entry) with a minimal environment (PATH=/usr/sbin:/usr/bin:/sbin:/bin), so the
launcher names the real entry point by absolute path — the console script of the
Python environment iscsimple is installed in (a venv, /usr/local, ...). Installing
again after moving or upgrading that environment refreshes it.

Also writes an example tab file and config if there are none. It never overwrites
either: the tab file decides which local device a mirror writes to.
"""

from __future__ import annotations

import os
import shlex
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from iscsimple.core.atomic import write_atomic
from iscsimple.core.errors import InputError, OperationError
from iscsimple.core.files import read_text
from iscsimple.core.paths import DEFAULT_CONFIG, DEFAULT_TAB
from iscsimple.hotplug.mdadm import NAMES_DROPIN, NAMES_DROPIN_TEXT

HOOK = Path("/etc/xen/scripts/block-iscsimple")
MARKER = "# iscsimple launcher"

EXAMPLE_TAB = """\
# block-iscsimple-tab.conf: which local device mirrors which LABEL.
#
# A domU disk entry 'vdev=xvda2,access=w,script=block-iscsimple,target=lun0@IQN+LABEL'
# builds /dev/md/LABEL from LUN 0 of IQN (write-mostly) and the DEVICE below; the
# local device is overwritten with the LUN's data when the VM starts.
#
# LABEL           DEVICE (absolute path, or MISSING to leave the local leg out)
# web1-root       /dev/vg0/web1-root
# web1-data       MISSING
#
# Check it with: iscsimple check-config
"""

EXAMPLE_CONFIG = """\
# iscsimple.toml: every key is optional; the values shown are the defaults.
# Check it with: iscsimple check-config

[iscsi]
# Portals to discover targets the open-iscsi node database does not know yet.
# portals = ["192.0.2.10:3260"]
# login_timeout = 15
# Seconds open-iscsi queues I/O for a dead session before failing it:
# mirrored LUNs short (md fails the iSCSI leg, the VM continues on the local leg),
# unmirrored LUNs long (ride out a short outage). A target carrying both gets the long one.
# replacement_timeout_mirrored = 5
# replacement_timeout_unmirrored = 120

# [targets."iqn.2001-04.com.example:storage"]
# replacement_timeout = 10

[attach]
# device_wait = 10
# budget = 30

[heal]
# enabled = true
# stable_seconds = 30
# backoff_max_seconds = 3600
# max_parallel = 4
"""


@dataclass
class InstallResult:
    hook: Path
    entry_point: str
    hook_action: str  # installed | updated | unchanged
    examples: list[tuple[Path, str]] = field(default_factory=list)  # (path, "written" | "kept")

    def report(self) -> list[str]:
        lines = [f"{self.hook}: {self.hook_action} (runs {self.entry_point})"]
        for path, action in self.examples:
            lines.append(f"{path}: {'example written' if action == 'written' else 'exists, left as it is'}")
        return lines


def entry_point() -> list[str]:
    """argv that runs this installation's block-iscsimple, by absolute path."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "block-iscsimple", Path(sys.executable).parent / "block-iscsimple"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    # Installed without console scripts (e.g. run from a source tree): the module itself.
    return [sys.executable, "-m", "iscsimple.hotplug.main"]


def launcher(argv: list[str]) -> str:
    return (
        "#!/bin/sh\n"
        f"{MARKER}: written by 'iscsimple install-hook'; run it again after moving iscsimple.\n"
        "# xl runs this for disks with script=block-iscsimple.\n"
        f'exec {shlex.join(argv)} "$@"\n'
    )


def _under(prefix: Path, path: Path) -> Path:
    return prefix / path.relative_to("/")


def install_hook(
    *,
    prefix: Path = Path("/"),
    dest: Path | None = None,
    tab: Path | None = None,
    config: Path | None = None,
    force: bool = False,
    default_tab: Path = DEFAULT_TAB,
    argv: list[str] | None = None,
    mdadm_names: bool = False,
) -> InstallResult:
    """Write the launcher atomically (mode 0755); write example tab/config files only where none exist.

    With `mdadm_names`, also mdadm's `CREATE names=yes` drop-in, needed beyond 512 arrays.
    Opt-in because it is host-wide: every array mdadm then creates by name is md_NAME.
    """
    hook = dest if dest is not None else _under(prefix, HOOK)
    argv = argv or entry_point()
    content = launcher(argv)
    try:
        existing = read_text(hook)
    except (FileNotFoundError, NotADirectoryError):
        existing = None
    except (OSError, UnicodeDecodeError) as e:
        raise OperationError(
            f"{hook}: cannot read the existing file ({e}); move it away and run install-hook again"
        ) from None
    if existing is not None and MARKER not in existing and not force:
        raise InputError(
            f"{hook} exists and is not an iscsimple launcher; move it away or run install-hook --force to replace it"
        )
    if existing == content:
        action = "unchanged"
    else:
        try:
            write_atomic(hook, content, mode=0o755, private_dir=False)
        except OSError as e:
            raise OperationError(
                f"{hook}: cannot write it ({e.strerror}); run install-hook as root"
            ) from None
        action = "installed" if existing is None else "updated"

    result = InstallResult(hook, shlex.join(argv), action)
    # With a prefix the standard places under it; without, where this host looks (ISCSIMPLE_TAB).
    tab_path = tab or (default_tab if prefix == Path("/") else _under(prefix, DEFAULT_TAB))
    config_path = config if config is not None else _under(prefix, DEFAULT_CONFIG)
    files = [(tab_path, EXAMPLE_TAB, 0o644), (config_path, EXAMPLE_CONFIG, 0o644)]
    if mdadm_names:
        files.append((_under(prefix, NAMES_DROPIN), NAMES_DROPIN_TEXT, 0o644))
    for path, example, mode in files:
        result.examples.append((path, _write_if_absent(path, example, mode)))
    return result


def _write_if_absent(path: Path, text: str, mode: int) -> str:
    """Create `path` with `text` unless it exists — O_EXCL, so a file appearing meanwhile is never replaced."""
    if path.exists() or path.is_symlink():
        return "kept"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.example")
    write_atomic(tmp, text, mode=mode, private_dir=False)
    try:
        os.link(tmp, path)  # fails if path exists: the link is the exclusive create
    except FileExistsError:
        return "kept"
    finally:
        tmp.unlink(missing_ok=True)
    return "written"
