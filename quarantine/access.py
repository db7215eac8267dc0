"""Who is asking, and what their role lets them do (issue 17).

Every command on kept data runs on behalf of a :class:`Caller`:

* through the control socket of a running ``mailwarden serve`` (access
  control on: ``[access]`` in the config), the daemon builds the caller from
  the socket's peer credentials (SO_PEERCRED: uid, hence user name and the
  Unix groups of the group database) and maps groups to roles with
  ``[access.roles]``;
* without ``[access]`` (the embedded, single-owner setup) the CLI opens the
  store itself: the caller is the OS user, who can read the store's files
  anyway, and holds every role (``enforced`` is false).

:data:`COMMAND_ROLES` is the one table of which role each command needs (the
README's "Who may see what" shows the same table).  Finer rules (a personal
item's body, an identified export, a re-identification need an approved
grant; a reviewer may delete only non-personal items) are checked by the
commands themselves, which refuse with :func:`refusal`.

The caller lives in a context variable: the control server sets it in the
worker thread that runs one request, so code below the command (the audit
row's user, say) reads it with :func:`current`.
"""

from __future__ import annotations

import contextvars
import grp
import os
import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gateway.config import ROLES

#: Which roles may run each command (any one of them suffices).
COMMAND_ROLES: Mapping[str, frozenset[str]] = {
    "quarantine list": frozenset({"reviewer", "dpo"}),
    "quarantine show": frozenset({"reviewer", "investigator", "dpo"}),
    "quarantine release": frozenset({"reviewer", "dpo"}),
    "quarantine delete": frozenset({"reviewer", "dpo"}),
    "quarantine hold": frozenset({"dpo"}),
    "quarantine unhold": frozenset({"dpo"}),
    "log export": frozenset({"auditor", "investigator", "dpo"}),
    "log stats": frozenset({"auditor", "dpo"}),
    "log verify": frozenset({"auditor", "dpo"}),
    "log reidentify": frozenset({"investigator", "auditor", "dpo"}),
    "audit list": frozenset({"auditor", "dpo"}),
    "access request": frozenset({"reviewer", "investigator", "auditor", "dpo"}),
    "access approve": frozenset({"dpo"}),
    "access deny": frozenset({"dpo"}),
    "access list": frozenset(ROLES),
    "subject-access": frozenset({"dpo"}),
    "erase": frozenset({"dpo"}),
    "purge": frozenset({"operator"}),
    "check": frozenset({"operator"}),
    "reload": frozenset({"operator"}),
}

#: What each role is for (the README's table and ``access list --help``).
ROLE_DUTIES: Mapping[str, str] = {
    "reviewer": "IT: quarantine list, headers, release, delete of non-personal items",
    "investigator": "HR / line manager: requests exceptional access, uses approved grants",
    "auditor": "log export, log verify, audit list (pseudonymised)",
    "dpo": "approves requests; subject access, erasure, re-identification, holds",
    "operator": "purge, check, reload",
}

#: Commands that never reach kept data: they run in the caller's own process.
LOCAL_COMMANDS = frozenset({"serve", "store keygen"})


@dataclass(frozen=True)
class Caller:
    """Who runs a command, and with which roles."""

    user: str
    uid: int
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    #: true when access control applies (the request came through the control socket)
    enforced: bool = False
    #: the client's terminal: whether stdout is a tty, and its width
    tty: bool = False
    width: int | None = None
    pid: int | None = field(default=None, compare=False)

    def has(self, *roles: str) -> bool:
        return not self.enforced or bool(self.roles.intersection(roles))

    def describe(self) -> str:
        """``alice (roles: reviewer)``: for refusals."""
        roles = ", ".join(sorted(self.roles)) or "none"
        return f"{self.user} (roles: {roles})"


_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "mailwarden_caller", default=None)


def direct_caller() -> Caller:
    """The OS user running the CLI on the store directly (access control off)."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != name:
        name = f"{name} (sudo: {''.join(c for c in sudo_user if c.isprintable())[:64]})"
    return Caller(user=name, uid=uid, roles=frozenset(ROLES), enforced=False)


def current() -> Caller:
    """The caller of the command being run."""
    caller = _current.get()
    return caller if caller is not None else direct_caller()


def set_current(caller: Caller | None) -> contextvars.Token[Caller | None]:
    return _current.set(caller)


def reset_current(token: contextvars.Token[Caller | None]) -> None:
    _current.reset(token)


def groups_of(user: str, gid: int) -> frozenset[str]:
    """The names of the Unix groups ``user`` belongs to (primary ``gid`` included),
    from the group database at the time of the request."""
    names: set[str] = set()
    try:
        gids = os.getgrouplist(user, gid)
    except (KeyError, OSError):
        gids = [gid]
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            names.add(str(g))
    return frozenset(names)


def roles_of(groups: Iterable[str], role_groups: Mapping[str, Iterable[str]]) -> frozenset[str]:
    """The roles whose configured groups include one of ``groups``."""
    have = set(groups)
    return frozenset(role for role, gs in role_groups.items() if have.intersection(gs))


def caller_from_peer(uid: int, gid: int, pid: int | None,
                     role_groups: Mapping[str, Iterable[str]], *,
                     tty: bool = False, width: int | None = None) -> Caller:
    """The caller behind a control-socket connection's peer credentials."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    groups = groups_of(user, gid)
    return Caller(user=user, uid=uid, groups=groups, roles=roles_of(groups, role_groups),
                  enforced=True, tty=tty, width=width, pid=pid)


def required_roles(command: str) -> frozenset[str] | None:
    """The roles ``command`` (``"quarantine show"``) needs; None: not a command on kept data."""
    return COMMAND_ROLES.get(command)


def role_refusal(command: str, caller: Caller) -> str | None:
    """Why ``caller`` may not run ``command`` at all, or None when the role allows it."""
    need = required_roles(command)
    if need is None or caller.has(*need):
        return None
    return (f"{command}: refused: needs role {' or '.join(sorted(need))}; "
            f"{caller.describe()}")


class Denied(Exception):
    """A command refused for lack of a role or grant (exit 1, audited)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
