"""The one iSCSI session per target that every LUN and VM of that target shares.

Callers hold the target's lock (locking.target_lock_name) around `ensure` and
`release`, and their own registry entry names the target before `ensure` runs: so
of 16 concurrent adds exactly one logs in, and a remove that finds no other user
of the target is the last one and logs out.

iscsimple logs out only sessions it opened: a marker under STATE/sessions/ says so
(an operator's own session to a target, or one iscsid opened at boot, is left alone).

The replacement timeout (how long open-iscsi queues I/O for a dead session before
failing it) is a per-session choice:
- mirrored LUNs want it short: md then fails the iSCSI leg and the VM carries on on
  the local leg instead of stalling;
- unmirrored LUNs want it long: there is nothing to fail over to, so riding out a
  short outage beats I/O errors in the VM.
A target carrying both gets the long one (a stall is better than I/O errors for the
unmirrored VM). A per-target value in the config overrides both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from iscsimple.core.atomic import remove_durably, write_atomic
from iscsimple.core.config import Config
from iscsimple.core.errors import OperationError
from iscsimple.core.iscsi import IscsiSession
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Attachment, Registry
from iscsimple.core.run import Deadline

from . import iscsiadm
from .devices import target_sessions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionResult:
    portal: str | None
    logged_in: bool  # this call created the session
    replacement_timeout: int


def replacement_timeout(config: Config, target: str, users: Iterable[Attachment]) -> tuple[int, bool]:
    """The timeout for `target`'s session given who uses it, and whether both kinds do."""
    kinds = {a.label is not None for a in users}
    mixed = len(kinds) == 2
    mirrored_only = kinds == {True}
    return config.replacement_timeout(target, mirrored=mirrored_only), mixed


