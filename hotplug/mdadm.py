"""mdadm, as the hotplug uses it: build the metadata-less RAID1, add the local leg, stop.

The commands are exactly the documented ones (README, "How attach works"):

    mdadm --build /dev/md/LABEL --level=1 --raid-devices=2 missing --write-mostly ISCSI_DEV
    mdadm /dev/md/LABEL --add LOCAL_DEV

so the array starts on the iSCSI copy alone and the local leg recovers *from* it.

Array names. For /dev/md/NAME, mdadm 4.2 picks a free number md127..md0, md511..md128
and fails with "No avail md devices" after 512 arrays. With ``CREATE names=yes`` in its
configuration it instead asks the kernel for a named array md_NAME (it writes md_NAME
to /sys/module/md_mod/parameters/new_array), which has no such limit. `--build` does
not accept `--config` ("option --config not valid in build mode", checked on the real
4.2 binary), so the setting must come from mdadm's own files: NAMES_DROPIN, which
mdadm reads next to /etc/mdadm/mdadm.conf.
"""

from __future__ import annotations

from pathlib import Path

from iscsimple.core.errors import OperationError
from iscsimple.core.run import CommandError, CommandTimeout, Deadline, run

MDADM = "mdadm"
BUILD_TIMEOUT = 10.0
ADD_TIMEOUT = 10.0
# Stopping flushes the array: with I/O queued to a dead iSCSI session this can take
# up to the session's replacement timeout. Bounded so `remove` always returns.
STOP_TIMEOUT = 10.0

NAMES_DROPIN = Path("/etc/mdadm/mdadm.conf.d/iscsimple.conf")
NAMES_DROPIN_TEXT = (
    "# Installed by iscsimple: name arrays built as /dev/md/NAME md_NAME in the kernel\n"
    "# instead of numbering them (mdadm numbers at most 512 arrays).\n"
    "CREATE names=yes\n"
)


class MdadmError(OperationError):
    pass


def build_argv(
    md_path: str,
    iscsi_dev: str | None,
    local_dev: str | None,
    bitmap: Path | None = None,
    bitmap_chunk_bytes: int | None = None,
) -> list[str]:
    """The --build command for the legs present; the local leg is added afterwards when both are.
    With `bitmap`: the same command plus the write-intent bitmap file (and its chunk size)."""
    if iscsi_dev is None and local_dev is None:
        raise ValueError("an array needs at least one leg")
    argv = [MDADM, "--build", md_path, "--level=1", "--raid-devices=2"]
    if iscsi_dev is not None:
        # Slot 0 stays empty for the local leg; the iSCSI leg serves reads only when it must.
        argv += ["missing", "--write-mostly", iscsi_dev]
    else:
        # No iSCSI leg: the local device is the only copy and the source; no resync.
        argv += [local_dev, "missing"]  # type: ignore[list-item]
    if bitmap is not None:
        argv.append(f"--bitmap={bitmap}")
        if bitmap_chunk_bytes:
            argv.append(f"--bitmap-chunk={bitmap_chunk_bytes // 1024}K")
    return argv


def build(
    md_path: str,
    iscsi_dev: str | None,
    local_dev: str | None,
    deadline: Deadline,
    bitmap: Path | None = None,
    bitmap_chunk_bytes: int | None = None,
) -> None:
    argv = build_argv(md_path, iscsi_dev, local_dev, bitmap, bitmap_chunk_bytes)
    _run(argv, BUILD_TIMEOUT, deadline, f"building {md_path}")


def version(deadline: Deadline) -> str | None:
    """What `mdadm --version` says (on stderr), or None if it cannot be run."""
    try:
        res = run([MDADM, "--version"], timeout=5.0, deadline=deadline)
    except OperationError:
        return None
    return (res.stdout + res.stderr).strip() or None


def add_argv(md_path: str, device: str, *, write_mostly: bool = False) -> list[str]:
    return [MDADM, md_path, "--add", *(["--write-mostly"] if write_mostly else []), device]


def add(md_path: str, device: str, deadline: Deadline, *, write_mostly: bool = False) -> None:
    argv = add_argv(md_path, device, write_mostly=write_mostly)
    _run(argv, ADD_TIMEOUT, deadline, f"adding {device} to {md_path}")


def stop(md_path: str, deadline: Deadline, timeout: float = STOP_TIMEOUT) -> None:
    _run(
        [MDADM, "--stop", md_path],
        timeout,
        deadline,
        f"stopping {md_path}",
        " (I/O stuck on a dead iSCSI session?); the array may still be running",
    )


def _run(argv: list[str], timeout: float, deadline: Deadline, what: str, timeout_hint: str = "") -> None:
    try:
        run(argv, timeout=timeout, deadline=deadline)
    except CommandTimeout as e:
        if e.spent:
            raise MdadmError(
                f"{what}: mdadm did not finish in the {e.timeout:.1f} s left: {e.spent}{timeout_hint}"
            ) from None
        raise MdadmError(f"{what}: mdadm did not finish within {e.timeout:.0f} s{timeout_hint}") from None
    except CommandError as e:
        detail = _last_line(e)
        if "No avail md devices" in e.stderr:
            raise MdadmError(
                f"{what}: mdadm has no free md device number left (it numbers at most 512 arrays); "
                f"let it name arrays md_LABEL instead: put 'CREATE names=yes' into {NAMES_DROPIN} "
                "(README: Installing into Xen)"
            ) from None
        if e.returncode is None:
            raise MdadmError(f"{what}: {detail}; install mdadm") from None
        raise MdadmError(f"{what} failed: {detail}") from None


def _last_line(e: CommandError) -> str:
    lines = [line for line in e.stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {e.returncode}"
