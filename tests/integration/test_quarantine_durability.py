"""A held message is durable before 250; store trouble means 451 (issue 3).

Uses the real clamd (EICAR is the simplest way to get a message held).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.eicar import eicar
from tests.support.harness import make_message
from tests.support.process import GatewayProcess, write_config
from tests.support.served import quarantine_rows

HELD = re.compile(r"held for review \(([0-9A-Za-z-]+)\)")


def _virus_message(subject: str = "invoice") -> bytes:
    return make_message(subject=subject, attachments=[("invoice.com", "application/octet-stream",
                                                       eicar())])


def test_held_message_is_in_store_with_owner_only_modes(make_gateway, next_hop, clamd):
    gw = make_gateway(chain=["clamav"], filters={"clamav": {"address": clamd.socket}})
    code, text = gw.send(_virus_message())
    assert code == 250 and "2.7.0" in text, text
    qid = HELD.search(text).group(1)
    assert next_hop.messages == []
    (row,) = quarantine_rows(gw.store_path)
    assert row["id"] == qid and row["reason"] == "clamav" and "Eicar" in row["detail"]
    path = gw.store_path / row["path"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"invoice.com" in path.read_bytes()
    for d in [gw.store_path, *(p for p in gw.store_path.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((gw.store_path / "mailwarden.db").stat().st_mode) == 0o600


def test_sigkill_right_after_250_keeps_the_held_message(tmp_path, next_hop, clamd):
    store = tmp_path / "store"
    cfg, port = write_config(tmp_path / "c.toml", store=store, next_hop=next_hop.address,
                             chain=["clamav"], filters={"clamav": {"address": clamd.socket}})
    p = GatewayProcess(cfg, port, tmp_path / "serve.log").start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("c.test")
            s.mail("a@ext.test")
            s.rcpt("b@example.com")
            code, text = s.data(_virus_message())
            p.proc.send_signal(signal.SIGKILL)  # the instant after 250
        assert code == 250
        qid = HELD.search(text.decode()).group(1)
        p.proc.wait(10)
    finally:
        p.stop()
    p2 = GatewayProcess(cfg, port, tmp_path / "serve2.log").start()
    try:
        rows = quarantine_rows(store)
        assert [r["id"] for r in rows] == [qid]
        assert (store / rows[0]["path"]).read_bytes().count(b"invoice.com") >= 1
    finally:
        p2.stop()
    assert next_hop.messages == []


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                          str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_gives_451_not_250(make_gateway, next_hop, clamd, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tiny tmpfs, which needs root")
    with _tmpfs(tmp_path / "tiny", "200k") as tiny:
        gw = make_gateway(chain=["clamav"], filters={"clamav": {"address": clamd.socket}},
                          store={"path": str(tiny / "store")})
        big = make_message(subject="big", attachments=[
            ("invoice.com", "application/octet-stream", eicar()),
            ("filler.bin", "application/octet-stream", os.urandom(400_000)),
        ])
        code, text = gw.send(big)
        assert code == 451 and "4.3.0" in text, text
        assert next_hop.messages == []
        assert quarantine_rows(tiny / "store") == []
        # Nothing half-kept: no stray message files.
        assert not [p for p in (tiny / "store").rglob("*.eml")]
        gw.stop()  # before the tmpfs goes


def _set_read_only(store: Path, read_only: bool) -> None:
    """Make the store's message tree read-only: chattr +i as root (root ignores
    modes), chmod 0500 otherwise."""
    dirs = [store / "messages", *(p for p in (store / "messages").rglob("*") if p.is_dir())]
    for d in dirs:
        if os.geteuid() == 0:
            out = subprocess.run(["chattr", "+i" if read_only else "-i", str(d)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                pytest.skip(f"chattr not supported here: {out.stderr.strip()}")
        else:
            d.chmod(0o500 if read_only else 0o700)


def test_read_only_store_gives_451(make_gateway, next_hop, clamd, tmp_path):
    gw = make_gateway(chain=["clamav"], filters={"clamav": {"address": clamd.socket}})
    code, _ = gw.send(make_message(subject="clean first"))
    assert code == 250
    _set_read_only(gw.store_path, True)
    try:
        code, text = gw.send(_virus_message("while read-only"))
        assert code == 451 and "4.3.0" in text, text
        # Clean mail still flows: only keeping is impossible.
        code, _ = gw.send(make_message(subject="clean during"))
        assert code == 250
    finally:
        _set_read_only(gw.store_path, False)
    code, text = gw.send(_virus_message("after"))
    assert code == 250 and "held" in text
    assert len(next_hop.messages) == 2
    assert len(quarantine_rows(gw.store_path)) == 1
