"""quarantine/pseudonym.py, quarantine/grants.py and the schema v2 migration
against a real SQLite store with an injected clock (the store methods
themselves, on every backend: tests/unit/test_store_protocol_access.py).

Proves: pseudonyms are stable within a key and differ across keys, ignore
case and angle brackets, drop display names, replace addresses anywhere in
text and the record's own local parts in the subject (not other words), and
leave out the unkeyed digests; re-identification recomputes the HMAC over an
export's records; grants open only what their scope allows, for their holder
and case, until they expire; a pending request is decided once; the
requester never decides; without access control nothing is required; a
store of schema v1
(audit rows, quarantine items) migrates to v2 and both chains still verify.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from quarantine import grants, pseudonym
from quarantine import log as logmod
from quarantine import sqlite as sqlite_mod
from quarantine.access import Caller, Denied
from quarantine.grants import Purpose
from quarantine.store import Store, iso
from tests.support.clock import Clock

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
KEY = bytes(range(32))


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "store", clock=clock)
    yield s
    await s.close()


def who(user: str, uid: int, *roles: str, enforced: bool = True) -> Caller:
    return Caller(user=user, uid=uid, roles=frozenset(roles), enforced=enforced)


HR = who("hr1", 5001, "investigator")
DPO = who("dpo1", 5002, "dpo")


# ------------------------------------------------------------ pseudonyms


def test_pseudonyms_are_keyed_stable_and_normalised() -> None:
    p, q = pseudonym.Pseudonymiser(KEY), pseudonym.Pseudonymiser(bytes(32))
    a = p.address("alice@example.com")
    assert a.startswith("pn-") and len(a) == 23
    assert p.address("<Alice@Example.COM>") == a == p.address("alice@example.com.")
    assert q.address("alice@example.com") != a
    assert p.address("bob@example.com") != a
    assert p.address("") == ""
    with pytest.raises(ValueError):
        pseudonym.Pseudonymiser(b"short")


def test_record_rules() -> None:
    p = pseudonym.Pseudonymiser(KEY)
    rec = {
        "time": "t", "mail_from": "Alice@Example.com", "rcpt_tos": ["bob@ext.test"],
        "from": "\"Smith, Alice\" <alice@example.com>", "to": "=?utf-8?q?Bob?= <bob@ext.test>",
        "cc": "undisclosed-recipients:;", "subject": "Alice: lunch with Bob. (mail bob@ext.test)",
        "message_id": "<alice.1@example.com>", "reply": "550 <bob@ext.test>: rejected",
        "attachments": [{"name": "cv-alice@example.com.pdf"}], "address_digest": "00",
        "personal": True, "size": 3,
    }
    out = p.record(rec)
    alice, bob = p.address("alice@example.com"), p.address("bob@ext.test")
    assert out["mail_from"] == alice and out["rcpt_tos"] == [bob]
    assert out["from"] == alice and out["to"] == bob and out["cc"] == ""
    assert out["subject"] == f"{alice}: lunch with {bob}. (mail {bob})"
    assert out["message_id"].startswith("mid-") and "alice" not in out["message_id"]
    assert out["reply"] == f"550 <{bob}>: rejected"
    # where an address ends is a guess in free text: the whole run goes
    assert out["attachments"] == [{"name": p.address("cv-alice@example.com.pdf")}]
    assert "address_digest" not in out and out["personal"] is True and out["size"] == 3
    # a local part that is not one of the record's own addresses stays; short ones too
    other = p.record({"mail_from": "al@x.test", "rcpt_tos": ["carol@x.test"],
                      "subject": "al and alice and Carol"})
    assert other["subject"] == f"al and alice and {p.address('carol@x.test')}"
    text = json.dumps(out).lower()
    assert "alice" not in text and "bob" not in text and "smith" not in text


async def test_reidentify_recomputes_over_the_export(store: Store) -> None:
    await store.write_log_batch([
        {"time": iso(T0), "queue_id": "Q1", "direction": "inbound", "mail_from": "a@x.test",
         "subject": "ping c@y.test", "addresses": ["a@x.test", "b@x.test"]},
        {"time": iso(T0 + timedelta(days=40)), "queue_id": "Q2", "direction": "inbound",
         "mail_from": "d@x.test", "addresses": ["d@x.test"]},
    ])
    p = pseudonym.Pseudonymiser(KEY)
    filters = {"since": None, "until": iso(T0 + timedelta(days=1)), "address": None,
               "direction": None, "up_to": 2}
    for a in ("a@x.test", "b@x.test", "c@y.test"):
        assert await logmod.reidentify(store, filters, KEY, p.address(a)) == a
    # outside the export's filters, or another key: not found
    assert await logmod.reidentify(store, filters, KEY, p.address("d@x.test")) is None
    assert await logmod.reidentify(store, filters, bytes(32), p.address("a@x.test")) is None


# ---------------------------------------------------------------- grants


async def test_grant_scope_holder_case_and_expiry(store: Store, clock: Clock) -> None:
    purpose = Purpose("absence", "ABS-1")
    rid = await grants.request(store, HR, scope_kind="address", scope="a@x.test",
                               purpose=purpose, reason="on leave")
    assert await grants.find_grant(store, HR, grants.PERSONAL_BODY, case="ABS-1",
                                   addresses=["a@x.test"]) is None  # pending
    with pytest.raises(Denied, match="second person"):
        await grants.decide(store, who("hr1", 5001, "investigator", "dpo"), rid, approve=True,
                            grant_hours=24)
    with pytest.raises(Denied, match="needs role dpo"):
        await grants.decide(store, who("hr2", 5003, "investigator"), rid, approve=True,
                            grant_hours=24)
    clock.now = T0 + timedelta(hours=1)
    decided = await grants.decide(store, DPO, rid, approve=True, grant_hours=2)
    assert decided["expires"] == iso(T0 + timedelta(hours=3))
    with pytest.raises(grants.RequestError, match="already approved"):
        await grants.decide(store, DPO, rid, approve=False, grant_hours=2)

    async def finds(opens: str, *, caller: Caller = HR, case: str | None = "ABS-1",
                    item: str | None = None, addresses: tuple[str, ...] = ("A@x.test",)) -> bool:
        return await grants.find_grant(store, caller, opens, case=case, item=item,
                                       addresses=addresses) is not None

    assert await finds(grants.PERSONAL_BODY) and await finds(grants.IDENTIFIED_EXPORT)
    assert await finds(grants.REIDENTIFY)
    assert not await finds(grants.PERSONAL_BODY, case="ABS-2")
    assert not await finds(grants.PERSONAL_BODY, addresses=("b@x.test",))
    assert not await finds(grants.PERSONAL_BODY, caller=who("hr2", 5003, "investigator"))
    clock.now = T0 + timedelta(hours=3)
    assert not await finds(grants.PERSONAL_BODY)
    (req,) = await store.access_requests()
    assert grants.state_of(req, clock.now) == "expired"
    assert grants.public(req, clock.now)["scope"] == "address:a@x.test"

    # an item grant opens that item's personal body only
    item_req = await grants.request(store, HR, scope_kind="item", scope="20261102-AAAAAAAAAAAA",
                                    purpose=purpose, reason="r")
    await grants.decide(store, DPO, item_req, approve=True, grant_hours=1)
    assert await finds(grants.PERSONAL_BODY, item="20261102-AAAAAAAAAAAA", addresses=())
    assert not await finds(grants.IDENTIFIED_EXPORT, item="20261102-AAAAAAAAAAAA", addresses=())
    assert not await finds(grants.PERSONAL_BODY, item="20261102-BBBBBBBBBBBB", addresses=())

    # without access control nothing is required (and nothing refused)
    assert await grants.require_grant(store, who("me", 1, enforced=False), "x",
                                      grants.REIDENTIFY, purpose=Purpose(), what="w") is None
    with pytest.raises(Denied, match="x: refused: w needs an approved"):
        await grants.require_grant(store, HR, "x", grants.REIDENTIFY, purpose=purpose,
                                   what="w", addresses=["z@x.test"], targets=["t"])
    rows = await store.audit_rows()
    assert [r[4] for r in rows] == [
        "access request", "access approve (refused)", "access approve (refused)",
        "access approve", "access deny", "access request", "access approve", "x (refused)"]


def test_grounds_and_cases() -> None:
    assert grants.check_ground("absence", ("absence",)) == "absence"
    with pytest.raises(ValueError, match=r"unknown ground 'x' \(allowed: a, b\)"):
        grants.check_ground("x", ("a", "b"))
    assert grants.check_case("  HR  7 ") == "HR 7"
    for bad in ("", "x" * 201, "a\x1bb"):
        with pytest.raises(ValueError):
            grants.check_case(bad)
    sudo_a = who("mailwarden (sudo: alice)", 999, enforced=False)
    assert grants.same_person("mailwarden (sudo: alice)", 999, sudo_a)
    assert not grants.same_person("mailwarden (sudo: bob)", 999, sudo_a)
    assert grants.same_person("hr1", 5001, who("hr1-renamed", 5001))


# ----------------------------------------------------------------- store


async def test_a_v1_store_migrates_and_its_chains_verify(tmp_path: Path, clock: Clock,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(sqlite_mod, "MIGRATIONS", sqlite_mod.MIGRATIONS[:1])
        old = await Store.open(root, clock=clock)
        qid = await old.quarantine(
            raw=b"Subject: x\r\n\r\nx\r\n", queue_id="Q", received=T0, direction="inbound",
            client_addr="192.0.2.1", helo="h", mail_from="a@x.test", rcpt_tos=["b@x.test"],
            headers={"subject": "x"}, reason="clamav", detail="", personal=True, verdicts=[])
        await old.audit("quarantine show", targets=[qid], reason="before the upgrade")
        await old.write_log_batch([{"time": iso(T0), "queue_id": "Q", "direction": "inbound",
                                    "addresses": ["a@x.test"]}])
        async with old.db.execute("PRAGMA user_version") as cur:
            assert (await cur.fetchone())[0] == 1
        await old.close()
    new = await Store.open(root, clock=clock)
    try:
        async with new.db.execute("PRAGMA user_version") as cur:
            assert (await cur.fetchone())[0] == len(sqlite_mod.MIGRATIONS) >= 2
        item = await new.get_item(qid)
        assert item is not None and item["hold_case"] is None and item["personal"] is True
        await new.audit("access list", detail={"count": 0})
        assert (await logmod.verify_audit(new)).ok
        assert (await logmod.verify(new)).ok
        assert await new.access_requests() == []
    finally:
        await new.close()
