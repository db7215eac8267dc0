"""The operator's kit in deploy/ is accepted by the real tools it is written for.

- ``mailwarden serve`` speaks the ``Type=notify`` protocol the unit relies on
  (READY=1 once listening, STOPPING=1 on SIGTERM), over a real datagram socket;
- the systemd unit, sysusers.d and tmpfiles.d snippets pass systemd's own
  parsers (``systemd-analyze verify``, ``systemd-sysusers``/``systemd-tmpfiles``
  into a temp root), when systemd's tools are installed;
- deploy/clamd.conf parses with ``clamconf`` and satisfies mailwarden's own
  clamd.conf checks for the default ``max_message_size``.

The Postfix snippets are exercised end to end in test_postfix_e2e.py.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from filters.clamav import clamd_conf_warnings
from gateway.config import GatewaySettings
from tests.support.harness import NextHop
from tests.support.process import GatewayProcess, write_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def test_serve_notifies_systemd_ready_and_stopping(tmp_path: Path, next_hop: NextHop) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        cfg, port = write_config(tmp_path / "config.toml", store=tmp_path / "store",
                                 next_hop=next_hop.address)
        gw = GatewayProcess(cfg, port, tmp_path / "serve.log", env={"NOTIFY_SOCKET": str(path)})
        gw.start()
        try:
            assert sock.recv(256) == b"READY=1"
            gw.signal(signal.SIGTERM)
            assert sock.recv(256) == b"STOPPING=1"
            assert gw.wait(20) == 0
        finally:
            gw.stop()


def _unit_with_real_binary(tmp_path: Path) -> Path:
    """The shipped unit, with ExecStart pointing at this venv's mailwarden."""
    binary = Path(sys.executable).parent / "mailwarden"
    if not binary.exists():
        pytest.skip(f"no console script at {binary} (package not installed in this venv)")
    text = (DEPLOY / "systemd" / "mailwarden.service").read_text()
    text = text.replace("/opt/mailwarden/bin/mailwarden", str(binary))
    unit = tmp_path / "mailwarden.service"
    unit.write_text(text)
    return unit


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    unit = _unit_with_real_binary(tmp_path)
    text = unit.read_text()
    for setting in ("Type=notify", "User=mailwarden", "ProtectSystem=strict",
                    "ReadWritePaths=/var/lib/mailwarden", "NoNewPrivileges=yes",
                    "Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert setting in text.splitlines(), setting
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "mailwarden.service" in line]
    assert proc.returncode == 0 and problems == [], proc.stdout + proc.stderr


def test_sysusers_and_tmpfiles_create_user_and_store(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None:
        pytest.skip("systemd-sysusers/systemd-tmpfiles are not installed (package systemd)")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["systemd-sysusers", f"--root={root}",
                    str(DEPLOY / "systemd" / "mailwarden.sysusers")],
                   check=True, capture_output=True, timeout=60)
    passwd = (root / "etc" / "passwd").read_text()
    assert passwd.startswith("mailwarden:x:") and "/usr/sbin/nologin" in passwd
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create",
                    str(DEPLOY / "systemd" / "mailwarden.tmpfiles")],
                   check=True, capture_output=True, timeout=60)
    store = root / "var" / "lib" / "mailwarden"
    assert store.is_dir() and store.stat().st_mode & 0o777 == 0o700


def test_clamd_conf_notes_are_a_valid_clamd_conf_that_mailwarden_accepts(tmp_path: Path) -> None:
    assert clamd_conf_warnings(DEPLOY / "clamd.conf", GatewaySettings().max_message_size) == []
    clamconf = shutil.which("clamconf")
    if clamconf is None:
        pytest.skip("clamconf is not installed (package clamav)")
    shutil.copy(DEPLOY / "clamd.conf", tmp_path / "clamd.conf")
    proc = subprocess.run([clamconf, "-c", str(tmp_path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert "ERROR" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert 'StreamMaxLength = "62914560"' in proc.stdout
