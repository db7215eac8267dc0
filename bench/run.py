"""mailwarden's throughput benchmark (issues 2 and 10).

One run starts its own Postfix ``smtp-sink`` (the fast next hop), its own
clamd (offline signature DB: EICAR + clamav-testfiles hashes), and every
target as a real subprocess, then drives load with Postfix's ``smtp-source``
(one connection per message) and prints a table of msgs/s, gateway CPU per
message (/proc), peak RSS (VmHWM), the sink's delivery count and the ratio to
the bare relay measured in the same run.

    python bench/run.py [--quick] [--matrix small,attach,virus,big]
                        [--sessions 1,20] [--messages N] [--runs 3]
                        [--targets sink,bare,...] [--peers] [--json FILE]

Targets (each cell runs every selected target; ``+uv`` = on uvloop):

  sink          smtp-source straight to smtp-sink
  bare          bench/bare_relay.py: aiosmtpd + aiosmtplib relay
  bare+uv       the same on uvloop
  bare+scan     the bare relay + one clamd INSTREAM per message
  bare+scan+uv  the same on uvloop (issue 10's baseline)
  mw-empty      mailwarden, ``chain = []`` (issue 2)
  mw-empty+uv   the same on uvloop (bench/uvloop_serve.py)
  mw-full       mailwarden, the full default chain (issue 10)
  mw-full+uv    the same on uvloop

Each (run, message set) starts every target afresh (so VmHWM is this set's
peak, and the store starts empty) and warms it up with a few unmeasured
messages; within a run the targets take turns (the order rotates between
runs); the table shows medians over the runs (peak RSS: the maximum).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import messages  # noqa: E402  (bench/ on sys.path)

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
CLK_TCK = os.sysconf("SC_CLK_TCK")

ALL_TARGETS = ("sink", "bare", "bare+uv", "bare+scan", "bare+scan+uv",
               "mw-empty", "mw-empty+uv", "mw-full", "mw-full+uv")

#: Which bare relay each target is compared with (same event loop).
BASELINE = {
    "mw-empty": "bare", "mw-empty+uv": "bare+uv",
    "mw-full": "bare+scan", "mw-full+uv": "bare+scan+uv",
    "bare+scan": "bare", "bare+scan+uv": "bare+uv",
}

#: Messages per cell: (1 session, more sessions).  --messages overrides.
COUNTS = {"small": (800, 2000), "attach": (500, 1000), "virus": (500, 1000), "big": (16, 40)}
QUICK_COUNTS = {"small": (150, 400), "attach": (100, 200), "virus": (100, 200), "big": (4, 8)}


def scans(target: str) -> bool:
    """True for targets that scan for viruses (virus messages must not arrive)."""
    return "scan" in target or target.startswith("mw-full")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_smtp(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """Wait until something on ``port`` greets with 220."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered 220 on port {port} within {timeout:g} s")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_hwm(pid: int) -> None:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# ------------------------------------------------------------------ smtp-sink


