"""The SQLite store's group commit of held messages.

Proves: many concurrent ``quarantine()`` calls are all kept (rows, address
index, files) in fewer transactions than messages, and each returns only
once its row is committed; a failure inside a batch fails every message of
that batch (StoreError, so 451) and keeps nothing of it (no row, no file),
while later messages are kept again; sealed bodies (``[store] key_file``)
go through the same path and read back.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from quarantine import review
from quarantine.crypto import write_kek
from quarantine.sqlite import SQLiteStore
from quarantine.store import DB_NAME, StoreError, open_store

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def config(tmp_path: Path, key_file: str = "") -> Any:
    return parse_config(
        {"gateway": {"internal_domains": ["example.com"]},
         "store": {"path": str(tmp_path / "store"), "key_file": key_file},
         "filters": {"chain": []}}
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Any]:
    s = await open_store(config(tmp_path).store, create=True, clock=lambda: T0)
    yield s
    await s.close()


def raw_message(n: int) -> bytes:
    return (f"From: a{n}@ext.test\r\nTo: b@example.com\r\nSubject: held {n}\r\n\r\n"
            f"body {n}\r\n").encode()


async def put(store: Any, n: int) -> str:
    return await store.quarantine(
        raw=raw_message(n), queue_id=f"Q{n}", received=T0, direction="inbound",
        client_addr="192.0.2.1", helo="mx.test", mail_from=f"a{n}@ext.test",
        rcpt_tos=["b@example.com"], headers={"from": f"a{n}@ext.test", "subject": f"held {n}"},
        reason="clamav", detail="Eicar", personal=False, verdicts=[],
    )


def count_commits(store: SQLiteStore) -> list[int]:
    commits = [0]
    real = store.db.execute

    def execute(sql: str, *args: Any, **kw: Any) -> Any:
        if sql == "COMMIT":
            commits[0] += 1
        return real(sql, *args, **kw)

    store.db.execute = execute  # type: ignore[method-assign]
    return commits


def eml_files(store: Any) -> set[str]:
    return {p.relative_to(store.root).as_posix()
            for p in (store.root / "messages").rglob("*.eml")}


async def test_concurrent_holds_are_all_kept_in_fewer_commits(store: Any) -> None:
    assert isinstance(store, SQLiteStore)
    commits = count_commits(store)
    n = 60
    ids = await asyncio.gather(*(put(store, i) for i in range(n)))
    assert len(set(ids)) == n
    assert commits[0] < n  # grouped (typically a handful of batches)
    # Every one listed, findable by address, its file in place; nothing else.
    items, more = await store.list_quarantine(limit=200)
    assert not more and {i["id"] for i in items} == set(ids)
    for k in (0, n - 1):
        found, _ = await store.list_quarantine(address=f"a{k}@ext.test")
        assert [i["id"] for i in found] == [ids[k]]
    assert eml_files(store) == {i["path"] for i in items}
    for k, qid in enumerate(ids):
        item = await store.get_item(qid)
        assert item is not None and item["queue_id"] == f"Q{k}"
        assert await store.read_body(item) == raw_message(k)


async def test_each_returns_only_after_its_commit(store: Any) -> None:
    """The id comes back only once the row is committed: another connection
    (another process, say the review CLI) sees it at that moment."""
    other = sqlite3.connect(store.root / DB_NAME)
    try:
        async def put_and_look(i: int) -> None:
            qid = await put(store, i)
            row = other.execute("SELECT id FROM quarantine WHERE id = ?", (qid,)).fetchone()
            assert row == (qid,)

        await asyncio.gather(*(put_and_look(i) for i in range(20)))
    finally:
        other.close()


async def test_a_failed_batch_fails_all_its_messages_and_keeps_nothing(
        store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = store.db.executemany
    failures = []

    async def executemany(sql: str, rows: Any) -> Any:
        if "INSERT INTO quarantine_address" in sql and not failures:
            failures.append(len(list(rows)))
            raise sqlite3.OperationalError("disk I/O error")
        return await real(sql, rows)

    monkeypatch.setattr(store.db, "executemany", executemany)
    # The first batch fails after its quarantine rows were inserted: the
    # transaction rolls back and every message of that batch is refused.
    results = await asyncio.gather(*(put(store, i) for i in range(30)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    kept = [r for r in results if isinstance(r, str)]
    assert failed and all(isinstance(r, StoreError) for r in failed), results
    assert "cannot record quarantine item" in str(failed[0])
    assert len(failed) * 2 == failures[0]  # exactly that batch (2 addresses each)
    items, _ = await store.list_quarantine(limit=200)
    assert {i["id"] for i in items} == set(kept)
    # Nothing half-kept: no row and no file of the failed batch.
    assert eml_files(store) == {i["path"] for i in items}
    count = store.db.execute("SELECT count(*) FROM quarantine_address")
    async with count as cur:
        assert (await cur.fetchone())[0] == len(kept) * 2
    # And the store keeps working.
    qid = await put(store, 99)
    assert await store.get_item(qid) is not None


async def test_a_failed_directory_sync_fails_the_batch(
        store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from quarantine import files

    def broken(root: Path, relatives: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files, "sync_dirs", broken)
    store._writing += 1  # as if another hold were being written: none is alone
    try:
        results = await asyncio.gather(*(put(store, i) for i in range(5)),
                                       return_exceptions=True)
    finally:
        store._writing -= 1
    assert all(isinstance(r, StoreError) for r in results), results
    assert (await store.list_quarantine())[0] == []
    assert eml_files(store) == set()


async def test_a_lone_hold_syncs_its_directory_with_its_file(
        store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One session: no batch to wait for, the directory's fsync in the same
    worker job as the file's (write_durable's default)."""
    from quarantine import files

    calls: list[Any] = []
    real_write = files.write_durable
    monkeypatch.setattr(files, "sync_dirs", lambda root, rel: calls.append(("sync_dirs", rel)))
    monkeypatch.setattr(files, "write_durable", lambda *a, **kw: (
        calls.append(("write", kw["sync_dir"])), real_write(*a, **kw))[1])
    qid = await put(store, 1)
    assert calls == [("write", True)]
    assert await store.get_item(qid) is not None


async def test_sealed_bodies_through_the_group_commit(tmp_path: Path) -> None:
    write_kek(tmp_path / "kek")
    store = await open_store(config(tmp_path, str(tmp_path / "kek")).store, create=True,
                             clock=lambda: T0)
    try:
        ids = await asyncio.gather(*(put(store, i) for i in range(12)))
        for k, qid in enumerate(ids):
            item = await review.get_item(store, qid)
            on_disk = (store.root / item["path"]).read_bytes()
            assert f"body {k}".encode() not in on_disk
            assert await review.read_message(store, item) == raw_message(k)
    finally:
        await store.close()


async def test_two_processes_opening_a_new_store_at_once(tmp_path: Path) -> None:
    """Several serve processes on one new store: each connection migrates
    only what the other has not (no "table meta already exists")."""
    for _ in range(5):
        path = tmp_path / f"store-{_}"
        stores = await asyncio.gather(SQLiteStore.open(path), SQLiteStore.open(path),
                                      SQLiteStore.open(path))
        try:
            ids = await asyncio.gather(*(put(s, i) for i, s in enumerate(stores)))
            for s in stores:
                assert {i["id"] for i in (await s.list_quarantine())[0]} == set(ids)
        finally:
            for s in stores:
                await s.close()
