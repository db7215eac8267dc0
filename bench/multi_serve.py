"""N ``mailwarden serve`` processes on one listening port (benchmark experiment).

Issue 18's multi-process question: does serving from several processes that
share the listen socket (``SO_REUSEPORT``: the kernel spreads new
connections over the listeners) scale with cores?  mailwarden's serve does
not offer it; this launcher starts ``--workers`` children, each the normal
CLI with ``create_server(..., reuse_port=True)`` forced, all on the same
config (so the same SQLite store: WAL, several writers take turns at the
write lock).  SIGTERM/SIGINT go to every child; it exits when they have.

    python bench/multi_serve.py --workers 2 serve --config bench.toml

``bench/run.py`` runs it as the targets ``mw-full*2`` / ``mw-empty*2``; the
children are in the launcher's process tree, so the CPU and RSS columns count
all of them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any


def child() -> None:
    real = asyncio.base_events.BaseEventLoop.create_server

    async def create_server(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["reuse_port"] = True
        return await real(self, *args, **kwargs)

    asyncio.base_events.BaseEventLoop.create_server = create_server  # type: ignore[method-assign]
    from cli import main

    sys.argv = [sys.argv[0], *sys.argv[2:]]  # drop --child
    main()


def launcher() -> int:
    args = sys.argv[1:]
    workers = 2
    if args[:1] == ["--workers"]:
        workers, args = int(args[1]), args[2:]
    procs = [subprocess.Popen([sys.executable, __file__, "--child", *args], stdin=subprocess.DEVNULL)
             for _ in range(workers)]

    running = {p.pid: p for p in procs}

    def forward(signum: int, _frame: Any) -> None:
        for p in running.values():
            p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while running:
        pid, wstatus = os.wait()
        p = running.pop(pid, None)
        if p is None:
            continue
        p.returncode = os.waitstatus_to_exitcode(wstatus)
        status = status or p.returncode
        forward(signal.SIGTERM, None)  # one is gone: stop the others too
    return status


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child()
    else:
        sys.path.insert(0, os.getcwd())
        sys.exit(launcher())
