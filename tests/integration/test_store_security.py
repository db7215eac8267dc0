"""Security of what is kept (issue 9).

* Owner-only modes even under a permissive umask: the store, every directory
  0700, every file (database, WAL, shared memory, message files) 0600.
* No path is built from message data: hostile ids are refused by
  ``quarantine.files.check_id`` and every path resolves inside ``store.path``
  (``..``, absolute paths, a symlink out of the store); a held message with a
  ``../`` filename, Message-ID, subject and sender lands at
  ``messages/YYYY/MM/DD/<id>.eml`` and nowhere else.
* The CLI validates ids (exit 2, one line, no traceback) before touching
  anything, and SQL is parameterised: statically (every dynamic SQL fragment
  in ``quarantine/`` and ``gateway/`` is a reviewed structural one; clause
  lists joined into SQL hold only literals) and behaviourally (injection
  payloads in headers, addresses and reasons are stored and matched as data).
* The CLI run as a user who cannot read the store says so in one line
  (exit 1), never a traceback (needs root to switch to ``nobody``).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from quarantine import files
from quarantine.store import Store
from tests.support.eicar import eicar
from tests.support.harness import NextHop, make_message
from tests.support.otheruser import PortableInstall, as_user
from tests.support.process import REPO, cli, write_config
from tests.support.served import quarantine_row, quarantine_rows, send_exact

HOSTILE_IDS = [
    "../../etc/passwd", "..", ".", "../20261123-ABC", "20261123-ABC/../../x", "/etc/passwd",
    "a/b", "a\\b", "", " ", "-rf", "x" * 65, "20261123-ABC\x00.eml", "20261123-ABC\n",
    "ID%2F..%2F", "Ａ１", "20261123_ABC", "*", "20261123-ABC.eml",
]
STORED = re.compile(r"^messages/\d{4}/\d{2}/\d{2}/\d{8}-[0-9A-F]{12}\.eml$")
STORE_FILES = re.compile(r"^mailwarden\.db(-wal|-shm)?$")


def _virus(subject: str = "virus", **headers: str) -> bytes:
    return make_message(subject=subject, headers=headers,
                        attachments=[("e.com", "application/octet-stream", eicar())])


def _held_id(text: str) -> str:
    m = re.search(r"held for review \(([^)]+)\)", text)
    assert m, text
    return m.group(1)


# ------------------------------------------------------------------------ modes


def test_owner_only_modes_under_a_permissive_umask(make_gateway: Any, next_hop: NextHop,
                                                   clamd: Any) -> None:
    old = os.umask(0)
    try:
        gw = make_gateway(chain=["clamav", "header_log"],
                          filters={"clamav": {"address": clamd.socket}})
        assert gw.send(_virus())[0] == 250
        assert gw.send(make_message(subject="clean"))[0] == 250
        gw.flush_log()
    finally:
        os.umask(old)
    seen_wal = False
    assert stat.S_IMODE(gw.store_path.stat().st_mode) == 0o700
    for p in gw.store_path.rglob("*"):
        mode = stat.S_IMODE(p.lstat().st_mode)
        if p.is_dir():
            assert mode == 0o700, (p, oct(mode))
        else:
            assert mode == 0o600, (p, oct(mode))
            seen_wal |= p.name.endswith("-wal")
    assert seen_wal, "expected the WAL file to exist while serving"
    assert len(list(gw.store_path.rglob("*.eml"))) == 1


# ----------------------------------------------------------------------- paths


@pytest.mark.parametrize("qid", HOSTILE_IDS)
def test_check_id_refuses_hostile_ids(qid: str) -> None:
    with pytest.raises(files.StorePathError):
        files.check_id(qid)


def test_check_id_accepts_what_the_store_makes() -> None:
    from quarantine.store import new_quarantine_id

    for _ in range(100):
        qid = new_quarantine_id(datetime.now(UTC))
        assert files.check_id(qid) == qid


@pytest.mark.parametrize("relative", [
    "../x.eml", "messages/../../x.eml", "/etc/passwd", "messages/2026/../../../x",
    "messages/link/x.eml", "", ".", "messages/..",
])
def test_message_path_stays_inside_the_store(tmp_path: Path, relative: str) -> None:
    root = tmp_path / "store"
    (root / "messages").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "messages" / "link").symlink_to(outside)
    with pytest.raises(files.StorePathError):
        files.message_path(root, relative)
    with pytest.raises(files.StorePathError):
        files.write_durable(root, relative, b"secret")
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "x.eml").exists()


def test_symlinked_day_directory_means_451_not_a_write_outside(
    make_gateway: Any, next_hop: NextHop, clamd: Any, tmp_path: Path
) -> None:
    gw = make_gateway(chain=["clamav"], filters={"clamav": {"address": clamd.socket}})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    year = gw.store_path / "messages" / datetime.now(UTC).strftime("%Y")
    shutil.rmtree(year, ignore_errors=True)
    year.symlink_to(outside)
    code, text = gw.send(_virus())
    assert code == 451 and "4.3.0" in text, text
    assert list(outside.rglob("*")) == []
    assert quarantine_rows(gw.store_path) == []


def test_message_data_never_becomes_a_path(make_gateway: Any, next_hop: NextHop,
                                           clamd: Any, tmp_path: Path) -> None:
    from tests.support.hostile import traversal_filename

    before = {p for p in tmp_path.rglob("*") if "store" not in p.relative_to(tmp_path).parts}
    gw = make_gateway(chain=["clamav", "attachment_types", "header_log"],
                      filters={"clamav": {"address": clamd.socket}})
    hostile = traversal_filename().replace(
        b"Subject: path traversal", b"Subject: ../../../../tmp/pwned"
    ).replace(b"Message-ID: <", b"Message-ID: <../../../../tmp/pwned/")
    virus = _virus("../../etc/cron.d/x", **{"Message-ID": "<../../x/../y@ext.test>"})
    for raw, sender in ((hostile, "../../x@ext.test"), (virus, "a/../../b@ext.test")):
        answer = send_exact(gw.port, raw, sender)
        assert answer.code == 250 and "held" in answer.text, answer
        row = quarantine_row(gw.store_path, _held_id(answer.text))
        assert row is not None and STORED.match(row["path"]), row["path"]
    gw.flush_log()
    for p in gw.store_path.rglob("*"):
        rel = p.relative_to(gw.store_path).as_posix()
        if p.is_file():
            assert STORE_FILES.match(rel) or STORED.match(rel), rel
        else:
            assert re.fullmatch(r"messages(/\d{4}(/\d{2}(/\d{2})?)?)?", rel), rel
    after = {p for p in tmp_path.rglob("*") if "store" not in p.relative_to(tmp_path).parts}
    assert after == before
    assert not Path("/tmp/pwned").exists()


# ------------------------------------------------------------------------- CLI


@pytest.fixture
def store_config(tmp_path: Path, next_hop: NextHop) -> Path:
    cfg, _ = write_config(tmp_path / "config.toml", store=tmp_path / "store",
                          next_hop=next_hop.address, chain=[])

    async def create() -> None:
        store = await Store.open(tmp_path / "store")
        await store.close()

    asyncio.run(create())
    return cfg


@pytest.mark.parametrize("args", [
    ["quarantine", "show"],
    ["quarantine", "show", "--body", "--reason", "look"],
    ["quarantine", "release", "--reason", "why"],
    ["quarantine", "delete", "--reason", "why"],
    ["quarantine", "hold", "--reason", "why"],
    ["quarantine", "unhold", "--reason", "why"],
], ids=lambda a: "-".join(x for x in a if not x.startswith("-") and x not in ("look", "why")))
@pytest.mark.parametrize("qid", ["../../etc/passwd", "a/b", "x" * 65, "20261123-ABC\n"],
                         ids=["dotdot", "slash", "long", "newline"])
def test_cli_refuses_hostile_ids(store_config: Path, args: list[str], qid: str) -> None:
    out = cli(*args[:2], qid, *args[2:], config=store_config)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid quarantine id" in lines[0], out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    db = sqlite3.connect(store_config.parent / "store" / "mailwarden.db")
    try:
        assert db.execute("SELECT count(*) FROM audit").fetchone()[0] == 0
    finally:
        db.close()


# ------------------------------------------------------------------------- SQL

SQL = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE|PRAGMA|CREATE|DROP|VALUES|ORDER BY|LIMIT)\b"
)
#: Every expression interpolated into SQL text, by module: all structural
#: (table names from code, placeholder lists, clause lists of literals),
#: never a value.  A new one fails this test until it is reviewed and added.
REVIEWED = {
    # every SQL statement lives in the backend module (the store protocol)
    "quarantine/sqlite.py": {"_log_from(query)", "where", "table", "index",
                             "_marks(len(chunk))", "_marks(len(ids))", "_marks(len(values))",
                             "', '.join(COLUMNS)",
                             "' AND '.join(where)", "' AND '.join(conditions)",
                             "' AND '.join(rng)", "sql", "base", "_SELECT",
                             "'SELECT received FROM quarantine' + (' WHERE ' + "
                             "' AND '.join(rng) if rng else '')",
                             "' WHERE ' + ' AND '.join(rng) if rng else ''",
                             "number + 1", "REQUEST_SELECT"},
    # the PostgreSQL backend: column lists, its own WHERE clauses built from
    # literals (values are %s parameters), table names from a fixed mapping
    "quarantine/postgres.py": {"_log_from(query)", "where", "table", "sql", "_SELECT",
                               "', '.join(COLUMNS)", "' AND '.join(where)",
                               "_AUDIT_COLUMNS", "_LOG_COLUMNS", "REQUEST_SELECT"},
    # the column list both backends select access requests with (literals)
    "quarantine/store.py": {"', '.join(REQUEST_COLUMNS)"},
}


def _sql_modules() -> list[Path]:
    return sorted([*(REPO / "quarantine").glob("*.py"), *(REPO / "gateway").glob("*.py")])


def _is_sql(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(
        SQL.search(node.value))


def dynamic_sql(tree: ast.AST) -> tuple[set[str], list[str], set[str]]:
    """(interpolated expressions, %/format uses, names of lists joined into SQL)."""
    interpolated: set[str] = set()
    formatting: list[str] = []
    joined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            if SQL.search("".join(v.value for v in node.values if isinstance(v, ast.Constant))):
                interpolated |= {ast.unparse(v.value) for v in node.values
                                 if isinstance(v, ast.FormattedValue)}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "format" and _is_sql(node.func.value):
                formatting.append(ast.unparse(node))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and _is_sql(node.left):
            formatting.append(ast.unparse(node))
        if isinstance(node, ast.BinOp | ast.AugAssign) and isinstance(node.op, ast.Add):
            parts = [node.left, node.right] if isinstance(node, ast.BinOp) else [
                node.target, node.value]
            if any(_is_sql(p) for p in parts):
                interpolated |= {ast.unparse(p) for p in parts if not isinstance(p, ast.Constant)}
    for expr in interpolated:
        joined |= set(re.findall(r"'\s*(?:AND|OR|,)\s*'\.join\((\w+)\)", expr))
    return interpolated, formatting, joined


def _literal_only_lists(tree: ast.AST, names: set[str],
                        reviewed: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Places where a list that is joined into SQL gets something that is not
    a literal clause: a string literal, an f-string interpolating only
    reviewed structural expressions (placeholder lists), or the elements of
    another such list (``[*rng, *where]``)."""
    names = set(names)

    def ok(e: ast.AST) -> bool:
        if isinstance(e, ast.Constant):
            return isinstance(e.value, str)
        if isinstance(e, ast.JoinedStr):
            return all(ast.unparse(v.value) in reviewed for v in e.values
                       if isinstance(v, ast.FormattedValue))
        if isinstance(e, ast.Starred) and isinstance(e.value, ast.Name):
            names.add(e.value.id)
            return True
        return False

    bad: list[str] = []
    for _ in range(2):  # a second pass for lists found through ``*name``
        bad = []
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("append", "extend", "insert")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in names):
                arg = node.args[-1]
                if node.func.attr == "extend":
                    elts = arg.elts if isinstance(arg, ast.List | ast.Tuple) else [arg]
                    bad += [ast.unparse(node) for e in elts
                            if not (isinstance(arg, ast.List | ast.Tuple) and ok(e))]
                elif not ok(arg):
                    bad.append(ast.unparse(node))
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.List | ast.Tuple):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id in names:
                        bad += [ast.unparse(node) for e in node.value.elts if not ok(e)]
    return bad


