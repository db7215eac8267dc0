"""`mailwarden serve`, `check` and config errors as real processes (issue 2)."""

from __future__ import annotations

import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest

from tests.support.harness import make_message
from tests.support.process import GatewayProcess, cli, free_port, write_config


@pytest.fixture
def served(tmp_path, next_hop):
    procs: list[GatewayProcess] = []

    def start(**kw) -> GatewayProcess:
        cfg, port = write_config(tmp_path / "config.toml", store=tmp_path / "store",
                                 next_hop=next_hop.address, **kw)
        p = GatewayProcess(cfg, port, tmp_path / "serve.log").start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def _send(port: int, raw: bytes, subject_rcpt: str = "b@example.com") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("c.test")
        s.mail("a@ext.test")
        s.rcpt(subject_rcpt)
        return s.data(raw)


def test_sigterm_drains_session_in_flight(served, next_hop):
    p = served(gateway={"drain_timeout": 120})
    next_hop.hold = threading.Event()  # the next hop answers when the test says so
    result: dict[str, object] = {}

    def client() -> None:
        result["reply"] = _send(p.port, make_message(subject="in flight"))

    t = threading.Thread(target=client)
    t.start()
    try:
        # Wait until the message is at the next hop, which holds its answer.
        assert next_hop.data_started.wait(120), "the message never reached the next hop"
        mark = p.log_mark()
        p.signal(signal.SIGTERM)
        p.wait_log("stopping: draining", since=mark)
        assert p.proc is not None and p.proc.poll() is None, "exited before the drain"
        assert t.is_alive(), "the client got its answer before the next hop gave one"
    finally:
        next_hop.hold.set()
    t.join(120)
    assert not t.is_alive(), "the client never got its answer"
    assert p.wait(120) == 0, p.log()
    code, _ = result["reply"]
    assert code == 250
    assert len(next_hop.messages) == 1
    assert "stopping: draining" in p.log()


def test_sigterm_idle_exits_promptly(served):
    # Promptly: without waiting for the drain deadline (no session to drain).
    p = served(gateway={"drain_timeout": 240})
    start = time.monotonic()
    p.signal(signal.SIGTERM)
    assert p.wait(240) == 0
    assert time.monotonic() - start < 120, "waited for the drain deadline with nothing to drain"
    assert "drain timeout" not in p.log()


def test_sighup_with_bad_config_keeps_serving(served, next_hop, tmp_path):
    p = served()
    good = p.config.read_text()
    p.config.write_text(good.replace("[gateway]", "[gateway]\nlisten_adress = 1"))
    mark = p.log_mark()
    p.signal(signal.SIGHUP)
    text = p.wait_log("reload refused", since=mark)
    assert "gateway.listen_adress: unknown key" in text
    code, _ = _send(p.port, make_message())
    assert code == 250
    # A good config is taken: the size limit now applies.
    p.config.write_text(good.replace("[gateway]", "[gateway]\nmax_message_size = 1000"))
    mark = p.log_mark()
    p.signal(signal.SIGHUP)
    p.wait_log("configuration reloaded", since=mark)
    code, _ = _send(p.port, make_message(body="x" * 4000))
    assert code == 552


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[gateway]\nlisten_adress = \"x\"", "gateway.listen_adress: unknown key"),
        ("[gateway]\nlisten = \"nope\"", "gateway.listen: bad address"),
        ("[gateway]\nmax_sessions = \"many\"", "gateway.max_sessions: expected an integer"),
        ("[gateway]\ntrusted_networks = [\"10.0.0.0/33\"]", "gateway.trusted_networks: bad network"),
        ("[gateway]\nnext_hop_cache_time = -1", "gateway.next_hop_cache_time: must not be negative"),
        ("[filters]\nchain = [\"clamav\", \"antispam\"]", "filters.chain: unknown filter 'antispam'"),
        ("[filters.clamv]\naction = \"reject\"", "filters.clamv: unknown key"),
        ("[bogus]\nx = 1", "bogus: unknown key"),
        ("[milter]\nlisten_adress = \"x\"", "milter.listen_adress: unknown key"),
        ("[milter]\nlisten = \"nope\"", "milter.listen: bad address"),
        ("[milter]\nlisten = \"unix:relative.sock\"", "milter.listen: bad address"),
        ("[milter]\nquarantine = \"drop\"", "milter.quarantine: must be one of 'own', 'hold'"),
        ("[milter]\nprogress_interval = 0", "milter.progress_interval: must be greater than 0"),
        ("[milter]\nprogress_interval = \"10s\"", "milter.progress_interval: expected a number"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, extra: str, key: str):
    base = "[gateway]\ninternal_domains = [\"example.com\"]\n"
    # Merge the extra table into the base where the table names collide.
    if extra.startswith("[gateway]"):
        text = base + extra.split("\n", 1)[1] + "\n"
    else:
        text = base + extra + "\n"
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    for command in ("check", "serve"):
        out = cli(command, config=cfg)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0], out.stderr


def test_missing_internal_domains_is_an_error(tmp_path: Path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[gateway]\nhostname = \"x\"\n")
    out = cli("check", config=cfg)
    assert out.returncode == 2
    assert "gateway.internal_domains: required key is missing" in out.stderr


def test_shipped_config_is_valid():
    from gateway.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "config.toml")
    assert cfg.chain == ("clamav", "attachment_types", "external_attachments", "personal",
                         "header_log")


def test_check_reports_next_hop_and_store(tmp_path, next_hop):
    cfg, _ = write_config(tmp_path / "c.toml", store=tmp_path / "store", next_hop=next_hop.address)
    out = cli("check", config=cfg)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "next hop" in out.stdout and "EHLO ok" in out.stdout
    assert "writable" in out.stdout
    cfg2, _ = write_config(tmp_path / "d.toml", store=tmp_path / "store",
                           next_hop=f"127.0.0.1:{free_port()}")
    out = cli("check", config=cfg2)
    assert out.returncode == 1
    assert "FAIL next hop" in out.stdout


def test_config_from_environment(tmp_path, next_hop):
    cfg, _ = write_config(tmp_path / "env.toml", store=tmp_path / "store", next_hop=next_hop.address)
    out = cli("check", env={"MAILWARDEN_CONFIG": str(cfg)})
    assert out.returncode == 0, out.stderr
    assert str(cfg) in out.stdout
