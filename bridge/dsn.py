"""Delivery status notifications (bounces) for spool entries that went dead: pure.

`build_dsn` turns a failed entry into an RFC 3464 ``multipart/report`` for the envelope
sender, or None when no DSN may be sent. Choices, with the rule behind each:

* Only a null reverse-path suppresses a DSN (RFC 5321 §6.1, RFC 3464 §1): a bounce is
  never bounced. ``Auto-Submitted`` on the original does not suppress it: RFC 3834 §1
  leaves DSNs out of its scope, and a sender of automated mail still needs to know that
  it was lost. The DSN itself carries ``Auto-Submitted: auto-replied`` (RFC 3834 §5) and
  must be sent with the null reverse-path, which is the caller's part.
* Everything but the human text is 7-bit ASCII. A non-ASCII recipient becomes the
  RFC 6533 ``utf-8;`` address type in its ``utf-8-addr-xtext`` form (``\\x{FC}``), which
  is valid inside a plain ``message/delivery-status``. A non-ASCII envelope sender can
  only be written as raw UTF-8 in ``To:`` (RFC 6532; RFC 2047 cannot encode an
  addr-spec), so such a DSN needs an SMTPUTF8/UTF-8-capable route, as its original had.
* The human text is UTF-8 in quoted-printable. The original's header block is attached
  as ``text/rfc822-headers`` (RFC 6522) unchanged when it is 7-bit with short lines, and
  in quoted-printable otherwise, which keeps 8-bit bytes and overlong lines losslessly.
  No header lines at all (junk input) means no third part: it is optional.
* Nothing from outside can start a line of its own: every value is cut to one line,
  control characters removed, and the Diagnostic-Code is bounded and folded at spaces.
* The output is reproducible: the boundary is derived from `message_id`, and all dates
  come from the arguments.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from datetime import datetime
from email.utils import format_datetime

from bridge.model import Envelope

__all__ = ["build_dsn"]

# How much of the original is searched for its header block; longer blocks are cut at a
# line boundary (the attached headers are for a human, not a replay).
_MAX_HEADER_BLOCK = 64 * 1024
# The longest Diagnostic-Code text or typed address, in characters after escaping, so
# that even an unbreakable one fits a 998-octet line.
_MAX_DIAGNOSTIC = 900
# The longest reason in the human text.
_MAX_REASON = 2000
_MAX_LINE = 998

_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t]")
_MESSAGE_ID = re.compile(
    rb"(?im)^message-id[ \t]*:[ \t]*(<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>)[ \t]*\r$"
)
_NOT_7BIT = re.compile(rb"[\x00\r\x80-\xff]")
_PARTIAL_ESCAPE = re.compile(r"\\(x(\{[0-9A-F]*)?)?$")
_XTEXT_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}


def build_dsn(
    *,
    original: bytes,
    envelope: Envelope,
    reason: str,
    status: int | None,
    permanent: bool,
    reporting_mta: str,
    arrival: datetime,
    now: datetime,
    message_id: str,
    postmaster: str = "",
) -> bytes | None:
    """The DSN for the failed recipients of one spool entry, or None when none may be sent.

    Args:
        original: The raw message as received; any bytes at all.
        envelope: Its envelope; `rcpt_to` are the recipients that failed.
        reason: Why it failed, already bounded by the caller; sanitised again here.
        status: HTTP status of the last attempt, if there was one.
        permanent: True for a permanent refusal (5.0.0); False when it expired (4.4.7).
        reporting_mta: Our host name (``dns;`` Reporting-MTA and MAILER-DAEMON domain).
        arrival: When the bridge accepted the message; aware.
        now: When the delivery was given up; aware. Date and Last-Attempt-Date.
        message_id: The DSN's own Message-ID, e.g. ``<dsn.{spool_id}@{host}>``.
        postmaster: The DSN's From address; ``MAILER-DAEMON@{reporting_mta}`` when empty.

    Returns:
        The complete message with CRLF line endings, or None for a null envelope sender.

    Raises:
        ValueError: `arrival` or `now` is naive.
    """
    if not envelope.mail_from:
        return None
    if arrival.tzinfo is None or now.tzinfo is None:
        raise ValueError("arrival and now must be timezone-aware")
    host = _one_line(reporting_mta).replace(" ", "") or "localhost"
    sender = _one_line(envelope.mail_from)
    from_addr = _one_line(postmaster).replace(" ", "") or f"MAILER-DAEMON@{host}"
    headers_block = _header_block(original)
    text = _human_text(host, envelope.rcpt_to, reason, permanent)
    parts = [
        (
            b"Content-Description: Notification\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n",
            _quoted_printable(text.encode("utf-8").split(b"\n")),
        ),
        (
            b"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n",
            _status_report(host, envelope, reason, status, permanent, arrival, now),
        ),
    ]
    if headers_block:
        parts.append(_headers_part(headers_block))
    boundary = _boundary(message_id, [body for _, body in parts])
    head = [
        f"From: Mail Delivery System <{from_addr}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {_one_line(message_id).replace(' ', '')}",
        "Auto-Submitted: auto-replied",
    ]
    found = _MESSAGE_ID.search(headers_block)
    if found:
        original_id = found.group(1).decode("ascii")
        head += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    head += [
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    out = [("\r\n".join(head) + "\r\n\r\n").encode("utf-8")]
    for part_head, body in parts:
        out += [f"--{boundary}\r\n".encode("ascii"), part_head, b"\r\n", body, b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def _one_line(value: str) -> str:
    """`value` with control characters and lone surrogates replaced by single spaces."""
    return " ".join(_CONTROLS.sub(" ", value).split())


def _human_text(host: str, recipients: tuple[str, ...], reason: str, permanent: bool) -> str:
    """The first part: what happened, for a person."""
    why = (
        "The email service refused it permanently, so it was not retried."
        if permanent
        else "Delivery was retried until the message expired in the queue."
    )
    lines = [
        f"This is the mail system at host {host}.",
        "",
        "Your message could not be delivered to the following recipients:",
        "",
        *(f"  <{_one_line(rcpt)}>" for rcpt in recipients),
        "",
        why,
        f"Reason: {_one_line(reason)[:_MAX_REASON]}",
        "",
        "The delivery report and the headers of your message are attached.",
    ]
    return "\n".join(lines)


def _status_report(
    host: str,
    envelope: Envelope,
    reason: str,
    status: int | None,
    permanent: bool,
    arrival: datetime,
    now: datetime,
) -> bytes:
    """The ``message/delivery-status`` body (RFC 3464 §2): one message block, one per rcpt."""
    lines = [f"Reporting-MTA: dns; {_xtext(host)}"]
    if envelope.helo:
        lines.append(f"Received-From-MTA: dns; {_xtext(_one_line(envelope.helo))}")
    lines.append(f"Arrival-Date: {format_datetime(arrival)}")
    diagnostic = _escape(_one_line(reason))
    if status is not None:
        diagnostic = f"{status} {diagnostic}"
    diagnostic = _bounded(diagnostic)
    for rcpt in envelope.rcpt_to:
        lines += [
            "",
            f"Final-Recipient: {_typed_address(rcpt)}",
            "Action: failed",
            f"Status: {'5.0.0' if permanent else '4.4.7'}",
            _fold(f"Diagnostic-Code: http; {diagnostic}"),
            f"Last-Attempt-Date: {format_datetime(now)}",
        ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _typed_address(address: str) -> str:
    """``rfc822; addr`` for ASCII, else RFC 6533 ``utf-8;`` in utf-8-addr-xtext form."""
    clean = _one_line(address).replace(" ", "")
    if clean.isascii():
        return f"rfc822; {_bounded(clean)}"
    return f"utf-8; {_bounded(_xtext(clean))}"


def _xtext(value: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: QCHARs as they are, the rest as ``\\x{HEX}``."""
    return "".join(c if c in _XTEXT_SAFE else f"\\x{{{ord(c):02X}}}" for c in value)


