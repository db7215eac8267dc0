"""attachment_types filter micro-benchmark (issue 4).

Prints two numbers:

* the filter's time per ordinary message: a ~100 KB message with one PDF
  attachment, ``await filter.check(mail)`` timed end to end (thread-pool hop,
  MIME parse, libmagic, SHA-256), median and p95 over N runs; a fresh ``Mail``
  each run, with and without the MIME parse (in the gateway the parse is
  shared by all filters);
* peak RSS while checking a 200 MB zip bomb and a 200 MB gzip bomb (ru_maxrss
  of a fresh interpreter, before and after the check).

    python bench/attachment_types_filter.py [--runs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from filters.attachment_types import AttachmentTypesFilter, Settings  # noqa: E402
from filters.base import FilterContext  # noqa: E402
from gateway.message import Direction, Mail  # noqa: E402
from tests.support.attachment_samples import pdf  # noqa: E402
from tests.support.harness import make_message  # noqa: E402

BOMB = """
import resource
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from filters.attachment_types import AttachmentTypesFilter, Settings
from filters.base import FilterContext
from gateway.message import Attachment
from tests.support.attachment_samples import zip_bomb
bomb = zip_bomb()
ctx = FilterContext("h", (), ThreadPoolExecutor(1), lambda: datetime.now(UTC), 1 << 26)
f = AttachmentTypesFilter(Settings(), ctx)
f.scan_attachment(Attachment("warmup.pdf", "application/pdf", b"%PDF-1.4", 0, False), None)
import sys, zlib
if sys.argv[1] == "gzip":  # a gzip stream of 200 MB zeros: must be inflated to be bounded
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join([c.compress(bytes(1 << 20)) for _ in range(200)] + [c.flush()])
name = "bomb.zip" if sys.argv[1] == "zip" else "bomb.gz"
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = f.scan_attachment(Attachment(name, "application/zip", bomb, 0, False), None)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(bomb), before, after, report.hits[0].describe())
"""


def mail_of(raw: bytes) -> Mail:
    return Mail(queue_id="BENCH", mail_from="a@ext.test", rcpt_tos=("b@example.com",), raw=raw,
                client_addr="192.0.2.1", direction=Direction.INBOUND,
                received=datetime.now(UTC))


async def time_checks(runs: int, parsed: bool) -> list[float]:
    ctx = FilterContext("bench", ("example.com",), ThreadPoolExecutor(1),
                        lambda: datetime.now(UTC), 1 << 26)
    filt = AttachmentTypesFilter(Settings(), ctx)
    raw = make_message(attachments=[("report.pdf", "application/pdf", pdf(72_000))])
    times = []
    for i in range(runs + 10):
        mail = mail_of(raw)
        if parsed:
            _ = mail.attachments  # the MIME parse is shared by the chain: leave it out
        t0 = time.perf_counter()
        verdict = await filt.check(mail)
        dt = time.perf_counter() - t0
        assert verdict.outcome.name == "RELAY", verdict
        if i >= 10:  # warm-up: thread start, libmagic database load
            times.append(dt)
    await filt.aclose()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    print("message: ~100 KB with one PDF attachment")
    for parsed in (False, True):
        times = asyncio.run(time_checks(args.runs, parsed))
        q = statistics.quantiles(times, n=20)
        what = "Mail pre-parsed" if parsed else "incl. MIME parse"
        print(f"filter check time ({what}) over {len(times)} runs: median "
              f"{statistics.median(times) * 1000:.2f} ms, p95 {q[18] * 1000:.2f} ms, "
              f"min {min(times) * 1000:.2f} ms")
    for kind in ("zip", "gzip"):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", BOMB, kind], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split(" ", 3)
        size, before, after, hit = out
        print(f"{kind} bomb ({int(size) // 1024} KB compressed, 200 MB of zeros): peak RSS "
              f"{int(before) / 1024:.1f} MB before, {int(after) / 1024:.1f} MB after the check "
              f"({time.perf_counter() - t0:.1f} s incl. interpreter start); {hit.strip()}")


if __name__ == "__main__":
    main()
