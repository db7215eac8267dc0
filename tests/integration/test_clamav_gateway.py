"""Virus scanning through the running gateway, with the real clamd.

Proves, over SMTP on loopback: EICAR (attachment, zip, message/rfc822) and a
clamav-testfiles executable are held (250 2.7.0 ... held for review), never
reach the next hop, are listed in the store and kept as 0600 files in a 0700
tree; IT gets a notification without the content; action ``reject`` gives 554
naming the virus; clean mail is delivered with ``X-Mailwarden-Scan: clean``;
clamd down gives 451 and nothing is delivered or kept (or an "unscannable"
hold with ``on_error = "quarantine"``).
"""

from __future__ import annotations

import re
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import replies
from quarantine.store import DB_NAME
from tests.support.clamd import TESTFILES, Clamd, virus_name_for_testfile
from tests.support.eicar import EICAR_NAME, eicar, forwarded, zipped
from tests.support.harness import Gateway, NextHop, make_message

HELD = re.compile(r"^2\.7\.0 accepted, held for review \((?P<id>[^)\s]+)\)$")
INBOUND = {"trusted_networks": ["10.255.255.0/24"]}  # loopback mail is then inbound


def quarantine_rows(gw: Gateway) -> list[dict[str, Any]]:
    db = sqlite3.connect(gw.store_path / DB_NAME)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM quarantine ORDER BY received")]
    finally:
        db.close()


def assert_held(gw: Gateway, nh: NextHop, code: int, text: str, virus: str) -> dict[str, Any]:
    """250 held, nothing at the next hop, the item listed with its file 0600."""
    assert code == 250, text
    m = HELD.match(text)
    assert m, text
    assert nh.messages == []
    rows = quarantine_rows(gw)
    assert [r["id"] for r in rows] == [m["id"]]
    row = rows[0]
    assert (row["reason"], row["detail"], row["state"]) == ("clamav", virus, "held")
    path = gw.store_path / row["path"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for parent in path.relative_to(gw.store_path).parents:
        if parent != Path("."):
            assert stat.S_IMODE((gw.store_path / parent).stat().st_mode) == 0o700, parent
    assert stat.S_IMODE(gw.store_path.stat().st_mode) == 0o700
    return row


CARRIERS: dict[str, Callable[[], tuple[bytes, str]]] = {
    "attachment": lambda: (
        make_message(attachments=[("eicar.com", "application/octet-stream", eicar())]),
        EICAR_NAME,
    ),
    "zip": lambda: (
        make_message(attachments=[("invoice.zip", "application/zip",
                                   zipped("invoice.pdf.com", eicar()))]),
        EICAR_NAME,
    ),
    "message-rfc822": lambda: (
        forwarded(make_message(attachments=[("eicar.com", "application/octet-stream",
                                             eicar())])),
        EICAR_NAME,
    ),
    "clamav-testfile": lambda: (
        make_message(attachments=[("setup.exe", "application/octet-stream",
                                   (TESTFILES / "clam.exe").read_bytes())]),
        virus_name_for_testfile("clam.exe"),
    ),
}


@pytest.mark.parametrize("carrier", list(CARRIERS))
def test_virus_is_held_not_delivered(
    clamd: Clamd, make_gateway: Any, next_hop: NextHop, carrier: str
) -> None:
    gw = make_gateway(chain=["clamav"], filters={"clamav": {"address": clamd.socket}})
    raw, virus = CARRIERS[carrier]()
    code, text = gw.send(raw)
    row = assert_held(gw, next_hop, code, text, virus)
    assert (gw.store_path / row["path"]).read_bytes() == raw


def test_inbound_virus_is_held_and_it_is_notified(
    clamd: Clamd, make_gateway: Any, next_hop: NextHop
) -> None:
    gw = make_gateway(
        chain=["clamav"], gateway=INBOUND,
        filters={"clamav": {"address": clamd.socket, "notify": "it-security@example.com"}},
    )
    raw = make_message(subject="your parcel",
                       attachments=[("label.zip", "application/zip", zipped("l.com", eicar()))])
    code, text = gw.send(raw, mail_from="mallory@ext.test", rcpt_tos=("b@example.com",))
    assert code == 250 and HELD.match(text), text
    notes = next_hop.wait_for(1, timeout=10)
    assert len(notes) == 1
    note = notes[0]
    assert note.rcpt_tos == ["it-security@example.com"]
    assert EICAR_NAME.encode() in note.data and b"mallory@ext.test" in note.data
    assert HELD.match(text)["id"].encode() in note.data  # type: ignore[index]
    assert eicar() not in note.data and b"label.zip" not in note.data.split(b"\r\n\r\n")[0]
    rows = quarantine_rows(gw)
    assert [r["direction"] for r in rows] == ["inbound"]


def test_action_reject_gives_554_naming_the_virus(
    clamd: Clamd, make_gateway: Any, next_hop: NextHop
) -> None:
    gw = make_gateway(chain=["clamav"],
                      filters={"clamav": {"address": clamd.socket, "action": "reject"}})
    raw = make_message(attachments=[("eicar.com", "application/octet-stream", eicar())])
    code, text = gw.send(raw)
    assert (code, text) == (554, f"5.7.1 message refused: virus found ({EICAR_NAME})")
    assert next_hop.messages == []
    assert quarantine_rows(gw) == []


def test_clean_mail_is_delivered_with_scan_header(
    clamd: Clamd, make_gateway: Any, next_hop: NextHop
) -> None:
    gw = make_gateway(chain=["clamav"], filters={"clamav": {"address": clamd.socket}})
    raw = make_message(attachments=[("report.pdf", "application/pdf", b"%PDF-1.4\n%fine\n")])
    code, text = gw.send(raw)
    assert code == 250, text
    (got,) = next_hop.messages
    assert got.data == b"X-Mailwarden-Scan: clean\r\n" + raw
    assert quarantine_rows(gw) == []


def test_clamd_down_gives_451_and_nothing_is_delivered(
    clamd: Clamd, make_gateway: Any, next_hop: NextHop
) -> None:
    gw = make_gateway(chain=["clamav"], filters={"clamav": {"address": clamd.socket}})
    raw = make_message(attachments=[("report.pdf", "application/pdf", b"%PDF-1.4\n")])
    with clamd.stopped():
        code, text = gw.send(raw)
    assert f"{code} {text}" == replies.SCANNER_UNAVAILABLE
    assert next_hop.messages == []
    assert quarantine_rows(gw) == []
    # clamd is back: the same message now goes through.
    assert gw.send(raw)[0] == 250
    assert len(next_hop.messages) == 1


def test_clamd_down_with_on_error_quarantine_holds_as_unscannable(
    clamd: Clamd, make_gateway: Any, next_hop: NextHop
) -> None:
    gw = make_gateway(chain=["clamav"],
                      filters={"clamav": {"address": clamd.socket, "on_error": "quarantine"}})
    with clamd.stopped():
        code, text = gw.send(make_message())
    assert code == 250 and HELD.match(text), text
    assert next_hop.messages == []
    (row,) = quarantine_rows(gw)
    assert row["reason"] == "clamav" and row["detail"].startswith("unscannable: ")