def test_sql_is_parameterised_statically() -> None:
    problems = []
    for path in _sql_modules():
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text())
        interpolated, formatting, joined = dynamic_sql(tree)
        problems += [f"{rel}: %/format() on SQL: {f}" for f in formatting]
        problems += [f"{rel}: unreviewed SQL interpolation {e!r}"
                     for e in sorted(interpolated - REVIEWED.get(rel, set()))]
        problems += [f"{rel}: non-literal clause in SQL list: {b}"
                     for b in _literal_only_lists(tree, joined | {"COLUMNS"},
                                                  REVIEWED.get(rel, set()))]
    assert not problems, "\n".join(problems)


def test_static_check_catches_injection() -> None:
    """The checker itself: value interpolation and value clauses are caught."""
    bad = ast.parse(
        "async def f(db, address):\n"
        "    where = []\n"
        "    where.append(f\"a.address = '{address}'\")\n"
        "    await db.execute('SELECT 1 FROM q WHERE ' + ' AND '.join(where))\n"
        "    await db.execute(f\"SELECT * FROM q WHERE id = '{address}'\")\n"
        "    await db.execute(\"SELECT * FROM q WHERE id = '%s'\" % address)\n"
    )
    interpolated, formatting, joined = dynamic_sql(bad)
    assert "address" in interpolated and formatting and joined == {"where"}
    assert _literal_only_lists(bad, joined)


