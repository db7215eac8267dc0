"""The virus notification: an observer of finished messages.

When a verdict found a virus (``Verdict.virus``) and names an address to
tell (``Verdict.notify``) and the message was held or refused, IT gets a
short plain-text notice through the next hop -- never the infected content.
Sent in the background: the client's reply does not wait for it.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from typing import TYPE_CHECKING, Any

from filters.base import Outcome
from gateway import replies
from gateway.config import Config
from gateway.relay import send_message

if TYPE_CHECKING:
    from gateway.message import Mail
    from gateway.pipeline import Result

log = logging.getLogger("mailwarden.pipeline")


class VirusNotifier:
    """Observer (``message_done``) that tells IT about viruses."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._background: set[asyncio.Task[Any]] = set()

    def message_done(self, mail: Mail, result: Result) -> None:
        for v in result.verdicts:
            if not v.notify or not v.virus:
                continue
            if v.outcome not in (Outcome.QUARANTINE, Outcome.REJECT):
                continue
            body = notification_text(mail, result, v.virus, self.config.gateway.hostname)
            task = asyncio.create_task(self._send(v.notify, body))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send(self, to: str, body: bytes) -> None:
        gw = self.config.gateway
        ok, reply, _ = await send_message(
            gw.next_hop, f"postmaster@{gw.hostname}", [to], body,
            timeout=gw.next_hop_timeout, helo_name=gw.hostname,
        )
        if not ok:
            log.error("virus notification to %s not accepted: %s", to, reply)

    async def aclose(self) -> None:
        """Let notifications under way finish (bounded)."""
        if self._background:
            await asyncio.wait(self._background, timeout=10)


def notification_text(mail: Mail, result: Result, virus: str, hostname: str) -> bytes:
    """A short plain-text notice naming sender, recipients, subject, virus, id."""
    safe = replies.safe_text
    lines = [
        f"From: mailwarden <postmaster@{hostname}>",
        "Subject: " + safe(f"[mailwarden] virus found: {virus}"),
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Message-ID: {email.utils.make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-generated",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "mailwarden found a virus in a message and did not deliver it.",
        "",
        f"Virus:         {safe(virus)}",
        f"Disposition:   {result.disposition}",
        f"Quarantine ID: {result.quarantine_id or '-'}",
        f"Queue ID:      {mail.queue_id}",
        f"Direction:     {mail.direction}",
        f"Client:        {safe(mail.client_addr)}",
        f"Sender:        <{safe(mail.mail_from)}>",
        f"Recipients:    {safe(', '.join(mail.rcpt_tos), 1000)}",
        f"Subject:       {safe(mail.subject or '', 300)}",
        "",
        "The infected content is not included.  Review it with",
        f"  mailwarden quarantine show {result.quarantine_id or '<id>'}",
        "",
    ]
    return ("\r\n".join(lines)).encode("ascii", "replace")
