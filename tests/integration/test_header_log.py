"""Personal-mail tagging and the header-only log, through the running gateway.

Proves, over SMTP on loopback with the real clamd and a recording next hop:
Sensitivity Private/Personal, classification headers and subject markers
(after ``Re:``, in RFC 2047 encoded words) are tagged ``X-Mailwarden-Personal:
yes`` at the next hop and ordinary mail is not (a forged tag is removed); one
header-only record per message whatever the outcome (relayed, held, rejected,
next hop refused, next hop and scanner temp-failed) with the verdicts, the
reply and the personal flag; and the canary test: a unique string planted in
bodies and attachments of relayed and held mail is nowhere under
``store.path`` (database, WAL, SHM) except inside the held message's file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import replies
from quarantine.store import DB_NAME
from tests.support.clamd import Clamd
from tests.support.eicar import EICAR_NAME, eicar
from tests.support.harness import Gateway, NextHop, make_message
from tests.support.harness import test_config as config_for

HELD = re.compile(r"held for review \((?P<id>[^)\s]+)\)")


def log_records(gw: Gateway) -> list[dict[str, Any]]:
    """Every stored record (after the writer flushed), with seq and hash."""
    gw.flush_log()
    db = sqlite3.connect(gw.store_path / DB_NAME)
    try:
        rows = db.execute("SELECT seq, record, hash FROM log ORDER BY seq").fetchall()
        index = db.execute("SELECT seq, address FROM log_address ORDER BY seq, address").fetchall()
    finally:
        db.close()
    out = []
    for seq, record, h in rows:
        rec = json.loads(record)
        rec["_seq"], rec["_hash"] = seq, h
        rec["_index"] = [a for s, a in index if s == seq]
        out.append(rec)
    return out


def header_values(data: bytes, name: str) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return [
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")
        if line.lower().startswith(name.lower() + ":")
    ]


PERSONAL_CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "sensitivity-private": ({"headers": {"Sensitivity": "Private"}}, True),
    "sensitivity-personal": ({"headers": {"Sensitivity": "Personal"}}, True),
    "x-classification": ({"headers": {"X-Classification": "personal"}}, True),
    "marker-after-re": ({"subject": "Re: [Personal] lunch on friday?"}, True),
    "marker-after-re-fwd": ({"subject": "RE: Fwd: private: flat viewing"}, True),
    # Encoded words: the whole subject including "Re:" and the marker is
    # RFC 2047 encoded (as mail clients do for non-ASCII subjects).
    "marker-encoded-word": ({"subject": "=?utf-8?q?Re=3A_=5Bpersonal=5D_d=C3=ADner?="}, True),
    "marker-encoded-b": ({"subject": "=?utf-8?b?" + base64.b64encode(
        "Private: Arztbrief für Jörg".encode()).decode() + "?="}, True),
    "ordinary": ({"subject": "quarterly report"}, False),
    "marker-not-at-start": ({"subject": "Re: about the [personal] folder"}, False),
    "sensitivity-confidential": ({"headers": {"Sensitivity": "Company-Confidential"}}, False),
    "forged-tag": ({"headers": {"X-Mailwarden-Personal": "yes"}}, False),
}


def test_personal_mail_is_tagged_and_flagged(
    make_gateway: Callable[..., Gateway], next_hop: NextHop
) -> None:
    gw = make_gateway(chain=["personal", "header_log"])
    for i, (kwargs, _) in enumerate(PERSONAL_CASES.values()):
        code, text = gw.send(make_message(**kwargs), mail_from=f"s{i}@example.com")
        assert code == 250, text
    got = next_hop.wait_for(len(PERSONAL_CASES))
    assert len(got) == len(PERSONAL_CASES)
    by_sender = {m.mail_from: m for m in got}
    records = {r["mail_from"]: r for r in log_records(gw)}
    for i, (case, (_, personal)) in enumerate(PERSONAL_CASES.items()):
        sender = f"s{i}@example.com"
        tags = header_values(by_sender[sender].data, "X-Mailwarden-Personal")
        assert tags == (["yes"] if personal else []), case
        rec = records[sender]
        assert rec["personal"] is personal, case
        (pv,) = [v for v in rec["verdicts"] if v["filter"] == "personal"]
        assert pv["personal"] is personal, case
        if personal:
            assert pv["marked_by"], case
    # decoded subjects are logged as text
    assert records["s5@example.com"]["subject"] == "Re: [personal] díner"
    assert records["s6@example.com"]["subject"] == "Private: Arztbrief für Jörg"


def test_one_record_per_message_whatever_the_outcome(
    make_gateway: Callable[..., Gateway], next_hop: NextHop, clamd: Clamd, tmp_path: Path
) -> None:
    chain = ["clamav", "personal", "header_log"]
    clam = {"address": clamd.socket}
    gw = make_gateway(chain=chain, filters={"clamav": clam})
    sent: list[tuple[str, str, str]] = []  # (sender, expected disposition, reply start)

    def send(sender: str, raw: bytes, disposition: str, **kw: Any) -> tuple[int, str]:
        code, text = gw.send(raw, mail_from=sender, **kw)
        sent.append((sender, disposition, f"{code} {text}"))
        return code, text

    # relayed (outbound, with the next hop's reply passed through)
    code, _ = send("relayed@example.com", make_message(subject="hello"), "relayed",
                   rcpt_tos=("x@partner.test",))
    assert code == 250
    # held: a virus, in personal mail, arriving from outside (XFORWARD ADDR)
    code, text = send(
        "held@ext.test",
        make_message(subject="Re: private: photos", from_="Eve <held@ext.test>",
                     attachments=[("eicar.com", "application/octet-stream", eicar())]),
        "quarantined", xforward={"ADDR": "203.0.113.9"},
    )
    qid = HELD.search(text)["id"]  # type: ignore[index]
    # next hop refuses the data (5xx) and defers it (4xx)
    next_hop.data_reply = "554 5.7.1 content refused downstream"
    send("refused@example.com", make_message(subject="nope"), "next-hop-refused")
    next_hop.data_reply = "451 4.3.0 try again later"
    send("deferred@example.com", make_message(subject="later"), "tempfailed")
    next_hop.data_reply = None
    # rejected: the same virus with action = reject
    gw.reload(config_for(tmp_path, next_hop.address, chain=chain,
                          filters={"clamav": {**clam, "action": "reject"}}))
    code, text = send("rejected@ext.test", make_message(
        attachments=[("eicar.com", "application/octet-stream", eicar())]), "rejected")
    assert code == 554, text
    # scanner down: temp failure from the filter
    gw.reload(config_for(tmp_path, next_hop.address, chain=chain,
                          filters={"clamav": {"address": str(tmp_path / "no-clamd.sock")}}))
    code, text = send("scanner-down@example.com", make_message(), "tempfailed")
    assert code == 451, text

    records = log_records(gw)
    assert len(records) == len(sent)
    by_sender = {r["mail_from"]: r for r in records}
    for sender, disposition, reply in sent:
        rec = by_sender[sender]
        assert rec["disposition"] == disposition, sender
        assert rec["reply"].replace("\r\n", " ").startswith(reply.split(" ")[0]), sender
    # the next hop's own reply is what the log records for relayed mail
    assert by_sender["relayed@example.com"]["reply"].startswith("250 2.0.0 Ok: queued as NH")
    assert by_sender["refused@example.com"]["reply"].startswith("554 5.7.1 content refused")
    assert by_sender["deferred@example.com"]["reply"].startswith("451 4.3.0 try again later")
    assert by_sender["scanner-down@example.com"]["reply"] == replies.SCANNER_UNAVAILABLE

    held = by_sender["held@ext.test"]
    assert held["quarantine_id"] == qid
    assert held["direction"] == "inbound" and held["client_addr"] == "203.0.113.9"
    assert held["personal"] is True
    (cv,) = [v for v in held["verdicts"] if v["filter"] == "clamav"]
    assert (cv["outcome"], cv["virus"]) == ("quarantine", EICAR_NAME)
    (att,) = held["attachments"]
    assert att["name"] == "eicar.com" and att["size"] == len(eicar())
    assert att["sha256"] == hashlib.sha256(eicar()).hexdigest()
    assert held["_index"] == ["b@example.com", "held@ext.test"]
    # the quarantine item carries the personal flag too
    db = sqlite3.connect(gw.store_path / DB_NAME)
    try:
        assert db.execute("SELECT personal FROM quarantine WHERE id = ?", (qid,)).fetchone() == (1,)
    finally:
        db.close()
    rel = by_sender["relayed@example.com"]
    assert rel["direction"] == "outbound" and rel["personal"] is False
    assert rel["rcpt_tos"] == ["x@partner.test"] and rel["subject"] == "hello"
    assert by_sender["rejected@ext.test"]["verdicts"][0]["outcome"] == "reject"


def _needles(canary: str, raw: bytes) -> list[bytes]:
    """The canary as plain text and every base64 line of the message that
    carries part of it (the form in which it travels in attachments)."""
    out = [canary.encode()]
    for line in raw.split(b"\r\n"):
        try:
            decoded = base64.b64decode(line, validate=True)
        except ValueError:
            continue
        if len(line) >= 16 and (canary.encode()[:8] in decoded or canary.encode()[-8:] in decoded):
            out.append(line)
    return out


def test_canary_never_reaches_the_database(
    make_gateway: Callable[..., Gateway], next_hop: NextHop, clamd: Clamd
) -> None:
    relayed_canary = "CANARY-R-" + secrets.token_hex(16)
    held_canary = "CANARY-Q-" + secrets.token_hex(16)

    def carrier(canary: str, virus: bool) -> bytes:
        atts = [("notes.txt", "text/plain", f"attachment text {canary} end".encode()),
                ("data.bin", "application/octet-stream", canary.encode() * 3)]
        if virus:
            atts.append(("eicar.com", "application/octet-stream", eicar()))
        return make_message(subject="canary run", body=f"Body line with {canary}.\n",
                            html=f"<p>{canary}</p>", attachments=atts,
                            headers={"Sensitivity": "Personal"})

    gw = make_gateway(chain=["clamav", "personal", "header_log"],
                      filters={"clamav": {"address": clamd.socket}})
    raw_r = carrier(relayed_canary, False)
    raw_q = carrier(held_canary, True)
    assert gw.send(raw_r)[0] == 250 and len(next_hop.wait_for(1)) == 1
    code, text = gw.send(raw_q)
    assert code == 250 and "held for review" in text, text
    records = log_records(gw)
    assert [r["disposition"] for r in records] == ["relayed", "quarantined"]
    assert all(len(r["attachments"]) >= 2 for r in records)
    # Scanned while the gateway runs: the WAL holds the recent writes.

    needles_r = _needles(relayed_canary, raw_r)
    needles_q = _needles(held_canary, raw_q)
    assert len(needles_r) > 1 and len(needles_q) > 1  # base64 forms found too
    files = [p for p in gw.store_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"} <= names, names
    found_q = []
    for path in files:
        data = path.read_bytes()
        for needle in needles_r:
            assert needle not in data, f"relayed mail content in {path}"
        if any(needle in data for needle in needles_q):
            found_q.append(path.relative_to(gw.store_path))
    # the held message's own file is the only place its content exists
    assert len(found_q) == 1, found_q
    assert found_q[0].parts[0] == "messages" and found_q[0].suffix == ".eml"