INJECTION = "x'OR'1'='1'--@ext.test"


def test_injection_payloads_are_data(make_gateway: Any, next_hop: NextHop, clamd: Any,
                                     tmp_path: Path) -> None:
    gw = make_gateway(chain=["clamav", "header_log"], filters={"clamav": {"address": clamd.socket}})
    subject = "'); DROP TABLE quarantine; --"
    code, text = gw.send(_virus(subject, **{"Message-ID": f"<{INJECTION}@ext.test>"}),
                         mail_from="o'brien@ext.test")
    assert code == 250
    qid = _held_id(text)
    gw.flush_log()
    gw.stop()
    cfg = Path(gw.config.path) if Path(gw.config.path).is_file() else None
    if cfg is None:
        cfg, _ = write_config(tmp_path / "cli.toml", store=gw.store_path,
                              next_hop=next_hop.address, chain=[])
    row = quarantine_row(gw.store_path, qid)
    assert row is not None and row["subject"] == subject and row["mail_from"] == "o'brien@ext.test"
    listed = cli("quarantine", "list", "--address", INJECTION, "--json", config=cfg)
    assert listed.returncode == 0 and listed.stdout.strip() == "", listed
    listed = cli("quarantine", "list", "--address", "o'brien@ext.test", "--json", config=cfg)
    assert [json.loads(x)["id"] for x in listed.stdout.splitlines()] == [qid], listed
    reason = "'; DELETE FROM audit; --"
    shown = cli("quarantine", "show", qid, "--reason", reason, config=cfg)
    assert shown.returncode == 0, shown
    exported = cli("log", "export", "--address", INJECTION, "--format", "jsonl", config=cfg)
    assert exported.returncode == 0 and exported.stdout.strip() == "", exported
    db = sqlite3.connect(gw.store_path / "mailwarden.db")
    try:
        assert db.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 1
        reasons = [r[0] for r in db.execute("SELECT reason FROM audit")]
    finally:
        db.close()
    assert reason in reasons


