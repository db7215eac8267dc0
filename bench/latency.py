"""Per-message latency at one session (issue 10: "added p50 latency per 100 KB
message, excluding clamd's own time, under 5 ms at 1 session").

One client session at a time sends bench/messages.py's ``attach`` message
(~100 KB, a text part and a 72 KB PDF) ``--messages`` times to each target:

  sink       smtp-sink directly (the baseline: client + loopback + the next hop)
  bare+scan  bench/bare_relay.py with one clamd INSTREAM per message (reference)
  mw-full    ``mailwarden serve`` with the full default chain (run.py's config)

and times each message **from sending MAIL FROM to reading the final reply to
the message data** (raw-socket client, plain SMTP, no pipelining, like
smtp-source).  In the same run it times ``--messages`` direct INSTREAM scans of
the same message bytes against the benchmark's clamd (clamd's own time), then
reports

    added p50 = p50(mw-full) - p50(sink) - p50(clamd scan)

against the goal (< 5 ms).  Connection modes (``--modes``):

  new    one connection per message (connect, EHLO, transaction, QUIT), as
         smtp-source and run.py do and as Postfix's smtp client delivers to a
         content filter when there is no backlog; mailwarden (and the bare
         relay) open their next-hop connection at the first MAIL, so that
         connect + EHLO to the next hop falls inside the timed window.  The goal
         verdict uses this mode.
  reuse  one connection per target for the whole run, many transactions on it
         (the next-hop connection is set up once): what a busy Postfix with
         connection caching sees.

The targets take turns in rounds of ``--batch`` messages (order rotating), so
machine noise hits all of them alike.  Exit status 0 whether or not the goal
is met; 1 only if the benchmark itself failed (a message not accepted, a
target died).

    .venv/bin/python bench/latency.py [--messages 300] [--batch 10]
        [--targets sink,bare+scan,mw-full] [--modes new,reuse] [--json FILE] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import messages  # noqa: E402  (bench/ on sys.path)
import run  # noqa: E402

#: Issue 10's goal: added p50 per 100 KB message at 1 session, milliseconds.
GOAL_MS = 5.0
TARGETS = ("sink", "bare+scan", "mw-full")
MODES = ("new", "reuse")
CLAMD_CHUNK = 64 * 1024


# --------------------------------------------------------------------- client


def wire_forms(lf_message: bytes) -> tuple[bytes, bytes]:
    """(DATA payload, raw message) for a message file with LF line endings.

    The payload is what smtp-source sends for ``-F``: every line with CRLF,
    lines starting with "." doubled, then ".\\r\\n".  The raw message (CRLF,
    not dot-stuffed) is what the gateway receives and streams to clamd.
    """
    lines = lf_message.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    raw = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                       for line in lines)
    return stuffed + b".\r\n", raw


class SmtpError(Exception):
    """An unexpected SMTP reply or a broken connection."""


class SmtpClient:
    """A minimal blocking SMTP client: plain SMTP, one command at a time."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 120.0,
                 helo: str = "latency.bench.example") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.expect(220)
        self.command(b"EHLO " + helo.encode(), 250)

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply."""
        text = []
        while True:
            line = self.reader.readline(4096)
            if not line:
                raise SmtpError("connection closed")
            text.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(text)

    def expect(self, code: int) -> str:
        got, text = self.reply()
        if got != code:
            raise SmtpError(f"expected {code}, got {got} {text}")
        return text

    def command(self, line: bytes, code: int) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.expect(code)

    def transaction(self, sender: str, recipient: str, payload: bytes) -> tuple[int, str, float]:
        """MAIL, RCPT, DATA, payload; (final code, text, seconds from MAIL to that reply)."""
        t0 = time.perf_counter()
        self.command(f"MAIL FROM:<{sender}>".encode(), 250)
        self.command(f"RCPT TO:<{recipient}>".encode(), 250)
        self.command(b"DATA", 354)
        self.sock.sendall(payload)
        code, text = self.reply()
        return code, text, time.perf_counter() - t0

    def close(self, quit: bool = True) -> None:
        with contextlib.suppress(OSError, SmtpError, ValueError):
            if quit:
                self.command(b"QUIT", 221)
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


def clamd_scan(socket_path: str, data: bytes, timeout: float = 60.0) -> tuple[str, float]:
    """One ``zINSTREAM`` of ``data`` on a fresh unix-socket connection: (answer, seconds)."""
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall(b"zINSTREAM\0")
        view = memoryview(data)
        for i in range(0, len(view), CLAMD_CHUNK):
            chunk = view[i : i + CLAMD_CHUNK]
            s.sendall(struct.pack("!L", len(chunk)) + chunk)
        s.sendall(struct.pack("!L", 0))
        answer = b""
        while not answer.endswith(b"\0"):
            part = s.recv(4096)
            if not part:
                break
            answer += part
    return answer.rstrip(b"\0").decode("ascii", "replace"), time.perf_counter() - t0


# ---------------------------------------------------------------- code


def snapshot(dest: Path, rev: str | None) -> tuple[Path, str]:
    """The code the targets run, and its description: run.py's copy of the work
    tree, or with ``rev`` the committed tree of that git revision (so a run is
    not disturbed by uncommitted edits in progress)."""
    if not rev:
        return run.snapshot(dest), run.code_version()
    dest.mkdir(parents=True, exist_ok=True)
    root = str(run.ROOT)
    archive = subprocess.run(["git", "-C", root, "archive", rev, *run.SNAPSHOT_DIRS],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    head = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h %s", rev],
                          capture_output=True, text=True, check=True).stdout.strip()
    return dest, f"{head[:72]} (git {rev}, committed tree only)"


# ---------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation between ranks."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = [1000 * x for x in seconds]
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "min": min(ms, default=float("nan")),
            "max": max(ms, default=float("nan"))}


# ---------------------------------------------------------------------- run


class Runner:
    """Sends batches to one target in one connection mode, keeps the timings."""

    def __init__(self, target: run.Target, mode: str, payload: bytes) -> None:
        self.target, self.mode, self.payload = target, mode, payload
        self.txn: list[float] = []      # MAIL FROM -> final DATA reply
        self.session: list[float] = []  # connect -> QUIT reply (mode "new")
        self.errors: list[str] = []
        self.held = 0
        self._conn: SmtpClient | None = None

    @property
    def name(self) -> str:
        return f"{self.target.name}/{self.mode}"

    def batch(self, count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            try:
                if self.mode == "new":
                    conn = SmtpClient(self.target.port)
                else:
                    if self._conn is None:
                        self._conn = SmtpClient(self.target.port)
                    conn = self._conn
                code, text, secs = conn.transaction(messages.SENDER, messages.RECIPIENT,
                                                    self.payload)
                if self.mode == "new":
                    conn.close()
                    self.session.append(time.perf_counter() - t0)
            except (OSError, SmtpError) as exc:
                self.errors.append(f"{self.name}: {exc!r}")
                if self._conn is not None:
                    self._conn.close(quit=False)
                    self._conn = None
                continue
            if code != 250:
                self.errors.append(f"{self.name}: {code} {text}")
                continue
            if "held" in text:
                self.held += 1
            self.txn.append(secs)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def other_load(busy0: int, busy1: int, own0: int, own1: int, wall: float) -> float:
    """Share of the machine's CPU used by processes outside the benchmark."""
    return max(0, (busy1 - busy0) - (own1 - own0)) / (wall * run.CLK_TCK * (os.cpu_count() or 1))


