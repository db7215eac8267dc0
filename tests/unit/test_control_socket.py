"""The control socket's mechanism, in-process (issue 17; the real-user tests
are tests/integration/test_access_socket.py).

A :class:`cli.control.ControlServer` over a toy click tree whose command
names are in ``COMMAND_ROLES``, the caller being this process's own user
(peer credentials of a real unix socket) with roles from its primary group:

* concurrent requests' outputs (megabytes each) never mix;
* a client that goes away in the middle of a stream ends its command (the
  next write raises) and the server goes on serving;
* a refusal is audited with the peer as the row's user, answered in one
  line, exit 1;
* ``--output`` in a request, an unknown command, a usage error: exit 2,
  nothing runs;
* the README's role table is ``COMMAND_ROLES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click
import pytest

from cli.common import Command, Group, run_with_store
from cli.control import (
    EXIT,
    MAX_PER_UID,
    STDERR,
    STDOUT,
    ControlServer,
    ControlSocketInUse,
    encode_request,
    read_frame,
)
from gateway.config import ROLES, Config, parse_config
from quarantine.access import COMMAND_ROLES, current
from quarantine.grants import refuse
from quarantine.store import Store

REPO = Path(__file__).resolve().parents[2]

#: What the toy commands saw: (command, user, uid, interrupted)
SEEN: list[tuple[str, str, int, bool]] = []


def toy_root() -> click.Group:
    @click.group(cls=Group)
    def root() -> None:
        pass

    @root.group("log", cls=Group)
    def log_group() -> None:
        pass

    @log_group.command("export", cls=Command)
    @click.option("--tag", required=True)
    @click.option("--lines", type=int, default=10)
    @click.option("--output", metavar="FILE")
    def export(tag: str, lines: int, output: str | None) -> None:
        caller = current()
        interrupted = True
        try:
            for i in range(lines):
                click.echo(f"{tag} {i:08d} " + tag * 40)
                if i % 97 == 0:
                    click.echo(f"{tag} note {i}", err=True)
            interrupted = False
        finally:
            SEEN.append(("log export", caller.user, caller.uid, interrupted))

    @root.group("quarantine", cls=Group)
    def quarantine_group() -> None:
        pass

    @quarantine_group.command("show", cls=Command)
    @click.argument("qid")
    @click.pass_context
    def show(ctx: click.Context, qid: str) -> None:
        async def body(store: Any, config: Any) -> int:
            await refuse(store, "quarantine show",
                         f"quarantine show: refused: {qid} is personal; needs an approved grant",
                         targets=[qid])

        run_with_store(ctx, body)

    @root.command("purge", cls=Command)
    def purge() -> None:
        # a prompt in the daemon must not read the daemon's stdin
        if not click.confirm("really?", default=False):
            click.echo("not confirmed")

    @root.command("erase", cls=Command)
    @click.argument("address")
    def erase(address: str) -> None:
        raise AssertionError("erase ran")

    return root


class FakeStore:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    async def audit(self, command: str, **kw: Any) -> int:
        c = current()
        self.rows.append({"command": command, "user": c.user, "uid": c.uid, **kw})
        return len(self.rows)


def make_config(tmp: str, path: str) -> Config:
    group = grp.getgrgid(os.getgid()).gr_name
    # Our own primary group holds "auditor", "investigator" and "operator":
    # log export, quarantine show and purge yes, erase no.
    return parse_config({
        "gateway": {"internal_domains": ["example.com"]},
        "store": {"path": os.path.join(tmp, "store")}, "filters": {"chain": []},
        "access": {"control_socket": path, "socket_mode": "0600",
                   "roles": {"auditor": [group], "investigator": [group],
                             "operator": [group]}}})


def ask(path: str, argv: list[str], *, stop_after: int | None = None
        ) -> tuple[int | None, bytes, bytes]:
    """One request; (exit status, stdout, stderr).  ``stop_after``: close
    the connection after that many stdout bytes (a client that vanishes)."""
    out, err = bytearray(), bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(encode_request(argv, tty=False, width=None))
        while (frame := read_frame(s)) is not None:
            kind, data = frame
            if kind == STDOUT:
                out += data
                if stop_after is not None and len(out) >= stop_after:
                    return None, bytes(out), bytes(err)
            elif kind == STDERR:
                err += data
            elif kind == EXIT:
                return int(data), bytes(out), bytes(err)
    return None, bytes(out), bytes(err)


@contextlib.asynccontextmanager
async def running() -> AsyncIterator[tuple[ControlServer, FakeStore, str]]:
    """A started server.  Started in the test body, not in a fixture: the
    server routes ``sys.stdout``, which pytest's capture sets anew for the
    call phase."""
    tmp = tempfile.mkdtemp(prefix="mw-ctl-")
    path = os.path.join(tmp, "sub", "control.sock")
    store = FakeStore()
    config = make_config(tmp, path)
    real = await Store.open(os.path.join(tmp, "store"))
    await real.close()
    # two workers: more requests than workers wait for one
    srv = ControlServer(root=toy_root(), config=lambda: config, store=store,  # type: ignore[arg-type]
                        workers=2)
    srv.tmp = tmp  # type: ignore[attr-defined]
    await srv.start()
    SEEN.clear()
    try:
        yield srv, store, path
    finally:
        await srv.stop()
        assert not os.path.exists(path)
        shutil.rmtree(tmp)


async def test_socket_mode_and_in_use() -> None:
    async with running() as (srv, store, path):
        assert os.stat(path).st_mode & 0o777 == 0o600
        other = ControlServer(root=toy_root(), config=srv.config, store=store)  # type: ignore[arg-type]
        with pytest.raises(ControlSocketInUse):
            await other.start()
        assert os.path.exists(path)
        # (the probe's connection is served before this one: first in, first accepted)
        code, _, _ = await asyncio.to_thread(ask, path, ["log", "export", "--tag", "Q"])
        assert code == 0


async def test_concurrent_outputs_do_not_mix() -> None:
    async with running() as (_, _, path):
        tags = ["A", "B", "C", "D"]  # MAX_RUNNING_PER_UID, over two workers
        lines = 20000  # about 1 MB each

        results = await asyncio.gather(*(
            asyncio.to_thread(ask, path, ["log", "export", "--tag", t, "--lines", str(lines)])
            for t in tags))
        for tag, (code, out, err) in zip(tags, results, strict=True):
            assert code == 0, err
            got = out.decode().splitlines()
            assert got == [f"{tag} {i:08d} " + tag * 40 for i in range(lines)]
            assert err.decode().splitlines() == [f"{tag} note {i}" for i in range(0, lines, 97)]
        me = os.getuid()
        assert sorted(s for s in SEEN) == [("log export", current().user, me, False)] * len(tags)


async def test_a_client_that_vanishes_ends_its_command() -> None:
    async with running() as (_, _, path):
        code, out, _ = await asyncio.to_thread(
            ask, path, ["log", "export", "--tag", "Z", "--lines", "2000000"], stop_after=1)
        assert code is None and out
        # The command stops at its next write (it would take minutes otherwise).
        for _ in range(600):
            if SEEN:
                break
            await asyncio.sleep(0.1)  # poll interval of the wait for the command's end
        assert SEEN == [("log export", current().user, os.getuid(), True)]
        code, out, err = await asyncio.to_thread(ask, path, ["log", "export", "--tag", "Y"])
        assert code == 0 and out.count(b"\n") == 10


async def test_refusal_is_audited_and_one_line() -> None:
    async with running() as (_, store, path):
        code, out, err = await asyncio.to_thread(ask, path, ["erase", "x@example.org"])
        assert code == 1 and out == b""
        (line,) = err.decode().splitlines()
        assert re.fullmatch(r"mailwarden: erase: refused: needs role dpo; \S+"
                            r" \(roles: auditor, investigator, operator\)", line), line
        (row,) = store.rows
        assert row["command"] == "erase (refused)" and row["uid"] == os.getuid()
        assert row["reason"] == line.removeprefix("mailwarden: ")
        assert row["detail"]["refused"] == row["reason"]
        assert row["detail"]["argv"] == ["erase", "x@example.org"]
        # A refusal does not depend on the rest of the line parsing.
        code, _, err = await asyncio.to_thread(ask, path, ["erase", "--bogus"])
        assert code == 1 and b"refused" in err and len(store.rows) == 2


async def test_a_denial_in_a_command_body_is_audited() -> None:
    async with running() as (srv, _, path):
        code, out, err = await asyncio.to_thread(ask, path, ["quarantine", "show", "X-1"])
        assert code == 1 and out == b""
        assert err.decode() == ("mailwarden: quarantine show: refused: X-1 is personal;"
                                " needs an approved grant\n")
        real = await Store.open(os.path.join(srv.tmp, "store"))  # type: ignore[attr-defined]
        try:
            rows = await real.audit_rows()
        finally:
            await real.close()
        (row,) = rows
        _, _, user, uid, command, _, _, _, _, detail, _ = row
        assert (user, uid, command) == (current().user, os.getuid(),
                                        "quarantine show (refused)")
        assert json.loads(detail)["refused"] == ("quarantine show: refused: X-1 is personal;"
                                                 " needs an approved grant")


@pytest.mark.parametrize("argv, needle", [
    (["log", "export", "--tag", "A", "--output", "/tmp/x"], b"the mailwarden client handles it"),
    (["log", "export"], b"Missing option '--tag'"),
    (["log", "nope"], b"No such command"),
    (["nope"], b"No such command"),
    ([], b""),
])
async def test_usage_errors_run_nothing(argv: list[str], needle: bytes) -> None:
    async with running() as (_, store, path):
        code, out, err = await asyncio.to_thread(ask, path, argv)
        assert code == 2, (out, err)
        assert needle in err
        assert SEEN == [] and store.rows == []


async def test_help_is_answered() -> None:
    async with running() as (_, _, path):
        code, out, _ = await asyncio.to_thread(ask, path, ["log", "export", "--help"])
        assert code == 0 and b"--tag" in out and SEEN == []


async def test_garbage_and_stop_in_flight() -> None:
    async with running() as (srv, _, path):

        def garbage() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                s.sendall(b"\xff\xff\xff\xff")
                return s.recv(1000)

        answer = await asyncio.to_thread(garbage)
        assert b"bad request" in answer
        # A stop while a command streams cuts its connection; the command ends.
        started = threading.Event()

        def long() -> tuple[int | None, bytes, bytes]:
            started.set()
            return ask(path, ["log", "export", "--tag", "L", "--lines", "5000000"])

        task = asyncio.create_task(asyncio.to_thread(long))
        await asyncio.to_thread(started.wait, 60)
        for _ in range(600):
            if srv._writers:
                break
            await asyncio.sleep(0.05)  # poll interval of the wait for the connection
        await srv.stop()
        code, _, _ = await task
        assert code is None
        for _ in range(600):
            if SEEN:
                break
            await asyncio.sleep(0.1)  # poll interval of the wait for the command's end
        assert SEEN and SEEN[0][3] is True


async def test_one_user_cannot_crowd_out_the_others() -> None:
    async with running() as (_, _, path):
        held = []
        try:
            for _ in range(MAX_PER_UID):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(s)
                s.connect(path)
            # each of those holds a connection (no request yet); one more is refused
            code, out, err = await asyncio.to_thread(ask, path, ["log", "export", "--tag", "B"])
            assert code == 1 and b"busy" in err
        finally:
            for s in held:
                s.close()
        for _ in range(600):
            code, out, err = await asyncio.to_thread(ask, path, ["log", "export", "--tag", "C"])
            if code == 0:
                break
            await asyncio.sleep(0.05)  # poll interval: the held connections' handlers end
        assert code == 0, err


async def test_a_prompt_never_reads_the_daemons_stdin() -> None:
    async with running() as (_, _, path):
        code, out, err = await asyncio.to_thread(ask, path, ["purge"])
        # click's prompt meets an empty stdin: it aborts
        assert (code, out, err) == (1, b"really? [y/N]: ", b"Aborted!\n")


async def test_one_user_cannot_hold_every_worker() -> None:
    async with running() as (srv, _, path):
        srv.max_running_per_uid = 1
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            stalled.connect(path)
            # a long export that this client never reads: it holds a worker
            stalled.sendall(encode_request(["log", "export", "--tag", "S", "--lines",
                                            "5000000"], tty=False, width=None))
            for _ in range(600):
                if srv._running:
                    break
                await asyncio.sleep(0.05)  # poll interval: the stalled command started
            code, _, err = await asyncio.to_thread(ask, path, ["log", "export", "--tag", "T"])
            assert code == 1 and b"busy with your other commands" in err
        finally:
            stalled.close()


async def test_clients_that_leave_at_once_are_no_error(caplog: pytest.LogCaptureFixture) -> None:
    def hit_and_run(n: int) -> None:
        for i in range(n):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                s.sendall(encode_request(["log", "export", "--tag", "H", "--lines", str(i)],
                                         tty=False, width=None))

    async with running() as (srv, _, path):
        await asyncio.to_thread(hit_and_run, 40)
        for _ in range(600):
            if srv.served >= 40:
                break
            await asyncio.sleep(0.05)  # poll interval: their handlers end (some were busy)
        code, _, _ = await asyncio.to_thread(ask, path, ["log", "export", "--tag", "Z"])
        assert code == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


# ------------------------------------------------------------ README table


def test_readme_role_table_is_command_roles() -> None:
    text = (REPO / "README.md").read_text()
    start = text.index("<!-- roles-table -->")
    end = text.index("<!-- /roles-table -->")
    table: dict[str, set[str]] = {}
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 1 + len(ROLES) or not cells[0].startswith("`"):
            continue
        table[cells[0].strip("`")] = {r for r, c in zip(ROLES, cells[1:], strict=True)
                                      if c == "yes"}
    header = [c.strip() for c in text[start:end].splitlines()[1].strip().strip("|").split("|")]
    assert header == ["command", *ROLES]
    assert table == {k: set(v) for k, v in COMMAND_ROLES.items()}


# ------------------------------------------------------------------ client


@pytest.mark.parametrize("args, expected", [
    (["log", "export", "--output", "f.csv", "--json"], ["log", "export", "--json"]),
    (["log", "export", "--output=f.csv"], ["log", "export"]),
    (["log", "export", "--address", "--output", "--output", "f.csv"],
     ["log", "export", "--address", "--output"]),
    (["log", "export", "--", "--output", "f.csv"], ["log", "export", "--", "--output", "f.csv"]),
])
def test_the_client_takes_output_off_the_line(args: list[str], expected: list[str]) -> None:
    from cli.client import without_option

    assert without_option(args, ["--output"], "f.csv") == expected


def test_the_client_without_a_daemon(tmp_path: Path) -> None:
    from cli.client import forward

    target = tmp_path / "out.csv"
    with pytest.raises(SystemExit) as exc:
        forward(str(tmp_path / "none.sock"), ["log", "export"], output=str(target))
    assert exc.value.code == 1
    assert list(tmp_path.iterdir()) == []
