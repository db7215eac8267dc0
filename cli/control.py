"""The control socket: how commands on kept data reach a running ``mailwarden
serve`` when ``[access]`` is configured (issue 17).

The daemon owns the store (its files belong to the ``mailwarden`` user, mode
0700); people reach kept data only through this unix socket, as
amavisd-release talks to amavisd.  Per connection:

1. the peer's credentials (``SO_PEERCRED``: pid, uid, gid) give the caller:
   user name, Unix groups from the group database, roles from
   ``[access.roles]`` (:func:`quarantine.access.caller_from_peer`);
2. one request: ``argv`` (the words after ``mailwarden``), whether the
   client's stdout is a terminal, and its width (see :func:`encode_request`);
3. ``argv`` is parsed against the click tree (a usage error or ``--help`` is
   answered as click would, exit 2 / 0); only the commands of
   :data:`~quarantine.access.COMMAND_ROLES` run here;
4. :func:`~quarantine.access.role_refusal` decides; a refusal is written to
   the audit trail as ``quarantine.grants.refuse`` writes the commands' own
   refusals (command ``"<command> (refused)"``, the caller's user and uid,
   ``detail.refused`` and ``reason`` = the refusal) and answered with that
   one line, exit 1;
5. a granted command runs in-process in a worker thread of a bounded pool,
   under :func:`~quarantine.access.set_current` (so its audit rows carry the
   peer's user and uid), with its own store connection (``run_with_store``);
   its stdout and stderr are captured for this request only (the
   process-wide ``sys.stdout``/``sys.stderr`` are proxies that route by a
   context variable) and streamed back in frames, then the exit status.

Options that name a local file (``--output FILE``) are the client's business
(cli/client.py writes the file as the caller); a request that still carries
one is a usage error, so the daemon never writes a file a caller chose.

Wire format (all lengths big-endian, unsigned 32 bit):

* request: ``len`` + UTF-8 JSON ``{"argv": [...], "tty": bool, "width": int|null}``,
  at most :data:`MAX_REQUEST` bytes;
* answer: frames ``kind`` (one byte: ``o`` stdout, ``e`` stderr, ``x`` exit
  status as ASCII digits) + ``len`` + payload; the ``x`` frame is the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from quarantine.access import (
    COMMAND_ROLES,
    LOCAL_COMMANDS,
    Caller,
    caller_from_peer,
    reset_current,
    role_refusal,
    set_current,
)

if TYPE_CHECKING:
    from gateway.config import Config
    from quarantine.store import Store

log = logging.getLogger("mailwarden.control")

#: Largest request accepted (argv as JSON); a longer one is refused unread.
MAX_REQUEST = 64 * 1024
#: Largest frame payload sent (longer output is split).
MAX_FRAME = 256 * 1024
#: How long a client may take to send its request.
REQUEST_TIMEOUT = 30.0
#: How long one frame may wait for a client that does not read.
SEND_TIMEOUT = 300.0
#: Connections served at once (running or queued); more are answered "busy".
MAX_CONNECTIONS = 64
#: Connections one uid may hold at once (so one user cannot crowd out the others).
MAX_PER_UID = 8
#: Commands run at once (worker threads).
WORKERS = 8
#: Commands one uid may have running (or waiting for a worker) at once, so
#: that one user's stalled clients cannot hold every worker.
MAX_RUNNING_PER_UID = 4
#: Buffered stdout is sent once it reaches this size (or on flush after FLUSH_AFTER s).
FLUSH_BYTES = 16 * 1024
FLUSH_AFTER = 0.2

_HEADER = struct.Struct(">cI")
_LENGTH = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

STDOUT, STDERR, EXIT = b"o", b"e", b"x"


class ProtocolError(Exception):
    """A request or answer that does not follow the wire format."""


class ClientGone(Exception):  # noqa: N818 - a state, not an error of ours
    """The client of the request went away (or stopped reading)."""


# ------------------------------------------------------------------ the wire


def encode_request(argv: Sequence[str], *, tty: bool, width: int | None) -> bytes:
    body = json.dumps({"argv": list(argv), "tty": bool(tty), "width": width},
                      ensure_ascii=False).encode("utf-8", "surrogateescape")
    return _LENGTH.pack(len(body)) + body


@dataclass(frozen=True)
class Request:
    argv: tuple[str, ...]
    tty: bool = False
    width: int | None = None


def decode_request(body: bytes) -> Request:
    try:
        data = json.loads(body.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("not a JSON object")
    argv = data.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ProtocolError("argv: expected a list of strings")
    if any("\0" in a for a in argv):
        raise ProtocolError("argv: NUL in an argument")
    tty = data.get("tty", False)
    width = data.get("width")
    if not isinstance(tty, bool):
        raise ProtocolError("tty: expected true or false")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int)
                              or not 20 <= width <= 1000):
        width = None
    return Request(argv=tuple(argv), tty=tty, width=width)


async def read_request(reader: asyncio.StreamReader) -> Request:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_REQUEST:
        raise ProtocolError(f"request of {length} bytes (at most {MAX_REQUEST})")
    return decode_request(await reader.readexactly(length))


def frames(kind: bytes, data: bytes) -> list[bytes]:
    """``data`` as frames of at most :data:`MAX_FRAME` bytes."""
    if not data:
        return [_HEADER.pack(kind, 0)]
    return [_HEADER.pack(kind, len(data[i:i + MAX_FRAME])) + data[i:i + MAX_FRAME]
            for i in range(0, len(data), MAX_FRAME)]


def read_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The next answer frame from a blocking socket; None at a clean end."""
    head = _recv_exact(sock, _HEADER.size, eof_ok=True)
    if head is None:
        return None
    kind, length = _HEADER.unpack(head)
    if kind not in (STDOUT, STDERR, EXIT) or length > MAX_FRAME:
        raise ProtocolError(f"bad frame {kind!r} of {length} bytes")
    data = _recv_exact(sock, length, eof_ok=False) if length else b""
    assert data is not None
    return kind, data


