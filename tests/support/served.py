"""Drive a running gateway with exact bytes and prove where each message went.

Used by the hostile-input, corpus, fault and soak tests:

* :func:`send_exact` sends one message over SMTP **byte for byte** (only
  dot-stuffing is added, and a final CRLF if the data lacks one, as every
  client does), then NOOP to show the session still serves, and records the
  reply to DATA and how long it took.  A connection closed without a reply
  raises: that is a failure in every test.
* :func:`settle` classifies the reply (relayed / held / refused / tempfail)
  and checks the message is where the reply says: at the next hop exactly
  once (found by its unique envelope sender) or in the quarantine with the
  same bytes; refused and temp-failed messages are in neither.
* :class:`ServedGateway` runs ``mailwarden serve`` as a subprocess and reads
  its peak RSS (``VmHWM``, resettable through ``/proc/PID/clear_refs``) and
  open file descriptors.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import smtplib
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import harness
from tests.support.harness import NextHop
from tests.support.process import GatewayProcess, write_config

HELD = re.compile(r"held for review \(([0-9A-Za-z-]+)\)")
#: Reply text after the code: an enhanced status code or at least some words.
REASON = re.compile(r"^(\d\.\d{1,3}\.\d{1,3} )?\S.{3,}")

FULL_CHAIN = ["clamav", "attachment_types", "external_attachments", "personal", "header_log"]
INBOUND = {"trusted_networks": ["10.255.255.0/24"]}


@dataclass
class Answer:
    """The gateway's reply to one DATA."""

    code: int
    text: str
    seconds: float
    sent: bytes  # the message as the gateway received it (unstuffed)
    mail_from: str
    noop: int = 0

    @property
    def kind(self) -> str:
        if self.code == 250:
            return "held" if HELD.search(self.text) else "relayed"
        if 500 <= self.code < 600:
            return "refused"
        if 400 <= self.code < 500:
            return "tempfail"
        return f"unexpected-{self.code}"

    @property
    def quarantine_id(self) -> str | None:
        m = HELD.search(self.text)
        return m.group(1) if m else None


def stuff(raw: bytes) -> bytes:
    """SMTP dot-stuffing plus the end-of-data line, for CRLF data."""
    if raw and not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    body = re.sub(rb"(?m)^\.", b"..", raw)
    return body + b".\r\n"


def as_received(raw: bytes) -> bytes:
    """What the gateway stores for ``raw`` sent by :func:`send_exact`."""
    return raw + b"\r\n" if raw and not raw.endswith(b"\r\n") else raw


def send_exact(
    port: int,
    raw: bytes,
    mail_from: str,
    rcpt_tos: Iterable[str] = ("b@example.com",),
    *,
    timeout: float = 120,
    host: str = "127.0.0.1",
) -> Answer:
    """One SMTP transaction with ``raw`` as the exact data; then NOOP, QUIT.

    A refusal before DATA (MAIL, RCPT) is returned as the answer, with
    ``seconds`` 0.
    """
    sent = as_received(raw)
    with smtplib.SMTP(host, port, timeout=timeout) as s:
        s.ehlo("client.test")
        answer = _transaction(s, raw, sent, mail_from, list(rcpt_tos))
        answer.noop = s.noop()[0]
    return answer


def _transaction(s: smtplib.SMTP, raw: bytes, sent: bytes, mail_from: str,
                 rcpt_tos: list[str]) -> Answer:
    options = ["BODY=8BITMIME"] if s.has_extn("8bitmime") else []
    code, msg = s.mail(mail_from, options)
    if code != 250:
        return Answer(code, msg.decode(errors="replace"), 0.0, sent, mail_from)
    for r in rcpt_tos:
        code, msg = s.rcpt(r)
        if code not in (250, 251):
            s.rset()
            return Answer(code, msg.decode(errors="replace"), 0.0, sent, mail_from)
    s.putcmd("data")
    code, msg = s.getreply()
    if code != 354:
        return Answer(code, msg.decode(errors="replace"), 0.0, sent, mail_from)
    start = time.perf_counter()
    s.send(stuff(raw))
    code, msg = s.getreply()  # raises SMTPServerDisconnected if dropped
    return Answer(code, msg.decode(errors="replace"), time.perf_counter() - start, sent,
                  mail_from)


def quarantine_row(store: Path, qid: str) -> dict[str, Any] | None:
    db = sqlite3.connect(f"file:{store / 'mailwarden.db'}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM quarantine WHERE id = ?", (qid,)).fetchone()
        return dict(row) if row else None
    finally:
        db.close()


def quarantine_rows(store: Path) -> list[dict[str, Any]]:
    if not (store / "mailwarden.db").exists():
        return []
    db = sqlite3.connect(f"file:{store / 'mailwarden.db'}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM quarantine ORDER BY received")]
    finally:
        db.close()


def assert_clean_output(data: bytes) -> None:
    """What mailwarden passes on never has a bare CR/LF or a NUL."""
    crlf = data.count(b"\r\n")
    assert data.count(b"\n") == crlf and data.count(b"\r") == crlf, "bare CR/LF passed on"
    assert b"\0" not in data, "NUL passed on"