# ------------------------------------------------------- a user without access


@pytest.fixture
def root_only_store() -> Iterator[Path]:
    """A config anyone can read, pointing at a root-only (0700) store with an item."""
    top = Path(tempfile.mkdtemp(prefix="mw-sec-"))
    try:
        top.chmod(0o755)
        cfg, _ = write_config(top / "config.toml", store=top / "store", next_hop="127.0.0.1:9",
                              chain=[])
        cfg.chmod(0o644)

        async def create() -> None:
            store = await Store.open(top / "store")
            await store.close()

        asyncio.run(create())
        yield cfg
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("args", [
    ["quarantine", "list"], ["quarantine", "show", "20261123-ABCDEF012345"],
    ["log", "export"], ["log", "verify"], ["audit", "list"], ["purge", "--dry-run"],
    ["subject-access", "a@example.com"],
], ids=lambda a: "-".join(a[:2]))
def test_cli_as_a_user_who_cannot_read_the_store(root_only_store: Path,
                                                  other_user_install: PortableInstall,
                                                  args: list[str]) -> None:
    # A copy of the code nobody can reach wherever the checkout lives (issue 19).
    if as_user("nobody") is None:
        pytest.skip("needs root (and setpriv or runuser) to run the CLI as nobody")
    why = other_user_install.probe("nobody")
    if why is not None:  # only where the base interpreter itself is out of nobody's reach
        pytest.skip(f"user nobody cannot start Python from {other_user_install.python}: {why}")
    out = other_user_install.run_as("nobody", "cli", "--config", str(root_only_store),
                                    *args)
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "permission denied" in lines[0].lower() or "cannot read" in lines[0].lower(), lines
    assert str(root_only_store.parent / "store") in lines[0]
