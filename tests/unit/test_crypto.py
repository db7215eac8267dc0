"""quarantine/crypto.py and its SQLite key store, on real files.

Proves: a sealed body round-trips (also 50 MB, off the loop) and only with its
own quarantine id; a wrong KEK, a tampered blob, a relabelled blob, an unknown
key and a destroyed key each fail with their own error; two key stores racing
to create one period's key end with one key that both use; destroying a key
leaves none of its wrapped bytes in the key store's files (database or WAL);
``store keygen`` writes a 0600 file and refuses to overwrite; a key file that
group or others can read, or of the wrong size, is refused naming the file.
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from quarantine import crypto
from quarantine.crypto import (
    BlobError,
    KekError,
    KeyDestroyed,
    KeyRing,
    KeyUnknown,
    load_kek,
    write_kek,
)
from quarantine.sqlite_keys import KEYS_DB, KEYS_DIR, SQLiteKeyStore
from quarantine.store import StoreError

PERIOD = "2026-12-06"


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    path = tmp_path / "kek"
    write_kek(path)
    return path


@pytest.fixture
async def ring(tmp_path: Path, kek_file: Path) -> AsyncIterator[KeyRing]:
    r = await crypto.open_keyring(str(kek_file), tmp_path / "store", create=True)
    assert r is not None
    yield r
    await r.close()


async def test_round_trip_bound_to_its_aad(ring: KeyRing) -> None:
    blob = await ring.seal(PERIOD, b"20261206-AAAA", b"Subject: hi\r\n\r\nsecret words\r\n")
    assert b"secret words" not in blob
    assert crypto.parse_blob(blob).key_id == PERIOD
    assert await ring.open(blob, b"20261206-AAAA") == b"Subject: hi\r\n\r\nsecret words\r\n"
    with pytest.raises(BlobError):
        await ring.open(blob, b"20261206-BBBB")  # another item's id
    # one key per period, reused
    again = await ring.seal(PERIOD, b"x", b"more")
    assert [r.key_id for r in await ring.records()] == [PERIOD]
    assert await ring.open(again, b"x") == b"more"


async def test_a_50_mb_body_seals_off_the_loop(ring: KeyRing) -> None:
    body = os.urandom(1 << 20) * 50
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        blob = await ring.seal(PERIOD, b"big", body)
        assert await ring.open(blob, b"big") == body
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ticks > 2  # the loop kept running while AES worked in the executor


async def test_wrong_kek_refuses_to_unwrap(tmp_path: Path, ring: KeyRing) -> None:
    blob = await ring.seal(PERIOD, b"q", b"body")
    other = write_kek(tmp_path / "other-kek")
    keys = await SQLiteKeyStore.open(tmp_path / "store", create=False)
    wrong = KeyRing(other, keys)
    try:
        with pytest.raises(KekError, match="wrong key-encryption key"):
            await wrong.open(blob, b"q")
    finally:
        await wrong.close()


async def test_tampered_and_relabelled_blobs_fail(ring: KeyRing) -> None:
    blob = bytearray(await ring.seal(PERIOD, b"q", b"a body worth altering"))
    flipped = bytearray(blob)
    flipped[-20] ^= 0x01
    with pytest.raises(BlobError, match="authentication failed"):
        await ring.open(bytes(flipped), b"q")
    # relabel to another existing period: the header is authenticated
    await ring.seal("2026-12-07", b"q", b"other day")
    relabelled = bytes(blob).replace(PERIOD.encode(), b"2026-12-07", 1)
    with pytest.raises(BlobError):
        await ring.open(relabelled, b"q")
    with pytest.raises(BlobError):
        await ring.open(bytes(blob[:30]), b"q")  # truncated
    with pytest.raises(BlobError):
        await ring.open(b"From: a@b\r\n\r\nplain", b"q")  # not a blob


async def test_unknown_and_destroyed_keys_are_told_apart(ring: KeyRing) -> None:
    blob = await ring.seal(PERIOD, b"q", b"body")
    unknown = blob.replace(PERIOD.encode(), b"2020-01-01", 1)
    with pytest.raises(KeyUnknown):
        await ring.open(unknown, b"q")
    [gone] = await ring.destroy([PERIOD])
    assert gone.key_id == PERIOD and gone.wrapped is None and gone.destroyed
    with pytest.raises(KeyDestroyed, match=gone.fingerprint):
        await ring.open(blob, b"q")
    # a destroyed period is never created again
    with pytest.raises(KeyDestroyed):
        await ring.seal(PERIOD, b"q", b"late")
    assert await ring.destroy([PERIOD]) == []  # already gone: nothing to report
    assert isinstance(KeyDestroyed("x"), StoreError)  # the CLI shows it as one line


async def test_two_creators_of_one_period_key_get_the_same_key(
    tmp_path: Path, kek_file: Path
) -> None:
    """Two key stores on one file (two connections, two threads: what two
    processes do) seal for a new period at the same moment."""
    kek = load_kek(kek_file)
    rings = [KeyRing(kek, await SQLiteKeyStore.open(tmp_path / "store", create=True))
             for _ in range(2)]
    try:
        for round_ in range(5):
            period = f"2026-12-{10 + round_:02d}"
            blobs = await asyncio.gather(
                *(r.seal(period, b"q", f"from {i}".encode()) for i, r in enumerate(rings))
            )
            # each ring opens the other's blob: one key won for both
            assert await rings[0].open(blobs[1], b"q") == b"from 1"
            assert await rings[1].open(blobs[0], b"q") == b"from 0"
        records = await rings[0].records()
        assert len(records) == 5 and len({r.fingerprint for r in records}) == 5
        # insert-if-absent keeps the first
        first = await rings[0].keys.get("2026-12-10")
        assert first is not None and first.wrapped is not None
        await rings[1].keys.insert_if_absent("2026-12-10", b"\x01" * 61, "f" * 16, "now")
        assert await rings[0].keys.get("2026-12-10") == first
    finally:
        for r in rings:
            await r.close()


async def test_destroyed_key_leaves_no_copy_in_the_key_store_files(
    tmp_path: Path, ring: KeyRing
) -> None:
    for n in range(3):
        await ring.seal(f"2026-11-0{n + 1}", b"q", b"body")
    keep = await ring.seal("2026-12-01", b"q", b"kept")
    records = {r.key_id: r for r in await ring.records()}
    doomed = records["2026-11-02"].wrapped
    assert doomed is not None
    keydir = tmp_path / "store" / KEYS_DIR

    def stored() -> bytes:
        return b"".join(p.read_bytes() for p in keydir.glob(KEYS_DB + "*"))

    assert doomed in stored()  # the check below can see it
    await ring.destroy(["2026-11-02"])
    assert doomed not in stored()
    wal = keydir / (KEYS_DB + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert await ring.open(keep, b"q") == b"kept"
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
    assert stat.S_IMODE((keydir / KEYS_DB).stat().st_mode) == 0o600


def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    from cli import main

    path = tmp_path / "kek"
    old = os.umask(0o022)
    try:
        res = CliRunner().invoke(main, ["store", "keygen", str(path)])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kek = load_kek(path)
    assert f"fingerprint {kek.fingerprint}" in res.output
    before = path.read_bytes()
    res = CliRunner().invoke(main, ["store", "keygen", str(path)])
    assert res.exit_code == 1
    assert res.stderr.strip() == (f"mailwarden: store keygen: {path} exists;"
                                  " refusing to overwrite a key file")
    assert path.read_bytes() == before
    # two keys are never the same
    write_kek(tmp_path / "kek2")
    assert load_kek(tmp_path / "kek2").key != kek.key


def test_unsafe_or_malformed_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    write_kek(path)
    os.chmod(path, 0o640)
    with pytest.raises(KekError, match=rf"key file {path}: mode 0640"):
        load_kek(path)
    os.chmod(path, 0o604)
    with pytest.raises(KekError, match=str(path)):
        load_kek(path)
    short = tmp_path / "short"
    short.write_text(f"{crypto.KEK_HEADER}\n{base64.b64encode(b'x' * 16).decode()}\n")
    os.chmod(short, 0o600)
    with pytest.raises(KekError, match=rf"key file {short}: the key is 16 bytes, expected 32"):
        load_kek(short)
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(32))
    os.chmod(junk, 0o600)
    with pytest.raises(KekError, match=rf"key file {junk}: not a mailwarden key file"):
        load_kek(junk)
    with pytest.raises(KekError, match=rf"key file {tmp_path}/missing: No such file"):
        load_kek(tmp_path / "missing")
    fresh = write_kek(tmp_path / "fresh")
    assert base64.b64encode(fresh.key).decode() not in repr(fresh)  # never printed


_CREATOR = """
import asyncio, sys
from pathlib import Path
from quarantine.crypto import KeyRing, load_kek
from quarantine.sqlite_keys import SQLiteKeyStore

