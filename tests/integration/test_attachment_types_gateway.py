"""Attachment true-type policy through the running gateway (issue 4).

Proves, over SMTP on loopback with the real store and a recording next hop:
a PE named .pdf, an .exe, photo.jpg.exe, an exe inside a zip, an .scr in a zip
in a zip, a .vbs, an ISO, an encrypted zip, a macro document, a zip bomb and
an exe inside Outlook's winmail.dat (TNEF) are held (250 2.7.0 ... held for review, nothing delivered, a quarantine row
with reason attachment_types and a detail naming the file and its true type);
a PDF, a plain DOCX and XLSX, a text file, a PNG and a zip of PDFs are
delivered untouched; ``action = "reject"`` gives CONTRACT.md's 554 naming the
file; macro documents leaving the organisation are relayed (macros are an
inbound rule by default); the verdict facts list name, true type, size and
SHA-256 of every attachment.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import replies
from quarantine.store import DB_NAME
from tests.support import attachment_samples as s
from tests.support.harness import Gateway, NextHop, make_message

HELD = re.compile(r"^2\.7\.0 accepted, held for review \((?P<id>[^)\s]+)\)$")
INBOUND = {"trusted_networks": ["10.255.255.0/24"]}  # loopback mail is then inbound
CHAIN = ["attachment_types"]


def quarantine_rows(gw: Gateway) -> dict[str, dict[str, Any]]:
    db = sqlite3.connect(gw.store_path / DB_NAME)
    try:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM quarantine")}
    finally:
        db.close()


def held_cases() -> list[tuple[str, str, bytes, str]]:
    """(filename, declared type, content, expected start of the detail)."""
    inner = s.zipped([("readme.txt", b"read me"), ("screensaver.scr", s.pe())])
    return [
        ("invoice.pdf", "application/pdf", s.pe(), "invoice.pdf: executable, PE32 executable"),
        ("setup.exe", "application/octet-stream", s.pe(), "setup.exe: executable"),
        ("photo.jpg.exe", "image/jpeg", s.pe(), "photo.jpg.exe: executable"),
        ("tools.zip", "application/zip", s.zipped([("a.pdf", s.pdf()), ("tool.exe", s.pe())]),
         "tools.zip/tool.exe: executable"),
        ("outer.zip", "application/zip", s.zipped([("inner.zip", inner)]),
         "outer.zip/inner.zip/screensaver.scr: executable"),
        ("run.vbs", "text/plain", b'CreateObject("WScript.Shell").Run "calc"\r\n',
         "run.vbs: script by name (.vbs)"),
        ("photos.iso", "application/octet-stream", s.iso(),
         "photos.iso: disk_image, ISO 9660 disk image"),
        ("report.zip", "application/zip", s.encrypted_zip([("report.pdf", s.pdf())]),
         "unscannable: encrypted archive report.zip"),
        ("budget.docm", "application/vnd.ms-word.document.macroEnabled.12", s.docm(),
         "budget.docm: Office document with VBA macros"),
        ("bomb.zip", "application/zip", s.zip_bomb(),
         "unscannable: archive exceeds limits (bomb.zip: more than 104857600 bytes"),
        ("winmail.dat", "application/ms-tnef", s.tnef([("setup.exe", s.pe())]),
         "winmail.dat/setup.exe: executable"),
    ]


def clean_cases() -> list[tuple[str, str, bytes]]:
    return [
        ("report.pdf", "application/pdf", s.pdf(40_000)),
        ("report.docx",
         "application/vnd.openxmlformats-officedocument.wordprocessingml.document", s.docx()),
        ("sheet.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
         s.xlsx()),
        ("notes.txt", "text/plain", b"minutes of the meeting\r\n"),
        ("photo.png", "image/png", s.png()),
        ("pdfs.zip", "application/zip", s.zipped([("a.pdf", s.pdf()), ("b.pdf", s.pdf())])),
    ]


def test_blocked_attachments_are_held(
    make_gateway: Callable[..., Gateway], next_hop: NextHop
) -> None:
    gw = make_gateway(chain=CHAIN, gateway=INBOUND)
    for name, ctype, data, expected in held_cases():
        raw = make_message(subject=f"held {name}", attachments=[(name, ctype, data)])
        code, text = gw.send(raw)
        assert code == 250, (name, text)
        m = HELD.match(text)
        assert m, (name, text)
        row = quarantine_rows(gw)[m["id"]]
        assert row["reason"] == "attachment_types", row
        assert row["detail"].startswith(expected), (name, row["detail"])
        assert row["subject"] == f"held {name}"
        (summary,) = [v for v in json.loads(row["verdicts"]) if v["filter"] == "attachment_types"]
        assert summary["outcome"] == "quarantine"
        assert [a["sha256"] for a in summary["attachments"]] == [hashlib.sha256(data).hexdigest()]
        assert summary["files"] and summary["files"][0].startswith(name)
    assert next_hop.messages == []
    assert len(quarantine_rows(gw)) == len(held_cases())


def test_clean_attachments_pass(make_gateway: Callable[..., Gateway], next_hop: NextHop) -> None:
    gw = make_gateway(chain=CHAIN, gateway=INBOUND)
    cases = clean_cases()
    for name, ctype, data in cases:
        raw = make_message(subject=f"clean {name}", attachments=[(name, ctype, data)])
        code, text = gw.send(raw)
        assert code == 250 and not HELD.match(text), (name, text)
    received = next_hop.wait_for(len(cases))
    assert len(received) == len(cases)
    assert quarantine_rows(gw) == {}
    # the verdict's facts: every attachment's name, true type, size, SHA-256
    (_mail, result), *_ = gw.results
    (verdict,) = [v for v in result.verdicts if v.filter == "attachment_types"]
    name, _ctype, data = cases[0]
    assert list(verdict.facts["attachments"]) == [{
        "name": name, "type": "application/pdf", "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }]


def test_reject_names_the_file(make_gateway: Callable[..., Gateway], next_hop: NextHop) -> None:
    gw = make_gateway(chain=CHAIN, filters={"attachment_types": {"action": "reject"}})
    raw = make_message(attachments=[("photo.jpg.exe", "image/jpeg", s.pe())])
    code, text = gw.send(raw)
    assert f"{code} {text}" == replies.ATTACHMENT_REJECTED.format("photo.jpg.exe")
    assert next_hop.messages == [] and quarantine_rows(gw) == {}


def test_macros_are_an_inbound_rule(
    make_gateway: Callable[..., Gateway], next_hop: NextHop
) -> None:
    """Outbound (loopback is trusted by default) a macro document is relayed
    and only noted; a real executable is held in every direction."""
    gw = make_gateway(chain=CHAIN)
    code, text = gw.send(make_message(attachments=[("budget.docm", "application/octet-stream",
                                                    s.docm())]), rcpt_tos=("x@partner.test",))
    assert code == 250 and not HELD.match(text), text
    assert len(next_hop.wait_for(1)) == 1
    code, text = gw.send(make_message(attachments=[("setup.exe", "application/octet-stream",
                                                    s.pe())]), rcpt_tos=("x@partner.test",))
    assert HELD.match(text), text


def test_corpus_samples_through_the_gateway(
    make_gateway: Callable[..., Gateway], next_hop: NextHop, corpus: Path
) -> None:
    """Real documents and mails: the oletools VBA document and rspamd's
    exe-attachment mail are held; the clean oletools baseline passes."""
    gw = make_gateway(chain=CHAIN, gateway=INBOUND)
    office = corpus / "attachments" / "oletools-office-samples"
    for name, held in (("oleform-PR314.docm", True), ("sample_with_vba.ppt", True),
                       ("harmless-clean.docx", False)):
        path = office / name
        if not path.exists():
            pytest.skip(f"{path} missing from the corpus")
        code, text = gw.send(make_message(attachments=[(name, "application/octet-stream",
                                                        path.read_bytes())]))
        assert code == 250 and bool(HELD.match(text)) is held, (name, text)
    eml = corpus / "mime" / "rspamd-functional-messages" / "exe_attm.eml"
    if eml.exists():
        raw = eml.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        code, text = gw.send(raw)
        assert HELD.match(text), text
    rows = quarantine_rows(gw).values()
    assert all(r["reason"] == "attachment_types" for r in rows)
    assert any(json.loads(r["verdicts"]) for r in rows)
    assert len(next_hop.messages) == 1
