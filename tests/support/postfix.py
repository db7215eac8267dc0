"""A private Postfix instance for the end-to-end tests, built from the shipped snippets.

Debian's ``postfix`` package is installed but not configured (debconf
``postfix/main_mailer_type`` = "No configuration"): there is no
``/etc/postfix/main.cf`` and no system mail server runs.  This helper never
touches ``/etc/postfix``: it writes its own ``main.cf``/``master.cf`` into a
temp directory and runs ``postfix -c DIR start`` (as root, which Postfix
requires; the daemons drop to the ``postfix`` user and ``postdrop`` group the
package created).  Layout of the temp directory (world-traversable, because
the daemons run as ``postfix``):

``etc/``     main.cf, master.cf (the config directory; kept apart from the
             queue because ``postfix check`` walks the config directory and
             would complain about the queue's ownership)
``spool/``   queue_directory (root-owned; Postfix creates its subdirectories)
``data/``    data_directory (owned by postfix)
``log/``     ``maillog_file`` written by postlogd (no syslog needed)

The configuration is the *shipped* integration: ``deploy/postfix/<mode>/
main.cf`` and ``master.cf`` are appended to a minimal base after replacing
the documented ports with free loopback ports chosen at run time:
``127.0.0.1:10025`` (mailwarden) and ``127.0.0.1:10026`` (re-injection); the
public ``smtp inet`` service becomes ``127.0.0.1:<port>``; every service runs
unchrooted.  Postfix listens on 127.0.0.1 only (``inet_interfaces``), resolves
nothing (``smtp_dns_support_level = disabled``, no PTR lookups) and relays
``example.com`` and everything else to ``relay_to`` (a capture server).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[2]
SNIPPETS = REPO / "deploy" / "postfix"
POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
POSTCONF = "/usr/sbin/postconf"

#: The ports the shipped snippets use (mailwarden, re-injection, mailwarden's milter).
SNIPPET_FILTER_PORT = 10025
SNIPPET_REINJECT_PORT = 10026
SNIPPET_MILTER_PORT = 10027

Mode = Literal["after-queue", "before-queue", "milter"]

BASE_MAIN_CF = """\
# private test instance (tests/support/postfix.py)
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
maillog_file_prefixes = {root}/log
maillog_file = {root}/log/maillog
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination =
relay_domains = example.com
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtputf8_enable = no
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relay_transport = smtp:[127.0.0.1]:{relay_port}
default_transport = smtp:[127.0.0.1]:{relay_port}
# Retry deferred mail quickly (the tests flush the queue explicitly anyway).
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
# Bounces would go to the fake senders; keep failures in the queue instead.
soft_bounce = yes
"""

BASE_MASTER_CF = """\
# private test instance (tests/support/postfix.py): internal services
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_missing() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    if not os.access(POSTFIX, os.X_OK):
        return (
            "postfix is not installed: echo 'postfix postfix/main_mailer_type select "
            "No configuration' | debconf-set-selections; apt-get install -y postfix"
        )
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root (postfix start)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def adapt_master_cf(text: str, *, smtpd_port: int, filter_port: int, reinject_port: int) -> str:
    """The shipped master.cf snippet with run-time loopback ports, unchrooted."""
    out = []
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            fields = line.split()
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{smtpd_port}"
            fields[4] = "n"  # chroot: the temp queue has no copy of /etc
            line = " ".join(fields)
        line = line.replace(f"127.0.0.1:{SNIPPET_FILTER_PORT}", f"127.0.0.1:{filter_port}")
        line = line.replace(f"[127.0.0.1]:{SNIPPET_FILTER_PORT}", f"[127.0.0.1]:{filter_port}")
        line = line.replace(f"127.0.0.1:{SNIPPET_REINJECT_PORT}", f"127.0.0.1:{reinject_port}")
        out.append(line)
    return "\n".join(out) + "\n"


def adapt_main_cf(text: str, *, filter_port: int) -> str:
    """The shipped main.cf snippet with the run-time mailwarden port (the
    milter snippet: the milter listens there)."""
    text = text.replace(f"inet:127.0.0.1:{SNIPPET_MILTER_PORT}", f"inet:127.0.0.1:{filter_port}")
    return text.replace(f"[127.0.0.1]:{SNIPPET_FILTER_PORT}", f"[127.0.0.1]:{filter_port}")


