"""How fast `mailwarden quarantine list` answers on a big quarantine (issue 7).

Fills a fresh store with N quarantine rows (default 100,000; spread over 90
days, a mix of reasons, 1% under hold, 5% released, three addresses per item)
directly through SQL, then times the real CLI as a subprocess, end to end
(interpreter start, config, store open, query, audit row, output):

    python bench/quarantine_list.py [--items 100000] [--runs 5] [--keep DIR]

Prints the median and worst wall time per query shape; the requirement is
under one second for each.  The query itself (in-process) is timed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quarantine import review  # noqa: E402
from quarantine.store import Store, iso, new_quarantine_id  # noqa: E402

#: The real CLI: the installed console script next to this interpreter, else
#: ``python -m cli``.
_SCRIPT = Path(sys.executable).with_name("mailwarden")
MAILWARDEN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli"]

REASONS = ["clamav", "attachment_types", "attachment_types,clamav", "personal"]


async def fill(path: Path, count: int) -> None:
    store = await Store.open(path)
    rnd = random.Random(7)
    now = datetime.now(UTC)
    rows, addrs = [], []
    for n in range(count):
        received = now - timedelta(seconds=rnd.uniform(0, 90 * 86400))
        qid = new_quarantine_id(received)
        sender = f"user{n % 5000}@ext{n % 97}.test"
        rcpt = f"staff{n % 300}@example.com"
        reason = REASONS[n % len(REASONS)]
        state = "released" if n % 20 == 0 else "held"
        rows.append((
            qid, iso(received), f"Q{n:09d}", "inbound", "192.0.2.1", "mx.test", sender,
            json.dumps([rcpt]), sender, rcpt, f"subject {n}", f"<{n}@ext.test>", "", 4096,
            reason, "detail", int(n % 10 == 0), int(n % 100 == 0), state,
            f"messages/{received:%Y/%m/%d}/{qid}.eml", "0" * 64, "[]", iso(received),
        ))
        addrs += [(qid, sender), (qid, rcpt), (qid, f"cc{n % 50}@example.com")]
    async with store.transaction() as db:
        await db.executemany(
            "INSERT INTO quarantine (id, received, queue_id, direction, client_addr, helo,"
            " mail_from, rcpt_tos, hdr_from, hdr_to, subject, message_id, hdr_date, size,"
            " reason, detail, personal, hold, state, path, sha256, verdicts, updated)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        await db.executemany(
            "INSERT INTO quarantine_address (id, address) VALUES (?, ?)", addrs
        )
    await store.db.execute("ANALYZE")
    await store.close()


async def in_process(path: Path, query: review.ListQuery, runs: int) -> float:
    store = await Store.open(path, create=False)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        await review.list_items(store, query)
        times.append(time.perf_counter() - t)
    await store.close()
    return statistics.median(times)


SHAPES: list[tuple[str, list[str], review.ListQuery]] = [
    ("list (default, newest 50)", [], review.ListQuery()),
    ("list --json", ["--json"], review.ListQuery()),
    ("list --reason clamav", ["--reason", "clamav"], review.ListQuery(reason="clamav")),
    ("list --address staff7@example.com", ["--address", "staff7@example.com"],
     review.ListQuery(address="staff7@example.com")),
    ("list --state all --page 200", ["--state", "all", "--page", "200"],
     review.ListQuery(state="all", page=200)),
    ("list --since/--until (one day)", ["--since", "SINCE", "--until", "SINCE"],
     review.ListQuery()),
    # worst cases: few or no matches (the index walk gives up, one sequential scan)
    ("list --state deleted (none exist)", ["--state", "deleted"],
     review.ListQuery(state="deleted")),
    ("list --state released --reason personal", ["--state", "released", "--reason", "personal"],
     review.ListQuery(state="released", reason="personal")),
    ("list --address nobody@example.com", ["--address", "nobody@example.com"],
     review.ListQuery(address="nobody@example.com")),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", help="Use/keep this directory instead of a temp dir.")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mw-bench-"))
    store = root / "store"
    try:
        if not (store / "mailwarden.db").exists():
            t = time.perf_counter()
            asyncio.run(fill(store, args.items))
            print(f"filled {args.items} items in {time.perf_counter() - t:.1f}s")
        config = root / "config.toml"
        config.write_text(
            '[gateway]\ninternal_domains = ["example.com"]\n'
            f'[store]\npath = "{store}"\n[filters]\nchain = []\n'
        )
        startup = []
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run([*MAILWARDEN, "--help"], capture_output=True, cwd=REPO, check=True)
            startup.append(time.perf_counter() - t)
        print(f"CLI start-up alone (`mailwarden --help`): median"
              f" {statistics.median(startup) * 1000:.0f}ms")
        day = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%d")
        print(f"{'query':40} {'CLI median':>11} {'CLI worst':>10} {'query only':>11}")
        worst_all = 0.0
        for label, extra, query in SHAPES:
            extra = [day if a == "SINCE" else a for a in extra]
            if "--since" in extra:
                query = review.ListQuery(since=day + "T00:00:00.000000Z",
                                         until=day + "T23:59:59.999999Z")
            cmd = [*MAILWARDEN, "--config", str(config),
                   "quarantine", "list", *extra]
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, cwd=REPO)
                times.append(time.perf_counter() - t)
                if proc.returncode != 0:
                    print(proc.stderr.decode(errors="replace"), file=sys.stderr)
                    return 1
            q = asyncio.run(in_process(store, query, args.runs))
            worst_all = max(worst_all, max(times))
            print(f"{label:40} {statistics.median(times) * 1000:9.0f}ms"
                  f" {max(times) * 1000:8.0f}ms {q * 1000:9.1f}ms")
        print(f"worst end-to-end: {worst_all * 1000:.0f}ms"
              f" ({'under' if worst_all < 1 else 'OVER'} one second)")
        return 0 if worst_all < 1 else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
