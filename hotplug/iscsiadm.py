"""open-iscsi's iscsiadm, as the hotplug uses it: node records, discovery, login, logout.

Every call is bounded (core.run). Exit codes are open-iscsi's (include/iscsi_err.h);
the ones we act on are named below. Errors become sentences an operator can act on.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from iscsimple.core.errors import OperationError
from iscsimple.core.run import CommandError, CommandTimeout, Deadline, run

log = logging.getLogger(__name__)

ISCSIADM = "iscsiadm"
REPLACEMENT_TIMEOUT_KEY = "node.session.timeo.replacement_timeout"
LOGIN_TIMEOUT_KEY = "node.conn[0].timeo.login_timeout"  # one login attempt (open-iscsi: 15 s)
LOGIN_RETRY_KEY = "node.session.initial_login_retry_max"  # attempts of a first login (open-iscsi: 8)

# include/iscsi_err.h
ERR_TRANS = 4  # connection failure
ERR_TRANS_TIMEOUT = 8
ERR_SESS_EXISTS = 15
ERR_ISCSID_NOTCONN = 20  # iscsid not running
ERR_NO_OBJS_FOUND = 21  # no records / no matching sessions
ERR_LOGIN_AUTH_FAILED = 24

NODE_TIMEOUT = 5.0  # node DB reads and updates touch only local files
DISCOVERY_TIMEOUT = 10.0
LOGOUT_TIMEOUT = 10.0
RESCAN_TIMEOUT = 5.0

_DISCOVERY_LINE = re.compile(r"^(?P<portal>\S+),(?P<tpgt>-?\d+)\s+(?P<target>\S+)$")


@dataclass(frozen=True)
class NodeRecord:
    """One node record of open-iscsi's database (/etc/iscsi/nodes/IQN/PORTAL)."""

    target: str
    portal: str  # "192.0.2.10:3260" or "[2001:db8::1]:3260"
    tpgt: int | None
    replacement_timeout: int | None
    settings: tuple[tuple[str, str], ...] = ()  # every `key = value` of the record

    def setting(self, key: str) -> str | None:
        return dict(self.settings).get(key)


class IscsiError(OperationError):
    pass


def parse_node_records(text: str) -> list[NodeRecord]:
    """`iscsiadm -m node -T IQN` output: full records ("# BEGIN RECORD") or "portal,tpgt target" lines."""
    records: list[NodeRecord] = []
    if "# BEGIN RECORD" in text:
        for block in text.split("# BEGIN RECORD")[1:]:
            values: dict[str, str] = {}
            for line in block.splitlines():
                key, sep, value = line.partition(" = ")
                if sep:
                    values[key.strip()] = value.strip()
            address, port = values.get("node.conn[0].address"), values.get("node.conn[0].port")
            if not values.get("node.name") or not address:
                continue
            host = f"[{address}]" if ":" in address and not address.startswith("[") else address
            records.append(
                NodeRecord(
                    target=values["node.name"],
                    portal=f"{host}:{port}" if port else host,
                    tpgt=_int(values.get("node.tpgt")),
                    replacement_timeout=_int(values.get(REPLACEMENT_TIMEOUT_KEY)),
                    settings=tuple(values.items()),
                )
            )
        return records
    for line in text.splitlines():
        m = _DISCOVERY_LINE.match(line.strip())
        if m:
            records.append(NodeRecord(m["target"], m["portal"], int(m["tpgt"]), None))
    return records


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def node_records(target: str, deadline: Deadline) -> list[NodeRecord]:
    """The node DB's records for `target`; [] when it does not know the target."""
    try:
        result = run(
            [ISCSIADM, "-m", "node", "-T", target], timeout=NODE_TIMEOUT, deadline=deadline, check=False
        )
    except CommandError as e:
        raise _explain(e, target) from None
    if result.returncode == ERR_NO_OBJS_FOUND:
        return []
    if result.returncode != 0:
        raise _explain(CommandError(result.argv, result.returncode, result.stderr), target)
    return [r for r in parse_node_records(result.stdout) if r.target == target]


