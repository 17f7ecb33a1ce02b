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
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from iscsimple.core.atomic import remove_durably, write_atomic
from iscsimple.core.config import Config
from iscsimple.core.errors import OperationError, StateFileError
from iscsimple.core.files import load_state_json
from iscsimple.core.iscsi import IscsiSession
from iscsimple.core.paths import HostPaths
from iscsimple.core.registry import Attachment, Registry, portal_problem
from iscsimple.core.run import Deadline

from . import iscsiadm
from .devices import target_sessions

log = logging.getLogger(__name__)

# iscsid's reopen delay and our own start-up lie outside the login timeout.
LOGIN_GRACE = 2.0
# Kept back from remove's budget for the logout after waiting for a pending login.
LOGOUT_RESERVE = iscsiadm.LOGOUT_TIMEOUT
PENDING_POLL = 0.2


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
    # On disk before the login: if this process is killed during it (libxl SIGKILLs the
    # script, not iscsiadm), the session that appears is still known to be ours and the
    # remove that follows logs it out.
    opened_before = is_ours(paths, target)
    mark_opening(paths, target, record.portal, config.login_timeout)
    if before_login is not None:
        before_login(record.portal)
    try:
        logged_in = iscsiadm.login(target, record.portal, config.login_timeout, deadline)
    except BaseException:
        # iscsiadm is gone (failed or killed at its timeout): nothing to wait for, but a
        # session may exist, so the marker stays for the rollback's logout.
        _write_marker(paths, SessionMarker(target, record.portal))
        raise
    if logged_in:
        mark_ours(paths, target, record.portal)
        log.info("logged in to %s at %s (replacement timeout %d s)", target, record.portal, timeout)
    elif not opened_before:  # someone else's session appeared meanwhile: not ours to log out
        forget(paths, target)
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
    users = registry.users_of(target)
    if users.unreadable:
        # An entry we cannot read may be a disk on this target: its session stays, as it is.
        log.warning(
            "the session to %s stays logged in: %s unreadable registry entr%s may use it (%s); once that is "
            "sorted out, log out by hand if nothing uses it: iscsiadm -m node -T %s --logout",
            target,
            len(users.unreadable),
            "y" if len(users.unreadable) == 1 else "ies",
            "; ".join(users.unreadable),
            target,
        )
        return
    if users.attachments:
        _retune(paths, config, target, users.attachments)
        return
    if logout == LOGOUT_NEVER:
        return
    marker = read_marker(paths, target)
    if logout == LOGOUT_IF_OURS and marker is None:
        if target_sessions(paths, target):
            log.info("last user of %s gone; the session was not opened by iscsimple and stays", target)
        return
    if marker is not None:
        _await_pending_login(paths, target, marker, deadline)
    if iscsiadm.logout(target, attachment.portal or (marker.portal if marker else None), deadline):
        log.info("logged out of %s (no attachment uses it any more)", target)
    forget(paths, target)


def _retune(paths: HostPaths, config: Config, target: str, users: list[Attachment]) -> None:
    """The remaining users may allow a shorter timeout (the last unmirrored LUN left)."""
    timeout, _ = replacement_timeout(config, target, users)
    for session in target_sessions(paths, target):
        if session.recovery_tmo is not None and session.recovery_tmo != timeout:
            set_live_timeout(paths, session, timeout)


# -- sessions iscsimple opened ------------------------------------------------------


# The marker says iscsimple opened (or is opening) the target's session, so the last
# remove logs it out. It is written before `iscsiadm --login` with the end of the login's
# window (`login_until`) and rewritten with `logged_in_at` once the login returned.


@dataclass(frozen=True)
class SessionMarker:
    target: str
    portal: str | None
    logged_in_at: float | None = None  # None: the login did not return (yet)
    login_until: float | None = None  # until then a login we started may still complete

    def pending(self, now: float) -> bool:
        return self.logged_in_at is None and self.login_until is not None and now < self.login_until


def _marker(paths: HostPaths, target: str) -> Path:
    return paths.state / "sessions" / f"{target}.json"


def _write_marker(paths: HostPaths, marker: SessionMarker) -> None:
    write_atomic(_marker(paths, marker.target), json.dumps(asdict(marker), sort_keys=True), fsync=False)


def mark_opening(paths: HostPaths, target: str, portal: str | None, login_timeout: float) -> None:
    """About to run `iscsiadm --login`: a session may appear from now on until `login_timeout` has
    passed (iscsid gives up within it, see node_settings), even if this process dies."""
    _write_marker(paths, SessionMarker(target, portal, login_until=time.time() + login_timeout + LOGIN_GRACE))


def mark_ours(paths: HostPaths, target: str, portal: str | None) -> None:
    _write_marker(paths, SessionMarker(target, portal, logged_in_at=time.time()))


def read_marker(paths: HostPaths, target: str) -> SessionMarker | None:
    """The marker of `target`, None if iscsimple did not open its session. An unreadable marker
    still means ours (logging out a session nobody else uses beats leaking it)."""
    path = _marker(paths, target)
    try:
        data = load_state_json(path)
    except FileNotFoundError:
        return None
    except StateFileError as e:
        log.warning("%s: taken as a session iscsimple opened", e)
        return SessionMarker(target, None)
    if not isinstance(data, dict):
        log.warning("unreadable session marker %s: taken as a session iscsimple opened", path)
        return SessionMarker(target, None)
    portal, logged_in_at, until = data.get("portal"), data.get("logged_in_at"), data.get("login_until")
    return SessionMarker(
        target,
        portal if portal_problem(portal) is None else None,  # it reaches iscsiadm's argv
        float(logged_in_at) if _seconds(logged_in_at) else None,
        float(until) if _seconds(until) else None,
    )


def _seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_ours(paths: HostPaths, target: str) -> bool:
    return _marker(paths, target).exists()


def forget(paths: HostPaths, target: str) -> None:
    remove_durably(_marker(paths, target))


def _await_pending_login(paths: HostPaths, target: str, marker: SessionMarker, deadline: Deadline) -> None:
    """An add that started a login was killed before it returned: iscsiadm and iscsid may still
    be logging in. Wait until the session is up or the login's window has closed (within what
    the deadline leaves for the logout itself), so the logout does not run before the session
    appears and leave it behind."""
    if not marker.pending(time.time()):
        return
    log.info("a login to %s that iscsimple started may still be running: waiting for it to end", target)
    end = time.monotonic() + min(marker.login_until - time.time(), deadline.remaining() - LOGOUT_RESERVE)  # type: ignore[operator]
    while time.monotonic() < end:
        if any(s.state == "LOGGED_IN" for s in target_sessions(paths, target)):
            return
        time.sleep(PENDING_POLL)
