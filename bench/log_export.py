"""How fast `mailwarden log export` streams a big log, and in how much memory (issue 6).

Fills a fresh store with N header-only log records (default 1,000,000; the
shape ``filters/header_log.py`` writes: envelope, headers, 0-2 attachments,
five verdicts, spread over 90 days, ~4 indexed addresses each), inserted
directly with SQL in one transaction but with correct chain hashes and
address digests (``mailwarden log verify`` accepts the result).  Then runs,
each as a real subprocess, timed with ``os.wait4`` (wall time and the child's
own peak RSS):

* ``mailwarden log export --format csv --output FILE`` (pseudonymised, the default)
* ``mailwarden log export --format jsonl --output FILE``
* the same two with ``--identified`` (the stored records, no pseudonyms)
* ``mailwarden log export --address A --format csv`` (one busy address)
* ``mailwarden log verify`` (with ``--verify``)
* the baseline: a bare ``sqlite3`` SELECT of the same rows written with
  ``csv.writer`` by a minimal Python child (no flattening, no audit, no
  atomic rename): the floor for "read the rows and write them out".

    python bench/log_export.py [--records 1000000] [--keep DIR] [--verify]

Prints records/second, peak RSS (the child's VmHWM, Linux) and the ratio of
wall time to the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from filters.header_log import TIME_FORMAT, address_digest  # noqa: E402
from quarantine.store import DB_NAME, GENESIS, Store, canonical, chain_hash  # noqa: E402

#: The real CLI, the way the console script runs it.
MAILWARDEN = [sys.executable, "-c", "from cli import main; main()"]

BUSY = "staff7@example.com"

BASELINE = r"""
import csv, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
with open(sys.argv[2], "w", newline="", encoding="utf-8") as fh:
    w = csv.writer(fh)
    w.writerow(["seq", "time", "queue_id", "direction", "record", "hash"])
    cur = db.execute("SELECT seq, time, queue_id, direction, record, hash FROM log ORDER BY seq")
    while True:
        rows = cur.fetchmany(2000)
        if not rows:
            break
        w.writerows(rows)
