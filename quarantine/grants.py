"""Grounds, cases and two-person approval for exceptional access (issue 17).

SQL-free: the rules, over the store protocol's request methods
(``add_access_request``, ``get_access_request``, ``access_requests``,
``decide_access_request``).  The click layer is ``cli/access.py``.

* **Purpose.** Every access that reads content or identifies a person names
  a *ground* (one of ``[access] grounds``: the policy's valid reasons) and a
  *case* reference; both go into the audit row's detail (``ground``,
  ``case``).
* **Requests.** ``access request`` records who asks, for what scope (one
  quarantine item, or one address), on which ground, for which case, and
  why.  It opens nothing by itself.
* **Approval.** A ``dpo`` other than the requester approves or denies
  (the same person is refused, and the refusal is audited).  An approved
  request is a *grant*: it is held by the requester only, valid for
  ``[access] grant_hours`` from the approval by the store's clock, for its
  case only, and opens only what its scope allows (:data:`OPENS`):

  - an item grant: the body of that item when it is marked personal;
  - an address grant: the bodies of personal items concerning the address,
    identified log exports filtered to the address (``log export
    --identified --address A``), and re-identification of a pseudonym that
    stands for the address or that appears in an export filtered to it.

* **States** (computed, :func:`state_of`): ``pending``, ``denied``,
  ``approved`` (a grant in force), ``expired`` (approved, past its end).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from quarantine.access import Caller, Denied
from quarantine.store import StoreProtocol as Store
from quarantine.store import addresses_of, iso

#: What a request may name.
SCOPES = ("item", "address")

#: What an approved grant of each scope opens.
PERSONAL_BODY = "personal-body"
IDENTIFIED_EXPORT = "identified-export"
REIDENTIFY = "reidentify"
OPENS: Mapping[str, frozenset[str]] = {
    "item": frozenset({PERSONAL_BODY}),
    "address": frozenset({PERSONAL_BODY, IDENTIFIED_EXPORT, REIDENTIFY}),
}

#: Keys of a request row (the store returns dicts with these keys).
REQUEST_KEYS = (
    "id", "created", "requester", "requester_uid", "scope_kind", "scope", "ground",
    "case_ref", "reason", "state", "decided", "decided_by", "decided_uid", "expires",
)
#: Keys of an export row.
EXPORT_KEYS = ("id", "time", "user", "uid", "ground", "case_ref", "filters", "identified",
               "hmac_key")

STATES = ("pending", "approved", "denied", "expired")

MAX_CASE = 200


class RequestError(Exception):
    """A request that cannot be decided (unknown, already decided): exit 1."""


@dataclass(frozen=True)
class Purpose:
    """The ground and case an access names (either may be absent where the
    command does not require them)."""

    ground: str | None = None
    case: str | None = None

    def detail(self) -> dict[str, str]:
        """For the audit row's detail: only what was given."""
        out: dict[str, str] = {}
        if self.ground:
            out["ground"] = self.ground
        if self.case:
            out["case"] = self.case
        return out


def check_ground(ground: str, allowed: Sequence[str]) -> str:
    """``ground`` if it is one of ``allowed``; ValueError naming the allowed ones."""
    value = (ground or "").strip()
    if value not in allowed:
        raise ValueError(f"unknown ground {ground!r} (allowed: {', '.join(allowed)})")
    return value


def check_case(case: str) -> str:
    """A case reference: one line of printable text, at most 200 characters."""
    value = " ".join((case or "").split())
    if not value:
        raise ValueError("--case is empty")
    if len(value) > MAX_CASE or not value.isprintable():
        raise ValueError(f"--case must be printable text of at most {MAX_CASE} characters")
    return value


def new_request_id(now: datetime) -> str:
    return "R" + now.strftime("%Y%m%d") + "-" + secrets.token_hex(4).upper()


def new_export_id(now: datetime) -> str:
    return "E" + now.strftime("%Y%m%d") + "-" + secrets.token_hex(5).upper()


