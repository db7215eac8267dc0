"""The real ``mailwarden`` as a subprocess, with a config file the test writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """A tiny TOML writer for test configs (tables of scalars and lists)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for k, v in data.items():
        if isinstance(v, Mapping):
            tables.append((f"{prefix}{k}", v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for name, table in tables:
        out += f"\n[{name}]\n" + to_toml(table, prefix=f"{name}.")
    return out


def write_config(
    path: Path,
    *,
    store: Path,
    next_hop: str,
    listen_port: int | None = None,
    chain: list[str] | None = None,
    gateway: Mapping[str, Any] | None = None,
    filters: Mapping[str, Mapping[str, Any]] | None = None,
    store_extra: Mapping[str, Any] | None = None,
    milter: Mapping[str, Any] | None = None,
) -> tuple[Path, int]:
    port = listen_port or free_port()
    data = {
        "gateway": {
            "listen": f"127.0.0.1:{port}",
            "next_hop": next_hop,
            "hostname": "mailwarden.test",
            "internal_domains": ["example.com"],
            "next_hop_timeout": 30,
            "drain_timeout": 10,
            **(gateway or {}),
        },
        "store": {"path": str(store), "log_flush_interval": 0.05, **(store_extra or {})},
        "filters": {"chain": list(chain or []), **{k: dict(v) for k, v in (filters or {}).items()}},
    }
    if milter is not None:
        data["milter"] = dict(milter)
    path.write_text(to_toml(data))
    return path, port


def cli(*args: str, config: Path | None = None, env: Mapping[str, str] | None = None,
        timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``mailwarden ARGS`` (as ``python -m cli``) and capture its output."""
    cmd = [sys.executable, "-m", "cli"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(args)
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, input=input,
        env={**os.environ, **(env or {})},
    )


class GatewayProcess:
    """``mailwarden serve`` in a subprocess; stderr goes to a log file."""

    def __init__(self, config: Path, port: int, log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> GatewayProcess:
        """Start and wait until the listener greets with 220 (generous: a
        loaded machine takes seconds to import the filters)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "--config", str(self.config), "serve"],
            stdout=self._log, stderr=self._log, cwd=REPO,
            env={**os.environ, **(self.env or {})},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"mailwarden exited {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mailwarden did not greet on port {self.port} within {timeout} s:"
                           f" {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_mark(self) -> int:
        """The log's current length: pass it to :meth:`wait_log` as ``since``."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def wait_log(self, needle: str, *, since: int = 0, timeout: float = 120) -> str:
        """Until ``needle`` appears in the log after byte ``since``; returns that
        part of the log.  Raises naming the line it waited for (and the log)
        when the timeout passes or the process exits without writing it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(since)
                    text = f.read().decode(errors="replace")
            except OSError:
                text = ""
            if needle in text:
                return text
            exited = self.proc is not None and self.proc.poll() is not None
            if exited or time.monotonic() > deadline:
                why = "exited" if exited else f"{timeout} s passed"
                raise AssertionError(f"waited for {needle!r} in the mailwarden log; {why}:"
                                     f"\n{self.log()}")
            time.sleep(0.02)  # poll interval of the wait, not a synchronisation

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if hasattr(self, "_log") and not self._log.closed:
            self._log.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()