def discover(portal: str, deadline: Deadline) -> list[NodeRecord]:
    """SendTargets discovery through `portal`, adding records only for targets the DB lacks.

    `-o new`: the default would also update (rewrite the settings of) known records
    and delete records of targets the portal no longer reports.
    """
    argv = [ISCSIADM, "-m", "discovery", "-t", "sendtargets", "-p", portal, "-o", "new"]
    try:
        result = run(argv, timeout=DISCOVERY_TIMEOUT, deadline=deadline)
    except CommandError as e:
        raise _explain(e, None, portal) from None
    return parse_node_records(result.stdout)


def set_node_setting(target: str, portal: str | None, key: str, value: str, deadline: Deadline) -> None:
    argv = [ISCSIADM, "-m", "node", "-T", target]
    if portal:
        argv += ["-p", portal]
    argv += ["-o", "update", "-n", key, "-v", value]
    try:
        run(argv, timeout=NODE_TIMEOUT, deadline=deadline)
    except CommandError as e:
        raise _explain(e, target, portal) from None


def login(target: str, portal: str, timeout: float, deadline: Deadline) -> bool:
    """Log in; True if this call created the session, False if it was there already."""
    argv = [ISCSIADM, "-m", "node", "-T", target, "-p", portal, "--login"]
    try:
        run(argv, timeout=timeout, deadline=deadline)
    except CommandError as e:
        if e.returncode == ERR_SESS_EXISTS:
            return False
        raise _explain(e, target, portal) from None
    return True


def logout(target: str, portal: str | None, deadline: Deadline, timeout: float = LOGOUT_TIMEOUT) -> bool:
    """Log out; False if there was no session (already logged out: fine, logout is idempotent)."""
    argv = [ISCSIADM, "-m", "node", "-T", target]
    if portal:
        argv += ["-p", portal]
    argv.append("--logout")
    try:
        run(argv, timeout=timeout, deadline=deadline)
    except CommandError as e:
        if e.returncode == ERR_NO_OBJS_FOUND:
            return False
        raise _explain(e, target, portal) from None
    return True


def rescan(sid: int, deadline: Deadline) -> None:
    """Ask the target for LUNs added since login (a shared session predates this LUN)."""
    try:
        run(
            [ISCSIADM, "-m", "session", "-r", str(sid), "--rescan"], timeout=RESCAN_TIMEOUT, deadline=deadline
        )
    except CommandError as e:
        log.warning("rescan of session %d failed: %s", sid, e)


def _explain(e: CommandError, target: str | None, portal: str | None = None) -> IscsiError:
    where = f"target {target}" if target else "discovery"
    if portal:
        where += f" at {portal}"
    if isinstance(e, CommandTimeout) and e.spent:
        message = (
            f"iSCSI {where} did not answer in the {e.timeout:.1f} s left ({' '.join(e.argv[1:])}): {e.spent}"
        )
    elif isinstance(e, CommandTimeout):
        message = (
            f"iSCSI {where} did not answer within {e.timeout:.0f} s ({' '.join(e.argv[1:])}); "
            "check that the filer is up and reachable from this host"
        )
    elif e.returncode == ERR_LOGIN_AUTH_FAILED:
        message = f"iSCSI login to {where} was refused (authentication failed); check the CHAP settings of the node record"
    elif e.returncode in (ERR_TRANS, ERR_TRANS_TIMEOUT):
        message = f"cannot reach iSCSI {where}: {_last_line(e)}; check the network and the filer"
    elif e.returncode == ERR_ISCSID_NOTCONN:
        message = f"iscsid is not running (needed for {where}); start it: systemctl start iscsid"
    elif e.returncode is None:
        message = f"cannot run iscsiadm for {where}: {_last_line(e)}; install open-iscsi"
    else:
        message = f"iscsiadm failed for {where} (exit {e.returncode}): {_last_line(e)}"
    error = IscsiError(message)
    error.returncode = e.returncode  # type: ignore[attr-defined]
    return error


def _last_line(e: CommandError) -> str:
    lines = [line for line in e.stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {e.returncode}"
