"""The store protocol's access-control methods (schema v2, issue 17), through
the protocol only, on every backend of tests/unit/test_store_protocol.py
(its ``backend``/``store`` fixtures, so a PostgreSQL param there runs these
too).

Proves: exports are recorded with their filters and key; requests are
inserted, listed by requester / scope / state, and decided only once while
pending; holds carry their case and end, ``release_expired_holds`` reports
(dry run) and lifts only the holds whose end has passed, and unhold clears
case and end.
"""

from __future__ import annotations

from datetime import timedelta

from quarantine.store import StoreProtocol, iso
from tests.unit.test_store_protocol import T0, backend, clock, store  # noqa: F401

KEY = bytes(range(32))


def request_row(rid: str, requester: str, scope_kind: str, scope: str) -> dict[str, object]:
    return {"id": rid, "created": iso(T0), "requester": requester, "requester_uid": 7,
            "scope_kind": scope_kind, "scope": scope, "ground": "absence", "case_ref": "C1",
            "reason": "r", "state": "pending", "decided": None, "decided_by": None,
            "decided_uid": None, "expires": None}


async def test_access_requests(store: StoreProtocol) -> None:  # noqa: F811
    await store.add_access_request(request_row("R1", "hr1", "address", "a@x.test"))
    await store.add_access_request(request_row("R2", "hr2", "item", "20260110-AAAAAAAAAAAA"))
    got = await store.get_access_request("R1")
    assert got is not None and got["scope"] == "a@x.test" and got["state"] == "pending"
    assert got["requester_uid"] == 7 and got["expires"] is None
    assert await store.get_access_request("R9") is None
    assert [r["id"] for r in await store.access_requests()] == ["R1", "R2"]
    assert [r["id"] for r in await store.access_requests(requester="hr2")] == ["R2"]
    assert [r["id"] for r in await store.access_requests(
        scope_kind="address", scope=["b@x.test", "a@x.test"])] == ["R1"]
    assert await store.access_requests(state="approved") == []
    expires = iso(T0 + timedelta(hours=24))
    assert await store.decide_access_request("R1", state="approved", decided=iso(T0),
                                             decided_by="dpo1", decided_uid=8, expires=expires)
    assert not await store.decide_access_request("R1", state="denied", decided=iso(T0),
                                                 decided_by="dpo2", decided_uid=9, expires=None)
    got = await store.get_access_request("R1")
    assert got is not None and (got["state"], got["decided_by"], got["expires"]) == (
        "approved", "dpo1", expires)
    assert [r["id"] for r in await store.access_requests(requester="hr1", state="approved",
                                                          scope_kind="address",
                                                          scope=["a@x.test"])] == ["R1"]


async def test_exports_and_expiring_holds(store: StoreProtocol) -> None:  # noqa: F811
    await store.add_export({"id": "E1", "time": iso(T0), "user": "u", "uid": 1, "ground": "",
                            "case_ref": "", "filters": {"address": "a@x.test", "up_to": 3},
                            "identified": False, "hmac_key": KEY.hex()})
    got = await store.get_export("E1")
    assert got is not None and got["filters"] == {"address": "a@x.test", "up_to": 3}
    assert got["identified"] is False and bytes.fromhex(got["hmac_key"]) == KEY
    assert await store.get_export("E2") is None

    ids = []
    for n in range(3):
        ids.append(await store.quarantine(
            raw=b"Subject: x\r\n\r\nx\r\n", queue_id=f"Q{n}", received=T0, direction="inbound",
            client_addr="192.0.2.1", helo="h", mail_from="a@x.test", rcpt_tos=["b@x.test"],
            headers={"subject": "x"}, reason="attachment_types", detail="", personal=False,
            verdicts=[]))
    await store.set_hold(ids[0], True, case="C1", until=iso(T0 + timedelta(days=1)))
    await store.set_hold(ids[1], True, case="C2")
    item = await store.get_item(ids[0])
    assert item is not None and (item["hold_case"], item["hold_until"]) == (
        "C1", iso(T0 + timedelta(days=1)))
    assert await store.release_expired_holds(iso(T0)) == []
    later = iso(T0 + timedelta(days=2))
    assert await store.release_expired_holds(later, dry_run=True) == [
        (ids[0], "C1", iso(T0 + timedelta(days=1)))]
    assert (await store.get_item(ids[0]) or {})["hold"] is True
    assert [r[0] for r in await store.release_expired_holds(later)] == [ids[0]]
    item = await store.get_item(ids[0])
    assert item is not None and (item["hold"], item["hold_case"], item["hold_until"]) == (
        False, None, None)
    assert (await store.get_item(ids[1]) or {})["hold"] is True
    await store.set_hold(ids[1], False)
    assert (await store.get_item(ids[1]) or {})["hold_case"] is None
