"""Crypto-shredding end to end: backups die with the period's key.

A key file from the real ``mailwarden store keygen``; the running gateway
quarantines messages on day D (real libmagic), sealing each file under D's
data key.  Two backups are taken: the organisation's (the store directory
*without* ``keys/``, as docs/crypto-shredding.md says) and a careless one
(everything, ``keys/`` included).  One item is then put under legal hold.  A
real ``mailwarden purge`` 100 days later (Debian faketime) destroys D's key
and prints the destruction report; afterwards every body in both backups is
tried with everything that remains (the KEK file and the key store as the
purge left it): every attempt fails with ``KeyDestroyed``, while the held item
is still shown by ``quarantine show --body``.  The careless backup's own copy
of ``keys/`` still opens its bodies: the reason ``keys/`` must never be backed
up.  A dry run first lists the same period and destroys nothing.

The same on PostgreSQL: the backup is a real ``pg_dump`` of the data
database; the keys live in the key database, which is never dumped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from quarantine import crypto
from quarantine.crypto import KeyDestroyed, KeyRing, load_kek
from quarantine.postgres_keys import keys_dsn
from quarantine.sqlite_keys import KEYS_DB, KEYS_DIR, SQLiteKeyStore
from tests.integration.test_quarantine_review import EXE, mw, shifted
from tests.support.harness import NextHop, make_message
from tests.support.postgres import PgServer
from tests.support.process import REPO, write_config

CHAIN = ["attachment_types", "header_log"]


def keygen(path: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "cli", "store", "keygen", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def bodies(root: Path) -> dict[str, bytes]:
    """quarantine id -> stored file bytes, for every message file under ``root``."""
    return {p.name[: -len(".eml")]: p.read_bytes()
            for p in sorted((root / "messages").rglob("*.eml"))}


def try_open(keys_root: Path, kek_file: Path, blobs: dict[str, bytes]) -> dict[str, Any]:
    """Open each blob with the KEK and the key store under ``keys_root``:
    qid -> plaintext, or the exception that stopped it."""

    async def ring() -> KeyRing:
        return KeyRing(load_kek(kek_file), await SQLiteKeyStore.open(keys_root, create=False))

    return _open_each(ring, blobs)


def _open_each(make_ring: Any, blobs: dict[str, bytes]) -> dict[str, Any]:
    """qid -> plaintext, or the CryptoError that stopped it, with the key ring
    ``await make_ring()`` gives."""

    async def go() -> dict[str, Any]:
        ring = await make_ring()
        out: dict[str, Any] = {}
        try:
            for qid, blob in blobs.items():
                try:
                    out[qid] = await ring.open(blob, qid.encode())
                except crypto.CryptoError as exc:
                    out[qid] = exc
        finally:
            await ring.close()
        return out

    return asyncio.run(go())


def test_backups_are_unreadable_after_the_purge_but_held_items_survive(
    tmp_path: Path, make_gateway: Any, next_hop: NextHop
) -> None:
    kek_file = tmp_path / "secrets" / "mailwarden.kek"
    kek_file.parent.mkdir(mode=0o700)
    out = keygen(kek_file)
    assert f"fingerprint {load_kek(kek_file).fingerprint}" in out
    store_extra = {"key_file": str(kek_file)}
    gw = make_gateway(chain=CHAIN, store=store_extra)
    config, _ = write_config(tmp_path / "config.toml", store=gw.store_path,
                             next_hop=next_hop.address, chain=CHAIN, store_extra=store_extra)
    ids: dict[str, str] = {}
    for name in ("alpha", "bravo", "charlie"):
        raw = make_message(subject=f"marker-{name}-subject", body=f"body of {name}",
                           attachments=[(f"{name}.exe", "application/octet-stream", EXE)])
        code, text = gw.send(raw)
        assert code == 250 and "held for review" in text, text
        ids[name] = text.rsplit("(", 1)[1].rstrip(")")
    assert gw.send(make_message(subject="clean one"))[0] == 250
    gw.flush_log()

    live = bodies(gw.store_path)
    assert set(live) == set(ids.values())
    periods = {crypto.parse_blob(b).key_id for b in live.values()}  # day D (two near midnight)
    for blob in live.values():
        assert b"marker-" not in blob  # sealed: not even the headers show

    # the backups: the organisation's leaves keys/ out; the careless one does not
    org_backup, careless = tmp_path / "backup-org", tmp_path / "backup-careless"
    shutil.copytree(gw.store_path, org_backup,
                    ignore=lambda d, names: [KEYS_DIR] if Path(d) == gw.store_path else [])
    shutil.copytree(gw.store_path, careless)
    assert not (org_backup / KEYS_DIR).exists() and (careless / KEYS_DIR / KEYS_DB).exists()
    with sqlite3.connect(careless / KEYS_DIR / KEYS_DB) as db:
        wrapped = dict(db.execute("SELECT key_id, wrapped FROM datakey").fetchall())
    assert set(wrapped) == periods

    held = ids["charlie"]
    proc = mw(config, "quarantine", "hold", held, "--reason", "case 12")
    assert proc.returncode == 0, proc.stderr
    later = shifted("+100d")

    # a dry run lists the periods and destroys nothing
    dry = mw(config, "purge", "--dry-run", "--json", prefix=later)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert {p["key_id"] for p in plan["periods_destroyed"]} == periods
    assert (plan["quarantine_items"], plan["kept_under_hold"]) == (2, 1)
    text = mw(config, "purge", "--dry-run", prefix=later)
    assert text.returncode == 0, text.stderr
    assert "period keys to destroy (dry run): " in text.stdout
    assert "nothing destroyed" in text.stdout.splitlines()[0]
    opened = try_open(gw.store_path, kek_file, live)
    assert all(isinstance(v, bytes) for v in opened.values()), opened

    proc = mw(config, "purge", "--json", prefix=later)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # one JSON object
    report = json.loads(proc.stdout)
    assert report["dry_run"] is False and report["encryption"] is True
    assert report["kek_fingerprint"] == load_kek(kek_file).fingerprint
    assert {(p["key_id"], p["fingerprint"]) for p in report["periods_destroyed"]} == {
        (k, crypto.fingerprint(w)) for k, w in wrapped.items()}
    assert all(p["destroyed"] for p in report["periods_destroyed"])
    assert (report["quarantine_items"], report["files_removed"], report["kept_under_hold"],
            report["log_records"], report["audit_rows"]) == (2, 2, 1, 4, 0)
    assert report["held_items"] == [held] and report["keys_checkpoint"] == "truncated"
    assert report["cutoff"] < report["now"]
    for key in ("now", "cutoff", "retention_days", "hold_keys_destroyed", "checkpoint"):
        assert key in report

    # every body in both backups, tried with everything that remains: all fail
    for backup in (org_backup, careless):
        copies = bodies(backup)
        assert set(copies) == set(ids.values())
        results = try_open(gw.store_path, kek_file, copies)
        assert all(isinstance(v, KeyDestroyed) for v in results.values()), results
        assert not any(b"marker-" in b or b"body of" in b for b in copies.values())

    # the held item survives, readable (under its own key)
    show = mw(config, "quarantine", "show", held, "--body", "--reason", "case 12")
    assert show.returncode == 0, show.stderr
    assert "body of charlie" in show.stdout
    gone = mw(config, "quarantine", "show", ids["alpha"], "--body", "--reason", "case 12")
    assert gone.returncode == 1  # purged

    # why keys/ is never backed up: the careless copy of it still opens its bodies
    leaked = try_open(careless, kek_file, bodies(careless))
    assert all(isinstance(v, bytes) for v in leaked.values())


def test_check_reports_the_key_file(tmp_path: Path, next_hop: NextHop) -> None:
    kek_file = tmp_path / "kek"
    keygen(kek_file)
    config, _ = write_config(tmp_path / "config.toml", store=tmp_path / "store",
                             next_hop=next_hop.address, chain=[],
                             store_extra={"key_file": str(kek_file)})
    proc = subprocess.run([sys.executable, "-m", "cli", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    fp = load_kek(kek_file).fingerprint
    assert f"ok   key file {kek_file}: readable, mode ok, fingerprint {fp}" in proc.stdout
    kek_file.chmod(0o640)
    proc = subprocess.run([sys.executable, "-m", "cli", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1
    assert f"FAIL key file {kek_file}: mode 0640 lets group or others in" in proc.stdout


@pytest.mark.parametrize("args", [("store", "keygen")])
def test_keygen_needs_a_path(args: tuple[str, ...]) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_key_store_modes_under_a_permissive_umask(tmp_path: Path, make_gateway: Any) -> None:
    kek_file = tmp_path / "kek"
    keygen(kek_file)
    old = os.umask(0)
    try:
        gw = make_gateway(chain=CHAIN, store={"key_file": str(kek_file)})
        raw = make_message(subject="modes", attachments=[("m.exe", "application/octet-stream",
                                                          EXE)])
        assert gw.send(raw)[0] == 250
    finally:
        os.umask(old)
    keydir = gw.store_path / KEYS_DIR
    assert stat.S_IMODE(gw.store_path.stat().st_mode) == 0o700
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
    found = sorted(p.name for p in keydir.iterdir())
    assert KEYS_DB in found and KEYS_DB + "-wal" in found, found
    for p in keydir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600


# ------------------------------------------------------------- PostgreSQL


def pg_dump_bodies(server: PgServer, dsn: str, out: Path) -> dict[str, bytes]:
    """A real ``pg_dump`` of the data database (what the organisation backs
    up) into ``out``; quarantine id -> the body bytes it holds (the ``COPY``
    block of ``body``, bytea in hex)."""
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    proc = subprocess.run(
        [str(server.bindir / "pg_dump"), "-h", str(server.socket_dir), "-U", "postgres",
         "-d", str(name), "-f", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found: dict[str, bytes] = {}
    inside = False
    for line in out.read_text().splitlines():
        if line.startswith("COPY public.body "):
            assert line.startswith("COPY public.body (path, id, data) FROM stdin;"), line
            inside = True
        elif inside and line == "\\.":
            inside = False
        elif inside:
            _path, qid, data = line.split("\t")
            assert data.startswith("\\\\x"), data[:10]
            found[qid] = bytes.fromhex(data[3:])
    return found


def try_open_pg(dsn: str, kek_file: Path, blobs: dict[str, bytes]) -> dict[str, Any]:
    """Each blob opened with the KEK and the key database as it is now."""

    async def ring() -> Any:
        opened = await crypto.open_keyring(str(kek_file), Path("/nonexistent"), create=False,
                                           dsn=dsn)
        assert opened is not None
        return opened

    return _open_each(ring, blobs)


def test_postgresql_dumps_are_unreadable_after_the_purge_but_held_items_survive(
    tmp_path: Path, make_gateway: Any, next_hop: NextHop, pg_server: PgServer
) -> None:
    """The same on the PostgreSQL backend: a gateway on PostgreSQL seals the
    bodies in the ``body`` table; a real ``pg_dump`` of the data database is
    the backup; ``mailwarden purge`` under libfaketime 100 days later destroys
    day D's key in the key database (its report lists it, with the
    fingerprint of the wrapped key as it was); every body in the dump then
    fails with ``KeyDestroyed`` with everything that remains (KEK file, key
    database, data database), and the held item is still shown."""
    kek_file = tmp_path / "secrets" / "mailwarden.kek"
    kek_file.parent.mkdir(mode=0o700)
    keygen(kek_file)
    dsn = pg_server.new_database()
    pg = {"backend": "postgresql", "dsn": dsn, "key_file": str(kek_file)}
    gw = make_gateway(chain=CHAIN, store={**pg, "instance": "gw1"})
    config, _ = write_config(tmp_path / "config.toml", store=tmp_path / "cli-state",
                             next_hop=next_hop.address, chain=CHAIN,
                             store_extra={**pg, "instance": "cli"})
    ids: dict[str, str] = {}
    for name in ("alpha", "bravo", "charlie"):
        raw = make_message(subject=f"marker-{name}-subject", body=f"body of {name}",
                           attachments=[(f"{name}.exe", "application/octet-stream", EXE)])
        code, text = gw.send(raw)
        assert code == 250 and "held for review" in text, text
        ids[name] = text.rsplit("(", 1)[1].rstrip(")")
    assert gw.send(make_message(subject="clean one"))[0] == 250
    gw.flush_log()

    dump = pg_dump_bodies(pg_server, dsn, tmp_path / "backup.sql")
    assert set(dump) == set(ids.values())
    periods = {crypto.parse_blob(b).key_id for b in dump.values()}
    assert not any(b"body of" in b or b"marker-" in b for b in dump.values())
    key_db = keys_dsn(dsn)
    with psycopg.connect(key_db, autocommit=True) as conn:
        wrapped = {k: bytes(w) for k, w in conn.execute("SELECT key_id, wrapped FROM datakey")}
    assert set(wrapped) == periods
    with psycopg.connect(dsn, autocommit=True) as conn:  # no key in the data database
        assert conn.execute("SELECT to_regclass('datakey')").fetchone() == (None,)
    backup_text = (tmp_path / "backup.sql").read_text()
    assert not any(w.hex() in backup_text for w in wrapped.values())

    held = ids["charlie"]
    proc = mw(config, "quarantine", "hold", held, "--reason", "case 12")
    assert proc.returncode == 0, proc.stderr
    later = shifted("+100d")
    dry = mw(config, "purge", "--dry-run", "--json", prefix=later)
    assert dry.returncode == 0, dry.stderr
    assert {p["key_id"] for p in json.loads(dry.stdout)["periods_destroyed"]} == periods
    assert all(isinstance(v, bytes) for v in try_open_pg(dsn, kek_file, dump).values())

    proc = mw(config, "purge", "--json", prefix=later)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] is False and report["encryption"] is True
    assert {(p["key_id"], p["fingerprint"]) for p in report["periods_destroyed"]} == {
        (k, crypto.fingerprint(w)) for k, w in wrapped.items()}
    assert all(p["destroyed"] for p in report["periods_destroyed"])
    assert (report["quarantine_items"], report["files_removed"], report["kept_under_hold"],
            report["log_records"]) == (2, 2, 1, 4)
    assert report["held_items"] == [held] and report["keys_checkpoint"] == "vacuumed"

    # the dump, tried with everything that remains: every body fails
    results = try_open_pg(dsn, kek_file, dump)
    assert all(isinstance(v, KeyDestroyed) for v in results.values()), results
    with psycopg.connect(key_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM datakey WHERE key_id = ANY(%s)",
                            (sorted(periods),)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM destroyed WHERE key_id = ANY(%s)",
                            (sorted(periods),)).fetchone() == (len(periods),)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT id FROM body")) == [held]

    # the held item survives, readable under its own key, from any instance
    show = mw(config, "quarantine", "show", held, "--body", "--reason", "case 12")
    assert show.returncode == 0, show.stderr
    assert "body of charlie" in show.stdout
    gone = mw(config, "quarantine", "show", ids["alpha"], "--body", "--reason", "case 12")
    assert gone.returncode == 1  # purged