class Postfix:
    """One private Postfix instance (see the module docstring).

    ``port`` is the public smtpd (where swaks connects), ``filter_port`` the
    port mailwarden must listen on, ``reinject_port`` mailwarden's next hop;
    after-queue only: ``submission_port``, an smtpd using the
    ``mailwarden-submission`` transport (no XFORWARD).  Milter mode: the
    stock public smtpd with the snippet's ``smtpd_milters`` pointing at
    ``filter_port`` (there is no re-injection port); ``extra_main_cf`` is
    appended last (a test's overrides).
    """

    def __init__(self, mode: Mode, *, relay_to: int, filter_port: int | None = None,
                 extra_main_cf: str = "") -> None:
        missing = postfix_missing()
        if missing:
            raise RuntimeError(missing)
        self.mode = mode
        self.root = Path(tempfile.mkdtemp(prefix="mw-postfix-"))
        self.root.chmod(0o755)
        self.config_dir = self.root / "etc"
        self.port = free_port()
        self.filter_port = filter_port or free_port()
        self.reinject_port = free_port()
        self.submission_port = free_port()
        self.relay_port = relay_to
        self.maillog = self.root / "log" / "maillog"
        self.running = False
        self.extra_main_cf = extra_main_cf
        self.write_config()

    # ------------------------------------------------------------ config

    def write_config(self) -> None:
        for name, owner in (("etc", None), ("spool", None), ("data", "postfix"), ("log", "postfix")):
            d = self.root / name
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
            if owner:
                shutil.chown(d, owner)
        snippets = SNIPPETS / self.mode
        main = BASE_MAIN_CF.format(root=self.root, relay_port=self.relay_port)
        main += "\n# ---- " + str(snippets / "main.cf") + "\n"
        main += adapt_main_cf((snippets / "main.cf").read_text(), filter_port=self.filter_port)
        if self.extra_main_cf:
            # an override replaces the earlier entry (postconf warns about duplicates)
            keys = {line.split("=", 1)[0].strip() for line in self.extra_main_cf.splitlines()
                    if "=" in line and not line.lstrip().startswith("#")}
            main = "\n".join(line for line in main.splitlines()
                             if line.split("=", 1)[0].strip() not in keys or line[:1].isspace())
            main += "\n# ---- test overrides\n" + self.extra_main_cf + "\n"
        master = BASE_MASTER_CF
        if self.mode == "milter":
            master += f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        if self.mode == "after-queue":
            # The public smtpd is the stock one; the snippet adds the rest.
            # A "submission" smtpd uses the snippet's mailwarden-submission
            # transport as the snippet tells (no SASL here: only the path).
            master += f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
            master += (
                f"127.0.0.1:{self.submission_port} inet n - n - - smtpd\n"
                "  -o syslog_name=postfix/submission\n"
                f"  -o content_filter=mailwarden-submission:[127.0.0.1]:{SNIPPET_FILTER_PORT}\n"
            )
        if (snippets / "master.cf").exists():
            master += "# ---- " + str(snippets / "master.cf") + "\n"
            master += (snippets / "master.cf").read_text()
        master = adapt_master_cf(
            master, smtpd_port=self.port, filter_port=self.filter_port,
            reinject_port=self.reinject_port,
        )
        (self.config_dir / "main.cf").write_text(main)
        (self.config_dir / "master.cf").write_text(master)

    # ------------------------------------------------------------ commands

    def _run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, check=False,
            env={**os.environ, "MAIL_CONFIG": str(self.config_dir)},
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}\n"
                f"maillog:\n{self.log_tail()}"
            )
        return proc

    def config_warnings(self) -> list[str]:
        """``postconf -n`` warnings (unknown or misspelt parameters in main.cf or
        in master.cf ``-o`` overrides); ``postfix start`` itself only refuses
        fatal errors."""
        proc = self._run(POSTCONF, "-c", str(self.config_dir), "-n")
        return [line for line in proc.stderr.splitlines() if "warning" in line]

    def start(self, timeout: float = 120) -> None:
        """Start the instance and wait until the public and re-injection ports accept."""
        self._run(POSTFIX, "-c", str(self.config_dir), "start", timeout=timeout)
        self.running = True
        deadline = time.monotonic() + timeout
        ports = (self.port,) if self.mode == "milter" else (self.port, self.reinject_port)
        for port in ports:
            while not _accepts(port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postfix does not listen on {port}:\n{self.log_tail()}")
                time.sleep(0.05)

    def master_pid(self) -> int | None:
        """The running master's pid (from ``spool/pid/master.pid``), or None."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.root / "spool" / "pid" / "master.pid").read_text().split()[0])
        return None

    def stop(self, timeout: float = 15) -> None:
        """``postfix stop`` and wait for the master to exit (``abort`` if it hangs)."""
        if not self.running:
            return
        pid = self.master_pid()
        self._run(POSTFIX, "-c", str(self.config_dir), "stop", check=False)
        deadline = time.monotonic() + timeout
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid is not None and _alive(pid):
            self._run(POSTFIX, "-c", str(self.config_dir), "abort", check=False)
        self.running = False

    def close(self) -> None:
        """Stop the instance and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def flush(self) -> None:
        """``postqueue -f``: attempt delivery of all queued mail now."""
        self._run(POSTQUEUE, "-c", str(self.config_dir), "-f")

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: the queued messages (one dict per message)."""
        proc = self._run(POSTQUEUE, "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def wait_queue_empty(self, timeout: float = 120) -> None:
        """Wait until Postfix has delivered (or dropped) everything it queued."""
        deadline = time.monotonic() + timeout
        while self.queue():
            if time.monotonic() > deadline:
                raise AssertionError(f"postfix queue not empty: {self.queue()}\n{self.log_tail()}")
            time.sleep(0.1)

    def wait_log(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """Wait until the maillog matches ``pattern`` (a regex); returns the match."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.log())
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"maillog never matched {pattern!r}:\n{self.log_tail()}")
            time.sleep(0.05)

    def log(self) -> str:
        """The instance's whole maillog so far."""
        with contextlib.suppress(OSError):
            return self.maillog.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the maillog (for failure messages)."""
        return "\n".join(self.log().splitlines()[-lines:])

    def __enter__(self) -> Postfix:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accepts(port: int) -> bool:
    """Something listens on 127.0.0.1:``port`` (read from /proc/net/tcp, not
    by connecting: a probe connection would start an smtpd, which in milter
    mode connects to a milter that is not up yet and logs a warning)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == want and fields[3] == "0A":  # LISTEN
                    return True
    except OSError:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_postfix() -> None:
    """For a test module's autouse fixture: fail when Debian's postfix is not
    installed (the README's test command installs it), skip with the reason
    when it is there but cannot run here."""
    import pytest

    why = postfix_missing()
    if why and "not installed" in why:
        pytest.fail(why, pytrace=False)
    if why:
        pytest.skip(why)


def after_received(data: bytes) -> bytes:
    """A delivered message without Postfix's own first Received header."""
    assert data.startswith(b"Received: "), data[:200]
    m = re.match(rb"Received: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", data)
    assert m, data[:300]
    return data[m.end():]
