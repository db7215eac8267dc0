"""A throw-away PostgreSQL server for the suite (issue 16).

``PgServer.create()`` runs ``initdb`` and ``pg_ctl`` as the ``postgres`` user
(initdb refuses root, and the suite runs as root in CI) with the data
directory in a fresh ``tempfile.mkdtemp()`` chowned to ``postgres`` (pytest's
``tmp_path`` is 0700 root: postgres could not enter it).  The server listens
on no TCP port at all (``listen_addresses = ''``): only on a Unix socket in
that directory, so there is no port to pick and nothing to collide with.
Authentication is ``trust`` (``initdb -A trust``); clients connect as the
``postgres`` role over the socket.

``new_database()`` makes an empty database per test (``CREATE DATABASE`` from
``template0`` is fast); ``stop()``/``start()`` take the server away and bring
it back for outage tests; ``cleanup()`` stops it and removes the directory.

Without the binaries: :func:`pg_bin` raises :class:`PgMissing`; the fixture
fails with that message when ``CI=true`` and skips visibly otherwise.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

USER = "postgres"


class PgMissing(RuntimeError):
    """PostgreSQL's server binaries (or the postgres user) are not installed."""


def pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb and pg_ctl."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        raise PgMissing(f"no {USER!r} user: install the postgresql package") from None
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    candidates = [p for p in candidates if (p / "initdb").exists() and (p / "pg_ctl").exists()]
    if not candidates:
        found = shutil.which("initdb")
        if found and shutil.which("pg_ctl"):
            return Path(found).parent
        raise PgMissing(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql:"
            " install the postgresql package"
        )

    def version(p: Path) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in p.parent.name.split("."))
        except ValueError:
            return (0,)

    return max(candidates, key=version)


def _as_postgres(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        argv = ["runuser", "-u", USER, "--", *argv]
    elif pwd.getpwuid(os.geteuid()).pw_name != USER:
        raise PgMissing("the PostgreSQL test server needs root (runuser) or the postgres user")
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


class PgServer:
    """One private PostgreSQL cluster listening on a Unix socket only."""

    def __init__(self, base: Path, bindir: Path) -> None:
        self.base = base
        self.bindir = bindir
        self.data = base / "data"
        self.socket_dir = base
        self.log_file = base / "server.log"
        self.running = False
        self._names = itertools.count(1)

    @classmethod
    def create(cls) -> PgServer:
        bindir = pg_bin()
        base = Path(tempfile.mkdtemp(prefix="mailwarden-pg-"))
        entry = pwd.getpwnam(USER)
        if os.geteuid() == 0:
            os.chown(base, entry.pw_uid, entry.pw_gid)
        os.chmod(base, 0o755)
        server = cls(base, bindir)
        try:
            _as_postgres([str(bindir / "initdb"), "-D", str(server.data), "-A", "trust",
                          "-U", USER, "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
            with open(server.data / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write(
                    "\n# mailwarden test server\n"
                    "listen_addresses = ''\n"
                    f"unix_socket_directories = '{server.socket_dir}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\nshared_buffers = 32MB\n"
                )
            server.start()
        except subprocess.CalledProcessError as exc:
            server.cleanup()
            raise RuntimeError(
                f"could not set up the test PostgreSQL: {exc.cmd}: {exc.stderr or exc.stdout}"
            ) from None
        except BaseException:
            server.cleanup()
            raise
        return server

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string for ``dbname`` over the server's socket."""
        return f"host={self.socket_dir} dbname={dbname} user={USER}"

    def _psql(self, sql: str) -> None:
        _as_postgres([str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                      "-h", str(self.socket_dir), "-U", USER, "-d", "postgres", "-c", sql])

    def new_database(self) -> str:
        """A fresh empty database; returns its DSN."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self._psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.dsn(name)

    def start(self) -> None:
        _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                      str(self.log_file), "-w", "-t", "120", "start"])
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, like an outage)."""
        _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode,
                      "-w", "-t", "120", "stop"])
        self.running = False

    def cleanup(self) -> None:
        if self.running:
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)