def _recv_exact(sock: socket.socket, n: int, *, eof_ok: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if eof_ok and not buf:
                return None
            raise ProtocolError("connection closed in the middle of a frame")
        buf += chunk
    return bytes(buf)


# ------------------------------------------------- per-request stdout/stderr


class _Output:
    """What one request's command writes: stdout buffered into frames,
    stderr sent at once (after any pending stdout, so the order holds)."""

    def __init__(self, send: Callable[[bytes, bytes], None], *, tty: bool) -> None:
        self._send = send
        self.tty = tty
        self._pending = bytearray()
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._null: int | None = None

    def out(self, data: bytes) -> None:
        with self._lock:
            self._pending += data
            if len(self._pending) >= FLUSH_BYTES:
                self._flush_locked()

    def err(self, data: bytes) -> None:
        with self._lock:
            self._flush_locked()
            self._send(STDERR, data)
            self._last = time.monotonic()

    def flush(self, *, force: bool = False) -> None:
        with self._lock:
            if self._pending and (force or time.monotonic() - self._last >= FLUSH_AFTER):
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            self._send(STDOUT, data)
            self._last = time.monotonic()

    def null_fd(self) -> int:
        """A descriptor for code that asks for ``fileno()`` (to dup2 /dev/null
        over it after a broken pipe, say): /dev/null, this request's own."""
        if self._null is None:
            self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        return self._null

    def close(self) -> None:
        if self._null is not None:
            with contextlib.suppress(OSError):
                os.close(self._null)
            self._null = None


#: The output of the request the current code runs for (None: the daemon's own).
_output: contextvars.ContextVar[_Output | None] = contextvars.ContextVar(
    "mailwarden_control_output", default=None)


class _BinaryProxy:
    """``sys.stdout.buffer`` (or stderr's) that writes to the current request."""

    def __init__(self, text: _TextProxy) -> None:
        self._text = text

    def write(self, data: bytes | bytearray | memoryview) -> int:
        target = _output.get()
        if target is None:
            return int(self._text.fallback.buffer.write(data))
        if isinstance(data, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        b = bytes(data)
        (target.out if self._text.is_stdout else target.err)(b)
        return len(b)

    def flush(self) -> None:
        target = _output.get()
        if target is None:
            self._text.fallback.buffer.flush()
        elif self._text.is_stdout:
            target.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._text.isatty()

    def fileno(self) -> int:
        return self._text.fileno()

    @property
    def closed(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._text.fallback.buffer, name)


class _TextProxy:
    """A process-wide ``sys.stdout`` / ``sys.stderr`` that writes to the
    request the current thread (context) serves, and to the real stream
    otherwise.  Concurrent requests never share a buffer."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, fallback: Any, is_stdout: bool) -> None:
        self.fallback = fallback
        self.is_stdout = is_stdout
        self.buffer = _BinaryProxy(self)

    def write(self, text: str) -> int:
        target = _output.get()
        if target is None:
            return int(self.fallback.write(text))
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        data = text.encode("utf-8", "replace")
        (target.out if self.is_stdout else target.err)(data)
        return len(text)

    def writelines(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        target = _output.get()
        if target is None:
            self.fallback.flush()
        elif self.is_stdout:
            target.flush()

    def isatty(self) -> bool:
        target = _output.get()
        if target is None:
            return bool(self.fallback.isatty())
        return target.tty if self.is_stdout else False

    def fileno(self) -> int:
        target = _output.get()
        if target is None:
            return int(self.fallback.fileno())
        return target.null_fd()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fallback, name)


class _StdinProxy:
    """``sys.stdin``: empty for a request (a command never reads the
    daemon's stdin; a prompt would end at once), the real one otherwise."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def _empty(self) -> bool:
        return _output.get() is not None

    def read(self, size: int = -1) -> str:
        return "" if self._empty() else str(self.fallback.read(size))

    def readline(self, size: int = -1) -> str:
        return "" if self._empty() else str(self.fallback.readline(size))

    def isatty(self) -> bool:
        return False if self._empty() else bool(self.fallback.isatty())

    def __iter__(self) -> Any:
        return iter(()) if self._empty() else iter(self.fallback)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fallback, name)


def install_proxies() -> Callable[[], None]:
    """Route ``sys.stdout``/``sys.stderr``/``sys.stdin`` by request; returns the undo."""
    old_out, old_err, old_in = sys.stdout, sys.stderr, sys.stdin
    new_out, new_err = _TextProxy(old_out, True), _TextProxy(old_err, False)
    new_in = _StdinProxy(old_in)
    sys.stdout, sys.stderr, sys.stdin = new_out, new_err, new_in  # type: ignore[assignment]

    def undo() -> None:
        if sys.stdout is new_out:
            sys.stdout = old_out
        if sys.stderr is new_err:
            sys.stderr = old_err
        if sys.stdin is new_in:
            sys.stdin = old_in

    return undo


# --------------------------------------------------------- the click tree


def resolve(root: click.Group, argv: Sequence[str], *, resilient: bool,
            obj: dict[str, Any] | None = None) -> tuple[str | None, click.Context]:
    """The command ``argv`` names (``"quarantine show"``, None for a group
    without its subcommand) and the parsed context of that command.

    Strict (``resilient=False``): parsing errors raise click's one-line
    usage errors, ``--help`` prints the help and raises ``click.exceptions.Exit``.
    """
    ctx = root.make_context("mailwarden", list(argv), obj=obj,
                            resilient_parsing=resilient)
    return walk(root, ctx, resilient=resilient)


def walk(root: click.Group, ctx: click.Context, *,
         resilient: bool) -> tuple[str | None, click.Context]:
    """From a parsed group context down to the command its arguments name."""
    cmd: click.Command = root
    names: list[str] = []
    while isinstance(cmd, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return None, ctx
        name, sub, rest = cmd.resolve_command(ctx, rest)
        if sub is None or name is None:
            return None, ctx
        names.append(name)
        ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=resilient)
        cmd = sub
    return " ".join(names), ctx


def file_option(ctx: click.Context) -> click.Parameter | None:
    """The command's option that names a local file to write (``--output``):
    the client writes that file itself."""
    for param in ctx.command.params:
        if isinstance(param, click.Option) and param.name == "output":
            return param
    return None


def file_params_given(ctx: click.Context) -> list[click.Parameter]:
    """Parameters of the command that name a file (``--output``, or any of
    type ``click.Path``/``click.File``) and have a value: the daemon refuses
    such a request rather than open a file a caller chose."""
    out = []
    for param in ctx.command.params:
        if param.name in (None, "config"):
            continue
        names_file = param.name == "output" or isinstance(param.type, click.Path | click.File)
        if names_file and ctx.params.get(param.name) not in (None, "", ()):
            out.append(param)
    return out


# ----------------------------------------------------------------- server


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def _clean_argv(argv: Sequence[str], limit: int = 2000) -> list[str]:
    """argv for an audit row: printable, bounded."""
    out: list[str] = []
    used = 0
    for a in argv[:64]:
        a = "".join(c if c.isprintable() else "?" for c in a)[:256]
        used += len(a)
        if used > limit:
            out.append("...")
            break
        out.append(a)
    return out


class ControlSocketInUse(OSError):
    """Another process answers on the control socket already."""


@dataclass
class ControlServer:
    """The control socket's listener (started by ``serve`` when ``[access]`` is set).

    ``root`` is the click group to run requests against, ``config`` gives the
    running config (it changes on SIGHUP), ``store`` is the daemon's store
    (for the refusals' audit rows; commands open their own connection).
    """

    root: click.Group
    config: Callable[[], Config]
    store: Store
    #: the daemon's reload (``mailwarden reload``): a coroutine function
    #: returning (ok, message); run in the daemon's loop
    reload: Callable[[], Awaitable[tuple[bool, str]]] | None = None
    workers: int = WORKERS
    max_connections: int = MAX_CONNECTIONS
    max_running_per_uid: int = MAX_RUNNING_PER_UID
    _server: asyncio.AbstractServer | None = field(default=None, init=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set, init=False)
    _conns: set[_Connection] = field(default_factory=set, init=False)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set, init=False)
    _per_uid: dict[int, int] = field(default_factory=dict, init=False)
    _running: dict[int, int] = field(default_factory=dict, init=False)
    #: connections handled to the end (answered, refused or dropped)
    served: int = field(default=0, init=False)
    _undo: Callable[[], None] | None = field(default=None, init=False)
    _path: str = field(default="", init=False)
    _inode: tuple[int, int] | None = field(default=None, init=False)

    @property
    def path(self) -> str:
        return self._path

    async def start(self) -> None:
        settings = self.config().access
        path = settings.control_socket
        parent = os.path.dirname(path) or "."
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._prepare_path, path, parent)
        self._server = await asyncio.start_unix_server(self._handle, path=path)
        try:
            os.chmod(path, int(settings.socket_mode, 8))
            st = os.stat(path)
        except OSError:
            self._server.close()
            raise
        self._path = path
        self._inode = (st.st_dev, st.st_ino)
        self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                        thread_name_prefix="mailwarden-control")
        self._undo = install_proxies()
        log.info("control socket listening on %s (mode %s)", path, settings.socket_mode)

    @staticmethod
    def _prepare_path(path: str, parent: str) -> None:
        """Create the parent directory if missing; remove a stale socket
        (one nobody answers on); refuse to replace anything else."""
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"access.control_socket: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2)
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: left by a serve that is gone
            return
        finally:
            probe.close()
        raise ControlSocketInUse(
            f"access.control_socket: {path} is in use (another mailwarden serve?)")

    async def stop(self) -> None:
        """Stop listening, cut the connections in flight, remove the socket."""
        if self._server is not None:
            self._server.close()
        for _ in range(5):  # connections just accepted: let their handlers start
            await asyncio.sleep(0)
        for c in list(self._conns):
            c.gone = True  # the command stops at its next write
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            # Handlers end once their command notices (its next write); a
            # command that does not write is not waited for longer than this.
            await asyncio.wait(list(self._tasks), timeout=10)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 10)
            self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._undo is not None:
            self._undo()
            self._undo = None
        if self._path:
            with contextlib.suppress(OSError):
                st = os.lstat(self._path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self._path)
            self._path = ""

    # ------------------------------------------------------------ one request

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        who = "unknown peer"
        counted: int | None = None
        try:
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            who = f"uid {uid} pid {pid}"
            counted = uid
            self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
            if len(self._writers) > self.max_connections or self._per_uid[uid] > MAX_PER_UID:
                log.warning("busy: connection from %s refused", who)
                await self._answer(writer, 1, "mailwarden: the daemon is busy; try again\n")
                return
            try:
                request = await asyncio.wait_for(read_request(reader), REQUEST_TIMEOUT)
            except (ProtocolError, asyncio.IncompleteReadError, TimeoutError,
                    ConnectionError) as exc:
                why = "no request in time" if isinstance(exc, TimeoutError) else \
                    "closed before sending a request" if isinstance(
                        exc, asyncio.IncompleteReadError) else str(exc) or type(exc).__name__
                log.warning("bad request from %s: %s", who, why)
                await self._answer(writer, 2, f"mailwarden: bad request: {why}\n")
                return
            if self._pool is None:
                await self._answer(writer, 1, "mailwarden: the daemon is stopping\n")
                return
            if self._running.get(uid, 0) >= self.max_running_per_uid:
                log.warning("busy: %s has %d commands running", who, self._running[uid])
                await self._answer(writer, 1, "mailwarden: the daemon is busy with your other"
                                              " commands; try again\n")
                return
            conn = _Connection(loop, writer)
            self._conns.add(conn)
            self._running[uid] = self._running.get(uid, 0) + 1
            try:
                code = await loop.run_in_executor(
                    self._pool, contextvars.Context().run, self._run, (pid, uid, gid),
                    request, conn, loop)
            finally:
                self._conns.discard(conn)
                self._running[uid] -= 1
                if not self._running[uid]:
                    del self._running[uid]
            if not conn.gone:
                try:
                    await conn.send_async(EXIT, str(code).encode())
                except (ConnectionError, OSError, TimeoutError):
                    log.info("%s went away before the exit status (%d)", who, code)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request from %s failed", who)
        finally:
            self.served += 1
            if counted is not None:
                self._per_uid[counted] -= 1
                if not self._per_uid[counted]:
                    del self._per_uid[counted]
            if task is not None:
                self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, writer: asyncio.StreamWriter, code: int, stderr: str) -> None:
        with contextlib.suppress(Exception):
            for f in frames(STDERR, stderr.encode()):
                writer.write(f)
            writer.write(_HEADER.pack(EXIT, len(str(code))) + str(code).encode())
            await asyncio.wait_for(writer.drain(), 10)

    def _run(self, peer: tuple[int, int, int], request: Request, conn: _Connection,
             loop: asyncio.AbstractEventLoop) -> int:
        """In a worker thread, in a fresh context: one request, start to end
        (the user and group lookups too: they may block on NSS)."""
        pid, uid, gid = peer
        caller = caller_from_peer(uid, gid, pid, self.config().access.roles,
                                  tty=request.tty, width=request.width)
        output = _Output(conn.send, tty=request.tty)
        _output.set(output)
        token = set_current(caller)
        try:
            try:
                code = self._dispatch(caller, request, loop)
            except ClientGone:
                code = 1
            except Exception:
                log.exception("%s by %s failed", " ".join(request.argv[:2]), caller.user)
                with contextlib.suppress(ClientGone):
                    output.err(b"mailwarden: internal error (see the daemon's log)\n")
                code = 1
            with contextlib.suppress(ClientGone):
                output.flush(force=True)
            return code
        finally:
            reset_current(token)
            output.close()
            _output.set(None)

    def _dispatch(self, caller: Caller, request: Request,
                  loop: asyncio.AbstractEventLoop) -> int:
        config = self.config()
        argv = list(request.argv)

        def say(line: str) -> None:
            sys.stderr.write(f"mailwarden: {line}\n")

        obj: dict[str, Any] = {"control_request": True, "config": config}
        if self.reload is not None:
            obj["reload"] = lambda: self._reload_from_worker(loop)
        # The command's name first (group options only: a refusal never
        # depends on how well the rest of the line parses), then the role.
        try:
            name, _ = resolve(self.root, argv, resilient=True, obj=dict(obj))
        except (click.ClickException, click.exceptions.Exit, SystemExit):
            name = None
        if name is None:
            # No command: click's own answer (usage, help, version); nothing runs.
            code, _ = self._parse_only(argv, obj)
            if code is None:
                say("no command given (see --help)")
                return 2
            return code
        if name in LOCAL_COMMANDS or name not in COMMAND_ROLES:
            say(f"{name}: runs on its own, not through the control socket")
            return 2
        refusal = role_refusal(name, caller)
        if refusal is not None:
            try:
                asyncio.run_coroutine_threadsafe(
                    self._audit_refusal(caller, name, refusal, argv), loop).result(60)
            except Exception as exc:
                log.error("cannot audit the refusal of %s to %s: %s",
                          name, caller.user, exc)
            log.info("refused %s to %s", name, caller.describe())
            say(refusal)
            return 1
        code, ctx = self._parse_only(argv, obj)
        if code is not None or ctx is None:
            return 2 if code is None else code
        for param in file_params_given(ctx):
            say(f"{name}: {param.opts[-1] if param.opts else param.name} names a file of the"
                " caller: the mailwarden client handles it, not the daemon")
            return 2
        log.info("granted %s to %s", name, caller.describe())
        try:
            self.root.main(args=argv, prog_name="mailwarden", standalone_mode=True, obj=obj)
        except SystemExit as exc:
            if exc.code is None:
                return 0
            if isinstance(exc.code, int):
                return exc.code
            sys.stderr.write(f"{exc.code}\n")
            return 1
        return 0

    def _parse_only(self, argv: Sequence[str],
                    obj: dict[str, Any]) -> tuple[int | None, click.Context | None]:
        """Parse ``argv`` strictly without running anything: (click's answer's
        status, None) when it has one (a usage error: the one line, exit 2;
        --help: the help, exit 0), (None, the command's context) when the
        line names a command and parses."""
        try:
            name, ctx = resolve(self.root, argv, resilient=False, obj=dict(obj))
        except click.exceptions.Exit as exc:  # --help, --version
            return exc.exit_code, None
        except click.ClickException as exc:
            exc.show()
            return exc.exit_code, None
        except SystemExit as exc:  # a callback's fail()
            return (exc.code if isinstance(exc.code, int) else 1), None
        return (None, ctx) if name is not None else (2, None)

    def _reload_from_worker(self, loop: asyncio.AbstractEventLoop) -> tuple[bool, str]:
        """``mailwarden reload`` in a worker: the daemon's reload, in its loop,
        audited with the caller (the context travels with the coroutine)."""
        assert self.reload is not None
        reload = self.reload

        async def go() -> tuple[bool, str]:
            ok, message = await reload()
            await self.store.audit("reload", detail={"outcome": "reloaded" if ok else message})
            return ok, message

        return asyncio.run_coroutine_threadsafe(go(), loop).result(300)

    async def _audit_refusal(self, caller: Caller, name: str, refusal: str,
                             argv: Sequence[str]) -> None:
        token = set_current(caller)
        try:
            # The row shape of quarantine.grants.refuse: "<command> (refused)".
            await self.store.audit(
                f"{name} (refused)", reason=refusal,
                detail={"refused": refusal, "roles": sorted(caller.roles),
                        "pid": caller.pid, "argv": _clean_argv(argv)})
        finally:
            reset_current(token)