def own_ticks(env: run.Env, targets: list[run.Target]) -> int:
    pids = [env.sink.proc.pid, *([env.clamd_pid] if env.clamd_pid else [])]
    total = run.own_ticks(None, pids)
    for t in targets:
        if t.pid is not None:
            with contextlib.suppress(OSError):
                total += run.tree_ticks(t.pid)
    return total


def measure(args: argparse.Namespace, env: run.Env, targets: list[run.Target],
            payload: bytes, raw: bytes) -> dict[str, Any]:
    """The interleaved rounds; returns timings, loads and checks."""
    runners = [Runner(t, mode, payload) for t in targets for mode in args.modes]
    scans: list[float] = []
    answers: set[str] = set()
    rounds = -(-args.messages // args.batch)
    loads: list[float] = []
    sent_before = env.sink.settle(0.1)
    t_start = time.perf_counter()
    busy_start, own_start = run.machine_busy_ticks(), own_ticks(env, targets)
    for r in range(rounds):
        n = min(args.batch, args.messages - r * args.batch)
        steps: list[Any] = [*runners, "clamd"]
        rot = r % len(steps)
        busy0, own0, t0 = run.machine_busy_ticks(), own_ticks(env, targets), time.perf_counter()
        for step in steps[rot:] + steps[:rot]:
            if step == "clamd":
                for _ in range(n):
                    answer, secs = clamd_scan(env.clamd_socket, raw)
                    answers.add(answer)
                    scans.append(secs)
            else:
                step.batch(n)
        loads.append(other_load(busy0, run.machine_busy_ticks(), own0, own_ticks(env, targets),
                                time.perf_counter() - t0))
        for t in targets:
            dead = t.died()
            if dead:
                raise RuntimeError(dead)
        if (r + 1) % max(1, rounds // 5) == 0:
            print(f"  round {r + 1}/{rounds}, other load {loads[-1]:.0%}", file=sys.stderr)
    wall = time.perf_counter() - t_start
    load = other_load(busy_start, run.machine_busy_ticks(), own_start, own_ticks(env, targets),
                      wall)
    for rn in runners:
        rn.close()
    expected = sum(len(rn.txn) for rn in runners) - sum(rn.held for rn in runners)
    arrived = env.sink.wait_for(sent_before + expected, 10) - sent_before
    disp = {t.name: dict(t.dispositions(args.messages * len(args.modes), timeout=5))
            for t in targets if t.name.startswith("mw")}
    logged = {t.name: logged_times(t, args.warmup) for t in targets if t.name.startswith("mw")}
    return {
        "runners": runners, "scans": scans, "clamd_answers": sorted(answers),
        "other_load": load, "other_load_max_round": max(loads, default=0.0),
        "other_load_median_round": percentile(loads, 50), "wall_s": wall,
        "delivered": arrived, "expected": expected, "dispositions": disp, "logged": logged,
    }


def logged_times(target: run.Target, skip: int) -> list[float]:
    """mailwarden's own per-message ``time=`` (chain, edits and relaying the DATA),
    from its log, without the first ``skip`` (warm-up) messages."""
    if target.log_path is None or not target.log_path.exists():
        return []
    text = target.log_path.read_text(errors="replace")
    return [float(x) for x in re.findall(r" disposition=\S+ .* time=([\d.]+)s", text)][skip:]


def report(args: argparse.Namespace, res: dict[str, Any], size: int, code: str) -> dict[str, Any]:
    """Print the results; return them as a JSON-able dict."""
    runners: list[Runner] = res["runners"]
    by = {(rn.target.name, rn.mode): rn for rn in runners}
    clamd = stats_ms(res["scans"])
    print(f"\nmailwarden latency benchmark: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\ncode: {code}\n"
          f"message: bench/messages.py 'attach', {size:,} bytes as received; "
          f"{args.messages} per target and mode, 1 session, rounds of {args.batch} "
          f"(targets interleaved); {res['wall_s']:.0f} s\n"
          f"other load: {res['other_load']:.0%} over the run (median round "
          f"{res['other_load_median_round']:.0%}, worst round {res['other_load_max_round']:.0%})\n")
    print("timed: MAIL FROM sent -> final reply to the message data read (ms)\n")
    print("| target | mode | n | p50 | p90 | p99 | max | session p50 (connect..QUIT) | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    out_targets = []
    for rn in runners:
        st = stats_ms(rn.txn)
        sess = stats_ms(rn.session) if rn.session else None
        print(f"| {rn.target.name} | {rn.mode} | {st['n']} | {st['p50']:.2f} | {st['p90']:.2f} "
              f"| {st['p99']:.2f} | {st['max']:.2f} | "
              f"{'–' if sess is None else format(sess['p50'], '.2f')} | {len(rn.errors)} |")
        out_targets.append({"target": rn.target.name, "mode": rn.mode, **st,
                            "session": sess, "errors": rn.errors[:20], "held": rn.held,
                            "samples_ms": [round(1000 * x, 4) for x in rn.txn]})
    print(f"| clamd INSTREAM (direct) | new conn | {clamd['n']} | {clamd['p50']:.2f} "
          f"| {clamd['p90']:.2f} | {clamd['p99']:.2f} | {clamd['max']:.2f} | – | – |")
    print(f"\nclamd answered: {', '.join(res['clamd_answers'])}")
    print(f"delivered to smtp-sink: {res['delivered']}/{res['expected']}"
          + ("" if res["delivered"] == res["expected"] else "  ⚠"))
    for name, d in res["dispositions"].items():
        print(f"{name} dispositions: " + ", ".join(f"{k} {v}" for k, v in sorted(d.items())))
    for name, times in res["logged"].items():
        if times:
            st = stats_ms(times)
            print(f"{name} logged time= (parse, chain, edits, DATA to the next hop; all modes): "
                  f"p50 {st['p50']:.2f} ms, p90 {st['p90']:.2f} ms, n {st['n']}")
    print(f"mw-full chain: {','.join(args.chain_used)}")

    verdicts = []
    print(f"\nIssue 10: added p50 = p50(target) - p50(sink) - p50(clamd scan) "
          f"[goal for mw-full: < {GOAL_MS:g} ms, mode 'new' decides]")
    for mode in args.modes:
        sink = by.get(("sink", mode))
        if sink is None or not sink.txn:
            continue
        s50 = percentile(sink.txn, 50) * 1000
        for name in dict.fromkeys(("mw-full", *args.targets)):
            rn = by.get((name, mode))
            if name == "sink" or rn is None or not rn.txn:
                continue
            t50 = percentile(rn.txn, 50) * 1000
            scanning = run.scans(name) and ("clamav" in args.chain_used
                                            or not name.startswith("mw-full"))
            scan = clamd["p50"] if scanning else 0.0
            added = t50 - s50 - scan
            line = (f"  {name:11} {mode:5}: {t50:6.2f} - {s50:.2f}"
                    + (f" - {scan:.2f}" if scanning else "       ")
                    + f" = {added:6.2f} ms")
            if name == "mw-full":
                met = added < GOAL_MS
                line += f"  -> goal {'met' if met else 'NOT met'}"
                if mode != "new":
                    line += " (informative)"
                verdicts.append({"mode": mode, "added_p50_ms": added, "met": met})
            print(line)
    return {"code": code, "message_bytes": size, "messages": args.messages,
            "batch": args.batch, "targets": out_targets, "clamd": clamd,
            "clamd_samples_ms": [round(1000 * x, 4) for x in res["scans"]],
            "other_load": res["other_load"], "other_load_max_round": res["other_load_max_round"],
            "delivered": res["delivered"], "expected": res["expected"],
            "dispositions": res["dispositions"], "goal_ms": GOAL_MS, "verdicts": verdicts,
            "chain": list(args.chain_used),
            "logged_ms": {k: stats_ms(v) for k, v in res["logged"].items() if v}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="mailwarden's added per-message latency at 1 session (issue 10); "
                    "see the module docstring and bench/README.md")
    p.add_argument("--messages", type=int, default=300,
                   help="measured messages per target and mode (default %(default)s)")
    p.add_argument("--batch", type=int, default=10,
                   help="messages per target per round (default %(default)s)")
    p.add_argument("--warmup", type=int, default=20,
                   help="unmeasured messages per target first (default %(default)s)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="targets, from: " + ", ".join(run.ALL_TARGETS)
                   + " (default %(default)s; sink and mw-full are needed for the goal)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="connection modes: new (one per message), reuse "
                        "(default %(default)s)")
    p.add_argument("--chain", help="mw-full's chain, comma-separated (default: "
                                   "gateway.config.DEFAULT_CHAIN; for finding where the time goes)")
    p.add_argument("--rev", metavar="REV",
                   help="run the code of this git revision (e.g. HEAD) instead of the work tree")
    p.add_argument("--json", metavar="FILE", help="write the samples and the summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    for t in args.targets:
        if t not in run.ALL_TARGETS:
            p.error(f"unknown target {t!r}")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    if args.messages < 1 or args.batch < 1:
        p.error("--messages and --batch must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run.check_tools(need_clamd=True)
    from gateway.config import DEFAULT_CHAIN

    workdir = Path(tempfile.mkdtemp(prefix="mw-latency-"))
    path = messages.write_all(workdir / "messages", ("attach",))["attach"]
    payload, raw = wire_forms(path.read_bytes())
    sink = clamd = None
    targets = [run.Target(name) for name in args.targets]
    ok = True
    try:
        sink = run.Sink(workdir)
        clamd = run.start_clamd()
        chain = tuple(c for c in args.chain.split(",") if c) if args.chain else DEFAULT_CHAIN
        src, code = snapshot(workdir / "src", args.rev)
        env = run.Env(workdir, sink, clamd.socket, run.clamd_pid(clamd), chain, src=src)
        env.generation = 1
        args.chain_used = chain
        print(f"latency: targets {','.join(args.targets)}, modes {','.join(args.modes)}, "
              f"{args.messages} messages each; workdir {workdir}", file=sys.stderr)
        for t in targets:
            t.start(env)
            warm = Runner(t, "new", payload)
            warm.batch(args.warmup)
            if warm.errors:
                raise RuntimeError(f"warm-up of {t.name} failed: {warm.errors[:3]}")
            t.dispositions(args.warmup, timeout=5)
        for _ in range(3):  # clamd warm-up
            clamd_scan(clamd.socket, raw)
        res = measure(args, env, targets, payload, raw)
        out = report(args, res, len(raw), code)
        errors = [e for rn in res["runners"] for e in rn.errors]
        ok = not errors and res["delivered"] == res["expected"]
        if errors:
            print("\nerrors:\n  " + "\n  ".join(errors[:10]), file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    finally:
        run.stop_all(targets, sink, clamd)
        if args.keep:
            print(f"\nkept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
