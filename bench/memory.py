"""mailwarden's memory under load (issue 10's memory goals).

Two measurements, each on a fresh ``mailwarden serve`` (the full default
chain, run.py's generated config: smtp-sink as next hop, loopback untrusted so
the mail is inbound and the external-attachments banner applies) with the
benchmark's own clamd (tests/support/clamd.py) and smtp-sink:

soak   ``--sessions`` (50) concurrent client sessions, each on one connection
       sending 1 MB messages back to back (a text part and a base64 random
       attachment named data.pdf; one message in 20 also carries EICAR and is
       held) for ``--seconds`` (60), as tests/integration/test_soak.py does.
       Reports the gateway's idle RSS before the load (the baseline) and its
       peak RSS during it, against the goal **peak RSS < 300 MB**.
big    one ``--big-mb`` (50) MB message (a text part and a random attachment
       named ``setup.exe``, which attachment_types holds as an executable by
       name; ``max_message_size`` raised to 60 MiB, clamd's StreamMaxLength)
       sent once.  Reports RSS before, peak RSS, peak / size and
       (peak - before) / size against the goal **peak RSS < 4x the message
       size** (the verdict uses peak / size, the literal reading; both are
       printed), and checks the message was held (reply, log line, quarantine
       row and file).

"RSS" (in MiB, as run.py's "MB") is the serve process tree: the serve process plus its children
(external_attachments' forkserver and its worker processes, which DKIM-check
messages over 512 KB).  Peak = the sum of the members' VmHWM
(``/proc/PID/status``, reset through ``clear_refs`` when the load starts; a
sum over processes that share pages overstates a little); the serve process's
own VmHWM and the highest sampled sum of VmRSS (every 50 ms) are printed too.

Exit status 0 whether or not a goal is met; 1 only if the benchmark itself
failed (errors from the gateway, a message not where its reply says).

    .venv/bin/python bench/memory.py [--seconds 60] [--sessions 50] [--big-mb 50]
        [--only soak|big] [--json FILE] [--keep]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import messages  # noqa: E402  (bench/ on sys.path)
import run  # noqa: E402
from latency import SmtpClient, SmtpError, other_load, snapshot, wire_forms  # noqa: E402

MB = 1_000_000
MIB = 1 << 20
SOAK_GOAL_MB = 300.0
BIG_GOAL_FACTOR = 4.0
#: clamd's StreamMaxLength in tests/support/clamd.py; the big run's max_message_size.
BIG_MAX_MESSAGE_SIZE = 60 * MIB


# ------------------------------------------------------------------- messages


def build_message(subject: str, msgid: str, attachments: list[tuple[str, str, bytes]]) -> bytes:
    """A multipart message, CRLF line endings as received (no dot-stuffing needed:
    no line starts with a dot)."""
    boundary = "=_mailwarden_memory_" + msgid
    head = messages._headers(subject, msgid, f'Content-Type: multipart/mixed; boundary="{boundary}"')
    parts = [("\r\n".join(head) + "\r\n\r\nThis is a multi-part message in MIME format.\r\n\r\n"
              f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n"
              "Content-Transfer-Encoding: 7bit\r\n\r\n"
              + "\r\n".join(messages.text_lines(1500)) + "\r\n").encode("ascii")]
    for name, ctype, data in attachments:
        parts.append(
            (f"\r\n--{boundary}\r\nContent-Type: {ctype}; name=\"{name}\"\r\n"
             "Content-Transfer-Encoding: base64\r\n"
             f"Content-Disposition: attachment; filename=\"{name}\"\r\n\r\n").encode("ascii"))
        parts.append(base64.encodebytes(data).replace(b"\n", b"\r\n"))
    parts.append(f"--{boundary}--\r\n".encode("ascii"))
    raw = b"".join(parts)
    assert b"\r\n." not in raw
    return raw


def random_payload(wire_bytes: int) -> bytes:
    """Random bytes whose base64 (76-character lines + CRLF) takes about ``wire_bytes``."""
    return os.urandom(max(0, wire_bytes - 3000) * 57 // 78)


def soak_messages(size: int) -> tuple[bytes, bytes]:
    """(clean, virus): ~``size`` bytes each, the virus one with EICAR attached."""
    data = b"%PDF-1.4\n%" + random_payload(size)
    clean = build_message("soak", "soak-clean", [("data.pdf", "application/pdf", data)])
    virus = build_message("soak virus", "soak-virus", [
        ("data.pdf", "application/pdf", data),
        ("e.com", "application/octet-stream", messages.eicar())])
    return clean, virus


def big_message(size: int) -> bytes:
    return build_message("setup", "big-setup", [
        ("setup.exe", "application/octet-stream", random_payload(size))])


# -------------------------------------------------------------------- gateway


class Gateway:
    """``mailwarden serve`` with run.py's generated config (+ ``extra`` [gateway] lines)."""

    def __init__(self, env: run.Env, work: Path, clamd_conf: str,
                 extra: dict[str, Any] | None = None) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.store = work / "store"
        self.port = run.free_port()
        conf = run.gateway_config(work / "config.toml", listen=self.port, sink=env.sink.port,
                                  store=self.store, chain=env.full_chain,
                                  clamd_socket=env.clamd_socket)
        text = conf.read_text()
        for key, value in (extra or {}).items():
            line = f"{key} = {json.dumps(value)}"
            text, n = re.subn(rf"(?m)^{key} = .*$", line, text, count=1)
            if not n:
                text = text.replace("[gateway]\n", f"[gateway]\n{line}\n", 1)
        if "[filters.clamav]" in text:
            text += f"clamd_conf = {json.dumps(clamd_conf)}\n"
        conf.write_text(text)
        from gateway.config import load_config

        load_config(conf)  # raises ConfigError if the patch broke it
        self.log_path = work / "stderr.log"
        src = str(env.src)
        pypath = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", run.console_main(env.src), "serve", "--config", str(conf)],
            cwd=src, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"), env={**os.environ, "PYTHONPATH": pypath})
        run.wait_smtp(self.port, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        run.stop_process(self.proc, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def dispositions(self, since: int = 0) -> dict[str, int]:
        """Per-message log lines by disposition, from character ``since`` of the log."""
        out: dict[str, int] = {}
        for d in re.findall(r" disposition=([\w-]+)", self.log()[since:]):
            out[d] = out.get(d, 0) + 1
        return out

    def quarantine_rows(self) -> list[dict[str, Any]]:
        db = self.store / "mailwarden.db"
        if not db.exists():
            return []
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            con.row_factory = sqlite3.Row
            return [dict(r) for r in con.execute("SELECT * FROM quarantine ORDER BY received")]
        finally:
            con.close()


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return "?"
    text = b" ".join(argv).decode(errors="replace")
    for what in ("resource_tracker", "forkserver"):
        if what in text:
            return what
    if "multiprocessing" in text or "spawn_main" in text:
        return "mp worker"
    return "serve" if "serve" in text else text[:40]


def tree_kb(root: int, key: str) -> tuple[int, list[dict[str, Any]]]:
    """Sum of ``key`` (VmRSS, VmHWM) over the process tree, and the members."""
    total, members = 0, []
    for pid in run.process_tree(root):
        with contextlib.suppress(OSError):
            kb = status_kb(pid, key)
            total += kb
            members.append({"pid": pid, "what": describe(pid), key: kb})
    return total, members


def reset_tree_hwm(root: int) -> None:
    for pid in run.process_tree(root):
        with contextlib.suppress(OSError):
            run.reset_hwm(pid)


class Sampler(threading.Thread):
    """Samples the tree's summed VmRSS every ``interval`` seconds; keeps the maximum."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.max_tree_kb = 0
        self.max_main_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(OSError):
                total, members = tree_kb(self.root, "VmRSS")
                self.max_tree_kb = max(self.max_tree_kb, total)
                for m in members:
                    if m["pid"] == self.root:
                        self.max_main_kb = max(self.max_main_kb, m["VmRSS"])
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def rss_snapshot(root: int) -> dict[str, Any]:
    total, members = tree_kb(root, "VmRSS")
    return {"tree_mb": total / 1024, "main_mb": status_kb(root, "VmRSS") / 1024,
            "members": members}


def peak_snapshot(root: int, sampler: Sampler) -> dict[str, Any]:
    total, members = tree_kb(root, "VmHWM")
    return {"tree_mb": total / 1024, "main_mb": status_kb(root, "VmHWM") / 1024,
            "sampled_tree_mb": sampler.max_tree_kb / 1024,
            "sampled_main_mb": sampler.max_main_kb / 1024, "members": members}


def own_ticks(env: run.Env, gw: Gateway) -> int:
    pids = [env.sink.proc.pid, *([env.clamd_pid] if env.clamd_pid else [])]
    return run.own_ticks(gw.pid, pids)


# ----------------------------------------------------------------------- soak


class Session(threading.Thread):
    """One client connection sending messages back to back until ``deadline``."""

    def __init__(self, k: int, port: int, deadline: float, clean: bytes, virus: bytes) -> None:
        super().__init__(daemon=True)
        self.k, self.port, self.deadline = k, port, deadline
        self.payloads = (clean + b".\r\n", virus + b".\r\n")
        self.relayed = self.held = 0
        self.sent_virus = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []

    def run(self) -> None:
        n = 0
        try:
            conn = SmtpClient(self.port, timeout=300, helo=f"soak{self.k}.bench.example")
            try:
                while time.monotonic() < self.deadline:
                    virus = (self.k + n) % 20 == 0
                    self.sent_virus += virus
                    code, text, secs = conn.transaction(
                        messages.SENDER, messages.RECIPIENT, self.payloads[virus])
                    self.latencies.append(secs)
                    if code != 250:
                        self.errors.append(f"session {self.k} message {n}: {code} {text}")
                    elif "held" in text:
                        self.held += 1
                        if not virus:
                            self.errors.append(f"session {self.k}: clean message held: {text}")
                    else:
                        self.relayed += 1
                        if virus:
                            self.errors.append(f"session {self.k}: EICAR relayed: {text}")
                    n += 1
            finally:
                conn.close()
        except (OSError, SmtpError) as exc:
            self.errors.append(f"session {self.k}: {exc!r}")


def soak(args: argparse.Namespace, env: run.Env, clamd_conf: str) -> dict[str, Any]:
    clean, virus = soak_messages(args.soak_size)
    gw = Gateway(env, env.workdir / "soak", clamd_conf,
                 {"max_sessions": max(1000, args.sessions + 10)})
    sampler: Sampler | None = None
    try:
        time.sleep(1.0)
        fresh = rss_snapshot(gw.pid)
        warm = Session(-1, gw.port, time.monotonic() + 1.0, clean, virus)
        warm.run()  # in this thread: a second of clean messages, the first one a virus
        if warm.errors:
            raise RuntimeError(f"warm-up failed: {warm.errors[:3]}")
        time.sleep(1.0)
        idle = rss_snapshot(gw.pid)
        log_start = len(gw.log())
        sink0 = env.sink.settle(0.2)
        reset_tree_hwm(gw.pid)
        sampler = Sampler(gw.pid)
        sampler.start()
        busy0, own0, t0 = run.machine_busy_ticks(), own_ticks(env, gw), time.perf_counter()
        deadline = time.monotonic() + args.seconds
        sessions = [Session(k, gw.port, deadline, clean, virus) for k in range(args.sessions)]
        for s in sessions:
            s.start()
        for s in sessions:
            s.join(args.seconds + 600)
        wall = time.perf_counter() - t0
        load = other_load(busy0, run.machine_busy_ticks(), own0, own_ticks(env, gw), wall)
        peak = peak_snapshot(gw.pid, sampler)
        sampler.stop()
        after = rss_snapshot(gw.pid)
        relayed = sum(s.relayed for s in sessions)
        held = sum(s.held for s in sessions)
        delivered = env.sink.wait_for(sink0 + relayed, 20) - sink0
        alive = gw.proc.poll() is None
    finally:
        if sampler is not None:
            sampler.stop()
        gw.stop()
    rows = gw.quarantine_rows()[warm.held:]  # the warm-up's rows are not counted
    disp = gw.dispositions(log_start)
    log = gw.log()
    errors = [e for s in sessions for e in s.errors]
    if not alive:
        errors.append(f"gateway died: {log[-1500:]}")
    if "Traceback" in log:
        errors.append("Traceback in the gateway's log")
    lat = sorted(x for s in sessions for x in s.latencies)
    return {
        "sessions": args.sessions, "seconds": args.seconds, "wall_s": wall,
        "message_bytes": len(clean), "virus_message_bytes": len(virus),
        "messages": relayed + held + sum(len(s.errors) for s in sessions),
        "relayed": relayed, "held": held, "virus_sent": sum(s.sent_virus for s in sessions),
        "delivered": delivered, "quarantine_rows": len(rows),
        "dispositions": disp, "errors": errors,
        "latency_p50_s": lat[len(lat) // 2] if lat else None,
        "latency_p99_s": lat[int(len(lat) * 0.99)] if lat else None,
        "other_load": load, "rss_fresh": fresh, "rss_idle": idle, "rss_peak": peak,
        "rss_after": after, "goal_mb": SOAK_GOAL_MB,
        "met": peak["tree_mb"] < SOAK_GOAL_MB,
    }


# ------------------------------------------------------------------------ big


def big(args: argparse.Namespace, env: run.Env, clamd_conf: str) -> dict[str, Any]:
    raw = big_message(int(args.big_mb * MB))
    warm_payload, _ = wire_forms(messages.build("attach"))
    gw = Gateway(env, env.workdir / "big", clamd_conf,
                 {"max_message_size": max(BIG_MAX_MESSAGE_SIZE, len(raw) + MIB)})
    sampler: Sampler | None = None
    code, text, secs = 0, "", 0.0
    try:
        time.sleep(1.0)
        fresh = rss_snapshot(gw.pid)
        conn = SmtpClient(gw.port, timeout=300)
        try:
            wcode, wtext, _ = conn.transaction(messages.SENDER, messages.RECIPIENT, warm_payload)
        finally:
            conn.close()
        if wcode != 250:
            raise RuntimeError(f"warm-up message: {wcode} {wtext}")
        time.sleep(1.0)
        before = rss_snapshot(gw.pid)
        reset_tree_hwm(gw.pid)
        sampler = Sampler(gw.pid, interval=0.02)
        sampler.start()
        busy0, own0, t0 = run.machine_busy_ticks(), own_ticks(env, gw), time.perf_counter()
        conn = SmtpClient(gw.port, timeout=300)
        try:
            code, text, secs = conn.transaction(messages.SENDER, messages.RECIPIENT,
                                                raw + b".\r\n")
        finally:
            conn.close()
        time.sleep(1.0)  # anything after the reply (store writes, log) counts too
        wall = time.perf_counter() - t0
        load = other_load(busy0, run.machine_busy_ticks(), own0, own_ticks(env, gw), wall)
        peak = peak_snapshot(gw.pid, sampler)
        sampler.stop()
        alive = gw.proc.poll() is None
    finally:
        if sampler is not None:
            sampler.stop()
        gw.stop()
    rows = [r for r in gw.quarantine_rows() if r["size"] >= len(raw) // 2]
    files = []
    for r in rows:
        p = Path(r["path"])
        p = p if p.is_absolute() else gw.store / p
        files.append({"path": str(p), "bytes": p.stat().st_size if p.exists() else None})
    log = gw.log()
    lines = [ln for ln in log.splitlines() if f"size={len(raw)}" in ln and "disposition=" in ln]
    errors = []
    held = code == 250 and "held" in text
    if not held:
        errors.append(f"the big message was not held: {code} {text}")
    if held and not rows:
        errors.append("held reply but no quarantine row")
    if not alive:
        errors.append(f"gateway died: {log[-1500:]}")
    size_mb = len(raw) / MB
    return {
        "message_bytes": len(raw), "reply": f"{code} {text}", "seconds": secs, "held": held,
        "quarantine_rows": [{k: r[k] for k in ("id", "reason", "detail", "size", "path")}
                            for r in rows],
        "quarantine_files": files, "log_lines": lines, "errors": errors, "other_load": load,
        "max_message_size": max(BIG_MAX_MESSAGE_SIZE, len(raw) + MIB),
        "rss_fresh": fresh, "rss_before": before, "rss_peak": peak,
        "peak_over_size": peak["tree_mb"] * MIB / MB / size_mb,
        "growth_over_size": (peak["tree_mb"] - before["tree_mb"]) * MIB / MB / size_mb,
        "goal_factor": BIG_GOAL_FACTOR,
        "met": peak["tree_mb"] * MIB < BIG_GOAL_FACTOR * len(raw),
    }


# --------------------------------------------------------------------- report


def members_text(members: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{m['what']} {m[key] / 1024:.0f}" for m in members)


def print_soak(r: dict[str, Any]) -> None:
    f, i, p, a = r["rss_fresh"], r["rss_idle"], r["rss_peak"], r["rss_after"]
    print(f"\n## soak: {r['sessions']} sessions x {r['seconds']:g} s of "
          f"{r['message_bytes'] / MB:.2f} MB messages (1 in 20 with EICAR), full chain, inbound")
    print(f"messages: {r['messages']} in {r['wall_s']:.0f} s ({r['messages'] / r['wall_s']:.1f}/s): "
          f"{r['relayed']} relayed ({r['delivered']} arrived at smtp-sink), {r['held']} held "
          f"({r['virus_sent']} EICAR sent, {r['quarantine_rows']} quarantine rows), "
          f"{len(r['errors'])} errors; per-message latency p50 "
          f"{r['latency_p50_s'] or 0:.2f} s, p99 {r['latency_p99_s'] or 0:.2f} s")
    print("dispositions (log): " + ", ".join(f"{k} {v}" for k, v in sorted(r["dispositions"].items())))
    print(f"other load: {r['other_load']:.0%}")
    print("| RSS (MiB) | serve tree | serve process | members |")
    print("|---|---|---|---|")
    print(f"| fresh, no mail yet (VmRSS) | {f['tree_mb']:.0f} | {f['main_mb']:.0f} "
          f"| {members_text(f['members'], 'VmRSS')} |")
    print(f"| idle before the load, after warm-up (VmRSS): baseline | {i['tree_mb']:.0f} "
          f"| {i['main_mb']:.0f} | {members_text(i['members'], 'VmRSS')} |")
    print(f"| **peak during the load (VmHWM)** | **{p['tree_mb']:.0f}** | {p['main_mb']:.0f} "
          f"| {members_text(p['members'], 'VmHWM')} |")
    print(f"| peak, sampled every 50 ms (VmRSS) | {p['sampled_tree_mb']:.0f} "
          f"| {p['sampled_main_mb']:.0f} | |")
    print(f"| after the load (VmRSS) | {a['tree_mb']:.0f} | {a['main_mb']:.0f} "
          f"| {members_text(a['members'], 'VmRSS')} |")
    print(f"goal: peak RSS < {r['goal_mb']:.0f} MiB: {p['tree_mb']:.0f} MiB "
          f"(idle {i['tree_mb']:.0f} MiB, +{p['tree_mb'] - i['tree_mb']:.0f} MiB under load) -> "
          f"goal {'met' if r['met'] else 'NOT met'}")


def print_big(r: dict[str, Any]) -> None:
    f, b, p = r["rss_fresh"], r["rss_before"], r["rss_peak"]
    size = r["message_bytes"]
    print(f"\n## big: one {size / MB:.1f} MB message ({size:,} bytes = {size / MIB:.1f} MiB; "
          "setup.exe attached), "
          f"full chain, inbound, max_message_size {r['max_message_size']:,}")
    print(f"reply after {r['seconds']:.1f} s: {r['reply']}")
    for q in r["quarantine_rows"]:
        print(f"quarantine row: id {q['id']} reason {q['reason']} size {q['size']:,} "
              f"detail {q['detail'][:100]!r}")
    for fl in r["quarantine_files"]:
        print(f"quarantine file: {fl['path']} ({fl['bytes']} bytes)")
    for ln in r["log_lines"]:
        print(f"log: {ln[:300]}")
    print(f"held: {'yes' if r['held'] and r['quarantine_rows'] else 'NO'}; "
          f"other load: {r['other_load']:.0%}")
    print("| RSS (MiB) | serve tree | serve process | members |")
    print("|---|---|---|---|")
    print(f"| fresh, no mail yet (VmRSS) | {f['tree_mb']:.0f} | {f['main_mb']:.0f} "
          f"| {members_text(f['members'], 'VmRSS')} |")
    print(f"| before, after one 100 KB message (VmRSS) | {b['tree_mb']:.0f} | {b['main_mb']:.0f} "
          f"| {members_text(b['members'], 'VmRSS')} |")
    print(f"| **peak (VmHWM)** | **{p['tree_mb']:.0f}** | {p['main_mb']:.0f} "
          f"| {members_text(p['members'], 'VmHWM')} |")
    print(f"| peak, sampled every 20 ms (VmRSS) | {p['sampled_tree_mb']:.0f} "
          f"| {p['sampled_main_mb']:.0f} | |")
    peak_bytes = p["tree_mb"] * MIB
    print(f"peak / size = {r['peak_over_size']:.2f}x; (peak - before) / size = "
          f"{r['growth_over_size']:.2f}x; serve process alone: "
          f"{p['main_mb'] * MIB / size:.2f}x / {(p['main_mb'] - b['main_mb']) * MIB / size:.2f}x")
    print(f"goal: peak RSS < {r['goal_factor']:g}x the message size "
          f"({r['goal_factor'] * size / MIB:.0f} MiB): peak {peak_bytes / MIB:.0f} MiB -> goal "
          f"{'met' if r['met'] else 'NOT met'} (verdict on peak / size, serve tree)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="mailwarden's peak RSS: a 50-session soak of 1 MB messages and one "
                    "50 MB held message (issue 10); see the module docstring and bench/README.md")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="soak duration (default %(default)s)")
    p.add_argument("--sessions", type=int, default=50,
                   help="concurrent soak sessions (default %(default)s)")
    p.add_argument("--soak-mb", type=float, default=1.0,
                   help="soak message size in MB (default %(default)s)")
    p.add_argument("--big-mb", type=float, default=50.0,
                   help="size of the held big message in MB (default %(default)s)")
    p.add_argument("--only", choices=("soak", "big"), help="run one of the two measurements")
    p.add_argument("--rev", metavar="REV",
                   help="run the code of this git revision (e.g. HEAD) instead of the work tree")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, store, configs)")
    args = p.parse_args(argv)
    args.soak_size = int(args.soak_mb * MB)
    if args.sessions < 1 or args.seconds <= 0 or args.big_mb <= 0:
        p.error("--sessions, --seconds and --big-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run.check_tools(need_clamd=True)
    from gateway.config import DEFAULT_CHAIN

    workdir = Path(tempfile.mkdtemp(prefix="mw-memory-"))
    sink = clamd = None
    code = "unknown"
    out: dict[str, Any] = {}
    try:
        sink = run.Sink(workdir)
        clamd = run.start_clamd()
        src, code = snapshot(workdir / "src", args.rev)
        out["code"] = code
        env = run.Env(workdir, sink, clamd.socket, run.clamd_pid(clamd), DEFAULT_CHAIN, src=src)
        print(f"memory: workdir {workdir}", file=sys.stderr)
        if args.only in (None, "soak"):
            print(f"soak: {args.sessions} sessions for {args.seconds:g} s ...", file=sys.stderr)
            out["soak"] = soak(args, env, str(clamd.config_path))
        if args.only in (None, "big"):
            print(f"big: one {args.big_mb:g} MB message ...", file=sys.stderr)
            out["big"] = big(args, env, str(clamd.config_path))
    finally:
        run.stop_all([], sink, clamd)
        if args.keep:
            print(f"\nkept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmailwarden memory benchmark: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\ncode: {code}")
    if "soak" in out:
        print_soak(out["soak"])
    if "big" in out:
        print_big(out["big"])
    errors = [e for k in ("soak", "big") for e in out.get(k, {}).get("errors", [])]
    if errors:
        print("\nbenchmark errors:\n  " + "\n  ".join(errors[:10]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
