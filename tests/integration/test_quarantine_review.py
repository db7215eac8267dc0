"""IT review, audit trail, retention, subject access and erasure through the real CLI.

The store is filled by the running gateway (real clamd for the virus, libmagic
for the executable, the personal filter, the header-only log); every command
then runs as a real ``mailwarden`` process against that live store (a few
variations go through click's runner in-process, which is faster).

Proves: ``quarantine list`` (newest first, --reason/--address/--state/paging,
JSON lines, a table); ``show`` prints headers and attachments but the body only
with a reason, and a personal body only with --exceptional, audited as
exceptional; ``release`` delivers to the real next hop with the original
envelope (or a subset of the original recipients, nobody else) and
``X-Mailwarden-Released: <user> <time>`` on top of the unchanged message, marks
released only once the next hop accepted (a 451 keeps it held), and asks for
--force for a virus; ``delete`` overwrites and removes the file and refuses an
item under legal hold; every access is in ``audit list`` with the OS user and
the reason; ``purge`` under a shifted clock (Debian faketime) removes expired
items, log records and files while a held item stays and both chains still
verify; ``subject-access`` writes one 0600 JSON document; ``erase`` removes
what concerns an address except held items and ``log verify`` still passes;
refusals are one line with exit 2 (usage) or 1 (failure), never a traceback,
including a store the user cannot read.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quarantine.store import DB_NAME
from tests.support.clamd import Clamd
from tests.support.eicar import EICAR_NAME, eicar
from tests.support.harness import Gateway, NextHop, make_message
from tests.support.otheruser import PortableInstall
from tests.support.process import REPO, write_config

#: The real CLI, as a process.
CLI = [sys.executable, "-m", "cli"]
CHAIN = ["clamav", "attachment_types", "personal", "header_log"]
EXE = b"MZ\x90\x00\x03" + b"\x00" * 300
USER = pwd.getpwuid(os.getuid()).pw_name


def mw(config: Path, *args: str, prefix: tuple[str, ...] = (),
       cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MAILWARDEN_CONFIG"}
    return subprocess.run(
        [*prefix, *CLI, *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env, cwd=cwd,
    )


def mw_inproc(config: Path, *args: str) -> Any:
    from click.testing import CliRunner

    from cli import main

    return CliRunner().invoke(main, [*args, "--config", str(config)])


def one_line_refusal(proc: Any, code: int, *needles: str) -> None:
    err = proc.stderr
    status = proc.exit_code if hasattr(proc, "exit_code") else proc.returncode
    assert status == code, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("mailwarden: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Setup:
    """A gateway with the review chain, the next hop, and a config file for the CLI."""

    def __init__(self, gw: Gateway, nh: NextHop, config: Path) -> None:
        self.gw, self.nh, self.config = gw, nh, config
        self.ids: dict[str, str] = {}

    def hold(self, name: str, raw: bytes, mail_from: str = "a@ext.test",
             rcpt_tos: tuple[str, ...] = ("b@example.com",)) -> str:
        code, text = self.gw.send(raw, mail_from=mail_from, rcpt_tos=rcpt_tos)
        assert code == 250 and "held for review" in text, text
        self.ids[name] = text.rsplit("(", 1)[1].rstrip(")")
        return self.ids[name]

    def row(self, qid: str) -> dict[str, Any]:
        with sqlite3.connect(self.gw.store_path / DB_NAME) as db:
            db.row_factory = sqlite3.Row
            r = db.execute("SELECT * FROM quarantine WHERE id = ?", (qid,)).fetchone()
        assert r is not None
        return dict(r)

    def audit(self) -> list[dict[str, Any]]:
        res = mw_inproc(self.config, "audit", "list", "--json")
        assert res.exit_code == 0, res.output
        return jsonl(res.stdout)


@pytest.fixture
def setup(tmp_path: Path, clamd: Clamd, make_gateway: Any, next_hop: NextHop) -> Iterator[Setup]:
    filters = {"clamav": {"address": clamd.socket}}
    gw = make_gateway(chain=CHAIN, filters=filters)
    config, _ = write_config(tmp_path / "config.toml", store=gw.store_path,
                             next_hop=next_hop.address, chain=CHAIN, filters=filters)
    s = Setup(gw, next_hop, config)
    s.hold("exe", make_message(subject="invoice", body="please pay",
                               attachments=[("invoice.exe", "application/octet-stream", EXE)]),
           rcpt_tos=("b@example.com", "c@example.com"))
    s.hold("personal", make_message(subject="[personal] my holiday", body="very private words",
                                    from_="Dee <d@example.com>", to="friend@ext.test",
                                    attachments=[("game.exe", "application/octet-stream", EXE)]),
           mail_from="d@example.com", rcpt_tos=("friend@ext.test",))
    s.hold("virus", make_message(subject="parcel",
                                 attachments=[("label.com", "application/octet-stream",
                                               eicar())]))
    code, _ = gw.send(make_message(subject="just text"))
    assert code == 250
    gw.flush_log()
    yield s


# ---------------------------------------------------------------- list, show


def test_list_filters_pages_and_formats(setup: Setup) -> None:
    proc = mw(setup.config, "quarantine", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    items = jsonl(proc.stdout)
    assert [i["id"] for i in items] == [setup.ids[k] for k in ("virus", "personal", "exe")]
    exe = items[2]
    assert exe["sender"] == "a@ext.test" and exe["recipients"] == ["b@example.com", "c@example.com"]
    assert exe["subject"] == "invoice" and exe["reason"].startswith("attachment_types")
    assert "invoice.exe" in exe["detail"] and exe["personal"] is False and exe["hold"] is False
    assert items[1]["personal"] is True
    assert "clamav" in items[0]["reason"].split(",") and EICAR_NAME in items[0]["detail"]

    table = mw(setup.config, "quarantine", "list")
    assert table.returncode == 0 and all(i in table.stdout for i in setup.ids.values())
    assert "invoice" in table.stdout and "yes" in table.stdout  # personal flag column

    def ids(*args: str) -> list[str]:
        res = mw_inproc(setup.config, "quarantine", "list", "--json", *args)
        assert res.exit_code == 0, res.output
        return [i["id"] for i in jsonl(res.stdout)]

    assert ids("--reason", "clamav") == [setup.ids["virus"]]
    assert ids("--address", "C@Example.com") == [setup.ids["exe"]]
    assert ids("--limit", "1", "--page", "2") == [setup.ids["personal"]]
    assert ids("--since", "2000-01-01", "--until", "2000-12-31") == []
    res = mw_inproc(setup.config, "quarantine", "list", "--limit", "2")
    assert "more with --page 2" in res.stderr


def test_show_headers_attachments_and_the_personal_body_rule(setup: Setup) -> None:
    exe, personal = setup.ids["exe"], setup.ids["personal"]
    proc = mw(setup.config, "quarantine", "show", exe)
    assert proc.returncode == 0, proc.stderr
    assert "Subject: invoice" in proc.stdout and "invoice.exe" in proc.stdout
    assert "please pay" not in proc.stdout  # headers only by default

    one_line_refusal(mw_inproc(setup.config, "quarantine", "show", exe, "--body"), 2,
                     "--reason")
    proc = mw(setup.config, "quarantine", "show", exe, "--body", "--reason", "ticket 42")
    assert proc.returncode == 0 and "please pay" in proc.stdout

    one_line_refusal(mw(setup.config, "quarantine", "show", personal, "--body",
                        "--reason", "curious"), 2, "personal", "--exceptional")
    proc = mw(setup.config, "quarantine", "show", personal, "--body", "--reason",
              "HR investigation 7", "--exceptional")
    assert proc.returncode == 0 and "very private words" in proc.stdout

    rows = [r for r in setup.audit() if r["command"] == "quarantine show"]
    assert [(r["targets"], r["reason"], r["exceptional"], r["user"], r["uid"]) for r in rows] == [
        ([exe], "", False, USER, os.getuid()),
        ([exe], "ticket 42", False, USER, os.getuid()),
        ([personal], "HR investigation 7", True, USER, os.getuid()),
    ]  # the refused attempts showed nothing and wrote nothing


# ------------------------------------------------------------------ release


def test_release_with_the_original_envelope(setup: Setup) -> None:
    qid = setup.ids["exe"]
    stored = (setup.gw.store_path / setup.row(qid)["path"]).read_bytes()
    one_line_refusal(mw_inproc(setup.config, "quarantine", "release", qid, "--reason", "ok",
                               "--to", "mallory@evil.test"), 2, "not an original recipient")
    assert setup.nh.messages == [setup.nh.messages[0]]  # only the relayed text mail

    proc = mw(setup.config, "quarantine", "release", qid, "--reason", "expected invoice",
              "--to", "C@example.com")
    assert proc.returncode == 0, proc.stderr
    got = setup.nh.messages[-1]
    assert got.mail_from == "a@ext.test" and got.rcpt_tos == ["c@example.com"]
    first, rest = got.data.split(b"\r\n", 1)
    assert first.startswith(f"X-Mailwarden-Released: {USER} ".encode())
    assert first.endswith(b"Z") and rest == stored  # the message itself is unchanged
    assert setup.row(qid)["state"] == "released"

    # all original recipients by default; a released item needs --force to go again
    one_line_refusal(mw_inproc(setup.config, "quarantine", "release", qid, "--reason", "x"), 1,
                     "already released")
    res = mw_inproc(setup.config, "quarantine", "release", qid, "--reason", "again", "--force")
    assert res.exit_code == 0, res.output
    assert setup.nh.messages[-1].rcpt_tos == ["b@example.com", "c@example.com"]

    rows = [r for r in setup.audit() if r["command"].startswith("quarantine release")]
    assert rows[0]["reason"] == "expected invoice" and rows[0]["detail"]["recipients"] == [
        "c@example.com"]
    assert rows[1]["command"] == "quarantine release (result)" and rows[1]["detail"]["accepted"]


def test_release_of_a_virus_needs_force_and_a_refusal_keeps_it_held(setup: Setup) -> None:
    virus = setup.ids["virus"]
    stored = (setup.gw.store_path / setup.row(virus)["path"]).read_bytes()
    one_line_refusal(mw_inproc(setup.config, "quarantine", "release", virus, "--reason", "x"), 2,
                     "clamav", "--force")
    setup.nh.data_reply = "451 4.3.0 try later"
    proc = mw(setup.config, "quarantine", "release", virus, "--reason", "false positive",
              "--force")
    one_line_refusal(proc, 1, "stays held", "451")
    assert setup.row(virus)["state"] == "held"
    setup.nh.data_reply = None
    res = mw_inproc(setup.config, "quarantine", "release", virus, "--reason", "fp", "--force")
    assert res.exit_code == 0, res.output
    assert setup.nh.messages[-1].data.split(b"\r\n", 1)[1] == stored
    assert setup.row(virus)["state"] == "released"
    results = [r["detail"]["accepted"] for r in setup.audit()
               if r["command"] == "quarantine release (result)"]
    assert results == [False, True]


# ------------------------------------------------------- delete, hold, audit


def test_delete_hold_and_the_audit_trail(setup: Setup) -> None:
    qid = setup.ids["exe"]
    path = setup.gw.store_path / setup.row(qid)["path"]
    res = mw_inproc(setup.config, "quarantine", "hold", qid, "--reason", "case 2026-11")
    assert res.exit_code == 0, res.output
    one_line_refusal(mw(setup.config, "quarantine", "delete", qid, "--reason", "cleanup"), 1,
                     "legal hold")
    assert path.exists()
    one_line_refusal(mw_inproc(setup.config, "quarantine", "delete", qid), 2, "--reason")
    assert mw_inproc(setup.config, "quarantine", "unhold", qid, "--reason", "closed").exit_code == 0
    proc = mw(setup.config, "quarantine", "delete", qid, "--reason", "not needed")
    assert proc.returncode == 0, proc.stderr
    assert not path.exists()
    row = setup.row(qid)
    assert row["state"] == "deleted" and row["subject"] is None and row["mail_from"] == ""
    res = mw_inproc(setup.config, "quarantine", "list", "--json", "--state", "deleted")
    assert [i["id"] for i in jsonl(res.stdout)] == [qid]

    rows = setup.audit()
    changes = [(r["command"], r["reason"]) for r in rows
               if r["targets"] == [qid] and r["command"] != "quarantine list"]
    assert changes == [("quarantine hold", "case 2026-11"), ("quarantine unhold", "closed"),
                       ("quarantine delete", "not needed")]
    assert {r["user"] for r in rows} == {USER}
    assert rows[-1]["command"] == "audit list"  # reading the trail is itself recorded
    assert all(len(r["hash"]) == 64 for r in rows)
    table = mw(setup.config, "audit", "list", "--since", "2000-01-01")
    assert table.returncode == 0 and "quarantine delete" in table.stdout
    verify = mw_inproc(setup.config, "log", "verify")
    assert verify.exit_code == 0 and "audit chain intact" in verify.stdout, verify.output


# ---------------------------------------------------------------- retention


def shifted(offset: str) -> tuple[str, ...]:
    """A command prefix running the command with libfaketime preloaded and
    ``FAKETIME=offset`` -- what ``faketime -f OFFSET`` does, without the
    wrapper's named semaphore (``sem_open: File exists`` when a stale one
    from an earlier process with the same pid is left in /dev/shm)."""
    if shutil.which("faketime") is None:
        pytest.fail("faketime is not installed: apt-get install -y faketime", pytrace=False)
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not libs:
        pytest.fail("libfaketime.so.1 not found (Debian package faketime)", pytrace=False)
    return ("env", f"LD_PRELOAD={libs[0]}", f"FAKETIME={offset}")


def test_purge_under_a_shifted_clock(setup: Setup) -> None:
    held, exe = setup.ids["personal"], setup.ids["exe"]
    held_path = setup.gw.store_path / setup.row(held)["path"]
    exe_path = setup.gw.store_path / setup.row(exe)["path"]
    assert mw_inproc(setup.config, "quarantine", "hold", held, "--reason", "case 9").exit_code == 0
    later = shifted("+100d")

    dry = mw(setup.config, "purge", "--dry-run", "--json", prefix=later)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert (plan["quarantine_items"], plan["kept_under_hold"], plan["log_records"]) == (2, 1, 4)
    assert exe_path.exists()

    now = mw_inproc(setup.config, "purge", "--json")  # the real clock: nothing is old yet
    assert json.loads(now.stdout)["quarantine_items"] == 0 and exe_path.exists()

    proc = mw(setup.config, "purge", prefix=later)
    assert proc.returncode == 0, proc.stderr
    assert "quarantine items removed: 2 (2 files); kept under legal hold: 1" in proc.stdout
    assert "log records removed: 4" in proc.stdout
    assert not exe_path.exists() and held_path.exists()
    listed = jsonl(mw_inproc(setup.config, "quarantine", "list", "--json", "--state", "all").stdout)
    assert [i["id"] for i in listed] == [held]
    with sqlite3.connect(setup.gw.store_path / DB_NAME) as db:
        assert db.execute("SELECT count(*) FROM log").fetchone()[0] == 0
    purges = [r for r in setup.audit() if r["command"].startswith("purge")]
    assert [r["detail"]["dry_run"] for r in purges] == [True, False, False]
    assert purges[-1]["time"] > purges[1]["time"]  # written at the shifted time

    # new mail chains on from the anchor the purge left; both chains verify
    setup.gw.send(make_message(subject="after the purge"))
    setup.gw.flush_log()
    verify = mw(setup.config, "log", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_serve_purges_on_its_own_schedule(setup: Setup, tmp_path: Path) -> None:
    """`mailwarden serve` (a second instance on the same store, 100 days later)
    applies retention every store.purge_interval seconds."""
    held, exe = setup.ids["personal"], setup.ids["exe"]
    assert mw_inproc(setup.config, "quarantine", "hold", held, "--reason", "case 5").exit_code == 0
    exe_path = setup.gw.store_path / setup.row(exe)["path"]
    config, _ = write_config(tmp_path / "serve.toml", store=setup.gw.store_path,
                             next_hop=setup.nh.address, store_extra={"purge_interval": 0.2})
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    # A session of its own lets the whole group be stopped below.
    proc = subprocess.Popen([*shifted("+100d"), *CLI, "--config", str(config), "serve"],
                            stdout=log, stderr=log, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while exe_path.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()
    assert not exe_path.exists(), (tmp_path / "serve.log").read_text()
    with sqlite3.connect(setup.gw.store_path / DB_NAME) as db:
        assert [r[0] for r in db.execute("SELECT id FROM quarantine")] == [held]
        commands = [r[0] for r in db.execute("SELECT command FROM audit")]
    assert "purge (scheduled)" in commands


# --------------------------------------------------- subject access, erase


def test_subject_access_and_erase(setup: Setup, tmp_path: Path) -> None:
    exe, personal = setup.ids["exe"], setup.ids["personal"]
    assert mw_inproc(setup.config, "quarantine", "hold", exe, "--reason", "case 3").exit_code == 0
    out = tmp_path / "sar" / "a.json"
    out.parent.mkdir()
    one_line_refusal(mw_inproc(setup.config, "subject-access", "a@ext.test",
                               "--include-bodies"), 2, "--reason")
    proc = mw(setup.config, "subject-access", "A@ext.test", "--output", str(out),
              "--include-bodies", "--reason", "DSAR 12")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert list(out.parent.iterdir()) == [out]  # no temp file left
    doc = json.loads(out.read_text())
    assert doc["address"] == "a@ext.test" and doc["generated_by"] == USER
    assert {r["record"]["subject"] for r in doc["log_records"]} == {
        "invoice", "parcel", "just text"}
    items = {i["id"]: i for i in doc["quarantine_items"]}
    assert set(items) == {exe, setup.ids["virus"]}
    stored = (setup.gw.store_path / setup.row(exe)["path"]).read_bytes()
    assert items[exe]["message"].encode() == stored
    assert "subject-access" in [r["command"] for r in doc["audit_rows"]]
    assert "3 log records, 2 quarantine items (2 with content)" in proc.stderr

    # the personal item's body stays out of an export unless exceptional
    res = mw_inproc(setup.config, "subject-access", "friend@ext.test", "--include-bodies",
                    "--reason", "DSAR 13")
    doc = json.loads(res.stdout)
    assert doc["quarantine_items"][0]["id"] == personal
    assert "message" not in doc["quarantine_items"][0]
    assert "exceptional" in doc["quarantine_items"][0]["body_withheld"]

    one_line_refusal(mw_inproc(setup.config, "erase", "a@ext.test"), 2, "--reason")
    virus_path = setup.gw.store_path / setup.row(setup.ids["virus"])["path"]
    proc = mw(setup.config, "erase", "a@ext.test", "--reason", "erasure request 12")
    assert proc.returncode == 0, proc.stderr
    assert "3 log records, 1 quarantine items" in proc.stdout
    assert exe in proc.stderr and "legal hold" in proc.stderr
    assert not virus_path.exists()
    after = json.loads(mw_inproc(setup.config, "subject-access", "a@ext.test").stdout)
    assert after["log_records"] == [] and [i["id"] for i in after["quarantine_items"]] == [exe]
    assert "erase" in [r["command"] for r in after["audit_rows"]]  # audit rows are kept
    verify = mw(setup.config, "log", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "erased" in verify.stdout


# ----------------------------------------------------------------- refusals


def test_refusals_are_one_line(tmp_path: Path, next_hop: NextHop) -> None:
    config, _ = write_config(tmp_path / "config.toml", store=tmp_path / "absent",
                             next_hop=next_hop.address)
    one_line_refusal(mw(config, "quarantine", "list"), 1, "does not exist")
    assert not (tmp_path / "absent").exists()  # the review commands never create a store
    one_line_refusal(mw_inproc(config, "quarantine", "show", "../../etc/passwd"), 2,
                     "invalid quarantine id")
    one_line_refusal(mw_inproc(config, "quarantine", "release", "20260101-AAAA"), 2,
                     "needs --reason")
    one_line_refusal(mw_inproc(config, "quarantine", "list", "--since", "yesterday"), 2,
                     "invalid date")
    one_line_refusal(mw_inproc(config, "subject-access", "not an address"), 2, "invalid address")


def test_a_store_this_user_cannot_read(tmp_path: Path, make_gateway: Any,
                                       next_hop: NextHop,
                                       other_user_install: PortableInstall) -> None:
    # A world-traversable directory, so that only the store's own 0700 mode
    # stands in the way.
    base = Path(tempfile.mkdtemp(prefix="mw-perm-"))
    try:
        os.chmod(base, 0o755)
        gw = make_gateway(store={"path": str(base / "store")})
        config, _ = write_config(base / "config.toml", store=gw.store_path,
                                 next_hop=next_hop.address)
        os.chmod(config, 0o644)
        if os.geteuid() == 0:
            # Root reads everything: show the refusal to nobody, running a copy
            # of the CLI it can reach wherever this checkout lives (issue 19).
            why = other_user_install.probe("nobody")
            if why is not None:  # only where the base interpreter is out of its reach
                pytest.skip(f"user nobody cannot start {other_user_install.python}: {why}")
            proc = other_user_install.run_as("nobody", "cli", "quarantine", "list",
                                             "--config", str(config))
        else:
            os.chmod(gw.store_path, 0)
            try:
                proc = mw(config, "quarantine", "list")
            finally:
                os.chmod(gw.store_path, 0o700)
        one_line_refusal(proc, 1, "cannot read the store", "permission denied")
    finally:
        shutil.rmtree(base, ignore_errors=True)
