"""Keyed pseudonyms for log exports (issue 17).

``mailwarden log export`` replaces every address in the records it writes
with ``pn-`` and the first 20 hex digits (80 bits) of
HMAC-SHA256(export key, lower-case address).  Each export draws a fresh random
32-byte key (kept in the store's ``export`` table, readable only by the
``mailwarden`` user), so:

* the same person has the same pseudonym everywhere in one export (counts,
  patterns and "excessive personal use" questions still work);
* two exports give the same person different pseudonyms: exports cannot be
  joined on the pseudonym without the keys;
* ``mailwarden log reidentify EXPORT_ID PSEUDONYM`` (with an approved grant)
  recomputes the HMAC over the addresses of that export's records to find
  the address again; no table of pseudonyms is kept anywhere.

What happens to each field of a record (decisions):

* ``mail_from``, ``rcpt_tos``: the bare address becomes its pseudonym.
* ``from``, ``to``, ``cc`` (header values): each address becomes its
  pseudonym and **display names are dropped** ("Dee Smith <d@example.com>"
  becomes ``pn-...``): a display name is a person's name in free text, it
  cannot be pseudonymised consistently (spellings vary) and it would undo the
  pseudonym next to it.
* ``subject``: kept, because the policy lets monitoring look at "address and
  subject heading"; any address written in it becomes its pseudonym, and so
  does a word equal to the local part of one of *this record's own*
  addresses (at least 3 characters: "lunch with alice" in alice@'s mail
  becomes "lunch with pn-..."), so that the subject does not name the sender
  or recipient the address columns hide.  Other names in free text cannot be
  recognised and stay: an export is pseudonymised, not anonymised.
* ``message_id``: replaced by ``mid-`` and a keyed hash (many message ids
  embed an address or a user name; the keyed hash still lets one find
  duplicates within the export).
* every other text value (the next hop's reply, verdict details, attachment
  names): any address in it becomes its pseudonym.
* ``address_digest`` and the chain ``hash`` are left out: both are unkeyed
  SHA-256 digests over data that include the real addresses, so anyone with
  a list of candidate addresses could test them against the digest
  (dictionary attack), and they would let two exports be joined.  An
  identified export keeps both (it can be checked against ``log verify``).

What pseudonyms cannot hide: two exports that contain the *same* record can
be matched on its time and queue id, and through that record the pseudonyms
in it; hand out one export per question.  ``client_addr`` (the connecting
MTA's IP address) is kept as it is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable
from typing import Any

PREFIX = "pn-"
MID_PREFIX = "mid-"
KEY_BYTES = 32
DIGITS = 20

#: An address inside free text: a run without white space, brackets, quotes
#: or separators around one '@'.
ADDRESS_RE = re.compile(r"[^\s<>()\[\]\\,;:\"'@]+@[^\s<>()\[\]\\,;:\"'@]+")
#: Words of a subject, for the local-part rule (dots, '+' and '-' stay inside a word).
_WORDS = re.compile(r"([\w.+-]+)")
_HEADER_KEYS = frozenset({"from", "to", "cc"})
_DROPPED = frozenset({"address_digest"})
#: Record keys that never hold an address (set by mailwarden, not by the mail).
_PLAIN_KEYS = frozenset({"time", "queue_id", "direction", "size", "personal", "elapsed_ms",
                         "filter_ms", "quarantine_id", "disposition", "client_addr"})


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def normalize(address: str) -> str:
    """The form an address is pseudonymised in: lower case, without angle
    brackets and trailing dots."""
    return address.strip().strip("<>").strip().rstrip(".").lower()


def addresses_in(text: str) -> set[str]:
    """The (normalised) addresses written anywhere in ``text``."""
    if "@" not in text:
        return set()
    return {normalize(m) for m in ADDRESS_RE.findall(text)} - {""}


class Pseudonymiser:
    """The pseudonyms of one export (one key), cached per address."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("pseudonym key too short")
        self._key = key
        self._cache: dict[str, str] = {}
        self._locals: dict[str, tuple[str, str]] = {}

    @property
    def key(self) -> bytes:
        return self._key

    def address(self, address: str) -> str:
        """``pn-`` + 20 hex digits for ``address`` (empty stays empty: ``<>``)."""
        cached = self._cache.get(address)
        if cached is not None:
            return cached
        norm = normalize(address)
        if not norm:
            out = ""
        else:
            mac = hmac.new(self._key, norm.encode("utf-8"), hashlib.sha256).hexdigest()
            out = PREFIX + mac[:DIGITS]
        self._cache[address] = out
        return out

    def token(self, value: str) -> str:
        """A keyed hash of a non-address value (message ids)."""
        mac = hmac.new(self._key, b"mid\0" + value.encode("utf-8"), hashlib.sha256).hexdigest()
        return MID_PREFIX + mac[:DIGITS]

    def _sub(self, match: re.Match[str]) -> str:
        text = match.group(0)
        core = text.rstrip(".")
        return self.address(core) + text[len(core):]

    def text(self, value: str) -> str:
        """``value`` with every address in it replaced by its pseudonym."""
        if "@" not in value:
            return value
        return ADDRESS_RE.sub(self._sub, value)

    def header(self, value: str | None) -> str | None:
        """An address header (From, To, Cc): the pseudonyms of its addresses,
        comma-separated; display names and anything else dropped."""
        if value is None:
            return None
        return ", ".join(self.address(a) for a in ADDRESS_RE.findall(value))

    def scrub(self, value: Any) -> Any:
        t = type(value)
        if t is str:
            return self.text(value)
        if t is list:
            return [self.scrub(v) for v in value]
        if t is dict:
            return {k: self.scrub(v) for k, v in value.items()}
        return value

    def _local(self, address: str) -> tuple[str, str]:
        """(local part, normalised address) of ``address``, cached."""
        got = self._locals.get(address)
        if got is None:
            norm = normalize(address)
            got = (norm.rsplit("@", 1)[0] if "@" in norm else "", norm)
            self._locals[address] = got
        return got

    def subject(self, value: str, own: Iterable[str]) -> str:
        """A subject: addresses replaced, and words equal to the local part
        (3 characters or more) of one of the record's own addresses."""
        value = self.text(value)
        low = value.lower()
        locals_: dict[str, str] = {}
        for a in own:
            local, norm = self._local(a)
            if len(local) >= 3 and local in low:
                locals_.setdefault(local, norm)
        if not locals_:
            return value
        parts = _WORDS.split(value)
        for i in range(1, len(parts), 2):
            word = parts[i]
            key = word.lower().strip(".")
            if key in locals_:
                lead = len(word) - len(word.lstrip("."))
                trail = len(word) - len(word.rstrip("."))
                parts[i] = (word[:lead] + self.address(locals_[key])
                            + (word[len(word) - trail:] if trail else ""))
        return "".join(parts)

    def record(self, rec: dict[str, Any]) -> dict[str, Any]:
        """A stored log record with its addresses replaced (see the module doc)."""
        own: list[str] = []
        out: dict[str, Any] = {}
        subject: Any = None
        for k, v in rec.items():
            if k in _PLAIN_KEYS:
                out[k] = v
            elif k in _DROPPED:
                continue
            elif k == "mail_from" and type(v) is str:
                own.append(v)
                out[k] = self.address(v) if "@" in v else self.text(v)
            elif k == "rcpt_tos" and type(v) is list:
                own.extend(r for r in v if type(r) is str)
                out[k] = [self.address(r) if type(r) is str and "@" in r else self.scrub(r)
                          for r in v]
            elif k in _HEADER_KEYS and type(v) is str:
                found = ADDRESS_RE.findall(v) if "@" in v else []
                own.extend(found)
                out[k] = ", ".join(self.address(a) for a in found)
            elif k == "message_id" and type(v) is str:
                out[k] = self.token(v)
            elif k == "subject":
                out[k] = subject = v  # replaced below, once every own address is known
            else:
                out[k] = self.scrub(v)
        if type(subject) is str:
            out["subject"] = self.subject(subject, own)
        elif subject is not None:
            out["subject"] = self.scrub(subject)
        return out


def _strings(value: Any) -> Iterable[str]:
    if type(value) is str:
        yield value
    elif type(value) is list:
        for v in value:
            yield from _strings(v)
    elif type(value) is dict:
        for v in value.values():
            yield from _strings(v)


def candidates(record_text: str, index: Iterable[str]) -> set[str]:
    """Every address a record's pseudonyms can stand for: its index
    addresses and the addresses written in its text values (decoded, so
    that an escaped newline does not glue onto an address)."""
    out = {normalize(a) for a in index}
    if "@" in record_text:
        try:
            rec = json.loads(record_text)
        except ValueError:
            rec = record_text
        for text in _strings(rec):
            out |= addresses_in(text)
    out.discard("")
    return out


__all__ = ["ADDRESS_RE", "KEY_BYTES", "MID_PREFIX", "PREFIX", "Pseudonymiser", "addresses_in",
           "candidates", "new_key", "normalize"]