def node_settings(config: Config, timeout: int) -> list[tuple[str, str]]:
    """The node-record settings a login needs: the replacement timeout, and a login that
    iscsid itself gives up on within our login timeout.

    open-iscsi tries a first login up to initial_login_retry_max (8) times, login_timeout
    (15 s) each, and goes on after iscsiadm is killed; against a hung filer a session
    would then linger (and could log in after the add failed). Two attempts of a third
    of our login timeout each, plus iscsid's reopen delay, end before we kill iscsiadm.
    """
    attempt = max(1, int(config.login_timeout // 3))
    return [
        (iscsiadm.REPLACEMENT_TIMEOUT_KEY, str(timeout)),
        (iscsiadm.LOGIN_TIMEOUT_KEY, str(attempt)),
        (iscsiadm.LOGIN_RETRY_KEY, "1"),
    ]


def ensure(
    paths: HostPaths,
    config: Config,
    registry: Registry,
    target: str,
    deadline: Deadline,
    before_login: Callable[[str], None] | None = None,
) -> SessionResult:
    """A logged-in session to `target` with the right replacement timeout. Hold the target lock.

    `before_login(portal)` runs just before iscsiadm --login: from then on a session may
    appear even if the login fails or times out (iscsid keeps trying), so a rollback
    must log out.
    """
    timeout, mixed = replacement_timeout(config, target, registry.using_target(target))
    if mixed and target not in config.target_replacement_timeout:
        log.info(
            "target %s carries mirrored and unmirrored LUNs: replacement timeout %d s, the unmirrored "
            "one (a stall is better than I/O errors for the unmirrored VM)",
            target,
            timeout,
        )
    sessions = target_sessions(paths, target)
    if sessions:
        return _reuse(paths, target, sessions, timeout, deadline)

    record = _node_record(config, target, deadline)
    # Before login: the new session starts with them.
    for key, value in node_settings(config, timeout):
        if record.setting(key) != value:
            iscsiadm.set_node_setting(target, record.portal, key, value, deadline)
    if before_login is not None:
        before_login(record.portal)
    logged_in = iscsiadm.login(target, record.portal, config.login_timeout, deadline)
    if logged_in:
        mark_ours(paths, target, record.portal)
        log.info("logged in to %s at %s (replacement timeout %d s)", target, record.portal, timeout)
    return SessionResult(record.portal, logged_in, timeout)


def _reuse(
    paths: HostPaths, target: str, sessions: list[IscsiSession], timeout: int, deadline: Deadline
) -> SessionResult:
    up = [s for s in sessions if s.state == "LOGGED_IN"]
    if not up:
        states = ", ".join(f"session {s.sid} {s.state}" for s in sessions)
        raise OperationError(
            f"the iSCSI session to {target} is not logged in ({states}): the target is unreachable; "
            "open-iscsi keeps retrying, attach again once it is back"
        )
    session = up[0]
    if session.recovery_tmo != timeout:
        set_live_timeout(paths, session, timeout)
        # So that a re-login (after iscsid restarts, say) keeps it.
        with contextlib.suppress(OperationError):
            iscsiadm.set_node_setting(
                target, session.portal, iscsiadm.REPLACEMENT_TIMEOUT_KEY, str(timeout), deadline
            )
    log.info("sharing session %d to %s", session.sid, target)
    return SessionResult(session.portal, False, timeout)


def set_live_timeout(paths: HostPaths, session: IscsiSession, timeout: int) -> None:
    """Change a running session's replacement timeout (sysfs recovery_tmo; root may write it)."""
    path = paths.sysfs / "class" / "iscsi_session" / session.name / "recovery_tmo"
    try:
        path.write_text(f"{timeout}\n")
        log.info(
            "session %d to %s: replacement timeout %s -> %d s",
            session.sid,
            session.target,
            session.recovery_tmo,
            timeout,
        )
    except OSError as e:
        log.warning(
            "cannot set %s to %d: %s; the session keeps %s s", path, timeout, e.strerror, session.recovery_tmo
        )


def _node_record(config: Config, target: str, deadline: Deadline) -> iscsiadm.NodeRecord:
    """The node DB's record; discovery only for a target the DB does not know."""
    records = iscsiadm.node_records(target, deadline)
    if records:
        return records[0]
    if not config.portals:
        where = config.path or "the config file"
        raise OperationError(
            f"open-iscsi's node database does not know {target} and no discovery portals are configured; "
            f"add the filer to [iscsi] portals in {where} or run iscsiadm -m discovery yourself"
        )
    problems = []
    for portal in config.portals:
        try:
            found = [r for r in iscsiadm.discover(portal, deadline) if r.target == target]
        except OperationError as e:
            problems.append(str(e))
            continue
        if not found:  # not printed (some versions list only what they added): ask the DB
            found = iscsiadm.node_records(target, deadline)
        if found:
            log.info("discovered %s at %s", target, found[0].portal)
            return found[0]
        problems.append(f"{portal} does not offer it")
    raise OperationError(
        f"target {target} is not in the node database and discovery did not find it ({'; '.join(problems)}); "
        "check the target name and that the filer exports it to this host"
    )


LOGOUT_IF_OURS = "if-ours"  # remove: only a session iscsimple opened
LOGOUT_ALWAYS = "always"  # rollback of an add that logged in (or tried to)
LOGOUT_NEVER = "never"  # rollback of an add that found the session there


def release(
    paths: HostPaths,
    config: Config,
    registry: Registry,
    attachment: Attachment,
    deadline: Deadline,
    logout: str = LOGOUT_IF_OURS,
) -> None:
    """Drop `attachment` from the registry; log out if it was the target's last user. Hold the target lock."""
    target = attachment.target
    assert target is not None
    registry.remove(attachment.id)
    users = registry.using_target(target)
    if users:
        _retune(paths, config, target, users)
        return
    if logout == LOGOUT_NEVER:
        return
    if logout == LOGOUT_IF_OURS and not is_ours(paths, target):
        if target_sessions(paths, target):
            log.info("last user of %s gone; the session was not opened by iscsimple and stays", target)
        return
    if iscsiadm.logout(target, attachment.portal, deadline):
        log.info("logged out of %s (no attachment uses it any more)", target)
    forget(paths, target)


def _retune(paths: HostPaths, config: Config, target: str, users: list[Attachment]) -> None:
    """The remaining users may allow a shorter timeout (the last unmirrored LUN left)."""
    timeout, _ = replacement_timeout(config, target, users)
    for session in target_sessions(paths, target):
        if session.recovery_tmo is not None and session.recovery_tmo != timeout:
            set_live_timeout(paths, session, timeout)


# -- sessions iscsimple opened ------------------------------------------------------


def _marker(paths: HostPaths, target: str) -> Path:
    return paths.state / "sessions" / f"{target}.json"


def mark_ours(paths: HostPaths, target: str, portal: str | None) -> None:
    data = {"target": target, "portal": portal, "logged_in_at": time.time()}
    write_atomic(_marker(paths, target), json.dumps(data, sort_keys=True), fsync=False)


def is_ours(paths: HostPaths, target: str) -> bool:
    return _marker(paths, target).exists()


def forget(paths: HostPaths, target: str) -> None:
    remove_durably(_marker(paths, target))