def settle(answer: Answer, next_hop: NextHop, store: Path, *, what: str = "") -> str:
    """Check the message is exactly where the reply says; return its kind."""
    label = f"{what}: {answer.code} {answer.text}"
    kind = answer.kind
    assert not kind.startswith("unexpected"), label
    assert answer.noop == 250, f"{label}: session no longer serving (NOOP {answer.noop})"
    delivered = [m for m in list(next_hop.messages) if m.mail_from == answer.mail_from]
    if kind == "relayed":
        assert len(delivered) == 1, f"{label}: at the next hop {len(delivered)} times"
        assert_clean_output(delivered[0].data)
    elif kind == "held":
        qid = answer.quarantine_id
        assert qid is not None
        row = quarantine_row(store, qid)
        assert row is not None, f"{label}: not in the quarantine"
        kept = (store / row["path"]).read_bytes()
        assert hashlib.sha256(kept).hexdigest() == row["sha256"], label
        assert kept == answer.sent, f"{label}: kept bytes differ from the bytes sent"
        assert row["mail_from"] == answer.mail_from, label
        assert delivered == [], f"{label}: held and also delivered"
    else:
        assert REASON.match(answer.text), f"{label}: no reason given"
        assert delivered == [], f"{label}: refused but delivered"
    return kind


@contextlib.contextmanager
def long_lines_allowed() -> Iterator[None]:
    """Inside the block, test next hops accept lines longer than 1,000
    octets (checked per connection, so keep the block open while the next
    hop serves), as Postfix does (aiosmtpd enforces RFC 5321's limit and answers
    ``500 Line too long``, which is the test next hop's policy, not the
    gateway's)."""
    old = harness._RecordingSMTP.line_length_limit
    harness._RecordingSMTP.line_length_limit = 4 << 20
    try:
        yield
    finally:
        harness._RecordingSMTP.line_length_limit = old


# ------------------------------------------------------------------ processes


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS (kB) of a process."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_sockets(pid: int, ports: Iterable[int]) -> int:
    """How many TCP sockets process ``pid`` holds open whose local or remote
    port is one of ``ports`` (a listener excepted): its client sessions on its
    own port, its connections to a next hop on that one's."""
    wanted = set(ports)
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()
                local, remote, state, inode = f[1], f[2], f[3], f[9]
                if inode not in inodes or state == "0A":  # 0A: LISTEN
                    continue
                if int(local.rsplit(":", 1)[1], 16) in wanted or \
                        int(remote.rsplit(":", 1)[1], 16) in wanted:
                    count += 1
    return count


def wait_sessions_closed(pid: int, ports: Iterable[int], timeout: float = 120) -> None:
    """Until process ``pid`` holds no session socket on ``ports`` (see
    :func:`tcp_sockets`); raises naming the wait."""
    ports = list(ports)
    deadline = time.monotonic() + timeout
    while (n := tcp_sockets(pid, ports)) > 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still holds {n} sockets on ports {ports}"
                                 f" after {timeout} s")
        time.sleep(0.02)  # poll interval of the wait


@dataclass
class ServedGateway:
    """``mailwarden serve`` in a subprocess, configured for the full chain."""

    workdir: Path
    next_hop: NextHop
    clamd_socket: str
    dns_address: str
    gateway: Mapping[str, Any] = field(default_factory=dict)
    filters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    chain: list[str] = field(default_factory=lambda: list(FULL_CHAIN))

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = self.workdir / "store"
        filters = {
            "clamav": {"address": self.clamd_socket},
            "external_attachments": {"nameservers": [self.dns_address], "dns_timeout": 2},
        }
        for name, values in self.filters.items():
            filters[name] = {**filters.get(name, {}), **values}
        self.config, self.port = write_config(
            self.workdir / "config.toml", store=self.store, next_hop=self.next_hop.address,
            chain=self.chain, gateway={"next_hop_timeout": 30, **self.gateway},
            filters={k: v for k, v in filters.items() if k in self.chain},
        )
        self.starts = 0
        self.process: GatewayProcess | None = None

    def start(self) -> ServedGateway:
        self.starts += 1
        self.process = GatewayProcess(
            self.config, self.port, self.workdir / f"serve-{self.starts}.log"
        ).start()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None and self.process.proc is not None
        return self.process.proc.pid

    def alive(self) -> bool:
        return (self.process is not None and self.process.proc is not None
                and self.process.proc.poll() is None)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()

    def log(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.workdir.glob("serve-*.log"))
        )

    def send(self, raw: bytes, mail_from: str, rcpt_tos: Iterable[str] = ("b@example.com",),
             **kw: Any) -> Answer:
        return send_exact(self.port, raw, mail_from, rcpt_tos, **kw)


def tally(kinds: Iterable[str]) -> str:
    """``relayed=3 held=1 ...`` in a fixed order, for the test output."""
    c = Counter(kinds)
    order = ["relayed", "held", "refused", "tempfail"]
    return " ".join(f"{k}={c.get(k, 0)}" for k in order + sorted(set(c) - set(order)))
