"""Run mailwarden as another Unix user, wherever the checkout lives (issue 19).

The tests that show what a user *without* access gets (the store's
permission error, later the control socket's refusals for real users and
roles, issue 17) run the CLI under another uid.  That user usually cannot
reach the checkout: a clone in a home directory or a ``mktemp -d`` folder is
mode 0700, and the checkout's ``.venv`` -- its interpreter symlink, its
site-packages, the editable install's path hook -- lives inside it.  Python
then fails with ``ModuleNotFoundError`` before mailwarden says a word.

The mechanism, :func:`portable_install`, builds once per test session (the
``other_user_install`` fixture in ``tests/conftest.py``):

1. a fresh, pip-less venv in a world-readable temp dir (``mw-portable-*``,
   every directory 0755), made with :mod:`venv` from the *base* interpreter
   (``sys._base_executable``: the system Python, outside the checkout);
2. the running interpreter's site-packages (the checkout's ``.venv``)
   hard-linked file by file into that venv's site-packages (a copy where
   the temp dir is on another file system), without the editable install's
   path hook (``__editable__*`` and ``.pth`` files that name the checkout);
3. the project's packages (``[tool.setuptools] packages`` in pyproject.toml,
   else every top-level directory with an ``__init__.py`` except tests and
   bench) hard-linked into the same site-packages, so ``import gateway`` finds
   this copy of today's code.

A hard link gives the other user the file's own mode (0644) without needing
to traverse the private directories above the original, so the build costs
only directory entries: about 0.5 s for the whole site-packages on this
machine (measured in the issue-19 note), once per session, and nothing is
written into the checkout.  Byte-compiled caches come along (same mtime and
size, so they stay valid); ``PYTHONDONTWRITEBYTECODE`` keeps the other user
from trying to write new ones.

:func:`as_user` gives the command prefix that switches to a user (``setpriv``,
else ``runuser``; only root can), and :meth:`PortableInstall.run_as` runs a
module of this copy as that user, in a directory it can enter, with a clean
``HOME``.  Use ``install.probe(user)`` to find out up front whether the
user can start Python at all (it fails only where the base interpreter itself
is out of that user's reach, which a skip must then say).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import site
import subprocess
import tempfile
import tomllib
import venv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOT_PACKAGES = {"tests", "bench", "docs", "deploy", "scripts"}


def project_packages(repo: Path = REPO) -> list[str]:
    """Top-level packages of the project: pyproject's list, else a glob."""
    names: list[str] = []
    try:
        data = tomllib.loads((repo / "pyproject.toml").read_text())
        listed = data.get("tool", {}).get("setuptools", {}).get("packages")
        if isinstance(listed, list):
            names = sorted({str(p).split(".")[0] for p in listed})
    except (OSError, tomllib.TOMLDecodeError):
        names = []
    if not names:
        names = sorted(p.parent.name for p in repo.glob("*/__init__.py")
                       if p.parent.name not in NOT_PACKAGES)
    return names


def as_user(user: str = "nobody", group: str = "nogroup") -> list[str] | None:
    """The command prefix that runs a command as ``user``; None unless root."""
    if os.geteuid() != 0:
        return None
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={user}", f"--regid={group}", "--clear-groups"]
    runuser = shutil.which("runuser")
    return [runuser, "-u", user, "--"] if runuser else None


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file is readable by anyone already, else a copy
    that is (never a chmod of the original)."""
    if os.stat(src).st_mode & 0o444 == 0o444:
        try:
            os.link(src, dst)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                raise
    shutil.copy2(src, dst)
    os.chmod(dst, 0o755 if os.access(src, os.X_OK) else 0o644)


def _is_editable_hook(name: str, path: Path, repo: Path) -> bool:
    if name.startswith("__editable__"):
        return True
    if name.endswith(".pth"):
        with contextlib.suppress(OSError):
            return str(repo) in path.read_text(errors="replace")
    return False


def _open_up(top: Path) -> None:
    """Every directory below ``top`` 0755 (files: see :func:`_link_or_copy`)."""
    for dirpath, _dirnames, _filenames in os.walk(top):
        os.chmod(dirpath, 0o755)


@dataclass(frozen=True)
class PortableInstall:
    """A copy of mailwarden and its dependencies that any user can run."""

    root: Path
    python: Path
    site_packages: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment for a run: no user site, no bytecode writes, no
        checkout on the path, no inherited mailwarden config."""
        keep = {k: v for k, v in os.environ.items()
                if k not in ("PYTHONPATH", "PYTHONHOME", "MAILWARDEN_CONFIG", "VIRTUAL_ENV")}
        return {**keep, "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "HOME": "/nonexistent"}

    def command(self, module: str, *args: str) -> list[str]:
        return [str(self.python), "-m", module, *args]

    def run_as(self, user: str | None, module: str, *args: str, group: str = "nogroup",
               env: Mapping[str, str] | None = None, timeout: float = 120,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``python -m module ARGS`` from this copy, as ``user`` (None: as now)."""
        prefix: Sequence[str] = []
        if user is not None:
            got = as_user(user, group)
            if got is None:
                raise RuntimeError(f"cannot switch to user {user!r}: needs root and setpriv"
                                   " or runuser")
            prefix = got
        return subprocess.run(
            [*prefix, *self.command(module, *args)], capture_output=True, text=True,
            timeout=timeout, cwd=self.root, env={**self.env, **(env or {})}, input=input,
        )

    def probe(self, user: str, group: str = "nogroup") -> str | None:
        """None if ``user`` can import this copy's code; else why not."""
        pkgs = ",".join(project_packages())
        try:
            out = subprocess.run(
                [*(as_user(user, group) or []), str(self.python), "-c", f"import {pkgs}"],
                capture_output=True, text=True, timeout=120, cwd=self.root, env=self.env)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if out.returncode != 0:
            return (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def portable_install(repo: Path = REPO, parent: str | None = None) -> PortableInstall:
    """Build the copy (see the module docstring); the caller removes it."""
    root = Path(tempfile.mkdtemp(prefix="mw-portable-", dir=parent))
    try:
        os.chmod(root, 0o755)
        env_dir = root / "venv"
        venv.EnvBuilder(symlinks=True, with_pip=False, clear=True).create(env_dir)
        python = env_dir / "bin" / "python"
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
        target = Path(purelib)
        sources = [Path(p) for p in site.getsitepackages() if Path(p).is_dir()
                   and Path(p).resolve() != target.resolve()]
        for src in sources:
            for entry in sorted(src.iterdir()):
                if _is_editable_hook(entry.name, entry, repo):
                    continue
                dst = target / entry.name
                if dst.exists():
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
                elif entry.is_file():
                    _link_or_copy(str(entry), str(dst))
        for name in project_packages(repo):
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(repo / name, target / name, symlinks=True,
                            copy_function=_link_or_copy)
        _open_up(root)
        return PortableInstall(root=root, python=python, site_packages=target)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
