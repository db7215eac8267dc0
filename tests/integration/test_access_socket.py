"""Access through the daemon, with real Unix users (issue 17).

The test creates one Unix group per role and one user in each (plus a user
with no role, and a service user that owns the store and runs ``mailwarden
serve``), all with unique names, removed afterwards even when a test fails.
``serve`` runs as the service user with ``[access]`` and a control socket in
a temp dir every user can reach; the store is the service user's, mode 0700.
Then the CLI runs as each user (``setpriv``, the portable install of
tests/support/otheruser.py) and shows:

* every command of ``COMMAND_ROLES`` mounted on the CLI runs for the roles
  the table lists and is refused for the others: exit 1, one line naming
  the role needed, and the refusal is in the audit trail (command, user,
  uid, reason);
* the audit rows of granted commands carry the peer's user and uid, not
  the daemon's;
* concurrent requests' outputs do not mix;
* ``--output FILE`` is written by the client, as the calling user, 0600;
* a user without a role cannot read the store's files, nor use the CLI on
  them directly (a config without ``[access]``);
* no daemon: one line, exit 1;
* hostile clients (garbage, a huge length, a partial request, a
  disconnect in the middle of a stream) do not hurt ``serve``;
* ``mailwarden reload`` by an operator reloads the daemon, audited;
* the two-person flow (issue 17's "must show") with real users through the
  daemon, the grant's expiry shown by restarting serve under libfaketime;
* the socket goes when serve stops; a stale one is replaced at start;
* the same daemon on the PostgreSQL backend (concurrent commands, each with
  its own connection; refusal and peer in the audit rows).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest

from gateway.config import ROLES
from quarantine.access import COMMAND_ROLES
from tests.support import attachment_samples as samples
from tests.support.harness import NextHop, make_message
from tests.support.otheruser import PortableInstall, as_user
from tests.support.process import to_toml, write_config
from tests.support.served import send_exact

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("useradd", "groupadd", "userdel",
                                                             "groupdel", "setpriv")),
    reason="needs root and useradd/groupadd/userdel/groupdel/setpriv to create Unix users")

#: A quarantine id that is well-formed but not held.
MISSING = "20260101-000000000000"
REFUSAL = re.compile(r"^mailwarden: (?P<cmd>[a-z -]+): refused: needs role (?P<need>[a-z ]+); "
                     r"(?P<user>\S+) \(roles: (?P<roles>[a-z, ]+)\)$")


def _args(command: str, qid: str) -> list[str] | None:
    """A command line for ``command`` that runs when the role allows it (it
    may still fail on its own terms, e.g. an id that is not held)."""
    table: dict[str, list[str]] = {
        "quarantine list": ["quarantine", "list"],
        "quarantine show": ["quarantine", "show", qid],
        "quarantine release": ["quarantine", "release", MISSING, "--reason", "test"],
        "quarantine delete": ["quarantine", "delete", MISSING, "--reason", "test"],
        "quarantine hold": ["quarantine", "hold", MISSING, "--reason", "test"],
        "quarantine unhold": ["quarantine", "unhold", MISSING, "--reason", "test"],
        "log export": ["log", "export"],
        "log stats": ["log", "stats"],
        "log verify": ["log", "verify"],
        "log reidentify": ["log", "reidentify", "no-such-export", "no-such-pseudonym"],
        "audit list": ["audit", "list"],
        "access request": ["access", "request", "--item", MISSING, "--ground", "absence",
                           "--case", "T-1", "--reason", "test"],
        "access approve": ["access", "approve", "999999"],
        "access deny": ["access", "deny", "999999"],
        "access list": ["access", "list"],
        "subject-access": ["subject-access", "nobody@example.org", "--reason", "test"],
        "erase": ["erase", "nobody@example.org", "--reason", "test"],
        "purge": ["purge", "--dry-run"],
        "check": ["check"],
        "reload": ["reload"],
    }
    args = table.get(command)
    if args is None:
        return None
    # Commands that take the policy's grounds and a case reference (issue 17's
    # grants work) get them, so "allowed" means the command itself ran.
    params = _param_names(command)
    if "ground" in params and "--ground" not in args:
        ground = ("false-positive" if command.startswith("quarantine") else
                  "subject-access" if command in ("subject-access", "erase") else "legal-duty")
        args = [*args, "--ground", ground]
    if "case" in params and "--case" not in args:
        args = [*args, "--case", "T-1"]
    return args


def _param_names(command: str) -> set[str]:
    from cli import main

    cmd: click.Command | None = main
    for word in command.split():
        cmd = cmd.commands.get(word) if isinstance(cmd, click.Group) else None
    return {p.name for p in cmd.params if p.name} if cmd is not None else set()


def mounted_commands() -> set[str]:
    """The command names (``"quarantine show"``) the CLI has."""
    from cli import main

    out: set[str] = set()

    def walk(group: click.Group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            full = f"{prefix}{name}"
            if isinstance(cmd, click.Group):
                walk(cmd, full + " ")
            else:
                out.add(full)

    walk(main, "")
    return out


# ------------------------------------------------------------ users, groups


def _admin(*cmd: str) -> None:
    """useradd & co.; retried while another process holds the passwd lock."""
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return
        busy = "lock" in out.stderr.lower() or out.returncode == 10
        if not busy or time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
        time.sleep(0.2)  # back-off before retrying the lock, not a synchronisation


@dataclass
class Accounts:
    """Groups and users created for the test; :meth:`remove` deletes them."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    users: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def group(self, tag: str) -> str:
        name = f"mwg{tag}{self.suffix}"
        _admin("groupadd", name)
        self.groups.append(name)
        return name

    def user(self, tag: str, groups: list[str] = (), *, system: bool = False) -> str:  # type: ignore[assignment]
        name = f"mwu{tag}{self.suffix}"
        cmd = ["useradd", "-M", "-N", "-g", "nogroup", "-d", "/nonexistent",
               "-s", "/usr/sbin/nologin"]
        if system:
            cmd.append("-r")
        if groups:
            cmd += ["-G", ",".join(groups)]
        _admin(*cmd, name)
        self.users.append(name)
        return name

    def remove(self) -> None:
        for u in self.users:
            with contextlib.suppress(Exception):
                _admin("userdel", u)
        for g in self.groups:
            with contextlib.suppress(Exception):
                _admin("groupdel", g)


