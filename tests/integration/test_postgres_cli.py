"""``mailwarden check`` and ``mailwarden log verify`` on the PostgreSQL backend,
as real subprocesses (issue 16).

Proves: ``check`` reports the backend, the database (never a password), the
instance and the schema version; ``log verify`` walks two instances' chains
and the anchor chain, then names ``instance NAME seq N`` after a record is
edited in the database; a store without the schema is one line, exit 1.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from gateway.config import StoreSettings
from quarantine.postgres import MIGRATIONS, PostgresStore
from quarantine.store import iso, utcnow
from tests.support.harness import NextHop
from tests.support.postgres import PgServer
from tests.support.process import write_config


def mw(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


async def populate(dsn: str, tmp_path: Path) -> None:
    for name in ("gw-a", "gw-b"):
        store = await PostgresStore.open(
            StoreSettings(backend="postgresql", dsn=dsn, instance=name,
                          path=str(tmp_path / name)), create=True)
        try:
            await store.write_log_batch([
                {"time": iso(utcnow()), "queue_id": f"{name}-{n}", "direction": "inbound",
                 "subject": f"s{n}"} for n in range(3)])
            await store.audit("test", reason="populate")
            await store.checkpoint()
        finally:
            await store.close()


def config_for(tmp_path: Path, dsn: str, next_hop: NextHop, **extra: Any) -> Path:
    path, _ = write_config(
        tmp_path / "config.toml", store=tmp_path / "state", next_hop=next_hop.address,
        store_extra={"backend": "postgresql", "dsn": dsn, "instance": "cli", **extra},
    )
    return path


def test_check_and_verify_on_postgresql(pg_server: PgServer, tmp_path: Path,
                                        next_hop: NextHop) -> None:
    dsn = pg_server.new_database()
    asyncio.run(populate(dsn, tmp_path))
    # trust authentication ignores the password: it must not be shown anyway
    config = config_for(tmp_path, dsn + " password=sekrit-pw", next_hop)
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]

    res = mw(config, "check")
    assert "sekrit-pw" not in res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if "store postgresql" in ln)
    assert line.startswith("ok") and f"database {dbname}" in line, res.stdout
    assert "instance cli" in line and f"schema v{len(MIGRATIONS)}" in line
    assert res.returncode == 0, res.stdout + res.stderr

    res = mw(config, "log", "verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 records" in res.stdout and "2 instance chains (gw-a, gw-b)" in res.stdout
    assert "audit chain intact" in res.stdout

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE log SET record = replace(record, '\"s1\"', '\"forged\"')"
                     " WHERE instance = 'gw-b' AND seq = 2")
    res = mw(config, "log", "verify")
    assert res.returncode == 1
    fail = next(ln for ln in res.stdout.splitlines() if ln.startswith("FAIL"))
    assert "instance gw-b seq 2" in fail and "gw-b-1" in fail, fail


def test_a_database_without_the_schema(pg_server: PgServer, tmp_path: Path,
                                       next_hop: NextHop) -> None:
    config = config_for(tmp_path, pg_server.new_database(), next_hop)
    res = mw(config, "log", "verify")
    assert res.returncode == 1
    assert "no mailwarden schema" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
