"""``mailwarden log export|verify|stats`` as real subprocesses against a live store.

A gateway (personal + header_log) writes records for mail sent over SMTP; older
records (January to March 2026) are added through the store's own chained
writer.  Proves: csv (header row) and jsonl parse with the standard readers;
``--since/--until/--address/--direction`` select the right records (a date
``--until`` includes that whole day); ``--output`` is written 0600 atomically
with a matching SHA-256 manifest line; every export and stats run is audited
(before and after); spreadsheet formulas are neutralised in csv; a progress
bar appears only on a terminal; ``log verify`` passes, then fails naming the
record after one stored value is edited with sqlite3; usage and config errors
exit 2, an absent store exits 1.  The exports here are ``--identified`` where
they compare real addresses (pseudonymised exports:
tests/integration/test_access_grants.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pty
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from filters.base import Verdict
from filters.header_log import HeaderLogFilter
from filters.header_log import Settings as LogSettings
from gateway.message import Direction, Mail
from gateway.pipeline import Result
from quarantine.log import CSV_COLUMNS
from quarantine.store import DB_NAME
from tests.support.harness import Gateway, NextHop, make_message

CLI = [sys.executable, "-c", "from cli import main; main()"]


def mw_inproc(config: Path, *args: str) -> Any:
    """The same command through click's runner, in-process (fast: for the
    many filter variations; the paths that matter run as real processes)."""
    from click.testing import CliRunner

    from cli import main

    return CliRunner().invoke(main, [*args, "--config", str(config)], catch_exceptions=False)


def mw(config: Path, *args: str, stderr_tty: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``mailwarden <args> --config <config>``."""
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("MAILWARDEN_CONFIG", None)
    cmd = [*CLI, *args, "--config", str(config)]
    if not stderr_tty:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=follower, timeout=60,
                              env={**env, "TERM": "xterm"})
    finally:
        os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return subprocess.CompletedProcess(cmd, proc.returncode, proc.stdout.decode(),
                                       b"".join(chunks).decode("utf-8", "replace"))


def historical(gw: Gateway, when: datetime, direction: Direction, mail_from: str,
               rcpt: str, subject: str, personal: bool = False) -> None:
    raw = make_message(subject=subject, from_=mail_from, to=rcpt)
    mail = Mail(queue_id=f"H{when:%m%d}", mail_from=mail_from, rcpt_tos=(rcpt,), raw=raw,
                client_addr="192.0.2.1", direction=direction, received=when)
    verdicts = [Verdict.relay("personal", personal=personal)]
    record = HeaderLogFilter(LogSettings(), None).build_record(  # type: ignore[arg-type]
        mail, Result("relayed", "250 2.0.0 Ok", verdicts))
    gw.call(gw.store.write_log_batch([record]))


@pytest.fixture
def populated(make_gateway: Callable[..., Gateway], next_hop: NextHop,
              tmp_path: Path) -> tuple[Gateway, Path]:
    gw = make_gateway(chain=["personal", "header_log"])
    historical(gw, datetime(2026, 1, 15, 23, 59, 59, tzinfo=UTC), Direction.INBOUND,
               "x@ext.test", "alice@example.com", "Private: January", personal=True)
    historical(gw, datetime(2026, 2, 10, 9, 0, tzinfo=UTC), Direction.OUTBOUND,
               "Alice@Example.com", "y@partner.test", "February report")
    historical(gw, datetime(2026, 3, 5, 12, 0, tzinfo=UTC), Direction.INTERNAL,
               "bob@example.com", "alice@example.com", "=HYPERLINK(\"http://evil\")")
    assert gw.send(make_message(subject="today", to="carol@example.com"),
                   mail_from="dave@example.com", rcpt_tos=("carol@example.com",))[0] == 250
    assert gw.send(make_message(subject="[personal] today", to="alice@example.com"),
                   mail_from="erin@ext.test", rcpt_tos=("alice@example.com",),
                   xforward={"ADDR": "203.0.113.5"})[0] == 250
    gw.flush_log()
    config = tmp_path / "config.toml"
    config.write_text(
        "[gateway]\ninternal_domains = [\"example.com\"]\n"
        f"[store]\npath = \"{gw.store_path}\"\n"
        "[filters]\nchain = [\"personal\", \"header_log\"]\n"
    )
    return gw, config


