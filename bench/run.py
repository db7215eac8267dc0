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
  mw-full+pg    the full chain on the PostgreSQL store (issue 16; a private
                PostgreSQL with fsync on, a fresh database per start)
  mw-full+key   the full chain, SQLite store, bodies sealed ([store] key_file)
  mw-full+pg+key  the same on the PostgreSQL store (keys in <db>_keys)

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
import peers  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The target that runs another commit's code (``--before REV``).
BEFORE = "mw-full@before"

ALL_TARGETS = ("sink", "bare", "bare+uv", "bare+scan", "bare+scan+uv",
               "mw-empty", "mw-empty+uv", "mw-full", "mw-full+uv",
               "mw-full+pg", "mw-full+key", "mw-full+pg+key")
#: Several serve processes on one port (bench/multi_serve.py; an experiment,
#: only when named in --targets): "*N" = N processes.
MULTI_TARGETS = ("mw-empty*2", "mw-full*2")
#: Added by --peers (bench/peers.py).
PEER_TARGETS = ("amavis", "clamsmtp")

#: Which bare relay each target is compared with (same event loop).
BASELINE = {
    "mw-empty": "bare", "mw-empty+uv": "bare+uv",
    "mw-full": "bare+scan", "mw-full+uv": "bare+scan+uv",
    "bare+scan": "bare", "bare+scan+uv": "bare+uv",
    BEFORE: "bare+scan",
    "mw-empty*2": "bare", "mw-full*2": "bare+scan",
    # issue 16: the PostgreSQL store against the SQLite one, same chain
    "mw-full+pg": "mw-full", "mw-full+key": "mw-full", "mw-full+pg+key": "mw-full+key",
}

#: Messages per cell: (1 session, more sessions).  --messages overrides.
COUNTS = {"small": (600, 2000), "attach": (400, 1000), "virus": (400, 1000), "big": (12, 30)}
QUICK_COUNTS = {"small": (150, 400), "attach": (100, 200), "virus": (100, 200), "big": (4, 8)}


