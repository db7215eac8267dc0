"""The CLI commands that never scan mail do not import the scanners (issue 14).

``quarantine``, ``log``, ``audit``, ``purge``, ``subject-access`` and ``erase``
run against the store only: they must not load libmagic, pyclamd, dkimpy,
olefile (or the filter modules that wrap them), which cost start-up time and
pull native libraries into a command an auditor runs.  Each command runs in
its own fresh interpreter (this test process has imported everything), from
``cli``'s ``main`` as the console script does, against a real store with a
held message and log records; the probe then writes ``sys.modules``' scanner
entries to a file.  ``check`` is the control: it builds the chain, so it must
show the scanners (otherwise the probe would prove nothing).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from quarantine.store import Store, iso
from tests.support.process import REPO, free_port, write_config

#: Modules that scan mail, and the native libraries behind them.
SCANNERS = ("pyclamd", "magic", "dkim", "olefile", "oletools", "py7zr", "rarfile",
            "filters.clamav", "filters.attachment_types", "filters.external_attachments",
            "filters.dkim_check", "filters.archives", "filters.macros", "filters.filetypes")
CHAIN = ["clamav", "attachment_types", "external_attachments", "personal", "header_log"]

#: Run ``mailwarden ARGV`` in this interpreter, then record what it imported.
PROBE = f"""
import json, os, sys
sys.argv[0] = "mailwarden"
from cli import main
try:
    main(sys.argv[1:], prog_name="mailwarden")
    code = 0
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
scanners = {SCANNERS!r}
loaded = sorted(m for m in sys.modules
                if any(m == s or m.startswith(s + ".") for s in scanners))
with open(os.environ["MW_PROBE_OUT"], "w") as fh:
    json.dump({{"code": code, "loaded": loaded}}, fh)
"""


def probe(tmp_path: Path, config: Path, *args: str) -> tuple[int, list[str], str]:
    out = tmp_path / "probe.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "--config", str(config), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "MW_PROBE_OUT": str(out)},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    result = json.loads(out.read_text())
    return result["code"], result["loaded"], proc.stdout + proc.stderr


async def _fill(path: Path) -> tuple[str, str]:
    store = await Store.open(path)
    try:
        ids = []
        for n in range(2):
            raw = (f"From: a@ext.test\r\nTo: b@example.com\r\nSubject: held {n}\r\n\r\n"
                   "body\r\n").encode()
            ids.append(await store.quarantine(
                raw=raw, queue_id=f"Q{n}", received=datetime.now(UTC), direction="inbound",
                client_addr="192.0.2.1", helo="mx.test", mail_from="a@ext.test",
                rcpt_tos=["b@example.com"],
                headers={"from": "a@ext.test", "to": "b@example.com", "subject": f"held {n}"},
                reason="attachment_types", detail="x.exe: executable", personal=False,
                verdicts=[{"filter": "attachment_types", "outcome": "quarantine"}],
            ))
        await store.write_log_batch([{
            "time": iso(datetime.now(UTC)), "queue_id": "Q0", "direction": "inbound",
            "subject": "logged", "addresses": ["a@ext.test", "b@example.com"],
        }])
    finally:
        await store.close()
    return ids[0], ids[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    tmp = tmp_path_factory.mktemp("cli-imports")
    store = tmp / "store"
    first, second = asyncio.run(_fill(store))
    # Nothing listens on the next hop: release fails (exit 1) after the audit row.
    config, _port = write_config(tmp / "config.toml", store=store,
                                 next_hop=f"127.0.0.1:{free_port()}", chain=CHAIN)
    return tmp, config, first, second


def commands(first: str, second: str) -> list[tuple[list[str], int]]:
    return [
        (["--help"], 0),
        (["quarantine", "list", "--help"], 0),
        (["quarantine", "list"], 0),
        (["quarantine", "list", "--json", "--state", "all"], 0),
        (["quarantine", "show", first], 0),
        (["quarantine", "show", first, "--body", "--reason", "probe"], 0),
        (["quarantine", "show", "../etc"], 2),
        (["quarantine", "hold", first, "--reason", "probe"], 0),
        (["quarantine", "unhold", first, "--reason", "probe"], 0),
        (["quarantine", "release", first, "--reason", "probe"], 1),
        (["quarantine", "delete", second, "--reason", "probe"], 0),
        (["log", "export"], 0),
        (["log", "export", "--json"], 0),
        (["log", "verify"], 0),
        (["log", "stats"], 0),
        (["audit", "list"], 0),
        (["purge", "--dry-run"], 0),
        (["subject-access", "b@example.com"], 0),
        (["erase", "b@example.com", "--reason", "probe"], 0),
        (["purge"], 0),
    ]


def test_commands_on_kept_data_do_not_import_the_scanners(
        setup: tuple[Path, Path, str, str]) -> None:
    tmp, config, first, second = setup
    for args, expected in commands(first, second):
        code, loaded, output = probe(tmp, config, *args)
        assert code == expected, (args, code, output)
        assert loaded == [], (args, loaded)


def test_check_builds_the_chain_and_so_imports_the_scanners(
        setup: tuple[Path, Path, str, str]) -> None:
    """The control: the probe does see scanners when a command loads them."""
    tmp, config, _first, _second = setup
    _code, loaded, output = probe(tmp, config, "check")
    assert "ok   config" in output, output
    for name in ("pyclamd", "magic", "dkim", "olefile", "filters.clamav"):
        assert name in loaded, (name, loaded)