def audit_rows(gw: Gateway) -> list[dict[str, Any]]:
    db = sqlite3.connect(gw.store_path / DB_NAME)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        db.close()


def csv_records(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    return list(reader)


def test_export_formats_and_filters(populated: tuple[Gateway, Path], tmp_path: Path) -> None:
    gw, config = populated
    # everything, csv (the default), to stdout: no progress bar, no manifest;
    # the export id on stderr.  Identified (real addresses: the owner's direct
    # access, no [access]); pseudonymised exports: tests/integration/test_access_grants.py
    res = mw(config, "log", "export", "--identified")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"export E\d{8}-[0-9A-F]{10} \(identified\)\n", res.stderr), res.stderr
    rows = csv_records(res.stdout)
    assert len(rows) == 5
    assert [r["subject"] for r in rows[:2]] == ["Private: January", "February report"]
    assert rows[0]["personal"] == "true" and rows[1]["personal"] == "false"
    assert rows[2]["subject"] == "'=HYPERLINK(\"http://evil\")"  # CSV injection neutralised
    assert rows[4]["direction"] == "inbound" and rows[4]["client_addr"] == "203.0.113.5"
    assert "personal:relay" in rows[4]["verdicts"] and "personal=true" in rows[4]["verdicts"]

    # jsonl (and --json) parse with json, carry seq + hash and the same records
    res = mw(config, "log", "export", "--format", "jsonl", "--identified")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [str(o["seq"]) for o in lines] == [r["seq"] for r in rows]
    assert [o["hash"] for o in lines] == [r["hash"] for r in rows]
    assert lines[0]["rcpt_tos"] == ["alice@example.com"] and lines[0]["personal"] is True

    def without_export_id(text: str) -> list[dict[str, Any]]:
        objs = [json.loads(line) for line in text.splitlines()]
        assert len({o.pop("export_id") for o in objs}) == 1
        return objs

    assert without_export_id(mw_inproc(config, "log", "export", "--json", "--identified").stdout
                             ) == without_export_id(res.stdout)

    def subjects(*args: str) -> list[str]:
        r = mw_inproc(config, "log", "export", "--format", "jsonl", *args)
        assert r.exit_code == 0, r.output
        return [json.loads(line)["subject"] for line in r.stdout.splitlines()]

    assert subjects("--since", "2026-02-01", "--until", "2026-02-28") == ["February report"]
    # a date --until includes the whole day (the January record is at 23:59:59)
    assert subjects("--until", "2026-01-15") == ["Private: January"]
    # offsets are honoured: 00:00+01:00 is 23:00Z the day before
    assert subjects("--since", "2026-01-16T00:00:00+01:00", "--until", "2026-03-05T11:59Z") == [
        "Private: January", "February report"]
    assert subjects("--since", "2026-01-16T00:00:00Z", "--until", "2026-03-05T12:00Z") == [
        "February report", "=HYPERLINK(\"http://evil\")"]
    assert subjects("--address", "ALICE@example.com") == [
        "Private: January", "February report", "=HYPERLINK(\"http://evil\")", "[personal] today"]
    assert subjects("--direction", "internal", "--until", "2026-06-30") == [
        "=HYPERLINK(\"http://evil\")"]
    assert subjects("--address", "nobody@example.com") == []

    # --output: atomic, 0600, manifest line with the file's SHA-256
    out = tmp_path / "exports" / "log.csv"
    out.parent.mkdir()
    res = mw(config, "log", "export", "--address", "alice@example.com", "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    data = out.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    first, manifest = res.stderr.strip().splitlines()
    assert first.startswith("export E") and first.endswith("(pseudonymised)")
    assert manifest == f"sha256 {hashlib.sha256(data).hexdigest()}  {out}  4 records"
    assert len(csv_records(data.decode())) == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["log.csv"]

    # every export was audited: a row before (filters) and one after (rows, digest)
    audit = audit_rows(gw)
    exports = [a for a in audit if a["command"] == "log export"]
    done = [a for a in audit if a["command"] == "log export done"]
    assert len(exports) == len(done) == 11
    last_start, last_done = exports[-1], done[-1]
    assert last_start["seq"] < last_done["seq"]
    filters = json.loads(last_start["filters"])
    assert filters["address"] == "alice@example.com" and filters["output"] == str(out)
    assert json.loads(last_start["targets"]) == ["alice@example.com"]
    detail = json.loads(last_done["detail"])
    assert detail == {"status": "complete", "rows": 4, "sha256": hashlib.sha256(data).hexdigest()}
    assert last_start["user"] and last_start["uid"] == os.getuid()


def test_progress_bar_only_on_a_terminal(populated: tuple[Gateway, Path], tmp_path: Path) -> None:
    _, config = populated
    res = mw(config, "log", "export", "--output", str(tmp_path / "x.jsonl"), "--json",
             stderr_tty=True)
    assert res.returncode == 0, res.stderr
    assert "exporting" in res.stderr  # rich's bar (transient) was drawn on the tty
    assert "sha256 " in res.stderr


def test_verify_passes_then_names_the_edited_record(populated: tuple[Gateway, Path]) -> None:
    gw, config = populated
    res = mw(config, "log", "verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "log chain intact: 5 records" in res.stdout
    assert "audit chain intact" in res.stdout

    db = sqlite3.connect(gw.store_path / DB_NAME)
    try:
        seq, queue_id, when = db.execute(
            "SELECT seq, queue_id, time FROM log WHERE record LIKE '%February report%'"
        ).fetchone()
        with db:
            db.execute("UPDATE log SET record = replace(record, 'February report', "
                       "'February rep0rt') WHERE seq = ?", (seq,))
    finally:
        db.close()
    res = mw(config, "log", "verify")
    assert res.returncode == 1
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("FAIL"))
    assert f"seq {seq} " in line and queue_id in line and when in line
    assert "1 of 5 records fail" in line


def test_stats_counts_per_address_and_month(populated: tuple[Gateway, Path]) -> None:
    gw, config = populated
    expected: dict[str, list[int]] = {"2026-01": [1, 1], "2026-02": [1, 0], "2026-03": [1, 0]}
    today = expected.setdefault(datetime.now(UTC).strftime("%Y-%m"), [0, 0])
    today[0] += 1  # "[personal] today" to alice
    today[1] += 1
    res = mw(config, "log", "stats", "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert set(rows[0]) == {"month", "address", "messages", "personal"}
    alice = {r["month"]: [r["messages"], r["personal"]]
             for r in rows if r["address"] == "alice@example.com"}
    assert alice == expected
    carol = [r for r in rows if r["address"] == "carol@example.com"]
    assert [(r["messages"], r["personal"]) for r in carol] == [(1, 0)]

    r = mw_inproc(config, "log", "stats", "--address", "Alice@Example.com", "--until", "2026-02-28")
    assert r.exit_code == 0, r.output
    lines = [ln.split() for ln in r.stdout.splitlines()]
    assert lines == [["month", "address", "messages", "personal"],
                     ["2026-01", "alice@example.com", "1", "1"],
                     ["2026-02", "alice@example.com", "1", "0"]]
    assert [a["command"] for a in audit_rows(gw)].count("log stats") == 2


def test_usage_and_store_errors(populated: tuple[Gateway, Path], tmp_path: Path) -> None:
    _, config = populated
    res = mw_inproc(config, "log", "export", "--since", "yesterday")
    assert res.exit_code == 2 and "invalid date 'yesterday'" in res.output
    res = mw_inproc(config, "log", "export", "--json", "--format", "csv")
    assert res.exit_code == 2 and "contradict" in res.output
    res = mw_inproc(config, "log", "export", "--output", str(tmp_path / "missing" / "x.csv"))
    assert res.exit_code == 2 and "does not exist" in res.output
    res = mw(tmp_path / "nope.toml", "log", "verify")
    assert res.returncode == 2 and "nope.toml" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[gateway]\ninternal_domains = [\"example.com\"]\n"
                   f"[store]\npath = \"{tmp_path / 'no-store'}\"\n")
    res = mw(bad, "log", "export")
    assert res.returncode == 1 and "does not exist" in res.stderr
    for args in (("log", "verify"), ("log", "stats")):
        r = mw_inproc(bad, *args)
        assert r.exit_code == 1 and "does not exist" in r.output, args
    assert not (tmp_path / "no-store").exists()