def scans(target: str) -> bool:
    """True for targets that scan for viruses (virus messages must not arrive)."""
    return "scan" in target or target.startswith("mw-full") or target in PEER_TARGETS


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


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (amavisd's children, for instance)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_ticks(root: int) -> int:
    """CPU ticks of a process tree: live members plus the children they reaped."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                f = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total


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


def start_clamd(tcp: bool = False) -> Any:
    """The suite's private clamd (tests/support/clamd.py: offline signature DB), started.

    ``tcp``: also listen on 127.0.0.1 (amavisd-new, running as its own user,
    cannot use the root-owned unix socket).
    """
    from tests.support.clamd import Clamd

    clamd = Clamd(tcp=tcp)
    clamd.start()
    return clamd


def clamd_pid(clamd: Any) -> int | None:
    proc = getattr(clamd, "_proc", None)
    return proc.pid if proc is not None else None


# -------------------------------------------------------------------- targets


def stop_all(targets: list[Any], sink: Sink | None, clamd: Any) -> None:
    """Stop whatever a benchmark started: its targets, the sink, clamd."""
    for t in targets:
        t.stop()
    if sink is not None:
        sink.stop()
    if clamd is not None:
        clamd.close()


def gateway_config(path: Path, *, listen: int, sink: int, store: Path,
                   chain: tuple[str, ...], clamd_socket: str, store_toml: str = "") -> Path:
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
        f"{store_toml}"
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
    warm_rate: float = 0.0

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
        if self.name in PEER_TARGETS:
            self.proc = self._start_peer(env, work)
            wait_smtp(self.port, self.proc, timeout=120)
            return
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
                                  clamd_socket=env.clamd_socket,
                                  store_toml=store_toml(self.name, env, work))
            code = env.before_src if self.name == BEFORE else env.src
            assert code is not None
            entry = ([str(BENCH / "uvloop_serve.py")] if uv
                     else [str(BENCH / "multi_serve.py"), "--workers", self.name.split("*")[1]]
                     if "*" in self.name else ["-c", console_main(code)])
            argv = [py, *entry, "serve", "--config", str(conf)]
        code = env.before_src if self.name == BEFORE else env.src
        assert code is not None
        src = str(code)
        argv = [a.replace(str(BENCH), str(code / "bench")) for a in argv]
        pypath = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            argv, cwd=src, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"), env={**os.environ, "PYTHONPATH": pypath},
        )
        wait_smtp(self.port, self.proc)

    def _start_peer(self, env: Env, work: Path) -> subprocess.Popen[bytes]:
        assert self.log_path is not None
        if self.name == "amavis":
            return peers.start_amavis(work, port=self.port, sink=env.sink.port,
                                      clamd_tcp=env.clamd_tcp, stderr=self.log_path)
        return peers.start_clamsmtp(work, port=self.port, sink=env.sink.port,
                                    clamd_socket=env.clamd_socket, stderr=self.log_path)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def died(self) -> str | None:
        """If the process has exited: its status and the end of its stderr."""
        if self.proc is None or self.proc.poll() is None:
            return None
        tail = ""
        if self.log_path is not None and self.log_path.exists():
            tail = self.log_path.read_bytes()[-1500:].decode("utf-8", "replace")
        return f"{self.name} exited with status {self.proc.returncode}:\n{tail}"

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
    src: Path = ROOT
    clamd_tcp: str = ""
    generation: int = 0
    #: ``--before REV``: that commit's tree (see snapshot_rev()).
    before_src: Path | None = None
    #: the private PostgreSQL of the ``+pg`` targets (tests/support/postgres.py)
    pg: Any = None


def start_postgres() -> Any:
    """A private PostgreSQL (the suite's throw-away server) made durable like a
    production one (fsync, synchronous_commit, full_page_writes on), so the
    PostgreSQL store is compared with SQLite's synchronous=FULL fairly."""
    from tests.support.postgres import PgServer

    server = PgServer.create()
    server.stop()
    with open(server.data / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write("\n# bench/run.py: durable like production\n"
                   "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")
    server.start()
    return server


def store_toml(target: str, env: Env, work: Path) -> str:
    """``[store]`` lines of a target beyond ``path``: the backend and the key file."""
    lines = ""
    if "+pg" in target:
        lines += 'backend = "postgresql"\n'
        lines += f'dsn = "{env.pg.new_database()}"\n'
        lines += f'instance = "{target}"\n'
    if target.endswith("+key"):
        from quarantine.crypto import write_kek

        kek = work / "kek"
        if not kek.exists():
            write_kek(kek)
        lines += f'key_file = "{kek}"\n'
    return lines


def _pyproject(root: Path) -> dict[str, Any]:
    import tomllib

    with (root / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def code_dirs(root: Path) -> tuple[str, ...]:
    """What a target process imports: the packages pyproject.toml installs, and bench/."""
    packages = _pyproject(root).get("tool", {}).get("setuptools", {}).get("packages", [])
    return (*sorted({p.split(".")[0] for p in packages}), "bench")


def console_main(root: Path) -> str:
    """``python -c`` code that runs the tree's ``mailwarden`` console script."""
    target = _pyproject(root)["project"]["scripts"]["mailwarden"]
    module, func = target.split(":")
    return f"import sys; from {module} import {func}; sys.argv[0] = 'mailwarden'; {func}()"


#: What a target process imports: copied once per run (see snapshot()).
SNAPSHOT_DIRS = code_dirs(ROOT)


def code_version() -> str:
    """The work tree's commit, and whether the code under test has local changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                *SNAPSHOT_DIRS], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head[:72] + (" + uncommitted changes" if dirty else "")


def snapshot(dest: Path) -> Path:
    """Copy the code under test so every process of this run runs the same code.

    Editing the work tree while a long run is under way (or another developer
    committing to it) would otherwise mix versions between cells.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SNAPSHOT_DIRS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")  # names the entry point
    return dest


def snapshot_rev(rev: str, dest: Path) -> Path:
    """Another commit's whole tree (``git archive``), for ``--before REV``."""
    dest.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev],
                                 capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench: --before {rev}: {exc.stderr.decode().strip()}") from None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def rev_version(rev: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s", rev],
                         capture_output=True, text=True)
    return out.stdout.strip()[:72] or rev


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
    #: share of the machine's CPU used by processes outside the benchmark
    other_load: float = 0.0
    #: smtp-source -d: every session sends its messages over one connection
    reuse: bool = False

    @property
    def row(self) -> int | str:
        """The report's "sess" column: the count, or "N reuse"."""
        return f"{self.sessions} reuse" if self.reuse else self.sessions

    @property
    def rate(self) -> float:
        return self.messages / self.wall if self.wall > 0 else 0.0


def smtp_source(port: int, path: Path, sessions: int, count: int, timeout: float,
                reuse: bool = False) -> int:
    """``reuse``: ``-d``, each session keeps its connection for all its messages
    (otherwise one connection per message)."""
    argv = [SMTP_SOURCE, "-A", *(["-d"] if reuse else []), "-s", str(sessions),
            "-m", str(count), "-F", str(path),
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
    """A few unmeasured messages (4 sessions); sets ``target.warm_rate``."""
    count = 4 if mset == "big" else 40
    before = env.sink.settle(0.05)
    t0 = time.perf_counter()
    smtp_source(target.port, path, 4, count, timeout=300)
    target.warm_rate = count / max(1e-6, time.perf_counter() - t0)
    env.sink.wait_for(before + (0 if scans(target.name) and mset == "virus" else count), 5)
    target.dispositions(count, timeout=2)


def machine_busy_ticks() -> int:
    """Busy clock ticks of the whole machine (all CPUs) from /proc/stat."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:9]]
    return sum(vals) - vals[3] - vals[4]  # minus idle and iowait


def own_ticks(target: int | None, pids: list[int]) -> int:
    """Ticks used by the benchmark: the target's process tree, ``pids``, this
    process and its waited children (smtp-source)."""
    own = os.times()
    total = round((own.user + own.system + own.children_user + own.children_system) * CLK_TCK)
    if target is not None:
        total += tree_ticks(target)
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_ticks(pid)
    return total


def measure(target: Target, env: Env, path: Path, mset: str, sessions: int,
            count: int, reuse: bool = False) -> Sample:
    dead = target.died()
    if dead:
        print(f"  {dead}\n  restarting {target.name}", file=sys.stderr)
        target.start(env)
        warm_up(target, env, path, mset)
    before_sink = env.sink.settle(0.05)
    pid = target.pid
    tree = process_tree(pid) if pid is not None else []
    ours = [env.sink.proc.pid, *([env.clamd_pid] if env.clamd_pid else [])]
    if pid is not None:
        for p in tree:
            with contextlib.suppress(OSError):
                reset_hwm(p)
        cpu0 = tree_ticks(pid)
    cl0 = cpu_ticks(env.clamd_pid) if env.clamd_pid else 0
    busy0, own0 = machine_busy_ticks(), own_ticks(pid, ours)
    t0 = time.perf_counter()
    rc = smtp_source(target.port, path, sessions, count,
                     timeout=120 + count * (2.0 if mset == "big" else 0.2), reuse=reuse)
    wall = time.perf_counter() - t0
    busy1, own1 = machine_busy_ticks(), own_ticks(pid, ours)
    other = max(0, (busy1 - busy0) - (own1 - own0)) / (wall * CLK_TCK * (os.cpu_count() or 1))
    held = scans(target.name) and mset == "virus"
    arrived = env.sink.wait_for(before_sink + (0 if held else count), 5)
    arrived = env.sink.settle(0.1) if held else arrived
    disp = target.dispositions(count)
    cpu_ms = clamd_ms = rss = None
    if pid is not None:
        cpu_ms = (tree_ticks(pid) - cpu0) * 1000 / CLK_TCK / count
        rss = 0.0
        for p in process_tree(pid):
            with contextlib.suppress(OSError):
                rss += vm_hwm_kb(p) / 1024
    if env.clamd_pid and (scans(target.name)):
        clamd_ms = (cpu_ticks(env.clamd_pid) - cl0) * 1000 / CLK_TCK / count
    dead = target.died()
    if dead:
        print(f"  {dead}", file=sys.stderr)
        rc = rc or -2
    return Sample(target.name, mset, sessions, count, wall, arrived - before_sink,
                  cpu_ms, clamd_ms, rss, dict(disp), rc, other, reuse)


# ---------------------------------------------------------------------- report


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(samples: list[Sample]) -> dict[tuple[str, Any, str], dict[str, Any]]:
    """Median per (set, sessions, target) and ratios; the sessions of a
    reuse row are "N reuse"."""
    groups: dict[tuple[str, Any, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.mset, s.row, s.target), []).append(s)
    out: dict[tuple[str, Any, str], dict[str, Any]] = {}
    for key, all_runs in groups.items():
        # Runs where smtp-source failed or the target died are shown (⚠) but
        # not averaged, unless no run succeeded.
        group = [s for s in all_runs if s.source_rc == 0] or all_runs
        disp: Counter[str] = Counter()
        for s in group:
            disp.update(s.dispositions)
        target = key[2]
        held = scans(target) and key[0] == "virus"
        ok = all((s.delivered == 0) if held else (s.delivered == s.messages) for s in all_runs)
        out[key] = {
            "rate": median([s.rate for s in group]),
            # Run-to-run noise: (max - min) / median of the runs' rates.
            "spread": ((max(s.rate for s in group) - min(s.rate for s in group))
                       / statistics.median(s.rate for s in group))
            if len(group) > 1 and statistics.median(s.rate for s in group) else None,
            "cpu_ms": median([s.cpu_ms for s in group]),
            "clamd_ms": median([s.clamd_ms for s in group]),
            "rss_mb": max((s.rss_mb for s in group if s.rss_mb is not None), default=None),
            "other_load": median([s.other_load for s in group]),
            "latency_ms": median([1000 * s.wall * s.sessions / s.messages for s in group]),
            "delivered": sum(s.delivered for s in all_runs),
            "sent": sum(s.messages for s in all_runs),
            "runs": len(group),
            "failed_runs": len(all_runs) - len(group),
            "dispositions": dict(disp),
            "ok": ok and all(s.source_rc == 0 for s in all_runs),
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


def print_table(summary: dict[tuple[str, Any, str], dict[str, Any]],
                order: list[str], sets: list[str], sessions: list[Any]) -> None:
    head = ("| set | sess | target | msgs/s | vs baseline | vs sink | ms/msg/session "
            "| CPU ms/msg | clamd ms/msg | peak RSS MB | delivered/sent | other load | dispositions |")
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
                      f"| {fmt(row['rss_mb'], '.0f')} | {deliv} | {row['other_load']:.0%} "
                      f"| {disp or '–'} |")


#: Issue 10's reference figures (same machine kind, Postfix smtp-source -> filter
#: -> smtp-sink): msgs/s for small/20, attach/20, attach/1; CPU ms per 100 KB
#: message; CPU ms per 6.7 MB message.
ISSUE10_REFERENCE = {
    "smtp-sink direct": (5498, 2787, 1482, None, None),
    "bare relay + clamd (uvloop)": (790, 258, 183, 4, 200),
    "amavisd-new 2.13": (81, 54, 15, 25, 121),
    "clamsmtp 1.10": (13, 19, 58, 1.5, 74),
}


def print_issue10(summary: dict[tuple[str, int, str], dict[str, Any]], order: list[str]) -> None:
    """Issue 10's matrix for this run, then its goals."""
    def cell(mset: str, s: int, target: str, key: str) -> float | None:
        row = summary.get((mset, s, target))
        return row[key] if row else None

    rows = [t for t in order if t == "sink" or scans(t)]
    if not any(t.startswith("mw-full") for t in rows):
        return
    print("\nIssue 10 matrix (this run; medians):")
    print("| target | 10 KB, 20 sessions | 100 KB + PDF, 20 sessions | 100 KB, 1 session "
          "| CPU ms per 100 KB msg | CPU ms per 6.7 MB msg |")
    print("|---|---|---|---|---|---|")
    for t in rows:
        vals = (cell("small", 20, t, "rate"), cell("attach", 20, t, "rate"),
                cell("attach", 1, t, "rate"), cell("attach", 1, t, "cpu_ms"),
                cell("big", 1, t, "cpu_ms"))
        print(f"| {t} | {fmt(vals[0], ',.0f')}/s | {fmt(vals[1], ',.0f')}/s "
              f"| {fmt(vals[2], ',.0f')}/s | {fmt(vals[3], '.1f')} | {fmt(vals[4], '.0f')} |")
    for name, ref in ISSUE10_REFERENCE.items():
        print(f"| *{name} (issue 10)* | {ref[0]:,}/s | {ref[1]:,}/s | {ref[2]:,}/s "
              f"| {fmt(ref[3], 'g')} | {fmt(ref[4], 'g')} |")
    cells = (("small", 20), ("attach", 20), ("attach", 1))
    for mw in ("mw-full", "mw-full+uv"):
        if ("small", 20, mw) not in summary and ("attach", 1, mw) not in summary:
            continue
        base = BASELINE[mw]
        parts = []
        for mset, s in cells:
            r = cell(mset, s, mw, "rate")
            b = cell(mset, s, base, "rate")
            a = cell(mset, s, "amavis", "rate")
            if r is None:
                continue
            txt = f"{mset}/{s}: {fmt(r / b if b else None, '.0%')} of {base}"
            if a:
                txt += f", {r / a:.1f}x amavis"
            parts.append(txt)
        big = cell("big", 1, mw, "cpu_ms")
        amavis_big = cell("big", 1, "amavis", "cpu_ms")
        if big is not None:
            ref = amavis_big if amavis_big is not None else 121
            parts.append(f"6.7 MB CPU {big:.0f} ms vs amavis {ref:.0f} ms"
                         + ("" if amavis_big is not None else " (issue figure)"))
        print(f"  {mw}: " + "; ".join(parts)
              + "  [goals: >= 60% of the bare relay + scan, >= 3x amavis, big CPU < amavis]")


def print_before_after(summary: dict[tuple[str, Any, str], dict[str, Any]],
                       msets: list[str], sessions: list[Any]) -> None:
    """``--before``: the full chain on the old code vs the work tree, cell by cell."""
    rows = [(m, s) for m in msets for s in sessions
            if (m, s, BEFORE) in summary and (m, s, "mw-full") in summary]
    if not rows:
        return
    print(f"\nBefore / after (mw-full vs {BEFORE}, same run; medians):")
    print("| set | sessions | before msgs/s | after msgs/s | after/before "
          "| before CPU ms/msg | after CPU ms/msg | run spread before / after |")
    print("|---|---|---|---|---|---|---|---|")
    for m, s in rows:
        b, a = summary[(m, s, BEFORE)], summary[(m, s, "mw-full")]
        ratio = a["rate"] / b["rate"] if b["rate"] else None
        print(f"| {m} | {s} | {fmt(b['rate'], ',.1f')} | {fmt(a['rate'], ',.1f')} "
              f"| {fmt(ratio, '.0%')} | {fmt(b['cpu_ms'], '.2f')} | {fmt(a['cpu_ms'], '.2f')} "
              f"| {fmt(b['spread'], '.0%')} / {fmt(a['spread'], '.0%')} |")


def print_issue16(summary: dict[tuple[str, int, str], dict[str, Any]]) -> None:
    """The store backends side by side (issue 16: PostgreSQL >= 90% of SQLite)."""
    rows = sorted((k for k in summary if k[2] in ("mw-full+pg", "mw-full+key", "mw-full+pg+key")),
                  key=lambda k: (k[0], str(k[1]), k[2]))  # sessions: 20 or "20 reuse"
    if not rows:
        return
    print("\nStore backends (same run, medians; goal: PostgreSQL >= 90% of SQLite):")
    for mset, s, target in rows:
        row = summary[(mset, s, target)]
        print(f"  {mset:6} x{s!s:<8} {target:15} {fmt(row['rate'], ',.1f'):>8} msgs/s"
              f" = {fmt(100 * row['vs_base'] if row['vs_base'] else None, '.0f')}% of"
              f" {row['base']}  (CPU {fmt(row['cpu_ms'], '.2f')} ms/msg)")


def print_issue2(summary: dict[tuple[str, int, str], dict[str, Any]], sessions: list[int]) -> None:
    """Issue 2's comparison: small messages, empty chain vs the bare relay."""
    if not any(("small", s, t) in summary for s in sessions for t in ("mw-empty", "mw-empty+uv")):
        return
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


# -------------------------------------------------------------------- profile

#: Frames that only say "the event loop (or a worker thread) ran something".
_PLUMBING = ("<module> ", "main ", "run ", "_run_module_as_main ", "_run_code ", "Runner.run ",
             "BaseEventLoop.run_forever ", "BaseEventLoop.run_until_complete ",
             "BaseEventLoop._run_once ", "Handle._run ", "Thread.run ", "Thread._bootstrap",
             "_worker ", "_WorkItem.run ", "Command.", "Group.invoke ", "Context.invoke ",
             "pass_context.", "serve (cli/serve.py", "_serve (cli/serve.py")


def _plumbing(frame: str) -> bool:
    return frame.startswith(_PLUMBING) or "(click/" in frame


def summarize_profile(raw: Path, top: int = 15) -> str:
    """Self and inclusive hot spots from a py-spy ``raw`` (collapsed stacks) file."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        self_t[frames[-1]] += count
        for f in set(frames):
            if not _plumbing(f):
                incl[f] += count
    if not total:
        return "  (no samples)"
    out = [f"  {total} samples; self time (leaf frames):"]
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in self_t.most_common(top)]
    out.append("  inclusive time:")
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top + 5)]
    return "\n".join(out)


def profile(args: argparse.Namespace, env: Env, files: dict[str, Path]) -> None:
    """Sample each mailwarden target under load with py-spy; print hot spots."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(pyspy, os.X_OK):
        raise SystemExit("bench: --profile needs py-spy (pip install py-spy)")
    outdir = Path(args.profile)
    outdir.mkdir(parents=True, exist_ok=True)
    counts = QUICK_COUNTS if args.quick else COUNTS
    for name in args.targets:
        if not name.startswith("mw"):
            continue
        for mset in args.matrix:
            for sessions in args.sessions:
                t = Target(name)
                env.generation += 1
                t.start(env)
                warm_up(t, env, files[mset], mset)
                n = args.messages or counts[mset][0 if sessions == 1 else 1]
                raw = outdir / f"{name}-{mset}-{sessions}.txt"
                spy = subprocess.Popen(
                    [pyspy, "record", "--pid", str(t.pid), "--format", "raw", "--output",
                     str(raw), "--rate", "250", "--nonblocking", "--function", "--gil"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # let py-spy attach
                smp = measure(t, env, files[mset], mset, sessions, n)
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
                t.stop()
                print(f"\n{name} {mset} x{sessions} sessions: {smp.rate:,.0f} msgs/s under "
                      f"py-spy, CPU {fmt(smp.cpu_ms, '.2f')} ms/msg; stacks in {raw}")
                if raw.exists():
                    print(summarize_profile(raw))


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="mailwarden throughput benchmark (smtp-source -> target -> smtp-sink)")
    p.add_argument("--quick", action="store_true", help="few messages, one run (~2 min)")
    p.add_argument("--matrix", default=",".join(messages.SETS),
                   help="message sets (default: %(default)s)")
    p.add_argument("--sessions", default="1,20", help="parallel sessions (default: %(default)s)")
    p.add_argument("--reuse", default="20",
                   help="session counts also measured with connection reuse (smtp-source -d: "
                        "one connection per session for all its messages), as extra rows "
                        "'N reuse'; '' for none (default: %(default)s)")
    p.add_argument("--messages", type=int, help="messages per cell (default: per set)")
    p.add_argument("--runs", type=int, help="runs per cell, interleaved (default 3; quick 1)")
    p.add_argument("--cell-seconds", type=float,
                   help="aim for about this long per cell for slow targets "
                        "(default 10; quick 3)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="targets (default: all: %(default)s)")
    p.add_argument("--chain", help="the full chain to test (default: gateway.config.DEFAULT_CHAIN)")
    p.add_argument("--peers", action="store_true",
                   help="also run amavisd-new and clamsmtp from Debian's packages")
    p.add_argument("--before", metavar="REV",
                   help="also run the full chain on commit REV's code (target "
                        f"{BEFORE}), interleaved with the rest: before/after in one run")
    p.add_argument("--json", metavar="FILE", help="write every sample and the summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument("--profile", metavar="DIR",
                   help="instead of the matrix: sample each mailwarden target under load "
                        "with py-spy (raw stacks into DIR) and print its hot spots")
    args = p.parse_args(argv)
    args.matrix = [m for m in args.matrix.split(",") if m]
    for m in args.matrix:
        if m not in messages.SETS:
            p.error(f"unknown message set {m!r} (known: {', '.join(messages.SETS)})")
    args.sessions = [int(s) for s in args.sessions.split(",") if s]
    args.reuse = [int(s) for s in args.reuse.split(",") if s]
    #: the report's session rows: one connection per message, then reuse
    args.rows = [*args.sessions, *(f"{s} reuse" for s in args.reuse)]
    args.targets = [t for t in args.targets.split(",") if t]
    for t in args.targets:
        if t not in ALL_TARGETS + PEER_TARGETS + MULTI_TARGETS:
            p.error(f"unknown target {t!r} "
                    f"(known: {', '.join(ALL_TARGETS + PEER_TARGETS + MULTI_TARGETS)})")
    if args.peers:
        args.targets += [t for t in PEER_TARGETS if t not in args.targets]
    if args.before and BEFORE not in args.targets:
        args.targets.append(BEFORE)
    for t in args.targets:
        if t in PEER_TARGETS and peers.missing(t):
            p.error(f"target {t} needs: {peers.missing(t)}")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.cell_seconds is None:
        args.cell_seconds = 3.0 if args.quick else 10.0
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
    from gateway.config import DEFAULT_CHAIN

    full_chain = tuple(args.chain.split(",")) if args.chain else DEFAULT_CHAIN
    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-"))
    files = messages.write_all(workdir / "messages", tuple(args.matrix))
    sink = clamd = pg = None
    targets = [Target(name) for name in args.targets]
    samples: list[Sample] = []
    t_start = time.monotonic()
    args.code = code_version()
    if args.before:
        args.code += f"; {BEFORE} = {rev_version(args.before)}"
    try:
        sink = Sink(workdir)
        clamd = start_clamd(tcp="amavis" in args.targets) if need_clamd else None
        pg = start_postgres() if any("+pg" in t for t in args.targets) else None
        env = Env(workdir, sink, clamd.socket if clamd else "", clamd_pid(clamd) if clamd else None,
                  full_chain, src=snapshot(workdir / "src"),
                  clamd_tcp=(clamd.tcp_address or "") if clamd else "",
                  before_src=snapshot_rev(args.before, workdir / "src-before")
                  if args.before else None, pg=pg)
        if args.profile:
            profile(args, env, files)
        else:
            run_matrix(args, env, files, targets, samples)
    finally:
        stop_all(targets, sink, clamd)
        if pg is not None:
            pg.cleanup()
    if args.profile:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    ok = report(args, samples, time.monotonic() - t_start)
    if args.keep:
        print(f"\nkept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def cell_count(args: argparse.Namespace, counts: dict[str, tuple[int, int]], t: Target,
               mset: str, sessions: int) -> int:
    """Messages for one cell: the set's count, fewer for a slow target.

    A target much slower than the others (amavis at ~20 msgs/s) gets about
    ``--cell-seconds`` of load, judged from its warm-up rate, but never fewer
    than 50 messages (big: 6).  ``--messages`` fixes the count for everyone.
    """
    if args.messages:
        return int(args.messages)
    n = counts[mset][0 if sessions == 1 else 1]
    if t.warm_rate <= 0:
        return n
    # Warm-up ran 4 sessions; one session is roughly 2-3 times slower.
    rate = t.warm_rate / (3 if sessions == 1 else 1)
    floor = 6 if mset == "big" else 50
    return max(min(n, floor), min(n, int(rate * args.cell_seconds)))


def run_matrix(args: argparse.Namespace, env: Env, files: dict[str, Path],
               targets: list[Target], samples: list[Sample]) -> None:
    """Every cell, ``args.runs`` times, targets interleaved; appends to ``samples``."""
    counts = QUICK_COUNTS if args.quick else COUNTS
    print(f"bench: {len(targets)} targets x {len(args.matrix)} sets x "
          f"{len(args.sessions)} session counts x {args.runs} runs; "
          f"full chain = {','.join(env.full_chain)}; workdir {env.workdir}", file=sys.stderr)
    for run in range(args.runs):
        rot = run % len(targets)
        order = targets[rot:] + targets[:rot]
        for mset in args.matrix:
            env.generation += 1
            for t in order:
                t.start(env)
                warm_up(t, env, files[mset], mset)
            cells = [(s, False) for s in args.sessions] + [(s, True) for s in args.reuse]
            for sessions, reuse in cells:
                for t in order:
                    n = cell_count(args, counts, t, mset, sessions)
                    time.sleep(0.2)  # let the previous target's background work finish
                    smp = measure(t, env, files[mset], mset, sessions, n, reuse)
                    samples.append(smp)
                    print(f"  run {run + 1} {mset:6} s={sessions:<3}{'d' if reuse else ' '} "
                          f"{t.name:13} "
                          f"{smp.rate:8,.1f} msgs/s  cpu {fmt(smp.cpu_ms, '.2f')} ms/msg  "
                          f"rss {fmt(smp.rss_mb, '.0f')} MB  delivered {smp.delivered}/{n}  "
                          f"other load {smp.other_load:.0%}"
                          + (f"  {smp.dispositions}" if smp.dispositions else ""),
                          file=sys.stderr)
            for t in order:
                t.stop()


def report(args: argparse.Namespace, samples: list[Sample], elapsed: float) -> bool:
    """Print the table and the issue 2 summary; write JSON if asked.  True if all ok."""
    summary = summarize(samples)
    print(f"\nmailwarden benchmark: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.runs} run(s) per cell "
          f"(medians), {elapsed:.0f} s\ncode: {args.code}\n")
    print_table(summary, list(args.targets), args.matrix, args.rows)
    print_issue2(summary, args.sessions)
    print_issue10(summary, list(args.targets))
    print_before_after(summary, args.matrix, args.rows)
    print_issue16(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "samples": [s.__dict__ | {"rate": s.rate} for s in samples],
            "summary": [{"set": k[0], "sessions": k[1], "target": k[2], **v}
                        for k, v in summary.items()],
        }, indent=1))
    return all(row["ok"] for row in summary.values())


if __name__ == "__main__":
    sys.exit(main())
