"""The store protocol (``quarantine.store.StoreProtocol``), through the protocol only.

Every test takes the ``backend`` fixture: a function that opens a store of the
backend under test (the same location each time, so two calls are two
gateway instances on one store).  Today the only backend is ``sqlite``; a
PostgreSQL backend adds one param to :func:`backend` and nothing else.

Proves: the quarantine round trip (item and body), list filters and paging,
release/delete/hold (hold refuses delete), subject lookups, totals, log
appends through the writer and from two concurrent appenders on one store
(one gapless chain that verifies: the chain position comes from the store,
not from one process's state), the audit chain, retention by cutoff (held
items survive, the log prefix goes and the chain still verifies), and erasure
tombstones.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from quarantine.log import LogQuery, verify, verify_audit
from quarantine.store import GENESIS, NotFound, OnHold, StoreProtocol, erased_record, iso

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)

Opener = Callable[[], Awaitable[StoreProtocol]]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[Opener]:
    """Opens stores of one backend on one location; closes them all at the end.
    PostgreSQL: a fresh database per test; each open is another gateway
    instance (``gw1``, ``gw2``...) with its own outbox directory."""
    opened: list[StoreProtocol] = []
    dsn = ""
    if request.param == "postgresql":
        dsn = request.getfixturevalue("pg_server").new_database()

    async def open_store() -> StoreProtocol:
        if request.param == "sqlite":
            from quarantine.store import Store

            store: StoreProtocol = await Store.open(tmp_path / "store", clock=clock,
                                                    flush_interval=0.01)
        elif request.param == "postgresql":
            from gateway.config import StoreSettings
            from quarantine.postgres import PostgresStore

            n = len(opened) + 1
            settings = StoreSettings(backend="postgresql", dsn=dsn, instance=f"gw{n}",
                                     path=str(tmp_path / f"gw{n}"))
            store = await PostgresStore.open(settings, create=True, clock=clock,
                                             flush_interval=0.01)
        else:  # pragma: no cover - a backend param without an opener
            raise AssertionError(request.param)
        opened.append(store)
        return store

    yield open_store
    for s in opened:
        await s.close()


@pytest.fixture
async def store(backend: Opener) -> StoreProtocol:
    return await backend()


async def hold(store: StoreProtocol, clock: Clock, received: datetime, *, subject: str = "hi",
               reason: str = "attachment_types", sender: str = "a@ext.test",
               rcpts: tuple[str, ...] = ("b@example.com",), personal: bool = False) -> str:
    clock.now = received
    raw = f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    return await store.quarantine(
        raw=raw, queue_id="Q" + subject, received=received, direction="inbound",
        client_addr="192.0.2.1", helo="mx.test", mail_from=sender, rcpt_tos=list(rcpts),
        headers={"from": sender, "to": ", ".join(rcpts), "subject": subject},
        reason=reason, detail="x.exe: executable", personal=personal,
        verdicts=[{"filter": reason.split(",")[0], "outcome": "quarantine"}],
    )


def rec(when: datetime, n: int, *addrs: str) -> dict[str, Any]:
    return {"time": iso(when), "queue_id": f"Q{n}", "direction": "inbound",
            "subject": f"s{n}", "addresses": list(addrs)}


async def all_rows(store: StoreProtocol) -> list[Any]:
    rows: list[Any] = []
    after = 0
    while page := await store.log_page(LogQuery(), after, 7):
        rows += page
        after = page[-1].seq
    return rows


# ------------------------------------------------------------- quarantine


async def test_quarantine_round_trip(store: StoreProtocol, clock: Clock) -> None:
    qid = await hold(store, clock, T0, subject="round", personal=True)
    item = await store.get_item(qid)
    assert item is not None
    assert item["id"] == qid and item["subject"] == "round" and item["personal"] is True
    assert item["rcpt_tos"] == ["b@example.com"] and item["state"] == "held"
    assert item["received"] == iso(T0) and item["hold"] is False
    assert item["verdicts"] == [{"filter": "attachment_types", "outcome": "quarantine"}]
    body = await store.read_body(item)
    assert body.endswith(b"\r\n\r\nbody\r\n") and len(body) == item["size"]
    assert await store.get_item("20260110-000000000000") is None
    assert [i["id"] for i in await store.get_items([qid, "20260110-000000000000"])] == [qid]
    assert await store.item_is_live(qid, item["path"])


async def test_list_filters_and_paging(store: StoreProtocol, clock: Clock) -> None:
    ids = [await hold(store, clock, T0 + timedelta(hours=n), subject=f"s{n}",
                      reason="clamav" if n % 3 == 0 else "attachment_types,clamav"
                      if n == 4 else "attachment_types",
                      rcpts=("c@example.com",) if n == 5 else ("b@example.com",))
           for n in range(7)]
    items, more = await store.list_quarantine()
    assert [i["id"] for i in items] == ids[::-1] and not more
    items, more = await store.list_quarantine(limit=3, page=1)
    assert [i["id"] for i in items] == [ids[6], ids[5], ids[4]] and more
    items, more = await store.list_quarantine(limit=3, page=3)
    assert [i["id"] for i in items] == [ids[0]] and not more
    items, _ = await store.list_quarantine(since=iso(T0 + timedelta(hours=2)),
                                           until=iso(T0 + timedelta(hours=4)))
    assert [i["id"] for i in items] == [ids[4], ids[3], ids[2]]
    items, _ = await store.list_quarantine(reason="clamav")
    assert [i["id"] for i in items] == [ids[6], ids[4], ids[3], ids[0]]
    assert await store.list_quarantine(reason="nosuchfilter") == ([], False)
    items, _ = await store.list_quarantine(address="c@example.com")
    assert [i["id"] for i in items] == [ids[5]]
    # the sparse-match fallback gives the same answer as the index walk
    for kw in ({"reason": "clamav"}, {"address": "c@example.com"}, {"limit": 2, "page": 2}):
        assert await store.list_quarantine(window=1, **kw) == await store.list_quarantine(**kw)


async def test_release_hold_delete(store: StoreProtocol, clock: Clock) -> None:
    a = await hold(store, clock, T0, subject="a")
    b = await hold(store, clock, T0 + timedelta(minutes=1), subject="b")
    await store.mark_released(a)
    item = await store.get_item(a)
    assert item is not None and item["state"] == "released"
    assert [i["id"] for i in (await store.list_quarantine())[0]] == [b]
    assert {i["id"] for i in (await store.list_quarantine(state="all"))[0]} == {a, b}

    await store.set_hold(b, True)
    with pytest.raises(OnHold):
        await store.delete_item(b)
    with pytest.raises(NotFound):
        await store.delete_item("20260110-000000000000")
    await store.set_hold(b, False)
    path = (await store.get_item(b) or {})["path"]
    assert await store.delete_item(b) is True
    tomb = await store.get_item(b)
    assert tomb is not None and tomb["state"] == "deleted"
    assert tomb["subject"] is None and tomb["mail_from"] == "" and tomb["rcpt_tos"] == []
    assert not await store.item_is_live(b, path)
    assert await store.subject_items("b@example.com") == [(a, False, False)]
    # a released item is not deleted by mark_released, a deleted one stays deleted
    await store.mark_released(b)
    assert (await store.get_item(b) or {})["state"] == "deleted"


async def test_subject_lookup_and_totals(store: StoreProtocol, clock: Clock) -> None:
    assert await store.quarantine_totals() == (0, 0)
    a = await hold(store, clock, T0, subject="a", sender="Alice <Alice@Ext.Test>")
    b = await hold(store, clock, T0 + timedelta(minutes=1), subject="b", personal=True)
    await store.set_hold(b, True)
    sizes = [(await store.get_item(q) or {})["size"] for q in (a, b)]
    assert await store.quarantine_totals() == (2, sum(sizes))
    await store.mark_released(a)
    assert await store.quarantine_totals() == (1, sizes[1])
    assert await store.subject_items("alice@ext.test") == [(a, False, False)]
    assert await store.subject_items("b@example.com") == [(a, False, False), (b, True, True)]
    await store.write_log_batch([rec(T0, 1, "alice@ext.test", "b@example.com"),
                                 rec(T0, 2, "b@example.com")])
    assert await store.subject_log_seqs("alice@ext.test") == [1]
    assert await store.subject_log_seqs("b@example.com") == [1, 2]
    got = [r async for r in store.log_records([2, 1])]
    assert [(s, t) for s, t, _ in got] == [(1, iso(T0)), (2, iso(T0))]
    assert '"subject":"s2"' in got[1][2]


# -------------------------------------------------------------------- log


async def test_log_writer_and_queries(store: StoreProtocol) -> None:
    for n in range(1, 21):
        store.append_log(rec(T0 + timedelta(days=n % 2), n, f"u{n % 3}@example.com"))
    await store.flush_log()
    rows = await all_rows(store)
    assert [r.seq for r in rows] == list(range(1, 21))
    assert await store.log_last_seq() == 20
    assert await store.log_count(LogQuery()) == 20
    assert await store.log_count(LogQuery(address="u0@example.com")) == 6
    assert await store.log_count(LogQuery(since=T0 + timedelta(days=1))) == 10
    assert await store.log_count(LogQuery(up_to=5)) == 5
    index = await store.log_index(1, 3)
    assert index == {1: ["u1@example.com"], 2: ["u2@example.com"], 3: ["u0@example.com"]}
    assert await store.log_anchor() == GENESIS
    assert (await verify(store)).ok


async def test_two_concurrent_appenders_give_one_gapless_chain(backend: Opener) -> None:
    """Two gateway instances on one store append at the same time: the chain
    position comes from the store inside each write transaction, so the
    records interleave into one chain without gaps or forks."""
    first, second = await backend(), await backend()

    async def appender(store: StoreProtocol, tag: int) -> None:
        for batch in range(10):
            await store.write_log_batch(
                [rec(T0, tag * 1000 + batch * 10 + i, f"w{tag}@example.com") for i in range(5)]
            )

    await asyncio.gather(appender(first, 1), appender(second, 2))
    for store in (first, second):
        rows = await all_rows(store)
        assert [r.seq for r in rows] == list(range(1, 101))
        assert await store.log_count(LogQuery(address="w1@example.com")) == 50
        result = await verify(store)
        assert result.ok, result.message
        assert "100 records" in result.message
    # a later append by either continues the same chain
    await first.write_log_batch([rec(T0, 9999)])
    await second.write_log_batch([rec(T0, 9998)])
    assert [r.seq for r in (await all_rows(first))[-2:]] == [101, 102]
    assert (await verify(second)).ok


async def test_audit_chain(backend: Opener) -> None:
    first, second = await backend(), await backend()
    seqs = await asyncio.gather(*(
        s.audit("show", targets=[f"t{n}"], reason="ticket 1", detail={"n": n})
        for n in range(6) for s in (first, second)
    ))
    assert sorted(seqs) == list(range(1, 13))
    rows = await first.audit_rows()
    assert [r[0] for r in rows] == list(range(1, 13))
    assert (await second.audit_entry(seqs[0])) == ("show", '{"n":0}')
    assert await first.audit_first_seq() == 1
    assert [r[0] for r in await first.audit_page(10, 5)] == [11, 12]
    result = await verify_audit(first)
    assert result.ok and "12 rows" in result.message, result.message


# -------------------------------------------------------------- retention


async def test_purge_by_cutoff_keeps_held_items(store: StoreProtocol, clock: Clock) -> None:
    old = [await hold(store, clock, T0 + timedelta(minutes=n), subject=f"o{n}")
           for n in range(3)]
    new = await hold(store, clock, T0 + timedelta(days=10), subject="new")
    await store.set_hold(old[1], True)
    await store.write_log_batch([rec(T0, 1), rec(T0, 2), rec(T0 + timedelta(days=10), 3)])
    await store.audit("show", targets=[new])
    cutoff = iso(T0 + timedelta(days=5))
    plan = await store.retention_plan(cutoff, iso(T0 - timedelta(days=1)))
    assert plan == {"quarantine_items": 2, "kept_under_hold": 1, "log_records": 2,
                    "audit_rows": 0, "log_end": 2, "audit_end": 0}
    gone: list[tuple[str, str]] = []
    async for batch in store.purge_quarantine_before(cutoff, batch=1):
        assert len(batch) == 1
        gone += batch
        for _, path in batch:
            assert await store.delete_body(path) is True
    assert sorted(q for q, _ in gone) == sorted([old[0], old[2]])
    assert await store.get_item(old[0]) is None and await store.get_item(old[2]) is None
    assert (await store.get_item(old[1]) or {})["hold"] is True
    assert (await store.get_item(new) or {})["state"] == "held"
    assert await store.purge_log_through(plan["log_end"], batch=1) == 2
    assert [r.seq for r in await all_rows(store)] == [3]
    assert await store.log_anchor() != GENESIS
    result = await verify(store)
    assert result.ok and "1 record" in result.message, result.message
    assert await store.purge_audit_through(plan["audit_end"]) == 0
    assert (await verify_audit(store)).ok
    assert await store.checkpoint() in ("truncated", "busy")


# ------------------------------------------------------------------ erase


async def test_erase_tombstones(store: StoreProtocol, clock: Clock) -> None:
    a = await hold(store, clock, T0, subject="a", sender="x@ext.test")
    b = await hold(store, clock, T0, subject="b", sender="x@ext.test")
    await store.set_hold(b, True)
    await store.write_log_batch([rec(T0, 1, "x@ext.test"), rec(T0, 2, "y@ext.test"),
                                 rec(T0, 3, "x@ext.test")])
    seqs = await store.subject_log_seqs("x@ext.test")
    ids = [i for i, _, _ in await store.subject_items("x@ext.test")]
    audit_seq = await store.audit("erase", detail={"log_seqs": seqs, "quarantine_ids": ids})
    assert await store.erase_log(seqs, erased_record(iso(clock()), audit_seq)) == 2
    removed, files_removed = await store.erase_items(ids)
    assert removed == [a] and files_removed == 1
    assert await store.get_item(a) is None and await store.get_item(b) is not None
    assert await store.subject_log_seqs("x@ext.test") == []
    rows = await all_rows(store)
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[0].queue_id == "" and '"erased":true' in rows[0].record
    assert '"subject":"s2"' in rows[1].record
    result = await verify(store)
    assert result.ok and "erased records: 2" in result.message, result.message


@pytest.mark.parametrize("name", ["sqlite", "postgres"])
def test_backend_has_every_protocol_method(name: str) -> None:
    if name == "sqlite":
        from quarantine.sqlite import SQLiteStore as cls
    else:
        from quarantine.postgres import PostgresStore as cls  # type: ignore[assignment]

    methods = [n for n, v in vars(StoreProtocol).items()
               if callable(v) and not n.startswith("_")]
    assert len(methods) >= 45
    missing = [n for n in methods if not callable(getattr(cls, n, None))]
    assert not missing, missing