class _Connection:
    """Frames to one client, sent from a worker thread through the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter) -> None:
        self.loop = loop
        self.writer = writer
        self.gone = False

    def send(self, kind: bytes, data: bytes) -> None:
        """From the worker thread: send, wait until the client took it."""
        if self.gone:
            raise ClientGone
        try:
            fut = asyncio.run_coroutine_threadsafe(self.send_async(kind, data), self.loop)
            fut.result(SEND_TIMEOUT + 60)
        except Exception:
            self.gone = True
            raise ClientGone from None
        if self.gone:
            raise ClientGone

    async def send_async(self, kind: bytes, data: bytes) -> None:
        try:
            for f in frames(kind, data):
                self.writer.write(f)
            await asyncio.wait_for(self.writer.drain(), SEND_TIMEOUT)
            if self.writer.is_closing():
                raise ConnectionResetError("client gone")
        except BaseException:
            self.gone = True
            self.writer.transport.abort()
            raise


def control_output_active() -> bool:
    """True while code runs for a control-socket request (its output is captured)."""
    return _output.get() is not None


__all__ = [
    "ClientGone", "ControlServer", "ControlSocketInUse", "ProtocolError", "Request",
    "control_output_active", "decode_request", "encode_request", "file_option",
    "file_params_given", "frames",
    "peer_credentials", "read_frame", "read_request", "resolve", "walk",
]
