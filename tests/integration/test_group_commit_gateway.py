"""Group commit through the SMTP proxy: concurrent held messages (real
clamd, real SMTP on loopback) are each answered 250 with their own id, and
all of them are kept (rows and files); when the store cannot make a batch
durable every session of it gets 451 and nothing is half kept."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from quarantine import files
from tests.support.eicar import eicar
from tests.support.harness import make_message
from tests.support.served import quarantine_rows

HELD = re.compile(r"held for review \(([0-9A-Za-z-]+)\)")
SESSIONS = 24


def _virus(n: int) -> bytes:
    return make_message(subject=f"invoice {n}",
                        attachments=[("invoice.com", "application/octet-stream", eicar())])


def _send_all(gw) -> list[tuple[int, str]]:
    with ThreadPoolExecutor(SESSIONS) as pool:
        return list(pool.map(lambda n: gw.send(_virus(n)), range(SESSIONS)))


def test_concurrent_held_messages_all_kept(make_gateway, next_hop, clamd) -> None:
    gw = make_gateway(chain=["clamav"], filters={"clamav": {"address": clamd.socket}})
    replies = _send_all(gw)
    assert all(code == 250 for code, _ in replies), replies
    ids = [HELD.search(text).group(1) for _, text in replies]
    assert len(set(ids)) == SESSIONS
    rows = quarantine_rows(gw.store_path)
    assert {r["id"] for r in rows} == set(ids)
    assert {r["subject"] for r in rows} == {f"invoice {n}" for n in range(SESSIONS)}
    for r in rows:
        assert (gw.store_path / r["path"]).is_file()
    assert next_hop.messages == []


def test_a_batch_that_cannot_be_made_durable_gets_451_everywhere(
        make_gateway, next_hop, clamd, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = make_gateway(chain=["clamav"], filters={"clamav": {"address": clamd.socket}})

    def broken(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    # Directory fsyncs fail: a batch's (sync_dirs) and a lone message's
    # (write_durable's own).
    monkeypatch.setattr(files, "_fsync_dir", broken)
    code, text = gw.send(_virus(-1))  # alone: its directory fsync in its own write
    assert code == 451 and "4.3.0" in text, text
    assert not list((gw.store_path / "messages").rglob("*.eml"))
    replies = _send_all(gw)
    assert all(code == 451 and "4.3.0" in text for code, text in replies), replies
    assert quarantine_rows(gw.store_path) == []
    assert not list((gw.store_path / "messages").rglob("*.eml"))
    monkeypatch.undo()
    code, text = gw.send(_virus(99))
    assert code == 250 and HELD.search(text), text