class Sink:
    """smtp-sink with its running counter (-c) read in a thread."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.messages = 0
        self._cond = threading.Condition()
        user = ["-u", "root"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-c", *user, f"127.0.0.1:{self.port}", "1000"],
            stdout=subprocess.PIPE, stderr=(workdir / "smtp-sink.err").open("wb"),
            stdin=subprocess.DEVNULL,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_smtp(self.port, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(4096)
            if not chunk:
                return
            buf += chunk
            *records, buf = re.split(rb"[\r\n]", buf)
            for rec in reversed(records):
                m = re.search(rb"mesg=(\d+)", rec)
                if m:
                    with self._cond:
                        self.messages = int(m.group(1))
                        self._cond.notify_all()
                    break

    def wait_for(self, count: int, timeout: float) -> int:
        """Wait (bounded) until at least ``count`` messages arrived; return the count."""
        with self._cond:
            self._cond.wait_for(lambda: self.messages >= count, timeout)
            return self.messages

    def settle(self, quiet: float = 0.3) -> int:
        """Wait until the counter has not moved for ``quiet`` seconds."""
        last = -1
        while True:
            with self._cond:
                now = self.messages
            if now == last:
                return now
            last = now
            time.sleep(quiet)

    def stop(self) -> None:
        stop_process(self.proc)


# ---------------------------------------------------------------------- clamd


class _LocalClamd:
    """A minimal private clamd (used when tests/support/clamd.py is absent)."""

    def __init__(self) -> None:
        import hashlib

        clamd = shutil.which("clamd") or "/usr/sbin/clamd"
        self.workdir = Path(tempfile.mkdtemp(prefix="mw-bench-clamd-"))
        self.socket = str(self.workdir / "clamd.sock")
        db = self.workdir / "db"
        db.mkdir()
        (db / "bench.ndb").write_text(f"Eicar-Test-Signature:0:*:{messages.eicar().hex()}\n")
        lines = []
        testfiles = Path("/usr/share/clamav-testfiles")
        if testfiles.is_dir():
            for p in sorted(testfiles.iterdir()):
                if p.is_file():
                    data = p.read_bytes()
                    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
                    lines.append(f"{md5}:{len(data)}:ClamAV-Test-File.{p.name}\n")
        if lines:
            (db / "bench.hdb").write_text("".join(lines))
        (self.workdir / "tmp").mkdir()
        conf = self.workdir / "clamd.conf"
        conf.write_text(
            f"Foreground yes\nLocalSocket {self.socket}\nDatabaseDirectory {db}\n"
            f"TemporaryDirectory {self.workdir / 'tmp'}\nLogFile {self.workdir / 'clamd.log'}\n"
            "MaxThreads 4\nScanMail yes\nScanArchive yes\nStreamMaxLength 60M\n"
            "AlertExceedsMax yes\nBytecode no\nSelfCheck 3600\n"
        )
        self._proc = subprocess.Popen([clamd, f"--config-file={conf}"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)

    def start(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"clamd exited with {self._proc.returncode}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(self.socket)
                s.sendall(b"nPING\n")
                if s.recv(16) == b"PONG\n":
                    return
            time.sleep(0.05)
        raise RuntimeError("clamd did not answer PING within 60 s")

    def close(self) -> None:
        stop_process(self._proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_clamd() -> Any:
    """The suite's clamd helper if present, else the local one; started."""
    try:
        from tests.support.clamd import Clamd
    except ImportError:
        clamd: Any = _LocalClamd()
    else:
        clamd = Clamd()
    clamd.start()
    return clamd


def clamd_pid(clamd: Any) -> int | None:
    proc = getattr(clamd, "_proc", None)
    return proc.pid if proc is not None else None


# -------------------------------------------------------------------- targets


def gateway_config(path: Path, *, listen: int, sink: int, store: Path,
                   chain: tuple[str, ...], clamd_socket: str) -> Path:
    """Write a mailwarden config for the benchmark and validate it."""
    from gateway.config import ConfigError, load_config

    chain_toml = ", ".join(f'"{c}"' for c in chain)
    text = (
        "# generated by bench/run.py\n"
        "[gateway]\n"
        f'listen = "127.0.0.1:{listen}"\n'
        f'next_hop = "127.0.0.1:{sink}"\n'
        'hostname = "mailwarden.bench.example"\n'
        f'internal_domains = ["{messages.INTERNAL_DOMAIN}"]\n'
        "# loopback is not trusted: smtp-source's mail counts as inbound from outside\n"
        "trusted_networks = []\n"
        "max_sessions = 1000\n"
        "[store]\n"
        f'path = "{store}"\n'
        "[filters]\n"
        f"chain = [{chain_toml}]\n"
    )
    if "clamav" in chain:
        text += f'[filters.clamav]\naddress = "{clamd_socket}"\n'
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        raise SystemExit(f"bench: generated config is invalid: {exc}") from None
    return path


