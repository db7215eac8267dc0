"""Grounds, two-person approval, pseudonymised exports and holds (issue 17),
through the real CLI against a real store.

Enforcement is tested without the control socket: the caller a command runs
for is set with ``set_current(Caller(..., enforced=True, roles=...))`` and the
command runs through click's runner in-process (the context variable reaches
the command's ``asyncio.run``); the store's clock is injected the same way
(``open_store`` wrapped), so a grant's expiry is a moved clock, not a wait.
The ordinary paths (no ``[access]``: the owner on the store directly) run as
real ``mailwarden`` processes.  The lead re-runs the two-person flow through
the control socket with real Unix users.

Proves: the two-person flow (an investigator requests; neither they nor a
dpo deciding their own request may approve; a dpo approves; the investigator
reads the personal body under the grant; another investigator, another case
or a clock past ``grant_hours`` are refused; everything, refusals included,
is in the audit trail); an unknown ground is one line with exit 2 naming the
allowed ones; a pseudonymised export holds no real address (every address of
the records, scanned in the bytes), keeps one pseudonym per person within an
export and changes them across exports, and drops display names;
re-identification is refused without a grant and allowed with one; an
identified export needs a grant for its --address; a reviewer deletes only
non-personal items; a hold names its case, shows in ``quarantine list`` and,
once its ``--until`` has passed, is released by ``purge`` and the item
purged (in-process on the injected clock, and as real processes with
libfaketime).  Every test runs on both backends (SQLite; PostgreSQL with a
fresh database per test).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from filters.header_log import address_digest
from quarantine import store as store_mod
from quarantine.access import Caller, reset_current, set_current
from quarantine.store import DB_NAME, addresses_of, iso
from tests.support.process import REPO

CLI = [sys.executable, "-m", "cli"]
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
GROUNDS = ("absence", "offensive-material", "excessive-personal", "detrimental", "legal-duty",
           "subject-access", "false-positive")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def record(n: int, when: datetime, mail_from: str, rcpts: list[str], from_: str, to: str,
           subject: str, *, personal: bool = False, reply: str = "250 2.0.0 Ok: queued",
           message_id: str | None = None) -> dict[str, Any]:
    index = sorted(addresses_of([mail_from, *rcpts, from_, to]))
    return {
        "time": iso(when), "queue_id": f"Q{n:04d}", "direction": "inbound",
        "client_addr": "192.0.2.1", "mail_from": mail_from, "rcpt_tos": rcpts, "from": from_,
        "to": to, "cc": None, "subject": subject, "message_id": message_id, "size": 1000 + n,
        "attachments": [], "verdicts": [{"filter": "personal", "outcome": "relay",
                                         "personal": personal}],
        "personal": personal, "disposition": "relayed", "reply": reply, "quarantine_id": None,
        "elapsed_ms": 1.5, "address_digest": address_digest(index), "addresses": index,
    }


RECORDS = [
    record(1, T0, "Alice@Example.com", ["bob@ext.test"], "Alice Smith <Alice@Example.com>",
           "Bob Jones <bob@ext.test>", "lunch with bob", message_id="<alice.1234@example.com>"),
    record(2, T0 + timedelta(minutes=1), "bob@ext.test", ["alice@example.com"],
           "Bob Jones <bob@ext.test>", "alice@example.com",
           "Re: question from carol@example.com"),
    record(3, T0 + timedelta(minutes=2), "carol@example.com",
           ["alice@example.com", "dee@example.com"], "\"Carol C.\" <carol@example.com>",
           "alice@example.com, Dee <dee@example.com>", "[personal] party", personal=True,
           reply="250 2.0.0 Ok (dee@example.com delayed)"),
]


class Env:
    """A store with a personal and an ordinary quarantine item and three log
    records, a config without [access], and the CLI in both forms."""

    def __init__(self, root: Path, config: Path, clock: Clock, dsn: str = "") -> None:
        self.root, self.config, self.clock = root, config, clock
        #: PostgreSQL's data database ("" on SQLite)
        self.dsn = dsn
        self.ids: dict[str, str] = {}

    def _rows(self, sqlite_sql: str, pg_sql: str) -> list[dict[str, Any]]:
        if self.dsn:
            import psycopg
            from psycopg.rows import dict_row

            with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
                return [dict(r) for r in conn.execute(pg_sql)]  # type: ignore[arg-type]
        with contextlib.closing(sqlite3.connect(self.root / DB_NAME)) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sqlite_sql)]

    def run(self, *args: str, as_: Caller | None = None) -> Any:
        """The command in-process, for ``as_`` (enforced) or the OS user."""
        from click.testing import CliRunner

        from cli import main

        token = set_current(as_) if as_ is not None else None
        try:
            return CliRunner().invoke(main, [*args, "--config", str(self.config)])
        finally:
            if token is not None:
                reset_current(token)

    def proc(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """The command as a real process (the real clock), direct mode."""
        env = {k: v for k, v in os.environ.items() if k != "MAILWARDEN_CONFIG"}
        return subprocess.run([*CLI, *args, "--config", str(self.config)], capture_output=True,
                              timeout=60, env=env, cwd=REPO)

    def audit(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM audit ORDER BY seq",
                          'SELECT id AS seq, time, "user", uid, command, targets, filters,'
                          " reason, exceptional, detail, hash FROM audit ORDER BY id")
        for r in rows:
            r["targets"] = json.loads(r["targets"])
            r["detail"] = json.loads(r["detail"])
        return rows

    def addresses(self) -> set[str]:
        return {r["address"] for r in self._rows("SELECT address FROM log_address",
                                                  "SELECT address FROM log_address")}


def caller(user: str, uid: int, *roles: str) -> Caller:
    return Caller(user=user, uid=uid, roles=frozenset(roles), enforced=True)


HR1 = caller("hr1", 40001, "investigator")
HR2 = caller("hr2", 40002, "investigator")
DANA = caller("dana", 40003, "investigator", "dpo")
DPO = caller("dpo1", 40004, "dpo")
AUDITOR = caller("aud1", 40005, "auditor")
IT = caller("it1", 40006, "reviewer")


async def _fill(settings: Any, clock: Clock) -> dict[str, str]:
    store = await store_mod.open_store(settings, create=True, clock=clock)
    try:
        ids = {}
        for name, subject, personal, body in (
            ("plain", "invoice", False, "please pay"),
            ("personal", "[personal] my holiday", True, "very private words"),
        ):
            raw = (f"From: Dee <dee@example.com>\r\nTo: friend@ext.test\r\nSubject: {subject}\r\n"
                   f"\r\n{body}\r\n").encode()
            ids[name] = await store.quarantine(
                raw=raw, queue_id="QX" + name, received=clock.now, direction="outbound",
                client_addr="192.0.2.9", helo="ws", mail_from="dee@example.com",
                rcpt_tos=["friend@ext.test"],
                headers={"from": "Dee <dee@example.com>", "to": "friend@ext.test",
                         "subject": subject},
                reason="attachment_types", detail="x.exe: executable", personal=personal,
                verdicts=[{"filter": "attachment_types", "outcome": "quarantine"}])
        await store.write_log_batch(RECORDS)
        return ids
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    clock = Clock(T0 + timedelta(hours=1))
    root = tmp_path / "store"
    config = tmp_path / "config.toml"
    dsn = ""
    backend = ""
    if request.param == "postgresql":
        dsn = request.getfixturevalue("pg_server").new_database()
        backend = f"backend = \"postgresql\"\ndsn = \"{dsn}\"\ninstance = \"cli\"\n"
    config.write_text(
        "[gateway]\ninternal_domains = [\"example.com\"]\nnext_hop = \"127.0.0.1:9\"\n"
        f"[store]\npath = \"{root}\"\n{backend}"
        "[filters]\nchain = []\n"
    )
    e = Env(root, config, clock, dsn)
    from gateway.config import load_config

    e.ids = asyncio.run(_fill(load_config(config).store, clock))
    real_open = store_mod.open_store

    async def open_with_clock(settings: Any, **kw: Any) -> Any:
        kw["clock"] = clock
        return await real_open(settings, **kw)

    # in-process commands run on the test's clock (the subprocesses on the real one)
    monkeypatch.setattr(store_mod, "open_store", open_with_clock)
    yield e


def one_line(res: Any, code: int, *needles: str) -> str:
    err = res.stderr
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert len(err.strip().splitlines()) == 1 and err.startswith("mailwarden: "), err
    for n in needles:
        assert n in err, err
    return err


def request(env: Env, who: Caller, *scope: str, case: str = "HR-7",
            ground: str = "offensive-material") -> str:
    res = env.run("access", "request", *scope, "--ground", ground, "--case", case,
                  "--reason", "complaint about offensive mail", as_=who)
    assert res.exit_code == 0, res.output
    rid = res.stdout.strip()
    assert re.fullmatch(r"R\d{8}-[0-9A-F]{8}", rid), rid
    return rid


# ------------------------------------------------------------- two persons


def test_two_person_flow_and_expiry(env: Env) -> None:
    personal = env.ids["personal"]
    read = ("quarantine", "show", personal, "--body", "--reason", "HR case", "--ground",
            "offensive-material", "--case", "HR-7")

    # without a grant the investigator cannot open the personal body
    one_line(env.run(*read, as_=HR1), 1, "refused", "grant", "HR-7")
    # ground and case are required when access control applies
    one_line(env.run("quarantine", "show", personal, "--body", "--reason", "x", as_=HR1), 2,
             "--ground", "--case", "offensive-material")

    rid = request(env, HR1, "--item", personal)
    # the requester cannot decide (no dpo role), nor a dpo their own request
    one_line(env.run("access", "approve", rid, as_=HR1), 1, "refused", "dpo")
    own = request(env, DANA, "--item", personal, case="HR-9")
    one_line(env.run("access", "approve", own, as_=DANA), 1, "refused", "second person")
    one_line(env.run(*read, as_=HR1), 1, "refused")  # still pending

    res = env.run("access", "approve", rid, as_=DPO)
    assert res.exit_code == 0, res.output
    assert f"{rid}: approved for hr1" in res.stdout
    res = env.run("access", "approve", rid, as_=DPO)
    one_line(res, 1, "already approved")

    res = env.run(*read, as_=HR1)
    assert res.exit_code == 0, res.output
    assert "very private words" in res.stdout
    # the grant is hr1's, for case HR-7 only
    one_line(env.run(*read, as_=HR2), 1, "refused")
    one_line(env.run(*read[:-1], "HR-8", as_=HR1), 1, "refused", "HR-8")

    # 24 h (grant_hours) after the approval the same read is refused
    env.clock.now += timedelta(hours=24, seconds=1)
    one_line(env.run(*read, as_=HR1), 1, "refused", "grant")

    listed = {r["id"]: r for r in map(json.loads, env.run(
        "access", "list", "--json", as_=DPO).stdout.splitlines())}
    assert listed[rid]["state"] == "expired" and listed[own]["state"] == "pending"
    assert listed[rid]["decided_by"] == "dpo1" and listed[rid]["case"] == "HR-7"
    # an investigator sees their own requests only
    mine = [json.loads(x)["id"] for x in env.run("access", "list", "--json",
                                                  as_=HR1).stdout.splitlines()]
    assert mine == [rid]
    table = env.run("access", "list", as_=DPO)
    assert table.exit_code == 0 and rid in table.stdout and "expired" in table.stdout

    rows = [(r["user"], r["command"], r["detail"].get("ground"), r["detail"].get("case"))
            for r in env.audit() if not r["command"].startswith("access list")]
    assert rows == [
        ("hr1", "quarantine show (refused)", "offensive-material", "HR-7"),
        ("hr1", "access request", "offensive-material", "HR-7"),
        ("hr1", "access approve (refused)", "offensive-material", "HR-7"),
        ("dana", "access request", "offensive-material", "HR-9"),
        ("dana", "access approve (refused)", "offensive-material", "HR-9"),
        ("hr1", "quarantine show (refused)", "offensive-material", "HR-7"),
        ("dpo1", "access approve", "offensive-material", "HR-7"),
        ("dpo1", "access approve", "offensive-material", "HR-7"),  # the second: already decided
        ("hr1", "quarantine show", "offensive-material", "HR-7"),
        ("hr2", "quarantine show (refused)", "offensive-material", "HR-7"),
        ("hr1", "quarantine show (refused)", "offensive-material", "HR-8"),
        ("hr1", "quarantine show (refused)", "offensive-material", "HR-7"),
    ]
    shown = next(r for r in env.audit() if r["command"] == "quarantine show")
    assert shown["exceptional"] == 1 and shown["detail"]["grant"] == rid
    assert "second person" in next(r for r in env.audit() if r["user"] == "dana"
                                   and "refused" in r["command"])["detail"]["refused"]
    verify = env.run("log", "verify")
    assert verify.exit_code == 0 and "audit chain intact" in verify.stdout, verify.output


def test_deny_and_an_address_grant_opens_personal_bodies_of_that_address(env: Env) -> None:
    personal = env.ids["personal"]
    read = ("quarantine", "show", personal, "--body", "--reason", "absent", "--ground",
            "absence", "--case", "ABS-1")
    denied = request(env, HR1, "--address", "friend@ext.test", ground="absence", case="ABS-1")
    assert env.run("access", "deny", denied, as_=DPO).exit_code == 0
    one_line(env.run(*read, as_=HR1), 1, "refused")
    rid = request(env, HR1, "--address", "Friend@Ext.test", ground="absence", case="ABS-1")
    assert env.run("access", "approve", rid, as_=DPO).exit_code == 0
    res = env.run(*read, as_=HR1)
    assert res.exit_code == 0 and "very private words" in res.stdout, res.output
    states = {json.loads(x)["id"]: json.loads(x)["state"]
              for x in env.run("access", "list", "--json", as_=HR1).stdout.splitlines()}
    assert states == {denied: "denied", rid: "approved"}
    # usage: exactly one scope; an unknown item
    one_line(env.run("access", "request", "--ground", "absence", "--case", "1", "--reason",
                     "x", as_=HR1), 2, "--item", "--address")
    one_line(env.run("access", "request", "--item", "20260101-AAAAAAAAAAAA", "--ground",
                     "absence", "--case", "1", "--reason", "x", as_=HR1), 1, "no quarantine item")


def test_subject_access_with_personal_bodies_needs_a_grant(env: Env) -> None:
    args = ("subject-access", "friend@ext.test", "--include-bodies", "--exceptional",
            "--reason", "DSAR 4", "--ground", "subject-access", "--case", "DSAR-4")
    one_line(env.run(*args, as_=DPO), 1, "refused", "personal mail of friend@ext.test")
    one_line(env.run("subject-access", "friend@ext.test", as_=DPO), 2, "--ground")
    rid = request(env, DPO, "--address", "friend@ext.test", ground="subject-access",
                  case="DSAR-4")
    assert env.run("access", "approve", rid, as_=DANA).exit_code == 0  # another dpo
    res = env.run(*args, as_=DPO)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    bodies = {i["id"]: i.get("message", "") for i in doc["quarantine_items"]}
    assert "very private words" in bodies[env.ids["personal"]]
    row = next(r for r in env.audit() if r["command"] == "subject-access")
    assert row["detail"]["grant"] == rid and row["detail"]["case"] == "DSAR-4"


def test_direct_mode_keeps_the_exceptional_flag_and_records_ground_and_case(env: Env) -> None:
    personal = env.ids["personal"]
    one_line(env.run("quarantine", "show", personal, "--body", "--reason", "x"), 2,
             "--exceptional")
    res = env.run("quarantine", "show", personal, "--body", "--reason", "x", "--exceptional",
                  "--ground", "legal-duty", "--case", "court order 5")
    assert res.exit_code == 0 and "very private words" in res.stdout
    row = env.audit()[-1]
    assert row["detail"]["ground"] == "legal-duty" and row["detail"]["case"] == "court order 5"
    assert row["exceptional"] == 1


def test_unknown_ground_is_a_usage_error_naming_the_allowed_ones(env: Env) -> None:
    for args in (("quarantine", "show", env.ids["plain"], "--body", "--reason", "x"),
                 ("log", "export"), ("erase", "a@example.com", "--reason", "x"),
                 ("access", "request", "--address", "a@example.com", "--case", "1",
                  "--reason", "x")):
        err = one_line(env.run(*args, "--ground", "curiosity"), 2, "unknown ground 'curiosity'")
        assert "allowed: " + ", ".join(GROUNDS) in err
    proc = env.proc("log", "reidentify", "E20260101-0000000000", "pn-00", "--ground", "nosy")
    assert proc.returncode == 2 and b"unknown ground 'nosy'" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_reviewer_deletes_only_items_not_marked_personal(env: Env) -> None:
    plain, personal = env.ids["plain"], env.ids["personal"]
    args = ("--reason", "cleanup", "--ground", "false-positive", "--case", "IT-1")
    one_line(env.run("quarantine", "delete", personal, *args, as_=IT), 1, "personal", "dpo")
    one_line(env.run("quarantine", "delete", plain, "--reason", "x", as_=IT), 2, "--ground")
    assert env.run("quarantine", "delete", plain, *args, as_=IT).exit_code == 0
    assert env.run("quarantine", "delete", personal, *args, as_=DPO).exit_code == 0
    cmds = [(r["user"], r["command"]) for r in env.audit()]
    assert cmds == [("it1", "quarantine delete (refused)"), ("it1", "quarantine delete"),
                    ("dpo1", "quarantine delete")]


# ------------------------------------------------------------ pseudonyms


def export(env: Env, *args: str, as_: Caller | None = None) -> tuple[bytes, str]:
    """A real process (direct mode) or, with ``as_``, in-process."""
    if as_ is None:
        proc = env.proc("log", "export", *args)
        assert proc.returncode == 0, proc.stderr
        out, err = proc.stdout, proc.stderr.decode()
    else:
        res = env.run("log", "export", *args, as_=as_)
        assert res.exit_code == 0, res.output
        out, err = res.stdout_bytes, res.stderr
    m = re.search(r"^export (E\d{8}-[0-9A-F]{10}) \((\w+)\)$", err, re.M)
    assert m, err
    return out, m.group(1)


def test_pseudonymised_export_has_no_real_address(env: Env) -> None:
    addresses = env.addresses()
    assert addresses == {"alice@example.com", "bob@ext.test", "carol@example.com",
                         "dee@example.com"}
    data, eid = export(env, "--format", "jsonl")
    text = data.decode().lower()
    # without the pseudonyms and the export id (hex: "dee" could occur in them)
    words = re.sub(r"\b(pn|mid)-[0-9a-f]{20}\b|\be\d{8}-[0-9a-f]{10}\b", "", text)
    for a in addresses:  # no address, no local part of one, in any case
        assert a not in text and a.split("@")[0] not in words, a
    for name in ("smith", "jones", "carol c", "dee"):  # display names are dropped
        assert name not in words
    objs = [json.loads(line) for line in data.decode().splitlines()]
    assert {o["export_id"] for o in objs} == {eid}
    assert all("hash" not in o and "address_digest" not in o for o in objs)
    alice = objs[0]["mail_from"]
    bob = objs[0]["rcpt_tos"][0]
    assert re.fullmatch(r"pn-[0-9a-f]{20}", alice) and alice != bob
    # one person, one pseudonym within the export: envelope, headers, subject, reply
    assert objs[0]["from"] == alice and objs[0]["to"] == bob
    assert objs[0]["subject"] == f"lunch with {bob}"
    assert objs[1]["mail_from"] == bob and objs[1]["rcpt_tos"] == [alice]
    carol = objs[2]["mail_from"]
    assert objs[1]["subject"] == f"Re: question from {carol}"
    dee = objs[2]["rcpt_tos"][1]
    assert objs[2]["to"] == f"{alice}, {dee}" and dee in objs[2]["reply"]
    assert objs[0]["message_id"].startswith("mid-")
    assert objs[2]["personal"] is True and objs[2]["subject"] == "[personal] party"

    # csv: the same rules; another export, other pseudonyms
    data2, eid2 = export(env)
    assert eid2 != eid
    text2 = data2.decode().lower()
    assert not any(a in text2 for a in addresses)
    rows = list(csv.DictReader(io.StringIO(data2.decode(), newline="")))
    assert {r["export_id"] for r in rows} == {eid2} and {r["hash"] for r in rows} == {""}
    alice2 = rows[0]["mail_from"]
    assert alice2.startswith("pn-") and alice2 != alice and rows[1]["rcpt_tos"] == alice2
    assert alice not in data2.decode() and bob not in data2.decode()

    # identified (direct mode, no [access]): real addresses, the chain hash, recorded
    data3, eid3 = export(env, "--format", "jsonl", "--identified")
    assert b"alice@example.com" in data3 and b'"hash":' in data3
    exports = [r for r in env.audit() if r["command"] == "log export"]
    assert [(r["detail"]["export_id"], r["detail"]["identified"]) for r in exports] == [
        (eid, False), (eid2, False), (eid3, True)]


def test_reidentify_needs_a_grant(env: Env) -> None:
    data, eid = export(env, "--format", "jsonl", as_=AUDITOR)
    objs = [json.loads(line) for line in data.decode().splitlines()]
    alice, carol = objs[0]["mail_from"], objs[2]["mail_from"]
    args = ("log", "reidentify", eid, alice, "--ground", "excessive-personal", "--case", "HR-3")

    one_line(env.run(*args, as_=AUDITOR), 1, "refused", "grant")
    one_line(env.run("log", "reidentify", eid, alice, as_=HR1), 2, "--ground")
    rid = request(env, HR1, "--address", "alice@example.com", ground="excessive-personal",
                  case="HR-3")
    one_line(env.run(*args, as_=HR1), 1, "refused")  # pending is not approved
    assert env.run("access", "approve", rid, as_=DPO).exit_code == 0
    res = env.run(*args, as_=HR1)
    assert res.exit_code == 0, res.output
    assert res.stdout == "alice@example.com\n"
    # the grant covers alice, not carol (this export is not filtered to alice)
    one_line(env.run("log", "reidentify", eid, carol, *args[4:], as_=HR1), 1, "refused")
    # an unknown pseudonym or export: exit 1, audited
    one_line(env.run("log", "reidentify", eid, "pn-" + "0" * 20, *args[4:], as_=HR1), 1,
             "stands for no address")
    one_line(env.run("log", "reidentify", "E20200101-0000000000", alice, *args[4:], as_=HR1),
             1, "no export")
    # the pseudonyms of another export are not this export's
    _, other = export(env, "--format", "jsonl", as_=AUDITOR)
    one_line(env.run("log", "reidentify", other, alice, *args[4:], as_=HR1), 1,
             "stands for no address")

    rows = [(r["user"], r["command"], r["detail"].get("result")) for r in env.audit()
            if r["command"].startswith("log reidentify")]
    assert rows == [("aud1", "log reidentify (refused)", None),
                    ("hr1", "log reidentify (refused)", None),
                    ("hr1", "log reidentify", "found"),
                    ("hr1", "log reidentify (refused)", None),
                    ("hr1", "log reidentify", "not found"),
                    ("hr1", "log reidentify", "no such export"),
                    ("hr1", "log reidentify", "not found")]
    found = next(r for r in env.audit() if r["detail"].get("result") == "found")
    assert found["targets"] == [eid, alice, "alice@example.com"]
    assert found["detail"]["grant"] == rid and found["detail"]["case"] == "HR-3"

    # direct mode (no [access]): the owner re-identifies without a grant, audited
    proc = env.proc("log", "reidentify", eid, carol)
    assert proc.returncode == 0 and proc.stdout == b"carol@example.com\n", proc.stderr


def test_identified_export_needs_a_grant_for_its_address(env: Env) -> None:
    base = ("--identified", "--format", "jsonl", "--ground", "legal-duty", "--case", "L-1")
    one_line(env.run("log", "export", *base, as_=AUDITOR), 2, "--address")
    one_line(env.run("log", "export", "--identified", "--address", "alice@example.com",
                     as_=AUDITOR), 2, "--ground")
    one_line(env.run("log", "export", *base, "--address", "alice@example.com", as_=AUDITOR), 1,
             "refused", "identified export of alice@example.com")
    rid = request(env, AUDITOR, "--address", "alice@example.com", ground="legal-duty",
                  case="L-1")
    assert env.run("access", "approve", rid, as_=DPO).exit_code == 0
    data, eid = export(env, *base, "--address", "Alice@Example.com", as_=AUDITOR)
    objs = [json.loads(line) for line in data.decode().splitlines()]
    assert len(objs) == 3 and objs[0]["mail_from"] == "Alice@Example.com"
    assert {o["export_id"] for o in objs} == {eid}
    one_line(env.run("log", "export", *base, "--address", "bob@ext.test", as_=AUDITOR), 1,
             "refused")
    started = [r for r in env.audit() if r["command"] == "log export"]
    assert started[-1]["detail"]["grant"] == rid and started[-1]["detail"]["identified"] is True
    refused = [r for r in env.audit() if r["command"] == "log export (refused)"]
    assert len(refused) == 2


# ----------------------------------------------------------------- holds


def test_holds_name_a_case_and_expire_at_purge(env: Env) -> None:
    plain, personal = env.ids["plain"], env.ids["personal"]
    one_line(env.run("quarantine", "hold", plain, "--reason", "x", as_=DPO), 2, "--case")
    one_line(env.run("quarantine", "hold", plain, "--case", "C-1", "--until", "2026-01-01",
                     "--reason", "x"), 2, "not in the future")
    res = env.run("quarantine", "hold", plain, "--case", "INV-12", "--until", "2027-03-31",
                  "--reason", "investigation 12", as_=DPO)
    assert res.exit_code == 0, res.output
    assert "for case INV-12 until 2027-03-31T23:59:59.999999Z" in res.stdout
    assert env.run("quarantine", "hold", personal, "--case", "INV-13", "--reason",
                   "open-ended").exit_code == 0

    items = {i["id"]: i for i in map(json.loads, env.run(
        "quarantine", "list", "--json").stdout.splitlines())}
    assert (items[plain]["hold"], items[plain]["hold_case"], items[plain]["hold_until"]) == (
        True, "INV-12", "2027-03-31T23:59:59.999999Z")
    assert (items[personal]["hold_case"], items[personal]["hold_until"]) == ("INV-13", None)
    table = env.run("quarantine", "list")
    assert "HOLD INV-12 (to 2027-03-31)" in table.stdout and "HOLD INV-13" in table.stdout

    # 120 days on (past the 90 days of retention) but before the hold's end: both kept
    env.clock.now = datetime(2027, 3, 2, 12, 0, tzinfo=UTC)
    res = env.run("purge", "--json")
    summary = json.loads(res.stdout)
    assert summary["holds_released"] == [] and summary["kept_under_hold"] == 2

    # past the end: the hold is released and normal retention applies at once
    env.clock.now = datetime(2027, 4, 1, 0, 0, 1, tzinfo=UTC)
    dry = json.loads(env.run("purge", "--dry-run", "--json").stdout)
    assert [h["id"] for h in dry["holds_released"]] == [plain]
    res = env.run("purge")
    assert res.exit_code == 0, res.output
    assert f"hold expired, released: {plain} (case INV-12, until 2027-03-31" in res.stdout
    assert "quarantine items removed: 1 (1 files); kept under legal hold: 1" in res.stdout
    left = [json.loads(x)["id"] for x in env.run("quarantine", "list", "--json", "--state",
                                                  "all").stdout.splitlines()]
    assert left == [personal]
    expired = [r for r in env.audit() if r["command"] == "quarantine hold expired"]
    assert len(expired) == 1 and expired[0]["targets"] == [plain]
    assert expired[0]["detail"]["holds"][0]["case"] == "INV-12"
    purge_row = [r for r in env.audit() if r["command"] == "purge"][-1]
    assert purge_row["detail"]["holds_released"][0]["id"] == plain

    # unhold clears the case
    assert env.run("quarantine", "unhold", personal, "--reason", "closed").exit_code == 0
    item = json.loads(env.run("quarantine", "list", "--json").stdout)
    assert (item["hold"], item["hold_case"]) == (False, None)


def faketime(offset: str) -> dict[str, str]:
    """The environment that runs a process ``offset`` later (libfaketime
    preloaded, without the ``faketime`` wrapper's named semaphore)."""
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not libs:
        pytest.fail("libfaketime.so.1 not found (Debian package faketime)", pytrace=False)
    return {"LD_PRELOAD": str(libs[0]), "FAKETIME": offset}


def test_a_real_purge_under_a_shifted_clock_releases_an_expired_hold(env: Env) -> None:
    """The same, with real processes on the real clock (the items were received
    on the fixture's clock, in November 2026)."""
    plain, personal = env.ids["plain"], env.ids["personal"]
    until = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%d")
    proc = env.proc("quarantine", "hold", plain, "--case", "INV-1", "--until", until,
                    "--reason", "r")
    assert proc.returncode == 0, proc.stderr
    assert env.proc("quarantine", "hold", personal, "--case", "INV-2", "--reason",
                    "r").returncode == 0
    base = {k: v for k, v in os.environ.items() if k != "MAILWARDEN_CONFIG"}
    later = subprocess.run([*CLI, "purge", "--config", str(env.config)], capture_output=True,
                           timeout=60, env={**base, **faketime("+200d")}, cwd=REPO, text=True)
    assert later.returncode == 0, later.stderr
    assert f"hold expired, released: {plain} (case INV-1, until {until}T23:59:59" in later.stdout
    assert "quarantine items removed: 1 (1 files); kept under legal hold: 1" in later.stdout
    left = [json.loads(x)["id"] for x in env.proc("quarantine", "list", "--json", "--state",
                                                   "all").stdout.splitlines()]
    assert left == [personal]
