"""The client side of the control socket (issue 17; the server is cli/control.py).

With ``[access]`` in the config, a command on kept data does not open the
store: the CLI sends its words to the running ``mailwarden serve`` over
``access.control_socket``, prints what comes back (stdout to stdout, stderr
to stderr) and exits with the daemon's status.  The daemon knows the caller
from the socket's peer credentials; nothing the client says about itself
(other than whether its stdout is a terminal, and its width) is trusted.

Runs locally, as before:

* ``serve`` and ``store keygen`` (:data:`~quarantine.access.LOCAL_COMMANDS`);
* ``--help`` / ``-h`` / ``--version`` anywhere, a group without its
  subcommand, an unknown command, a command line click cannot parse (click
  answers; nothing is opened);
* every command when the config has no ``[access]`` section (the caller then
  opens the store directly and holds every role).

A caller who may not read the config at all (the shipped
``/etc/mailwarden`` is 0750 root:mailwarden) talks to the daemon at the
default control socket, ``/run/mailwarden/control.sock``, when one is there.

``--output FILE`` (``log export``, ``subject-access``) is the client's: the
option is removed from what is sent, and the command's stdout is written to a
0600 temp file beside FILE (as the calling user), fsynced and renamed into
place only when the command succeeded; then ``sha256 HEX  FILE`` on stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import IO

import click

from cli.common import fail, get_config
from cli.control import (
    EXIT,
    STDERR,
    STDOUT,
    ProtocolError,
    encode_request,
    file_option,
    read_frame,
    walk,
)
from gateway.config import AccessSettings, resolve_path
from quarantine.access import COMMAND_ROLES, LOCAL_COMMANDS

#: Words that make click answer by itself (help, version): always local.
LOCAL_WORDS = frozenset({"-h", "--help", "--version"})


def maybe_forward(root: click.Group, ctx: click.Context) -> None:
    """Called by the root group before it runs a subcommand: forward the
    command to the daemon (and exit) when access control is on; return to
    run it locally otherwise."""
    args = [*getattr(ctx, "_protected_args", []), *ctx.args]
    words = args[:args.index("--")] if "--" in args else args
    if LOCAL_WORDS.intersection(words):
        return
    try:
        name, leaf = walk(root, ctx, resilient=True)
    except (click.ClickException, click.exceptions.Exit):
        return  # click will say it, locally
    if name is None or name in LOCAL_COMMANDS or name not in COMMAND_ROLES:
        return
    socket_path = unreadable_config_socket(ctx)
    if socket_path is None:
        config = get_config(ctx)
        if not config.access.enabled:
            return
        socket_path = config.access.control_socket
    output: str | None = None
    param = file_option(leaf)
    if param is not None:
        value = leaf.params.get(param.name or "")
        if value not in (None, ""):
            output = str(value)
            args = without_option(args, [*param.opts, *param.secondary_opts], output)
    sys.exit(forward(socket_path, args, output=output))


def unreadable_config_socket(ctx: click.Context) -> str | None:
    """The default control socket, when the config is the daemon's and the
    caller may not read it (``/etc/mailwarden`` is 0750 root:mailwarden) but
    a daemon listens there; else None (the config decides)."""
    path = resolve_path(ctx.ensure_object(dict).get("config_path"))
    try:
        with open(path, "rb"):
            return None
    except PermissionError:
        pass
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or os.access(parent, os.X_OK):
            return None
    except OSError:
        return None
    default = AccessSettings().control_socket
    return default if os.path.exists(default) else None


def without_option(args: Sequence[str], opts: Sequence[str], value: str) -> list[str]:
    """``args`` without the first ``OPT VALUE`` / ``OPT=VALUE`` of ``opts``."""
    out = list(args)
    for i, word in enumerate(out):
        if word == "--":
            break
        if word in opts and i + 1 < len(out) and out[i + 1] == value:
            del out[i:i + 2]
            return out
        if any(word == f"{o}={value}" for o in opts if o.startswith("--")):
            del out[i]
            return out
    return out


def forward(path: str, argv: Sequence[str], *, output: str | None = None) -> int:
    """Run ``argv`` in the daemon; returns its exit status."""
    sink: _LocalFile | None = None
    if output is not None:
        sink = _LocalFile(output)
    try:
        return _forward(path, argv, sink, output)
    except BaseException:  # Ctrl-C included: no temp file left behind
        _abort(sink)
        raise


def _forward(path: str, argv: Sequence[str], sink: _LocalFile | None,
             output: str | None) -> int:
    tty = sink is None and _isatty(sys.stdout)
    width = shutil.get_terminal_size().columns if tty else None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            _abort(sink)
            fail(f"mailwarden serve is not running: no control socket at {path}", 1)
        except OSError as exc:
            _abort(sink)
            fail(f"cannot connect to the control socket {path}: {exc.strerror or exc}", 1)
        try:
            sock.sendall(encode_request(argv, tty=tty, width=width))
            code = _stream(sock, sink)
        except (ProtocolError, OSError) as exc:
            _abort(sink)
            if isinstance(exc, BrokenPipeError) and sink is None:
                _quiet_stdout()
                return 1
            what = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            fail(f"lost the connection to mailwarden serve: {what}", 1)
    finally:
        sock.close()
    if sink is not None:
        if code != 0:
            sink.abort()
        else:
            try:
                digest = sink.commit()
            except OSError as exc:
                sink.abort()
                fail(f"cannot write {output}: {exc.strerror or exc}", 1)
            click.echo(f"sha256 {digest}  {output}", err=True)
    return code


def _stream(sock: socket.socket, sink: _LocalFile | None) -> int:
    out: IO[bytes] = sink.fh if sink is not None else sys.stdout.buffer
    while True:
        frame = read_frame(sock)
        if frame is None:
            raise ProtocolError("the daemon closed the connection before the command ended")
        kind, data = frame
        if kind == STDOUT:
            out.write(data)
            if sink is None:
                out.flush()
            else:
                sink.digest.update(data)
        elif kind == STDERR:
            sys.stderr.buffer.write(data)
            sys.stderr.flush()
        elif kind == EXIT:
            try:
                return int(data.decode("ascii"))
            except ValueError:
                raise ProtocolError(f"bad exit status {data[:20]!r}") from None


class _LocalFile:
    """``--output FILE`` written by the client: a 0600 temp file beside it."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            fail(f"--output: directory {directory} does not exist", 2)
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                            suffix=".tmp", dir=directory)
        except OSError as exc:
            fail(f"cannot write {path}: {exc.strerror or exc}", 1)
        os.fchmod(fd, 0o600)
        self.fh = os.fdopen(fd, "wb")
        self.digest = hashlib.sha256()

    def commit(self) -> str:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        with contextlib.suppress(OSError):
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return self.digest.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def _abort(sink: _LocalFile | None) -> None:
    if sink is not None:
        sink.abort()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _quiet_stdout() -> None:
    """The reader of stdout went away (``| head``): no error at exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