@dataclass
class Target:
    """One system under test, started as a subprocess (sink: the shared sink)."""

    name: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    log_offset: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, env: Env) -> None:
        if self.name == "sink":
            self.port = env.sink.port
            return
        self.port = free_port()
        py = sys.executable
        uv = self.name.endswith("+uv")
        work = env.workdir / f"{self.name}-{env.generation}"
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "stderr.log"
        self.log_offset = 0
        if self.name.startswith("bare"):
            argv = [py, str(BENCH / "bare_relay.py"), "--listen", f"127.0.0.1:{self.port}",
                    "--next-hop", f"127.0.0.1:{env.sink.port}"]
            if "scan" in self.name:
                argv += ["--clamd", env.clamd_socket]
            if uv:
                argv.append("--uvloop")
        else:
            chain = env.full_chain if self.name.startswith("mw-full") else ()
            conf = gateway_config(work / "config.toml", listen=self.port, sink=env.sink.port,
                                  store=work / "store", chain=chain,
                                  clamd_socket=env.clamd_socket)
            entry = [str(BENCH / "uvloop_serve.py")] if uv else ["-m", "gateway.cli"]
            argv = [py, *entry, "serve", "--config", str(conf)]
        pypath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            argv, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"), env={**os.environ, "PYTHONPATH": pypath},
        )
        wait_smtp(self.port, self.proc)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def dispositions(self, expected: int, timeout: float = 5) -> Counter[str]:
        """Count mailwarden's per-message log lines since the last call."""
        counts: Counter[str] = Counter()
        if self.log_path is None or not self.name.startswith("mw"):
            return counts
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("rb") as fh:
                fh.seek(self.log_offset)
                data = fh.read()
            complete = data[: data.rfind(b"\n") + 1]
            counts = Counter(m.decode() for m in re.findall(rb" disposition=([\w-]+)", complete))
            if sum(counts.values()) >= expected or time.monotonic() > deadline:
                self.log_offset += len(complete)
                return counts
            time.sleep(0.05)


@dataclass
class Env:
    workdir: Path
    sink: Sink
    clamd_socket: str
    clamd_pid: int | None
    full_chain: tuple[str, ...]
    generation: int = 0


# ----------------------------------------------------------------------- cells


@dataclass
class Sample:
    """One measured run of one cell."""

    target: str
    mset: str
    sessions: int
    messages: int
    wall: float
    delivered: int
    cpu_ms: float | None
    clamd_ms: float | None
    rss_mb: float | None
    dispositions: dict[str, int] = field(default_factory=dict)
    source_rc: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.wall if self.wall > 0 else 0.0


