"""A :class:`MilterAnswer` as milter responses to the end of the message.

Pure functions, no I/O.  :func:`answer_packets` turns the handler's answer
into the packets the session writes after SMFIC_BODYEOB:

- accept, no change -> ACCEPT
- accept with ``original``/``edited`` -> the header edits (:func:`header_ops`),
  then the body as REPLBODY pieces of at most 65,535 bytes if it changed, all
  back to back (Postfix refuses a REPLBODY mixed with other requests), then
  ACCEPT
- reject -> REPLYCODE 5xx; tempfail -> REPLYCODE 4xx
- discard -> DISCARD
- quarantine -> ``"own"``: DISCARD; ``"hold"``: QUARANTINE(reason) + ACCEPT

Header edits follow Postfix's index rules (milter8.c, cleanup_milter.c), as
seen from the milter, whose view is the header block *without* the MTA's own
first ``Received:`` header:

- CHGHEADER(index, name, value): the ``index``-th (1-based) header of that
  name (case-insensitive) in the milter's view; an empty value deletes it;
- INSHEADER(index, ...): inserted before the ``index``-th header of the
  delivered message, which counts the MTA's own ``Received:`` as the first:
  INSHEADER(p + 1) puts the new header at position ``p`` (0-based) of the
  milter's view; a position past the end appends;
- ADDHEADER: appended after the last header.

Every operation is computed against the header list as the earlier
operations left it (the MTA applies them in order).  Values travel with
``SMFIP_HDR_LEADSPC`` semantics (everything after the colon, leading space
included) and with folded lines joined by a bare LF, as libmilter and Postfix
expect.
"""

from __future__ import annotations

from typing import Literal

from gateway.milter import codec as c
from gateway.milter.api import MilterAnswer

QuarantineMode = Literal["own", "hold"]
HeaderList = list[tuple[bytes, bytes]]
HeaderOp = c.AddHeader | c.InsertHeader | c.ChangeHeader

#: Above this many (original x edited) differing headers the diff stops
#: looking for the fewest operations and replaces the differing run whole
#: (still exact, only more requests).
_LCS_CELLS = 250_000

DEFAULT_HOLD_REASON = "held for review by mailwarden"


class EditError(ValueError):
    """The edited message cannot be expressed as milter requests."""


# ------------------------------------------------------------ parsing


def split_message(raw: bytes) -> tuple[HeaderList, bytes]:
    """``(headers, body)`` of a CRLF message: ``[(name, value)]`` where value is
    everything after the colon up to the header's final CRLF (folding kept as
    CRLF), and the body after the blank line.  A message that starts with the
    blank line has no headers; one without a blank line is all headers."""
    headers: HeaderList = []
    pos = 0
    n = len(raw)
    while pos < n:
        if raw.startswith(b"\r\n", pos):
            return headers, raw[pos + 2 :]
        end = raw.find(b"\r\n", pos)
        # the header's end: the first CRLF not followed by SP / HT
        while end >= 0 and end + 2 < n and raw[end + 2] in b" \t":
            end = raw.find(b"\r\n", end + 2)
        line_end = n if end < 0 else end
        colon = raw.find(b":", pos, line_end)
        first_eol = raw.find(b"\r\n", pos, line_end)
        if colon < 0 or (0 <= first_eol < colon) or colon == pos or b"\0" in raw[pos:colon]:
            raise EditError(f"not a header line: {raw[pos : pos + 40]!r}")
        headers.append((raw[pos:colon], raw[colon + 1 : line_end]))
        if end < 0:
            return headers, b""
        pos = end + 2
    return headers, b""


def join_message(headers: HeaderList, body: bytes) -> bytes:
    """The inverse of :func:`split_message` (always with the blank line)."""
    return b"".join(name + b":" + value + b"\r\n" for name, value in headers) + b"\r\n" + body


def wire_value(value: bytes) -> bytes:
    """A header value as sent in a modification request: folds as bare LF."""
    if b"\0" in value:
        raise EditError("NUL in an edited header value")
    return value.replace(b"\r\n", b"\n")


# ------------------------------------------------------------ header diff


