"""The SQLite backend raises the protocol's errors, never its driver's (issue 14).

Proves: every public coroutine and async generator of
:class:`quarantine.sqlite.SQLiteStore` maps ``sqlite3.Error`` (which is
``aiosqlite.Error``) to :class:`quarantine.store.StoreError`, except the few
that map their own (``open``, ``quarantine``, ``check``); the message names the
store and keeps SQLite's own words; NotFound and OnHold pass through as
themselves; an async generator's error is mapped too, and one left early is
closed; the CLI then turns a broken store into one line, exit 1 (it catches
no driver exception itself).
"""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from quarantine import sqlite as backend
from quarantine.log import LogQuery
from quarantine.store import NotFound, Store, StoreError, iso, utcnow
from tests.support.process import write_config


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[backend.SQLiteStore]:
    s = await Store.open(tmp_path / "store")
    yield s
    await s.close()


def test_every_public_coroutine_maps_driver_errors() -> None:
    unmapped = []
    for name, fn in vars(backend.SQLiteStore).items():
        if name.startswith("_") or name in backend._OWN_ERRORS:
            continue
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            if not getattr(fn, "maps_driver_errors", False):
                unmapped.append(name)
    assert unmapped == []
    # The wrapper keeps the kind of callable (inspect, and the protocol, see them as before).
    assert inspect.iscoroutinefunction(backend.SQLiteStore.log_page)
    assert inspect.isasyncgenfunction(backend.SQLiteStore.log_records)
    assert backend.SQLiteStore.log_page.__name__ == "log_page"


async def test_a_driver_error_is_a_store_error_naming_the_store(
        store: backend.SQLiteStore) -> None:
    await store.db.execute("DROP TABLE audit")
    with pytest.raises(StoreError) as info:
        await store.audit("probe")
    assert type(info.value) is StoreError
    assert str(info.value) == f"store {store.root}: no such table: audit"
    assert isinstance(info.value.__cause__, sqlite3.Error)


async def test_not_found_passes_through(store: backend.SQLiteStore) -> None:
    with pytest.raises(NotFound):
        await store.delete_item("20260101-000000000000")


async def test_async_generators_map_errors_and_close_early(
        store: backend.SQLiteStore) -> None:
    await store.write_log_batch([
        {"time": iso(utcnow()), "queue_id": f"Q{n}", "direction": "inbound", "subject": "s"}
        for n in range(3)
    ])
    seen = []
    async for seq, _time, _record in store.log_records([1, 2, 3]):
        seen.append(seq)
        break
    assert seen == [1]
    assert await store.log_count(LogQuery()) == 3  # the connection is still usable
    await store.db.execute("DROP TABLE log_address")
    await store.db.execute("DROP TABLE log")
    with pytest.raises(StoreError, match=r"no such table: log"):
        async for _row in store.log_records([1]):
            pass
    with pytest.raises(StoreError, match=r"no such table: log"):
        await store.log_last_seq()


def test_the_cli_reports_a_broken_store_in_one_line(tmp_path: Path) -> None:
    from cli import main

    async def break_it() -> None:
        s = await Store.open(tmp_path / "store")
        await s.db.execute("DROP TABLE audit")
        await s.close()

    asyncio.run(break_it())
    config, _ = write_config(tmp_path / "config.toml", store=tmp_path / "store",
                             next_hop="127.0.0.1:9", chain=[])
    res = CliRunner().invoke(main, ["--config", str(config), "quarantine", "list"])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert res.output.strip() == f"mailwarden: store {tmp_path / 'store'}: no such table: audit"