def smtp_source(port: int, path: Path, sessions: int, count: int, timeout: float) -> int:
    argv = [SMTP_SOURCE, "-A", "-s", str(sessions), "-m", str(count), "-F", str(path),
            "-f", messages.SENDER, "-t", messages.RECIPIENT, "-M", "source.bench.example",
            f"127.0.0.1:{port}"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  smtp-source timed out after {timeout:g} s", file=sys.stderr)
        return -1
    if done.returncode:
        print(f"  smtp-source exit {done.returncode}: {done.stderr.decode()[-300:]}",
              file=sys.stderr)
    return done.returncode


def warm_up(target: Target, env: Env, path: Path, mset: str) -> None:
    count = 4 if mset == "big" else 40
    before = env.sink.settle(0.05)
    smtp_source(target.port, path, 4, count, timeout=300)
    env.sink.wait_for(before + (0 if scans(target.name) and mset == "virus" else count), 5)
    target.dispositions(count, timeout=2)


def measure(target: Target, env: Env, path: Path, mset: str, sessions: int,
            count: int) -> Sample:
    before_sink = env.sink.settle(0.05)
    pid = target.pid
    if pid is not None:
        reset_hwm(pid)
        cpu0 = cpu_ticks(pid)
    cl0 = cpu_ticks(env.clamd_pid) if env.clamd_pid else 0
    t0 = time.perf_counter()
    rc = smtp_source(target.port, path, sessions, count,
                     timeout=120 + count * (2.0 if mset == "big" else 0.2))
    wall = time.perf_counter() - t0
    held = scans(target.name) and mset == "virus"
    arrived = env.sink.wait_for(before_sink + (0 if held else count), 5)
    arrived = env.sink.settle(0.1) if held else arrived
    disp = target.dispositions(count)
    cpu_ms = clamd_ms = rss = None
    if pid is not None:
        cpu_ms = (cpu_ticks(pid) - cpu0) * 1000 / CLK_TCK / count
        rss = vm_hwm_kb(pid) / 1024
    if env.clamd_pid and (scans(target.name)):
        clamd_ms = (cpu_ticks(env.clamd_pid) - cl0) * 1000 / CLK_TCK / count
    return Sample(target.name, mset, sessions, count, wall, arrived - before_sink,
                  cpu_ms, clamd_ms, rss, dict(disp), rc)


# ---------------------------------------------------------------------- report


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(samples: list[Sample]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Median per (set, sessions, target) and ratios."""
    groups: dict[tuple[str, int, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.mset, s.sessions, s.target), []).append(s)
    out: dict[tuple[str, int, str], dict[str, Any]] = {}
    for key, group in groups.items():
        disp: Counter[str] = Counter()
        for s in group:
            disp.update(s.dispositions)
        target = key[2]
        held = scans(target) and key[0] == "virus"
        ok = all((s.delivered == 0) if held else (s.delivered == s.messages) for s in group)
        out[key] = {
            "rate": median([s.rate for s in group]),
            "cpu_ms": median([s.cpu_ms for s in group]),
            "clamd_ms": median([s.clamd_ms for s in group]),
            "rss_mb": max((s.rss_mb for s in group if s.rss_mb is not None), default=None),
            "latency_ms": median([1000 * s.wall * s.sessions / s.messages for s in group]),
            "delivered": sum(s.delivered for s in group),
            "sent": sum(s.messages for s in group),
            "runs": len(group),
            "dispositions": dict(disp),
            "ok": ok and all(s.source_rc == 0 for s in group),
        }
    for (mset, sessions, target), row in out.items():
        base = BASELINE.get(target)
        b = out.get((mset, sessions, base)) if base else None
        row["vs_base"] = row["rate"] / b["rate"] if b and b["rate"] else None
        row["base"] = base if b else None
        sink = out.get((mset, sessions, "sink"))
        row["vs_sink"] = row["rate"] / sink["rate"] if sink and target != "sink" else None
    return out


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def print_table(summary: dict[tuple[str, int, str], dict[str, Any]],
                order: list[str], sets: list[str], sessions: list[int]) -> None:
    head = ("| set | sess | target | msgs/s | vs baseline | vs sink | ms/msg/session "
            "| CPU ms/msg | clamd ms/msg | peak RSS MB | delivered/sent | dispositions |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for mset in sets:
        for s in sessions:
            for target in order:
                row = summary.get((mset, s, target))
                if row is None:
                    continue
                vs = "–" if row["vs_base"] is None else f"{row['vs_base']:.0%} of {row['base']}"
                note = "" if row["ok"] else " ⚠"
                if scans(target) and mset == "virus":
                    held = row["sent"] - row["delivered"]
                    deliv = f"{row['delivered']}/{row['sent']} ({held} held){note}"
                else:
                    deliv = f"{row['delivered']}/{row['sent']}{note}"
                disp = ", ".join(f"{k} {v}" for k, v in sorted(row["dispositions"].items()))
                print(f"| {mset} | {s} | {target} | {row['rate']:,.0f} | {vs} "
                      f"| {fmt(row['vs_sink'], '.1%')} | {fmt(row['latency_ms'], '.2f')} "
                      f"| {fmt(row['cpu_ms'], '.2f')} | {fmt(row['clamd_ms'], '.2f')} "
                      f"| {fmt(row['rss_mb'], '.0f')} | {deliv} | {disp or '–'} |")


def print_issue2(summary: dict[tuple[str, int, str], dict[str, Any]], sessions: list[int]) -> None:
    print("\nIssue 2 (small messages, empty chain vs bare relay; goal >= 90%):")
    for s in sessions:
        for mw in ("mw-empty", "mw-empty+uv"):
            row = summary.get(("small", s, mw))
            if row is None:
                continue
            base = summary.get(("small", s, BASELINE[mw]))
            sink = summary.get(("small", s, "sink"))
            parts = [f"  {s:>2} sessions {mw:<12} {row['rate']:7,.0f} msgs/s"]
            if base:
                parts.append(f"{BASELINE[mw]} {base['rate']:,.0f}/s -> {row['vs_base']:.0%}"
                             + (" (goal met)" if row["vs_base"] >= 0.9 else " (goal NOT met)"))
            if sink:
                parts.append(f"sink {sink['rate']:,.0f}/s")
            parts.append(f"CPU {fmt(row['cpu_ms'], '.2f')} s per 1,000 msgs")
            parts.append(f"peak RSS {fmt(row['rss_mb'], '.0f')} MB")
            print("; ".join(parts))


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="mailwarden throughput benchmark (smtp-source -> target -> smtp-sink)")
    p.add_argument("--quick", action="store_true", help="few messages, one run (~2 min)")
    p.add_argument("--matrix", default=",".join(messages.SETS),
                   help="message sets (default: %(default)s)")
    p.add_argument("--sessions", default="1,20", help="parallel sessions (default: %(default)s)")
    p.add_argument("--messages", type=int, help="messages per cell (default: per set)")
    p.add_argument("--runs", type=int, help="runs per cell, interleaved (default 3; quick 1)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="targets (default: all: %(default)s)")
    p.add_argument("--chain", help="the full chain to test (default: gateway.config.DEFAULT_CHAIN)")
    p.add_argument("--peers", action="store_true",
                   help="also run amavisd-new and clamsmtp (not implemented here)")
    p.add_argument("--json", metavar="FILE", help="write every sample and the summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = p.parse_args(argv)
    args.matrix = [m for m in args.matrix.split(",") if m]
    for m in args.matrix:
        if m not in messages.SETS:
            p.error(f"unknown message set {m!r} (known: {', '.join(messages.SETS)})")
    args.sessions = [int(s) for s in args.sessions.split(",") if s]
    args.targets = [t for t in args.targets.split(",") if t]
    for t in args.targets:
        if t not in ALL_TARGETS:
            p.error(f"unknown target {t!r} (known: {', '.join(ALL_TARGETS)})")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    return args


def check_tools(need_clamd: bool) -> None:
    missing = [t for t in (SMTP_SOURCE, SMTP_SINK) if not os.access(t, os.X_OK)]
    if need_clamd and not (shutil.which("clamd") or os.access("/usr/sbin/clamd", os.X_OK)):
        missing.append("clamd")
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)}: "
                         "apt-get install postfix clamav-daemon clamav-testfiles")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    need_clamd = any(scans(t) for t in args.targets)
    check_tools(need_clamd)
    if args.peers:
        print("--peers: amavisd-new and clamsmtp side-by-side runs are not implemented here; "
              "see bench/README.md for the reference figures.", file=sys.stderr)
    from gateway.config import DEFAULT_CHAIN

    full_chain = tuple(args.chain.split(",")) if args.chain else DEFAULT_CHAIN
    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-"))
    files = messages.write_all(workdir / "messages", tuple(args.matrix))
    counts = QUICK_COUNTS if args.quick else COUNTS
    sink = clamd = None
    targets = [Target(name) for name in args.targets]
    samples: list[Sample] = []
    t_start = time.monotonic()
    try:
        sink = Sink(workdir)
        clamd = start_clamd() if need_clamd else None
        env = Env(workdir, sink, clamd.socket if clamd else "", clamd_pid(clamd) if clamd else None,
                  full_chain)
        print(f"bench: {len(args.targets)} targets x {len(args.matrix)} sets x "
              f"{len(args.sessions)} session counts x {args.runs} runs; "
              f"full chain = {','.join(full_chain)}; workdir {workdir}", file=sys.stderr)
        for run in range(args.runs):
            rot = run % len(targets)
            order = targets[rot:] + targets[:rot]
            for mset in args.matrix:
                env.generation += 1
                for t in order:
                    t.start(env)
                    warm_up(t, env, files[mset], mset)
                for sessions in args.sessions:
                    n = args.messages or counts[mset][0 if sessions == 1 else 1]
                    for t in order:
                        time.sleep(0.2)  # let the previous target's background work finish
                        smp = measure(t, env, files[mset], mset, sessions, n)
                        samples.append(smp)
                        print(f"  run {run + 1} {mset:6} s={sessions:<3} {t.name:13} "
                              f"{smp.rate:8,.1f} msgs/s  cpu {fmt(smp.cpu_ms, '.2f')} ms/msg  "
                              f"rss {fmt(smp.rss_mb, '.0f')} MB  delivered {smp.delivered}/{n}"
                              + (f"  {smp.dispositions}" if smp.dispositions else ""),
                              file=sys.stderr)
                for t in order:
                    t.stop()
    finally:
        for t in targets:
            t.stop()
        if sink is not None:
            sink.stop()
        if clamd is not None:
            clamd.close()
    summary = summarize(samples)
    print(f"\nmailwarden benchmark: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.runs} run(s) per cell "
          f"(medians), {time.monotonic() - t_start:.0f} s\n")
    print_table(summary, list(args.targets), args.matrix, args.sessions)
    print_issue2(summary, args.sessions)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "samples": [s.__dict__ | {"rate": s.rate} for s in samples],
            "summary": [{"set": k[0], "sessions": k[1], "target": k[2], **v}
                        for k, v in summary.items()],
        }, indent=1))
    if args.keep:
        print(f"\nkept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(row["ok"] for row in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
