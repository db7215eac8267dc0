"""The milter listener: ``start_milter(listen, handler, ...)``.

``listen`` is ``"host:port"`` (``[v6]:port``) or ``"unix:/path"``.  A unix
socket replaces a stale socket file (never any other kind of file) and gets
mode 0660 (the MTA's group must be able to connect).  One task per
connection, at most ``max_connections`` at once (one more is accepted and
closed at once, with a log line: the MTA applies its default action).
``close()`` stops accepting and asks every session to finish the message in
flight; ``wait_closed()`` waits for them, at most ``drain_timeout`` seconds,
then cancels the rest (nothing is answered for those: the MTA's
``milter_default_action = tempfail`` applies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path

from gateway.config import parse_hostport
from gateway.milter import codec as c
from gateway.milter.actions import QuarantineMode
from gateway.milter.api import Handler
from gateway.milter.session import MilterSession

log = logging.getLogger("mailwarden.milter")


def parse_listen(listen: str) -> tuple[str, str | int]:
    """``("unix", path)`` or ``(host, port)``; ValueError naming the problem."""
    if listen.startswith("unix:"):
        path = listen[5:]
        if not path.startswith("/"):
            raise ValueError(f"bad milter socket {listen!r}: expected unix:/absolute/path")
        return "unix", path
    return parse_hostport(listen)


class MilterServer:
    """A running milter listener (see the module docstring)."""

    def __init__(self, handler: Handler, *, quarantine_mode: QuarantineMode,
                 progress_interval: float, max_message_size: int,
                 max_connections: int = 200, drain_timeout: float = 30.0,
                 negotiate_timeout: float = 30.0, idle_timeout: float = 1800.0,
                 handler_timeout: float | None = None,
                 max_packet: int = c.DEFAULT_MAX_PACKET) -> None:
        if quarantine_mode not in ("own", "hold"):
            raise ValueError(f"bad quarantine mode {quarantine_mode!r}")
        self.handler = handler
        self.quarantine_mode = quarantine_mode
        self.progress_interval = progress_interval
        self.max_message_size = max_message_size
        self.max_connections = max_connections
        self.drain_timeout = drain_timeout
        self.negotiate_timeout = negotiate_timeout
        self.idle_timeout = idle_timeout
        self.handler_timeout = handler_timeout
        self.max_packet = max_packet
        self.server: asyncio.AbstractServer | None = None
        #: ("host", port) or the unix socket path
        self.address: tuple[str, int] | str = ""
        self.sessions: dict[asyncio.Task[None], MilterSession] = {}
        #: connections refused over max_connections
        self.refused = 0
        self._unix_path: str | None = None
        self._closing = False

    async def start(self, listen: str) -> None:
        host, port = parse_listen(listen)
        if host == "unix":
            assert isinstance(port, str)
            _remove_stale_socket(port)
            self.server = await asyncio.start_unix_server(self._connection, path=port)
            os.chmod(port, 0o660)
            self._unix_path = port
            self.address = port
        else:
            assert isinstance(port, int)
            self.server = await asyncio.start_server(self._connection, host=host, port=port)
            sock = self.server.sockets[0].getsockname()
            self.address = (sock[0], sock[1])
        log.info("milter listening on %s (quarantine=%s, progress every %g s)",
                 self.listen_text, self.quarantine_mode, self.progress_interval)

    @property
    def listen_text(self) -> str:
        if isinstance(self.address, str):
            return f"unix:{self.address}"
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self._closing or len(self.sessions) >= self.max_connections:
            self.refused += 1
            log.warning("milter: %d connections already (max_connections); refusing one",
                        len(self.sessions))
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            return
        session = MilterSession(
            reader, writer, self.handler, max_message_size=self.max_message_size,
            quarantine_mode=self.quarantine_mode, progress_interval=self.progress_interval,
            max_packet=self.max_packet, negotiate_timeout=self.negotiate_timeout,
            idle_timeout=self.idle_timeout, handler_timeout=self.handler_timeout,
        )
        task = asyncio.current_task()
        assert task is not None
        self.sessions[task] = session
        try:
            await session.run()
        finally:
            self.sessions.pop(task, None)

    def close(self) -> None:
        """Stop accepting; sessions finish the message in flight, then close."""
        self._closing = True
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions.values()):
            session.request_stop()

    async def wait_closed(self) -> None:
        """Wait for the sessions (at most ``drain_timeout``), cancel the rest."""
        tasks = list(self.sessions)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.drain_timeout)
            if pending:
                log.warning("milter: drain timeout: closing %d connections in flight",
                            len(pending))
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None


def _remove_stale_socket(path: str) -> None:
    """Remove a leftover socket file; refuse to replace anything else."""
    p = Path(path)
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            p.unlink()              # nobody listens: stale
            return
    raise OSError(f"{path}: another process is listening on it")


async def start_milter(listen: str, handler: Handler, *, quarantine_mode: QuarantineMode,
                       progress_interval: float, max_message_size: int,
                       max_connections: int = 200, drain_timeout: float = 30.0,
                       negotiate_timeout: float = 30.0, idle_timeout: float = 1800.0,
                       handler_timeout: float | None = None) -> MilterServer:
    """Listen on ``listen`` and serve every MTA connection with ``handler``.

    Returns the running :class:`MilterServer` (``.address``, ``.listen_text``,
    ``.close()``, ``await .wait_closed()``).
    """
    server = MilterServer(
        handler, quarantine_mode=quarantine_mode, progress_interval=progress_interval,
        max_message_size=max_message_size, max_connections=max_connections,
        drain_timeout=drain_timeout, negotiate_timeout=negotiate_timeout,
        idle_timeout=idle_timeout, handler_timeout=handler_timeout,
    )
    await server.start(listen)
    return server
