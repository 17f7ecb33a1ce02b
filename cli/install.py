"""`iscsimple install-hook`: make xl find this installation's block-iscsimple.

xl runs ``/etc/xen/scripts/block-iscsimple`` (``script=block-iscsimple`` in a disk
entry) with a minimal environment (PATH=/usr/sbin:/usr/bin:/sbin:/bin), so the
launcher names the real entry point by absolute path — the console script of the
Python environment iscsimple is installed in (a venv, /usr/local, ...). Installing
again after moving or upgrading that environment refreshes it.

Also writes an example tab file and config if there are none. It never overwrites
either: the tab file decides which local device a mirror writes to.

On a host where the Debian package is installed, the hook is the package's conffile
(the launcher of /usr/sbin/block-iscsimple): install-hook checks it and never rewrites
it, so dpkg stays the one owner of its files.
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
from iscsimple.core.files import read_file, read_problem, read_text
from iscsimple.core.paths import DEFAULT_CONFIG, DEFAULT_TAB
from iscsimple.hotplug.mdadm import NAMES_DROPIN, NAMES_DROPIN_TEXT

HOOK = Path("/etc/xen/scripts/block-iscsimple")
MARKER = "# iscsimple launcher"
# What the Debian package installs: the hook is its launcher of this (debian/rules).
PACKAGED_ENTRY = Path("/usr/sbin/block-iscsimple")
# dpkg's list of the package's files, one absolute path a line.
DPKG_LIST = Path("/var/lib/dpkg/info/iscsimple.list")
REINSTALL = (
    "apt-get install --reinstall -o Dpkg::Options::=--force-confmiss "
    "-o Dpkg::Options::=--force-confnew iscsimple"
)

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
# check_after = false
"""


@dataclass
class InstallResult:
    hook: Path
    entry_point: str
    hook_action: str  # installed | updated | unchanged
    examples: list[tuple[Path, str]] = field(default_factory=list)  # (path, "written" | "kept")
    packaged: bool = False  # the Debian package's hook, checked and left to dpkg

    def report(self) -> list[str]:
        if self.packaged:
            lines = [
                f"{self.hook}: installed by the Debian package iscsimple, left as it is "
                f"(runs {self.entry_point})"
            ]
        else:
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


@dataclass(frozen=True)
class PackageState:
    """What the host says about the Debian package's hook (under a prefix)."""

    entry_installed: bool  # /usr/sbin/block-iscsimple is there: the package is installed
    hook_listed: bool  # dpkg's file list names the hook: the package (installed or removed) owns it

    @property
    def owns_hook(self) -> bool:
        return self.entry_installed or self.hook_listed


def package_state(prefix: Path = Path("/")) -> PackageState:
    """Read from the files dpkg leaves (no dpkg call): its list of the package's files, which
    names the hook while the package is installed or removed but not purged, and the entry point."""
    listing = _under(prefix, DPKG_LIST)
    try:
        # Untrusted like every file read: regular and bounded; paths are bytes, not always UTF-8.
        lines = read_file(listing).splitlines()
    except (FileNotFoundError, NotADirectoryError):
        lines = []
    except OSError as e:
        raise OperationError(
            f"{listing}: cannot read it ({read_problem(e)}), so cannot tell whether the Debian package "
            f"iscsimple owns {HOOK}; repair dpkg's database (apt-get install --reinstall iscsimple)"
        ) from None
    entry = _under(prefix, PACKAGED_ENTRY)
    return PackageState(
        entry_installed=entry.exists() or entry.is_symlink(),
        hook_listed=os.fsencode(HOOK) in lines,
    )


def check_packaged_hook(hook: Path, existing: str | None, state: PackageState) -> None:
    """The package's hook must be the package's launcher; anything else is for the operator to settle
    with dpkg, never for install-hook to overwrite (a conffile dpkg would then call modified)."""
    if not state.entry_installed:
        raise InputError(
            f"{hook}: a conffile of the removed Debian package iscsimple ({PACKAGED_ENTRY} is gone); "
            "install the package again (apt install iscsimple) or purge it (apt purge iscsimple) "
            "before install-hook writes another launcher"
        )
    if existing != launcher([str(PACKAGED_ENTRY)]):
        what = "missing" if existing is None else f"not the package's launcher of {PACKAGED_ENTRY}"
        raise InputError(
            f"{hook}: the Debian package iscsimple installs this hook and it is {what}; "
            f"install-hook leaves the package's files to dpkg: restore it with '{REINSTALL}'"
        )


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

    Where the Debian package owns the hook (PREFIX/usr/sbin/block-iscsimple, or dpkg's list naming
    it), only check it: left as it is when it is the package's launcher, an error saying what to
    do otherwise; the tab and config are the package's conffiles then. An explicit `argv` is the
    package build writing that launcher itself.

    With `mdadm_names`, also mdadm's `CREATE names=yes` drop-in, needed beyond 512 arrays.
    Opt-in because it is host-wide: every array mdadm then creates by name is md_NAME.
    """
    hook = dest if dest is not None else _under(prefix, HOOK)
    try:
        existing = read_text(hook)
    except (FileNotFoundError, NotADirectoryError):
        existing = None
    except (OSError, UnicodeDecodeError) as e:
        raise OperationError(
            f"{hook}: cannot read the existing file ({e}); move it away and run install-hook again"
        ) from None
    state = package_state(prefix) if argv is None and _is_hook(hook, prefix) else None
    examples: list[tuple[Path, str]] = []
    if state is not None and state.owns_hook:
        check_packaged_hook(hook, existing, state)
        result = InstallResult(hook, str(PACKAGED_ENTRY), "unchanged", packaged=True)
    else:
        result = _write_launcher(hook, existing, argv or entry_point(), force)
        # With a prefix the standard places under it; without, where this host looks (ISCSIMPLE_TAB).
        tab_path = tab or (default_tab if prefix == Path("/") else _under(prefix, DEFAULT_TAB))
        config_path = config if config is not None else _under(prefix, DEFAULT_CONFIG)
        examples += [(tab_path, EXAMPLE_TAB), (config_path, EXAMPLE_CONFIG)]
    if mdadm_names:
        examples.append((_under(prefix, NAMES_DROPIN), NAMES_DROPIN_TEXT))
    for path, example in examples:
        result.examples.append((path, _write_if_absent(path, example, 0o644)))
    return result


def _is_hook(path: Path, prefix: Path) -> bool:
    """Whether `path` is (or names the same file as) the hook xl runs under `prefix`."""
    hook = _under(prefix, HOOK)
    if path == hook:
        return True
    try:
        return os.path.samefile(path, hook)
    except (OSError, ValueError):
        return False


def _write_launcher(hook: Path, existing: str | None, argv: list[str], force: bool) -> InstallResult:
    content = launcher(argv)
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
    return InstallResult(hook, shlex.join(argv), action)


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