def state_of(request: Mapping[str, Any], now: datetime) -> str:
    """pending, denied, approved or expired (approved and past its end)."""
    state = str(request.get("state") or "pending")
    if state == "approved" and request.get("expires") and str(request["expires"]) <= iso(now):
        return "expired"
    return state


def public(request: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A request for output (``access list``): stored fields and the state now."""
    return {
        "id": request["id"],
        "state": state_of(request, now),
        "requested": request["created"],
        "requester": request["requester"],
        "scope": f"{request['scope_kind']}:{request['scope']}",
        "ground": request["ground"],
        "case": request["case_ref"],
        "reason": request["reason"],
        "decided": request.get("decided"),
        "decided_by": request.get("decided_by"),
        "expires": request.get("expires"),
        "opens": sorted(OPENS.get(str(request["scope_kind"]), ())),
    }


def same_person(a_user: str, a_uid: int | None, caller: Caller) -> bool:
    """Whether ``caller`` is the person recorded as (``a_user``, ``a_uid``).

    The uid decides for a real user; the name too, so that two sudo
    invocations of the same person (``mailwarden (sudo: alice)``) match."""
    if "(sudo:" in a_user or "(sudo:" in caller.user:
        return a_user == caller.user
    return a_user == caller.user or (a_uid is not None and a_uid == caller.uid)


async def refuse(store: Store, command: str, message: str, *, targets: Sequence[str] = (),
                 purpose: Purpose | None = None, **detail: Any) -> NoReturn:
    """Audit a refusal (command ``"<command> (refused)"``, the reason in its
    detail), then raise :class:`Denied` (exit 1, one line)."""
    await store.audit(f"{command} (refused)", targets=list(targets),
                      detail={**(purpose.detail() if purpose else {}), **detail,
                              "refused": message})
    raise Denied(message)


# ------------------------------------------------------------- requests


async def request(store: Store, caller: Caller, *, scope_kind: str, scope: str,
                  purpose: Purpose, reason: str) -> str:
    """Record a request (audited first); returns its id."""
    if scope_kind not in SCOPES:
        raise ValueError(f"unknown scope {scope_kind!r}")
    now = store.clock()
    rid = new_request_id(now)
    await store.audit("access request", targets=[scope], reason=reason,
                      detail={**purpose.detail(), "request": rid, "scope": scope_kind})
    await store.add_access_request({
        "id": rid, "created": iso(now), "requester": caller.user,
        "requester_uid": caller.uid, "scope_kind": scope_kind, "scope": scope,
        "ground": purpose.ground or "", "case_ref": purpose.case or "", "reason": reason,
        "state": "pending", "decided": None, "decided_by": None, "decided_uid": None,
        "expires": None,
    })
    return rid


async def decide(store: Store, caller: Caller, rid: str, *, approve: bool,
                 grant_hours: int) -> dict[str, Any]:
    """Approve or deny the pending request ``rid`` as ``caller``.

    Refused (audited, :class:`Denied`) when the caller made the request, or
    (enforced) holds no ``dpo`` role; :class:`RequestError` when it is
    unknown or already decided.  Returns the decided request."""
    command = "access approve" if approve else "access deny"
    req = await store.get_access_request(rid)
    if req is None:
        await store.audit(command, targets=[rid], detail={"result": "no such request"})
        raise RequestError(f"{command}: no access request {rid}")
    purpose = Purpose(req["ground"], req["case_ref"])
    if caller.enforced and "dpo" not in caller.roles:
        await refuse(store, command, f"{command}: refused: needs role dpo; {caller.describe()}",
                     targets=[rid], purpose=purpose)
    if same_person(req["requester"], req["requester_uid"], caller):
        await refuse(
            store, command,
            f"{command}: refused: {rid} was requested by {caller.user}; a second person"
            " (another dpo) must decide it",
            targets=[rid], purpose=purpose)
    now = store.clock()
    if req["state"] != "pending":
        await store.audit(command, targets=[rid], detail={**purpose.detail(),
                                                          "result": f"already {req['state']}"})
        raise RequestError(f"{command}: {rid} is already {state_of(req, now)}"
                           f" (by {req['decided_by']} at {req['decided']})")
    expires = iso(now + timedelta(hours=grant_hours)) if approve else None
    state = "approved" if approve else "denied"
    await store.audit(command, targets=[rid, req["scope"]],
                      detail={**purpose.detail(), "request": rid, "requester": req["requester"],
                              "scope": req["scope_kind"], "expires": expires})
    if not await store.decide_access_request(rid, state=state, decided=iso(now),
                                             decided_by=caller.user, decided_uid=caller.uid,
                                             expires=expires):
        raise RequestError(f"{command}: {rid} was decided meanwhile")
    out = await store.get_access_request(rid)
    assert out is not None
    return out


async def visible_requests(store: Store, caller: Caller) -> list[dict[str, Any]]:
    """What ``access list`` shows ``caller``: every request for a dpo (or
    without access control), otherwise the caller's own."""
    if not caller.enforced or "dpo" in caller.roles:
        return await store.access_requests()
    return await store.access_requests(requester=caller.user)


# --------------------------------------------------------------- grants


async def find_grant(store: Store, caller: Caller, opens: str, *, case: str | None,
                     item: str | None = None,
                     addresses: Iterable[str] = ()) -> dict[str, Any] | None:
    """The caller's approved, unexpired grant for ``case`` that opens
    ``opens`` for the item ``item`` or one of ``addresses``, or None."""
    now = store.clock()
    found: list[dict[str, Any]] = []
    if item is not None and opens in OPENS["item"]:
        found += await store.access_requests(requester=caller.user, scope_kind="item",
                                             scope=[item], state="approved")
    addrs = sorted({a.strip().lower() for a in addresses if a})
    if addrs and opens in OPENS["address"]:
        found += await store.access_requests(requester=caller.user, scope_kind="address",
                                             scope=addrs, state="approved")
    usable = [g for g in found
              if state_of(g, now) == "approved" and (case is None or g["case_ref"] == case)
              and same_person(g["requester"], g["requester_uid"], caller)]
    return max(usable, key=lambda g: str(g["expires"]), default=None)


def item_addresses(item: Mapping[str, Any]) -> set[str]:
    """The addresses a quarantine item concerns (envelope and logged headers)."""
    return addresses_of([item.get("mail_from"), *(item.get("rcpt_tos") or ()),
                         item.get("hdr_from"), item.get("hdr_to")])


async def require_grant(store: Store, caller: Caller, command: str, opens: str, *,
                        purpose: Purpose, what: str, item: str | None = None,
                        addresses: Iterable[str] = (), targets: Sequence[str] = (),
                        hint: str = "") -> dict[str, Any] | None:
    """The grant that lets ``caller`` do ``what`` (None without access
    control: nothing to check); otherwise the refusal is audited and
    :class:`Denied` raised, naming what is missing."""
    if not caller.enforced:
        return None
    grant = await find_grant(store, caller, opens, case=purpose.case, item=item,
                             addresses=addresses)
    if grant is not None:
        return grant
    await refuse(
        store, command,
        f"{command}: refused: {what} needs an approved, unexpired grant held by"
        f" {caller.user} for case {purpose.case or '(none given)'}"
        f"{' (' + hint + ')' if hint else ''}",
        targets=targets, purpose=purpose)


__all__ = [
    "EXPORT_KEYS", "IDENTIFIED_EXPORT", "OPENS", "PERSONAL_BODY", "REIDENTIFY", "REQUEST_KEYS",
    "SCOPES", "STATES", "Purpose", "RequestError", "check_case", "check_ground", "decide",
    "find_grant", "item_addresses", "new_export_id", "new_request_id", "public", "refuse",
    "request", "require_grant", "same_person", "state_of", "visible_requests",
]