"""


def records(count: int, seed: int = 6) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """Yield (record, index addresses) pairs, deterministic."""
    rnd = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=90)
    step = 90 * 86400 / max(count, 1)
    for n in range(count):
        when = start + timedelta(seconds=n * step)
        inbound = n % 3 != 0
        staff = f"staff{n % 300}@example.com"
        other = f"user{rnd.randrange(5000)}@ext{n % 97}.test"
        sender, rcpt = (other, staff) if inbound else (staff, other)
        rcpts = [rcpt] + ([f"staff{(n + 1) % 300}@example.com"] if n % 4 == 0 else [])
        cc = f"cc{n % 50}@example.com" if n % 5 == 0 else None
        personal = n % 17 == 0
        atts = []
        for a in range(n % 3):
            atts.append({
                "name": f"document-{n}-{a}.pdf", "declared_type": "application/pdf",
                "type": "application/pdf", "size": 20000 + (n * 37 + a) % 400000,
                "sha256": hashlib.sha256(f"{n}/{a}".encode()).hexdigest(),
            })
        disposition = "quarantined" if n % 200 == 0 else "relayed"
        rec = {
            "time": when.strftime(TIME_FORMAT),
            "queue_id": f"{n:010X}",
            "direction": "inbound" if inbound else "outbound",
            "client_addr": f"198.51.100.{n % 250}" if inbound else "127.0.0.1",
            "mail_from": sender,
            "rcpt_tos": rcpts,
            "from": f"Some Sender <{sender}>",
            "to": ", ".join(rcpts),
            "cc": cc,
            "subject": ("Private: " if personal else "") + f"Quarterly figures, part {n % 1000}",
            "message_id": f"<{n}.{seed}@mail.ext{n % 97}.test>",
            "date": when.strftime("%a, %d %b %Y %H:%M:%S +0000"),
            "size": 4000 + (n * 131) % 900000,
            "attachments": atts,
            "verdicts": [
                {"filter": "clamav", "outcome": "quarantine" if disposition == "quarantined"
                 else "relay", **({"virus": "Eicar-Test-Signature"}
                                  if disposition == "quarantined" else {})},
                {"filter": "attachment_types", "outcome": "relay"},
                {"filter": "external_attachments", "outcome": "relay",
                 "dkim": "pass" if n % 2 else "none"},
                {"filter": "personal", "outcome": "relay", "personal": personal,
                 **({"marked_by": "subject: private:"} if personal else {})},
                {"filter": "header_log", "outcome": "relay"},
            ],
            "personal": personal,
            "disposition": disposition,
            "reply": ("250 2.7.0 accepted, held for review (20261101-ABCDEF012345)"
                      if disposition == "quarantined" else f"250 2.0.0 Ok: queued as {n:X}"),
            "quarantine_id": "20261101-ABCDEF012345" if disposition == "quarantined" else None,
            "elapsed_ms": round(5 + (n % 97) / 3, 1),
            "filter_ms": {"clamav": 3.1, "attachment_types": 0.4, "personal": 0.0},
        }
        index = sorted({sender, *rcpts, *([cc] if cc else [])})
        rec["address_digest"] = address_digest(index)
        yield rec, index


def fill(path: Path, count: int) -> float:
    """Create the store and insert ``count`` chained records; returns seconds."""
    async def create() -> None:
        store = await Store.open(path)
        await store.close()

    asyncio.run(create())
    t0 = time.perf_counter()
    db = sqlite3.connect(path / DB_NAME, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    prev = GENESIS
    rows: list[tuple] = []
    addrs: list[tuple] = []
    seq = 0
    for rec, index in records(count):
        seq += 1
        payload = canonical(rec)
        prev = chain_hash(prev, payload)
        rows.append((seq, rec["time"], rec["queue_id"], rec["direction"], payload, prev))
        addrs.extend((seq, a) for a in index)
        if len(rows) >= 20000:
            db.executemany("INSERT INTO log (seq, time, queue_id, direction, record, hash)"
                           " VALUES (?,?,?,?,?,?)", rows)
            db.executemany("INSERT INTO log_address (seq, address) VALUES (?,?)", addrs)
            rows.clear()
            addrs.clear()
            print(f"\r  generated {seq:,} records", end="", file=sys.stderr, flush=True)
    db.executemany("INSERT INTO log (seq, time, queue_id, direction, record, hash)"
                   " VALUES (?,?,?,?,?,?)", rows)
    db.executemany("INSERT INTO log_address (seq, address) VALUES (?,?)", addrs)
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    print(file=sys.stderr)
    return time.perf_counter() - t0


def _hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_child(cmd: list[str], **kw: Any) -> tuple[float, float, int, str]:
    """Run ``cmd``; returns (wall seconds, peak RSS MiB, exit code, stderr).

    Peak RSS is the child's own ``VmHWM`` (sampled every 10 ms until it
    exits): ``ru_maxrss`` from ``wait4`` would include the pages the child
    inherited from this (large) process before its exec.
    """
    errf = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=errf, **kw)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            value = _hwm_kib(proc.pid)
            if value is not None:
                peak = max(peak, value)
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, _usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    errf.seek(0)
    err = errf.read().decode("utf-8", "replace")
    errf.close()
    return wall, peak / 1024, proc.returncode, err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, help="use (and keep) this directory; reuse its store")
    ap.add_argument("--verify", action="store_true", help="also time `mailwarden log verify`")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="mw-bench-log-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    try:
        existing = 0
        if (store / DB_NAME).exists():
            with sqlite3.connect(store / DB_NAME) as db:
                existing = db.execute("SELECT count(*) FROM log").fetchone()[0]
        if existing != args.records:
            shutil.rmtree(store, ignore_errors=True)
            print(f"filling {store} with {args.records:,} records ...", file=sys.stderr)
            secs = fill(store, args.records)
            print(f"  filled in {secs:.1f} s", file=sys.stderr)
        size = sum(p.stat().st_size for p in store.iterdir() if p.is_file())
        config = work / "config.toml"
        config.write_text(
            "[gateway]\ninternal_domains = [\"example.com\"]\n"
            f"[store]\npath = \"{store}\"\n"
        )
        n = args.records
        print(f"\nlog: {n:,} records, store {size / 2**20:,.0f} MiB\n")
        print(f"{'run':<34} {'wall s':>8} {'records/s':>11} {'peak RSS MiB':>13} "
              f"{'output MiB':>11} {'vs baseline':>11}")

        results: dict[str, tuple[float, float, int]] = {}

        def report(name: str, wall: float, rss: float, out: Path | None, rows: int) -> None:
            osize = out.stat().st_size / 2**20 if out and out.exists() else 0.0
            base = results.get("baseline")
            ratio = f"{wall / base[0]:.2f}x" if base and name != "baseline" else "-"
            print(f"{name:<34} {wall:>8.2f} {rows / wall:>11,.0f} {rss:>13.1f} "
                  f"{osize:>11,.0f} {ratio:>11}", flush=True)
            results[name] = (wall, rss, rows)

        out = work / "baseline.csv"
        wall, rss, rc, err = run_child([sys.executable, "-c", BASELINE,
                                        str(store / DB_NAME), str(out)])
        assert rc == 0, err
        report("baseline", wall, rss, out, n)
        out.unlink()

        # pseudonymised (the default) and --identified (the stored records as they are)
        for fmt, extra in (("csv", ()), ("jsonl", ()), ("csv", ("--identified",)),
                           ("jsonl", ("--identified",))):
            out = work / f"export.{fmt}"
            wall, rss, rc, err = run_child(
                [*MAILWARDEN, "log", "export", "--config", str(config), "--format", fmt,
                 "--output", str(out), *extra])
            assert rc == 0, err
            manifest = err.strip().splitlines()[-1]
            assert manifest.endswith(f"{n} records"), manifest
            report(f"log export {fmt} {' '.join(extra)}".rstrip(), wall, rss, out, n)
            out.unlink()

        with sqlite3.connect(store / DB_NAME) as db:
            busy = db.execute("SELECT count(*) FROM log_address WHERE address = ?",
                              (BUSY,)).fetchone()[0]
        out = work / "busy.csv"
        with out.open("wb") as fh:
            wall, rss, rc, err = run_child(
                [*MAILWARDEN, "log", "export", "--config", str(config), "--address", BUSY],
                stdout=fh)
        assert rc == 0, err
        report(f"  --address ({busy:,} records)", wall, rss, out, busy)
        out.unlink()

        if args.verify:
            wall, rss, rc, err = run_child([*MAILWARDEN, "log", "verify", "--config",
                                            str(config)], stdout=subprocess.DEVNULL)
            assert rc == 0, err
            report("mailwarden log verify", wall, rss, None, n)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
