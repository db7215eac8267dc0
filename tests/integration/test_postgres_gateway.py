"""The gateway on the PostgreSQL backend while PostgreSQL goes away and comes back.

Proves (issue 16, "While PostgreSQL is unreachable"): a message to hold gets
250 held while PostgreSQL is up and 451 4.3.0 while it is down (never 250
without a durable copy); clean mail is still relayed during the outage and
its log record waits in the local outbox; when PostgreSQL is back the
outbox ships, every record exactly once, and the log chain verifies.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg

from quarantine.log import verify
from quarantine.postgres import OUTBOX_NAME
from tests.support import attachment_samples as s
from tests.support.harness import NextHop, make_message
from tests.support.postgres import PgServer

INBOUND = {"trusted_networks": ["10.255.255.0/24"]}


def log_rows(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT queue_id FROM log ORDER BY id")]


def test_outage_451_for_holds_relay_continues_log_ships_after(
        own_pg_server: PgServer, make_gateway, next_hop: NextHop, tmp_path: Path) -> None:
    dsn = own_pg_server.new_database()
    gw = make_gateway(chain=["attachment_types", "header_log"], gateway=INBOUND,
                      store={"backend": "postgresql", "dsn": dsn, "instance": "gw1"})
    exe = [("tool.exe", "application/octet-stream", s.pe())]
    try:
        code, text = gw.send(make_message(subject="held while up", attachments=exe))
        assert code == 250 and "held for review" in text, text
        gw.flush_log()
        own_pg_server.stop()
        code, text = gw.send(make_message(subject="held while down", attachments=exe))
        assert code == 451 and "4.3.0" in text, text
        code, text = gw.send(make_message(subject="clean while down"))
        assert code == 250 and "held" not in text, text
        assert len(next_hop.wait_for(1)) == 1
        gw.flush_log()
        outbox = Path(gw.config.store.path) / OUTBOX_NAME
        waiting = [json.loads(line)["record"]["subject"]
                   for line in outbox.read_text().splitlines()]
        assert "clean while down" in waiting
        own_pg_server.start()

        async def drained() -> None:
            async with asyncio.timeout(180):
                while await gw.store.drain_outbox():
                    pass

        gw.call(drained(), timeout=200)
        assert not outbox.exists()
        rows = log_rows(dsn)
        assert len(rows) == len(set(rows)) == 3  # held, 451 (logged as tempfail), clean
        result = gw.call(verify(gw.store))
        assert result.ok, result.message
    finally:
        if not own_pg_server.running:
            own_pg_server.start()