def _escape(value: str) -> str:
    """Non-ASCII characters of a one-line text as ``\\x{HEX}``, so the text stays 7-bit."""
    return "".join(c if c.isascii() else f"\\x{{{ord(c):02X}}}" for c in value)


def _bounded(text: str) -> str:
    """`text` cut to `_MAX_DIAGNOSTIC` characters, never inside a ``\\x{HEX}`` escape."""
    if len(text) <= _MAX_DIAGNOSTIC:
        return text
    return _PARTIAL_ESCAPE.sub("", text[: _MAX_DIAGNOSTIC - 3]) + "..."


def _fold(field: str, width: int = 78) -> str:
    """A one-line field folded at spaces (RFC 5322 §2.2.3); unfolding gives it back."""
    lines: list[str] = []
    current = ""
    for word in field.split(" "):
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n ".join(lines)


def _header_block(original: bytes) -> bytes:
    """The original's header lines, CRLF-terminated; the body and anything odd left out.

    The header block ends at the first empty line or at the first line that is neither
    a field nor a continuation (a message without a separator), as email.feedparser
    reads it. An mbox ``From `` line is skipped. Never raises.
    """
    window = original[: _MAX_HEADER_BLOCK + 1]
    lines = window.split(b"\n")
    if len(original) > _MAX_HEADER_BLOCK:
        lines.pop()  # the last piece may be cut in the middle of a line
    if lines and lines[0].startswith(b"From "):
        lines.pop(0)
    kept: list[bytes] = []
    for line in lines:
        line = line.removesuffix(b"\r")
        if not line or not _HEADER_LINE.match(line) or (not kept and line[:1] in b" \t"):
            break
        kept.append(line + b"\r\n")
    return b"".join(kept)


def _headers_part(block: bytes) -> tuple[bytes, bytes]:
    """The ``text/rfc822-headers`` part: as it is when 7-bit-clean, else quoted-printable."""
    lines = block.removesuffix(b"\r\n").split(b"\r\n")
    clean = all(len(line) <= _MAX_LINE and not _NOT_7BIT.search(line) for line in lines)
    head = b"Content-Description: Undelivered Message Headers\r\n"
    if clean:
        return head + b"Content-Type: text/rfc822-headers\r\n", block
    try:
        block.decode("utf-8")
        ctype = b"Content-Type: text/rfc822-headers; charset=utf-8\r\n"
    except UnicodeDecodeError:
        ctype = b"Content-Type: text/rfc822-headers\r\n"
    cte = b"Content-Transfer-Encoding: quoted-printable\r\n"
    return head + ctype + cte, _quoted_printable(lines) + b"\r\n"


def _quoted_printable(lines: list[bytes]) -> bytes:
    """Lines (without line breaks) as quoted-printable with CRLF hard and soft breaks."""
    encoded = (binascii.b2a_qp(line, istext=False).replace(b"=\n", b"=\r\n") for line in lines)
    return b"\r\n".join(encoded)


def _boundary(message_id: str, bodies: list[bytes]) -> str:
    """A boundary derived from `message_id` that occurs in none of the bodies.

    ``=_`` can never appear in quoted-printable output; the counter covers the 7-bit
    parts, whose content partly comes from outside.
    """
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    counter = 0
    while True:
        boundary = f"=_dsn_{digest}_{counter}"
        if not any(boundary.encode("ascii") in body for body in bodies):
            return boundary
        counter += 1