async def main():
    keys = await SQLiteKeyStore.open(Path(sys.argv[2]), create=True)
    ring = KeyRing(load_kek(sys.argv[1]), keys)
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # the go signal: both processes race from here
    blob = await ring.seal(sys.argv[3], b"q", sys.argv[4].encode())
    sys.stdout.write(blob.hex() + "\\n"); sys.stdout.flush()
    await ring.close()

asyncio.run(main())
"""


def test_two_processes_creating_one_period_key_get_the_same_key(
    tmp_path: Path, kek_file: Path
) -> None:
    import subprocess
    import sys

    from tests.support.process import REPO

    store = tmp_path / "store"
    periods = [f"2026-11-{d:02d}" for d in range(1, 6)]
    for period in periods:
        procs = [subprocess.Popen([sys.executable, "-c", _CREATOR, str(kek_file), str(store),
                                   period, f"from {i}"], cwd=REPO, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                 for i in range(2)]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline() == "ready\n"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            blobs = [bytes.fromhex(p.stdout.readline().strip()) for p in procs if p.stdout]
            for p in procs:
                assert p.wait(timeout=60) == 0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                for f in (p.stdin, p.stdout):
                    if f is not None:
                        f.close()

        async def check(blobs: list[bytes] = blobs) -> None:
            ring = KeyRing(load_kek(kek_file), await SQLiteKeyStore.open(store, create=False))
            try:
                assert [await ring.open(b, b"q") for b in blobs] == [b"from 0", b"from 1"]
            finally:
                await ring.close()

        asyncio.run(check())
    keys = asyncio.run(_records(store))
    assert [r.key_id for r in keys] == periods


async def _records(store: Path) -> list[crypto.KeyRecord]:
    ks = await SQLiteKeyStore.open(store, create=False)
    try:
        return await ks.list()
    finally:
        await ks.close()