def _lcs_pairs(a: HeaderList, b: HeaderList) -> list[tuple[int, int]]:
    """Index pairs of a longest common subsequence of exactly equal headers."""
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    if n * m > _LCS_CELLS:
        return []
    # lengths[i][j] = LCS length of a[i:], b[j:]
    lengths = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, below = lengths[i], lengths[i + 1]
        ai = a[i]
        for j in range(m - 1, -1, -1):
            row[j] = below[j + 1] + 1 if ai == b[j] else max(below[j], row[j + 1])
    pairs = []
    i = j = 0
    while i < n and j < m:
        if a[i] == b[j]:
            pairs.append((i, j))
            i += 1
            j += 1
        elif lengths[i + 1][j] >= lengths[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def _anchors(a: HeaderList, b: HeaderList) -> list[tuple[int, int]]:
    """Matched (original, edited) index pairs: common prefix, common suffix and
    an LCS of the middle."""
    n, m = len(a), len(b)
    pre = 0
    while pre < n and pre < m and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < n - pre and suf < m - pre and a[n - 1 - suf] == b[m - 1 - suf]:
        suf += 1
    mid = _lcs_pairs(a[pre : n - suf], b[pre : m - suf])
    return ([(k, k) for k in range(pre)]
            + [(i + pre, j + pre) for i, j in mid]
            + [(n - suf + k, m - suf + k) for k in range(suf)])


def header_ops(original: HeaderList, edited: HeaderList) -> list[HeaderOp]:
    """Modification requests that turn ``original`` into ``edited`` (see the
    module docstring for the index rules)."""
    ops: list[HeaderOp] = []
    cur: HeaderList = list(original)     # the MTA's header list as ops are applied
    pos = 0                               # next unprocessed position in ``cur``

    def occurrence(at: int) -> int:
        name = cur[at][0].lower()
        return 1 + sum(1 for h in cur[:at] if h[0].lower() == name)

    def delete() -> None:
        name = cur[pos][0]
        ops.append(c.ChangeHeader(occurrence(pos), name, b""))
        del cur[pos]

    def insert(header: tuple[bytes, bytes]) -> None:
        nonlocal pos
        name, value = header
        if pos == len(cur):
            ops.append(c.AddHeader(name, wire_value(value)))
        else:
            ops.append(c.InsertHeader(pos + 1, name, wire_value(value)))
        cur.insert(pos, header)
        pos += 1

    def change(header: tuple[bytes, bytes]) -> None:
        nonlocal pos
        name, value = header
        if not value:          # an empty CHGHEADER value means delete: delete + insert
            delete()
            insert(header)
            return
        ops.append(c.ChangeHeader(occurrence(pos), name, wire_value(value)))
        cur[pos] = header
        pos += 1

    prev_i = prev_j = -1
    for ai, bj in [*_anchors(original, edited), (len(original), len(edited))]:
        gone = original[prev_i + 1 : ai]      # unmatched originals (now at cur[pos:...])
        new = edited[prev_j + 1 : bj]         # unmatched edited headers, in order
        # pair a removed and an added header of the same name as a change, in order
        pairs: dict[int, int] = {}
        g = 0
        for k, (name, _v) in enumerate(new):
            lname = name.lower()
            for gi in range(g, len(gone)):
                if gone[gi][0].lower() == lname:
                    pairs[k] = gi
                    g = gi + 1
                    break
        done = 0                              # originals of this gap handled so far
        for k, header in enumerate(new):
            gi = pairs.get(k)
            if gi is None:
                insert(header)
                continue
            while done < gi:
                delete()
                done += 1
            change(header)
            done += 1
        while done < len(gone):
            delete()
            done += 1
        if bj < len(edited):
            pos += 1                          # the matched header stays
        prev_i, prev_j = ai, bj
    return ops


# ------------------------------------------------------------ answers


def edit_packets(original: bytes, edited: bytes) -> list[c.Response]:
    """Header requests, then REPLBODY pieces if the body changed (no ACCEPT)."""
    if edited == original:
        return []
    o_headers, o_body = split_message(original)
    e_headers, e_body = split_message(edited)
    packets: list[c.Response] = list(header_ops(o_headers, e_headers))
    if e_body != o_body:
        packets.extend(c.replace_body(e_body))
    return packets


def milter_reply(reply: str) -> str:
    """An SMTP reply as REPLYCODE text: one printable line, ``%`` doubled
    (libmilter and Postfix read the text with ``%`` as an escape)."""
    line = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in reply)
    return line.replace("%", "%%")


def answer_packets(answer: MilterAnswer, raw: bytes, *,
                   quarantine_mode: QuarantineMode) -> list[c.Response]:
    """The responses to SMFIC_BODYEOB for ``answer`` on the message ``raw``.

    Raises :class:`EditError` (or ValueError) if an accept's ``original`` is not
    the message the MTA holds, or the edit cannot be expressed; the caller
    answers TEMPFAIL then.
    """
    kind = answer.kind
    if kind == "accept":
        if answer.original is None or answer.edited is None:
            return [c.Accept()]
        if answer.original is not raw and answer.original != raw:
            raise EditError("accept: original is not the message the MTA sent")
        return [*edit_packets(answer.original, answer.edited), c.Accept()]
    if kind in ("reject", "tempfail"):
        return [c.ReplyCode(milter_reply(answer.reply))]
    if kind == "discard":
        return [c.Discard()]
    if kind == "quarantine":
        if quarantine_mode == "own":
            return [c.Discard()]
        if quarantine_mode == "hold":
            reason = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in answer.reason)
            return [c.Quarantine(reason.strip() or DEFAULT_HOLD_REASON), c.Accept()]
        raise ValueError(f"bad quarantine mode {quarantine_mode!r}")
    raise ValueError(f"bad answer kind {kind!r}")


def encode(packets: list[c.Response]) -> bytes:
    """The packets as one write."""
    return b"".join(p.encode() for p in packets)