# ------------------------------------------------------------------- serve


@dataclass
class Env:
    base: Path
    config: Path
    store: Path
    socket: Path
    port: int
    service: str
    #: role (or "none") -> user name
    users: dict[str, str]
    install: PortableInstall
    next_hop: NextHop
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    qid: str = ""
    personal_qid: str = ""
    relayed: int = 0

    def run(self, who: str, *args: str, config: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``mailwarden ARGS`` as the user of role ``who`` (or a user name)."""
        user = self.users.get(who, who)
        return self.install.run_as(user, "cli", "--config", str(config or self.config), *args,
                                   timeout=timeout)

    def log(self) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def audit(self) -> list[dict[str, Any]]:
        """The audit trail, read through the daemon by the dpo."""
        out = self.run("dpo", "audit", "list", "--json")
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


_RELAUNCH = ("import json, os, sys; os.environ.update(json.loads(sys.argv[1]));"
             " os.execv('/proc/self/exe', sys.argv[2:])")


def _start_serve(env: Env, extra_env: dict[str, str] | None = None) -> None:
    prefix = as_user(env.service, "nogroup")
    assert prefix is not None
    env.log_path = env.base / "serve.log"
    since = env.log_path.stat().st_size if env.log_path.exists() else 0
    with open(env.log_path, "ab") as logf:
        command = env.install.command("cli", "--config", str(env.config), "serve")
        if extra_env:
            # Set after the user switch (setpriv itself must not load libfaketime:
            # its shared state would be root's, out of the service user's reach),
            # then exec through /proc/self/exe (the interpreter's own path may lie
            # in a directory only root may search).
            command = [command[0], "-c", _RELAUNCH, json.dumps(extra_env), *command]
        env.proc = subprocess.Popen(
            [*prefix, *command], stdout=logf, stderr=logf, cwd=env.install.root,
            env=env.install.env)
    deadline = time.monotonic() + 120
    while "mailwarden ready" not in env.log()[since:]:
        if env.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serve did not start: {env.log()}")
        time.sleep(0.05)  # poll interval of the wait for the ready line


def _stop_serve(env: Env) -> int | None:
    if env.proc is None:
        return None
    if env.proc.poll() is None:
        env.proc.send_signal(signal.SIGTERM)
        try:
            env.proc.wait(60)
        except subprocess.TimeoutExpired:
            env.proc.kill()
            env.proc.wait(10)
    return env.proc.returncode


@pytest.fixture(scope="module")
def env(other_user_install: PortableInstall) -> Iterator[Env]:
    accounts = Accounts()
    next_hop = NextHop()
    base = Path(tempfile.mkdtemp(prefix="mw-access-"))
    e: Env | None = None
    try:
        os.chmod(base, 0o755)
        groups = {role: accounts.group(role[:3]) for role in ROLES}
        users = {role: accounts.user(role[:3], [groups[role]]) for role in ROLES}
        users["none"] = accounts.user("non")
        service = accounts.user("svc", system=True)
        svc = pwd.getpwnam(service)
        problem = other_user_install.probe(users["none"])
        if problem:
            pytest.skip(f"other users cannot run the portable install: {problem}")
        store = base / "store"
        store.mkdir(mode=0o700)
        os.chown(store, svc.pw_uid, svc.pw_gid)
        run = base / "run"
        run.mkdir(mode=0o755)
        os.chown(run, svc.pw_uid, svc.pw_gid)
        sock = run / "control.sock"
        config, port = write_config(
            base / "config.toml", store=store, next_hop=next_hop.address,
            chain=["attachment_types", "personal", "header_log"])
        with open(config, "a") as f:
            f.write("\n" + to_toml({"access": {
                "control_socket": str(sock), "socket_mode": "0666",
                "roles": {role: [groups[role]] for role in ROLES}}}))
        os.chmod(config, 0o644)
        e = Env(base=base, config=config, store=store, socket=sock, port=port, service=service,
                users=users, install=other_user_install, next_hop=next_hop)
        _start_serve(e)
        held = send_exact(port, make_message(
            subject="tool", attachments=[("tool.bin", "application/octet-stream",
                                          samples.elf())]), "held@ext.test")
        assert held.kind == "held", held.text
        e.qid = held.quarantine_id or ""
        private = send_exact(port, make_message(
            subject="[personal] my holiday", body="very private words\n",
            attachments=[("tool.bin", "application/octet-stream", samples.elf())]),
            "private@ext.test")
        assert private.kind == "held", private.text
        e.personal_qid = private.quarantine_id or ""
        for i in range(60):
            answer = send_exact(port, make_message(subject=f"note {i}"), f"s{i}@ext.test")
            assert answer.kind == "relayed", answer.text
        e.relayed = 60
        yield e
    finally:
        if e is not None:
            _stop_serve(e)
        next_hop.stop()
        accounts.remove()
        shutil.rmtree(base, ignore_errors=True)


def _wait_log_records(env: Env, n: int) -> None:
    """Until the header log holds ``n`` records (the writer is batched)."""
    deadline = time.monotonic() + 120
    while True:
        out = env.run("auditor", "log", "export", "--format", "jsonl")
        if out.returncode == 0 and len(out.stdout.splitlines()) >= n:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the log has not {n} records: {out.stderr}")
        time.sleep(0.2)  # poll interval of the wait


# ------------------------------------------------------------------- tests


@pytest.mark.parametrize("command", sorted(COMMAND_ROLES))
def test_each_command_as_each_role(env: Env, command: str) -> None:
    if command not in mounted_commands():
        pytest.skip(f"{command}: in COMMAND_ROLES but not mounted on the CLI yet")
    args = _args(command, env.qid)
    assert args is not None, f"{command}: add a command line to _args"
    need = COMMAND_ROLES[command]
    who = [*ROLES, "none"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(who, pool.map(lambda w: env.run(w, *args), who), strict=True))
    refused: list[str] = []
    for role, out in results.items():
        user = env.users[role]
        label = f"{command} as {role} ({user}): exit {out.returncode}: {out.stderr.strip()}"
        if role in need:
            assert "refused: needs role" not in out.stderr, label
            assert out.returncode in (0, 1, 2), label
            assert "Traceback" not in out.stderr, label
        else:
            assert out.returncode == 1, label
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1, label
            m = REFUSAL.match(lines[0])
            assert m, label
            assert m["cmd"] == command and m["user"] == user, label
            assert m["need"] == " or ".join(sorted(need)), label
            assert out.stdout == "", label
            refused.append(user)
    assert env.alive(), env.log()
    rows = [r for r in env.audit() if r["command"] == f"{command} (refused)"]
    for user in refused:
        mine = [r for r in rows if r["user"] == user]
        assert mine, f"the refusal of {command} to {user} is not in the audit trail"
        row = mine[-1]
        assert row["uid"] == pwd.getpwnam(user).pw_uid
        assert row["detail"]["refused"] == row["reason"]
        assert row["reason"].startswith(f"{command}: refused: needs role")


def test_granted_rows_carry_the_peer(env: Env) -> None:
    out = env.run("reviewer", "quarantine", "list", "--json")
    assert out.returncode == 0, out.stderr
    assert env.qid in out.stdout
    show = _args("quarantine show", env.qid)
    assert show is not None
    out = env.run("reviewer", *show)
    assert out.returncode == 0, out.stderr
    assert "tool" in out.stdout
    reviewer = pwd.getpwnam(env.users["reviewer"])
    rows = env.audit()
    listed = [r for r in rows if r["command"] == "quarantine list"
              and r["user"] == reviewer.pw_name]
    assert listed and listed[-1]["uid"] == reviewer.pw_uid
    shown = [r for r in rows if r["command"] == "quarantine show" and env.qid in r["targets"]]
    assert shown and shown[-1]["user"] == reviewer.pw_name
    assert shown[-1]["uid"] == reviewer.pw_uid
    service = pwd.getpwnam(env.service)
    assert not [r for r in rows if r["uid"] == service.pw_uid], \
        "a row of a command run through the socket carries the daemon's user"
    # ... and the dpo's own `audit list` row is the dpo's.
    dpo = pwd.getpwnam(env.users["dpo"])
    assert [r for r in rows if r["command"] == "audit list" and r["uid"] == dpo.pw_uid]


def test_reload_through_the_socket(env: Env) -> None:
    out = env.run("operator", "reload")
    assert out.returncode == 0, out.stderr
    assert "configuration reloaded" in out.stdout
    assert "configuration reloaded" in env.log()
    operator = pwd.getpwnam(env.users["operator"])
    rows = [r for r in env.audit() if r["command"] == "reload"
            and r["detail"].get("outcome") == "reloaded"]
    assert rows and rows[-1]["user"] == operator.pw_name
    assert rows[-1]["uid"] == operator.pw_uid
    # the daemon's config file broken: refused, one line, the running config
    # kept (the client reads a good copy: it would refuse a broken one itself)
    good = env.config.read_text()
    copy = env.base / "client-copy.toml"
    copy.write_text(good)
    os.chmod(copy, 0o644)
    try:
        env.config.write_text(good.replace("[gateway]", "[gateway]\nbogus_key = 1", 1))
        out = env.run("operator", "reload", config=copy)
        _one_line(out, 1, "reload refused, keeping the running config", "bogus_key")
    finally:
        env.config.write_text(good)
    out = env.run("reviewer", "quarantine", "list")
    assert out.returncode == 0, out.stderr


def test_the_store_is_out_of_reach_without_the_daemon(env: Env) -> None:
    prefix = as_user(env.users["none"])
    assert prefix is not None
    db = env.store / "mailwarden.db"
    out = subprocess.run([*prefix, "cat", str(db)], capture_output=True, timeout=60)
    assert out.returncode != 0 and b"Permission denied" in out.stderr
    assert stat.S_IMODE(env.store.stat().st_mode) == 0o700
    # A config without [access]: the CLI opens the store itself, and cannot.
    direct = env.base / "direct.toml"
    direct.write_text(env.config.read_text().split("\n[access]")[0])
    os.chmod(direct, 0o644)
    for role in ("none", "dpo"):
        out = env.run(role, "quarantine", "list", config=direct)
        assert out.returncode == 1, out
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr
        assert out.stdout == ""


def test_concurrent_requests_do_not_mix(env: Env) -> None:
    _wait_log_records(env, env.relayed)
    jobs = [("auditor", "csv"), ("dpo", "jsonl"), ("auditor", "jsonl"), ("dpo", "csv")] * 2

    def export(job: tuple[str, str]) -> subprocess.CompletedProcess[str]:
        who, fmt = job
        return env.run(who, "log", "export", "--format", fmt)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(export, jobs))
    for (who, fmt), out in zip(jobs, results, strict=True):
        label = f"{who} {fmt}: {out.stderr.strip()}"
        assert out.returncode == 0, label
        if fmt == "csv":
            rows = list(csv.reader(io.StringIO(out.stdout)))
            header, body = rows[0], rows[1:]
            assert header[0] == "seq", label
            assert all(len(r) == len(header) for r in body), label
            seqs = [int(r[0]) for r in body]
        else:
            records = [json.loads(line) for line in out.stdout.splitlines()]
            seqs = [r["seq"] for r in records]
        assert len(seqs) >= env.relayed, label
        assert seqs == sorted(set(seqs)), label


def test_output_file_is_written_by_the_client(env: Env) -> None:
    auditor = pwd.getpwnam(env.users["auditor"])
    outdir = env.base / "out-auditor"
    outdir.mkdir(mode=0o700)
    os.chown(outdir, auditor.pw_uid, auditor.pw_gid)
    target = outdir / "export.csv"
    out = env.run("auditor", "log", "export", "--output", str(target))
    assert out.returncode == 0, out.stderr
    st = target.stat()
    assert st.st_uid == auditor.pw_uid, "the file was not written by the caller"
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert target.read_text().startswith("seq,")
    assert re.search(r"^sha256 [0-9a-f]{64}  " + re.escape(str(target)) + "$",
                     out.stderr, re.M), out.stderr
    assert out.stdout == ""
    # subject-access --output, by the dpo: the same.
    dpo = pwd.getpwnam(env.users["dpo"])
    dpodir = env.base / "out-dpo"
    dpodir.mkdir(mode=0o700)
    os.chown(dpodir, dpo.pw_uid, dpo.pw_gid)
    sar = _args("subject-access", env.qid)
    assert sar is not None
    out = env.run("dpo", *sar, "--output", str(dpodir / "sar.json"))
    assert out.returncode == 0, out.stderr
    st = (dpodir / "sar.json").stat()
    assert st.st_uid == dpo.pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    json.loads((dpodir / "sar.json").read_text())
    assert [p.name for p in dpodir.iterdir()] == ["sar.json"]
    # Refused: no file, no temp file left behind.
    none = pwd.getpwnam(env.users["none"])
    nonedir = env.base / "out-none"
    nonedir.mkdir(mode=0o700)
    os.chown(nonedir, none.pw_uid, none.pw_gid)
    out = env.run("none", "log", "export", "--output", str(nonedir / "x.csv"))
    assert out.returncode == 1 and "refused: needs role" in out.stderr
    assert list(nonedir.iterdir()) == []


def test_no_daemon_is_one_line(env: Env) -> None:
    gone = env.base / "nodaemon.toml"
    gone.write_text(env.config.read_text().replace(str(env.socket),
                                                    str(env.base / "nowhere" / "control.sock")))
    os.chmod(gone, 0o644)
    out = env.run("reviewer", "quarantine", "list", config=gone)
    assert out.returncode == 1
    assert out.stderr.strip() == ("mailwarden: mailwarden serve is not running: no control"
                                  f" socket at {env.base / 'nowhere' / 'control.sock'}")


HOSTILE = r"""
import socket, struct, sys, json
path, case = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
if case == "garbage":
    s.sendall(b"\x00\x00\x00\x10" + b"\xff" * 16)
elif case == "huge":
    s.sendall(struct.pack(">I", 2**31))
elif case == "partial":
    s.sendall(struct.pack(">I", 100) + b'{"argv": [')
    s.close(); sys.exit(0)
elif case == "vanish":
    body = json.dumps({"argv": ["log", "export", "--format", "jsonl"], "tty": False,
                       "width": None}).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    s.recv(10)
    s.close(); sys.exit(0)
elif case == "notreading":
    body = json.dumps({"argv": ["log", "export"], "tty": False, "width": None}).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    s.shutdown(socket.SHUT_WR)
    s.close(); sys.exit(0)
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.write(data.decode("utf-8", "replace"))
"""


@pytest.mark.parametrize("case", ["garbage", "huge", "partial", "vanish", "notreading"])
def test_hostile_clients_do_not_hurt_serve(env: Env, case: str) -> None:
    prefix = as_user(env.users["auditor"])
    assert prefix is not None
    out = subprocess.run([*prefix, str(env.install.python), "-c", HOSTILE, str(env.socket), case],
                         capture_output=True, text=True, timeout=120, env=env.install.env,
                         cwd=env.install.root)
    assert out.returncode == 0, out.stderr
    if case in ("garbage", "huge"):
        assert "bad request" in out.stdout
    assert env.alive(), env.log()
    # serve still answers, and said nothing worse than a warning about it.
    check = env.run("auditor", "log", "verify")
    assert check.returncode == 0, check.stderr
    assert "Traceback" not in env.log()


def faketime(offset: str) -> dict[str, str]:
    """The environment that runs a process ``offset`` later (libfaketime)."""
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not libs:
        pytest.fail("libfaketime.so.1 not found (Debian package faketime)", pytrace=False)
    return {"LD_PRELOAD": str(libs[0]), "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1"}


def _one_line(out: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    label = f"exit {out.returncode}: {out.stderr.strip()}"
    assert out.returncode == code, label
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailwarden: "), label
    for n in needles:
        assert n in lines[0], label


def test_two_person_flow_through_the_daemon(env: Env) -> None:
    """Real users through the control socket: an investigator requests, cannot
    approve; a dpo cannot approve their own request; a dpo approves; the
    investigator reads the personal body; 25 h later (serve restarted under
    libfaketime) the same read is refused.  Everything in the audit trail
    under the real users' names."""
    qid = env.personal_qid
    inv, dpo = env.users["investigator"], env.users["dpo"]
    read = ("quarantine", "show", qid, "--body", "--reason", "HR case", "--ground",
            "offensive-material", "--case", "HR-7")
    mark = max((r["seq"] for r in env.audit()), default=0)
    _one_line(env.run("investigator", *read), 1, "refused", "grant")

    def request(who: str, case: str) -> str:
        out = env.run(who, "access", "request", "--item", qid, "--ground",
                      "offensive-material", "--case", case, "--reason", "complaint 7")
        assert out.returncode == 0, out.stderr
        rid = out.stdout.strip()
        assert re.fullmatch(r"R\d{8}-[0-9A-F]{8}", rid), rid
        return rid

    rid = request("investigator", "HR-7")
    _one_line(env.run("investigator", "access", "approve", rid), 1, "refused", "dpo")
    own = request("dpo", "HR-9")
    _one_line(env.run("dpo", "access", "approve", own), 1, "refused", "second person")
    out = env.run("dpo", "access", "approve", rid)
    assert out.returncode == 0, out.stderr
    out = env.run("investigator", *read)
    assert out.returncode == 0, out.stderr
    assert "very private words" in out.stdout
    # another user with the same role has no grant
    _one_line(env.run("reviewer", *read), 1, "refused")

    # 25 hours later (grant_hours = 24): the daemon's clock moved, the read is refused
    assert _stop_serve(env) == 0, env.log()
    try:
        _start_serve(env, faketime("+25h"))
        _one_line(env.run("investigator", *read), 1, "refused", "grant")
    finally:
        _stop_serve(env)
        _start_serve(env)

    rows = [(r["user"], r["command"]) for r in env.audit() if r["seq"] > mark
            and r["command"].startswith(("quarantine show", "access approve", "access request"))
            and (qid in r["targets"] or r["command"].startswith("access"))]
    assert rows == [
        (inv, "quarantine show (refused)"),
        (inv, "access request"),
        (inv, "access approve (refused)"),
        (dpo, "access request"),
        (dpo, "access approve (refused)"),
        (dpo, "access approve"),
        (inv, "quarantine show"),
        (env.users["reviewer"], "quarantine show (refused)"),
        (inv, "quarantine show (refused)"),
    ], rows


def test_pseudonymised_export_and_reidentify_through_the_daemon(env: Env) -> None:
    """Real users through the control socket: the auditor's export holds no
    real address (bytes scanned), one pseudonym per person within an export and
    another across exports; re-identification is refused without a grant and
    gives the address with an approved one."""
    _wait_log_records(env, env.relayed)
    senders = [f"s{i}@ext.test" for i in range(env.relayed)]

    def export(who: str) -> tuple[bytes, str]:
        out = env.run(who, "log", "export", "--format", "jsonl")
        assert out.returncode == 0, out.stderr
        m = re.search(r"\b(E\d{8}-[0-9A-F]{10})\b", out.stderr)
        assert m, out.stderr
        return out.stdout.encode(), m.group(1)

    data, eid = export("auditor")
    text = data.decode().lower()
    for addr in [*senders, "b@example.com", "held@ext.test", "private@ext.test"]:
        assert addr not in text, addr
    objs = [json.loads(line) for line in data.decode().splitlines()]
    note1 = next(o for o in objs if o["subject"] == "note 1")
    pseudo = note1["mail_from"]
    assert re.fullmatch(r"pn-[0-9a-f]{20}", pseudo), pseudo
    rcpts = {r for o in objs for r in o["rcpt_tos"]}
    assert len(rcpts) == 1, rcpts  # b@example.com, the same pseudonym in every record
    data2, eid2 = export("auditor")
    assert eid2 != eid and pseudo.encode() not in data2 and rcpts.pop().encode() not in data2

    args = ("log", "reidentify", eid, pseudo, "--ground", "excessive-personal",
            "--case", "HR-11")
    _one_line(env.run("auditor", *args), 1, "refused", "grant")
    _one_line(env.run("investigator", *args), 1, "refused", "grant")
    out = env.run("investigator", "access", "request", "--address", "s1@ext.test", "--ground",
                  "excessive-personal", "--case", "HR-11", "--reason", "complaint 11")
    assert out.returncode == 0, out.stderr
    rid = out.stdout.strip()
    assert env.run("dpo", "access", "approve", rid).returncode == 0
    out = env.run("investigator", *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "s1@ext.test\n"
    rows = [(r["user"], r["command"]) for r in env.audit()
            if r["command"].startswith("log reidentify") and eid in r["targets"]]
    assert rows == [(env.users["auditor"], "log reidentify (refused)"),
                    (env.users["investigator"], "log reidentify (refused)"),
                    (env.users["investigator"], "log reidentify")], rows


def test_serve_removes_its_socket_on_stop(env: Env) -> None:
    """Last in this module: stop serve (SIGTERM), the socket goes; a restart
    replaces nothing it should not (a stale socket is replaced)."""
    assert env.socket.exists()
    assert _stop_serve(env) == 0, env.log()
    assert not env.socket.exists()
    # A stale socket (nobody answers on it) is replaced at the next start.
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(env.socket))
    stale.close()
    svc = pwd.getpwnam(env.service)
    os.chown(env.socket, svc.pw_uid, svc.pw_gid)
    _start_serve(env)
    assert stat.S_IMODE(env.socket.stat().st_mode) == 0o666
    out = env.run("reviewer", "quarantine", "list")
    assert out.returncode == 0, out.stderr



# ------------------------------------------------------- PostgreSQL backend


@pytest.fixture(scope="module")
def pg_env(other_user_install: PortableInstall, pg_server: Any) -> Iterator[Env]:
    """The same daemon on the PostgreSQL backend (serve as root: the store is
    the database, not files); users with the reviewer and dpo roles and one
    with none."""
    accounts = Accounts()
    next_hop = NextHop()
    base = Path(tempfile.mkdtemp(prefix="mw-access-pg-"))
    e: Env | None = None
    try:
        os.chmod(base, 0o755)
        roles = ("reviewer", "dpo")
        groups = {role: accounts.group(role[:3]) for role in roles}
        users = {role: accounts.user(role[:3], [groups[role]]) for role in roles}
        users["none"] = accounts.user("non")
        run = base / "run"
        run.mkdir(mode=0o755)
        sock = run / "control.sock"
        config, port = write_config(
            base / "config.toml", store=base / "store", next_hop=next_hop.address,
            chain=["attachment_types", "header_log"],
            store_extra={"backend": "postgresql", "dsn": pg_server.new_database(),
                         "instance": "sock"})
        with open(config, "a") as f:
            f.write("\n" + to_toml({"access": {
                "control_socket": str(sock), "roles": {r: [groups[r]] for r in roles}}}))
        os.chmod(config, 0o644)
        e = Env(base=base, config=config, store=base / "store", socket=sock, port=port,
                service="root", users=users, install=other_user_install, next_hop=next_hop)
        _start_serve(e)
        held = send_exact(port, make_message(
            subject="tool", attachments=[("tool.bin", "application/octet-stream",
                                          samples.elf())]), "held@ext.test")
        assert held.kind == "held", held.text
        e.qid = held.quarantine_id or ""
        yield e
    finally:
        if e is not None:
            _stop_serve(e)
        next_hop.stop()
        accounts.remove()
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_backend_through_the_daemon(pg_env: Env) -> None:
    env = pg_env
    reviewer = pwd.getpwnam(env.users["reviewer"])
    none = pwd.getpwnam(env.users["none"])
    # concurrent commands, each with its own PostgreSQL connection in the daemon
    jobs = [("reviewer", ("quarantine", "list", "--json"))] * 4 + \
        [("dpo", ("audit", "list", "--json"))] * 4 + [("none", ("quarantine", "list"))]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda j: env.run(j[0], *j[1]), jobs))
    for (who, _), out in zip(jobs, results, strict=True):
        if who == "none":
            _one_line(out, 1, "quarantine list: refused: needs role dpo or reviewer",
                      none.pw_name)
        else:
            assert out.returncode == 0, out.stderr
            rows = [json.loads(line) for line in out.stdout.splitlines()]
            if who == "reviewer":
                assert [r["id"] for r in rows] == [env.qid]
    rows = env.audit()
    listed = [r for r in rows if r["command"] == "quarantine list"]
    assert len(listed) == 4 and {(r["user"], r["uid"]) for r in listed} == \
        {(reviewer.pw_name, reviewer.pw_uid)}
    refused = [r for r in rows if r["command"] == "quarantine list (refused)"]
    assert [(r["user"], r["uid"]) for r in refused] == [(none.pw_name, none.pw_uid)]
    assert env.alive(), env.log()
