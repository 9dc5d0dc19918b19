"""Prepare the stored message bytes for an API that takes raw MIME.

Mailgun (``messages.mime``), SES v2 (``Content.Raw``), SparkPost (``email_rfc822``) and
Gmail (``raw``) forward what we give them. `prepare_raw` hands them the bytes exactly as
received, except for these changes, each of which some raw-MIME API requires:

1. **CRLF line ends everywhere.** Bare LF and bare CR become CRLF (RFC 5322 §2.1; SES
   rejects bare LF, SparkPost rewrites it anyway). Case 07 of the shared corpus.
2. **A header/body separator.** If the header section runs straight into the body
   (case 21), a blank line is inserted where Python's parser says the body begins;
   SES requires "a header and a body, separated by one blank line". A message that ends
   inside its header section gets the empty line appended.
3. **One of each unique top-level field.** Of each field that may occur at most once
   (RFC 5322 §3.6 table, plus RFC 2045/2183 MIME fields), the first occurrence is kept
   and later ones are dropped, compared case-insensitively. That matches what the
   parser reports (the first value wins) and what SES demands: it refuses
   ``Duplicate header 'Message-ID'`` (case 25). SES refuses duplicates of a longer list
   of fields, `SES_UNIQUE_FIELDS`, which the SES adapter passes instead.
4. **No line over 998 octets** (RFC 5322 §2.1.1; SES: "can't exceed 1,000 characters").
   A leaf part whose body has such a line is re-encoded so that its decoded content is
   byte-identical: 7bit/8bit/binary text becomes quoted-printable, other types base64;
   an existing base64 body is re-wrapped; an existing quoted-printable body gets soft
   line breaks. Long lines in a header are folded at whitespace (unfolding restores the
   value exactly); long lines in a multipart preamble or epilogue, which no reader
   shows, are split. As a last resort, the long lines of a body that cannot be
   re-encoded (an unknown transfer encoding such as x-uuencode, a multipart without a
   boundary, nesting deeper than 64, message/partial) are cut at 998 octets: a changed
   line break in already-broken mail beats a permanent refusal by the API. Case 08.
   With ``utf8=True`` the same re-encoding is applied to any leaf whose body is not
   valid UTF-8, because SparkPost takes the message as a JSON string (case 12: an 8bit
   windows-1252 body).
5. **Bcc.** Every top-level ``Bcc:`` field is removed: APIs with an envelope field
   (Mailgun ``to``, SES ``Destination``, SparkPost ``recipients``) would otherwise show
   the blind copies to everyone. APIs that read recipients from the headers (Gmail)
   pass `bcc_header`, and get exactly one ``Bcc:`` field listing those addresses.

Everything else is left byte for byte as it was, including non-unique fields, their
order and folding, nested headers and parts that need no change. Missing Date and
Message-ID fields are not added: SES overwrites both with its own values, and Mailgun
and SparkPost do not require them.

The function is pure and total: malformed MIME (unknown transfer encodings, multiparts
without a boundary, missing close delimiters, absurd nesting) is passed through as well
as it can be, never raising. An entity whose encoding it cannot decode is left alone.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from email.message import Message as _EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32

__all__ = [
    "MAX_LINE_OCTETS",
    "SES_UNIQUE_FIELDS",
    "UNIQUE_FIELDS",
    "prepare_raw",
]

#: RFC 5322 §2.1.1: a line is at most 998 octets, excluding the CRLF.
MAX_LINE_OCTETS = 998

#: Fields RFC 5322 §3.6 allows at most once, and the MIME fields of RFC 2045 / 2183.
UNIQUE_FIELDS: frozenset[str] = frozenset(
    {
        "date",
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "message-id",
        "in-reply-to",
        "references",
        "subject",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-id",
        "content-description",
        "content-disposition",
    }
)

#: The fields SES refuses to see twice ("Amazon SES header fields", SES developer guide).
SES_UNIQUE_FIELDS: frozenset[str] = UNIQUE_FIELDS | frozenset(
    {
        "accept-language",
        "acceptlanguage",
        "archived-at",
        "auto-submitted",
        "bounces-to",
        "comments",
        "content-alternative",
        "content-base",
        "content-class",
        "content-duration",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "delivered-to",
        "disposition-notification-options",
        "disposition-notification-to",
        "dkim-signature",
        "domainkey-signature",
        "errors-to",
        "importance",
        "keywords",
        "list-archive",
        "list-help",
        "list-id",
        "list-owner",
        "list-post",
        "list-subscribe",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "message-context",
        "organization",
        "original-from",
        "original-message-id",
        "original-recipient",
        "original-subject",
        "precedence",
        "priority",
        "return-path",
        "return-receipt-to",
        "sensitivity",
        "solicitation",
        "thread-index",
        "thread-topic",
        "user-agent",
        "vbr-info",
    }
)

_CRLF = b"\r\n"
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")
# The field-name test of Python's feedparser (printable ASCII except colon, then ':'),
# so that we split header from body where the parser the rest of the bridge uses does.
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_LONG_LINE = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE_OCTETS + 1))
_QP_LINE = 76
# Deeper nesting than this is not mail but an attack on recursive parsers.
_MAX_DEPTH = 40
# Transfer encodings whose decoded form is the body itself.
_IDENTITY_CTE = frozenset({"", "7bit", "8bit", "binary"})
# RFC 2046 §5.2: these may only be 7bit, 8bit or binary, so they cannot be re-encoded.
_NEVER_ENCODED = frozenset({"message/rfc822", "message/global", "message/partial"})


def prepare_raw(
    raw: bytes,
    *,
    bcc_header: Sequence[str] | None = None,
    unique_fields: frozenset[str] = UNIQUE_FIELDS,
    utf8: bool = False,
) -> bytes:
    """The stored message with only the changes raw-MIME APIs require.

    Args:
        raw: The message exactly as received (after dot-unstuffing).
        bcc_header: Addresses for a single ``Bcc:`` field, for APIs that take the
            recipients from the headers. None or empty: the message has no Bcc field.
        unique_fields: Lower-case names of the top-level fields to keep only once.
        utf8: Also re-encode every leaf body that is not valid UTF-8, for APIs that take
            the message as a JSON string (SparkPost). Header bytes are not changed.

    Returns:
        The message bytes to send (see the module docstring for every change made).

    Raises:
        ValueError: A `bcc_header` address is empty or contains CR or LF.
    """
    bcc_field = _bcc_field(bcc_header) if bcc_header else None
    data = _ANY_LINE_END.sub(_CRLF, raw) if _BARE_LINE_END.search(raw) else raw
    fields, sep, body = _split_entity(data)
    fields = [f for f in _dedupe(fields, unique_fields) if _field_name(f) != "bcc"]
    if bcc_field is not None:
        fields.append(bcc_field)
    if fields:
        if not fields[-1].endswith(_CRLF):
            fields[-1] += _CRLF
        sep = _CRLF
    fields, sep, body = _Fixer(utf8=utf8).entity(fields, sep, body, depth=0, top=True)
    return b"".join(_fold(f) for f in fields) + sep + body


# --- header section -------------------------------------------------------------------


def _split_entity(data: bytes) -> tuple[list[bytes], bytes, bytes]:
    """Split an entity into (fields, separator, body).

    Each field is its first line plus its continuation lines, CRLFs included; the
    separator is the blank line (``b"\\r\\n"``) or ``b""`` when the header section ran
    straight into the body, or the data ended inside it.
    """
    fields: list[bytes] = []
    pos = 0
    size = len(data)
    while pos < size:
        end = data.find(_CRLF, pos)
        line_end = size if end < 0 else end + 2
        line = data[pos:line_end]
        if line == _CRLF:
            return fields, _CRLF, data[line_end:]
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        elif _FIELD_START.match(line):
            fields.append(line)
        else:
            break
        pos = line_end
    return fields, b"", data[pos:]


def _field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")


def _dedupe(fields: list[bytes], unique: frozenset[str]) -> list[bytes]:
    seen: set[str] = set()
    kept: list[bytes] = []
    for field in fields:
        name = _field_name(field)
        if name in unique:
            if name in seen:
                continue
            seen.add(name)
        kept.append(field)
    return kept


def _bcc_field(addresses: Sequence[str]) -> bytes:
    encoded: list[bytes] = []
    for address in addresses:
        if not address or "\r" in address or "\n" in address:
            raise ValueError(f"not usable in a Bcc header: {address!r}")
        encoded.append(address.encode("utf-8"))
    line = b"Bcc: " + encoded[0]
    lines: list[bytes] = []
    for item in encoded[1:]:
        if len(line) + 2 + len(item) > 78:
            lines.append(line + b",")
            line = b" " + item
        else:
            line += b", " + item
    lines.append(line)
    return _CRLF.join(lines) + _CRLF


def _fold(field: bytes) -> bytes:
    """Fold physical lines over 998 octets before whitespace; unfolding undoes it."""
    if not _LONG_LINE.search(field):
        return field
    out: list[bytes] = []
    for index, line in enumerate(field.split(_CRLF)):
        # Never fold inside the field name, nor right after its colon.
        start = line.find(b":") + 2 if index == 0 else 1
        while len(line) > MAX_LINE_OCTETS:
            cut = max(
                line.rfind(b" ", start, MAX_LINE_OCTETS + 1),
                line.rfind(b"\t", start, MAX_LINE_OCTETS + 1),
            )
            if cut < start:
                later = [p for p in (line.find(b" ", start), line.find(b"\t", start)) if p > 0]
                if not later:
                    break  # one unbreakable token: nothing we may do without changing it
                cut = min(later)
            out.append(line[:cut])
            line = line[cut:]
            start = 1
        out.append(line)
    return _CRLF.join(out)


def _header_view(fields: list[bytes]) -> _EmailMessage:
    """The fields as a stdlib message, to read Content-Type the way the parser does."""
    return BytesHeaderParser(policy=compat32).parsebytes(b"".join(fields) + _CRLF)


# --- bodies ---------------------------------------------------------------------------


class _Fixer:
    """Walks the MIME tree and re-encodes the leaves that break the API's rules."""

    def __init__(self, *, utf8: bool) -> None:
        self.utf8 = utf8

    def needs_fix(self, data: bytes) -> bool:
        if _LONG_LINE.search(data):
            return True
        if self.utf8:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return True
        return False

    def entity(
        self, fields: list[bytes], sep: bytes, body: bytes, *, depth: int, top: bool
    ) -> tuple[list[bytes], bytes, bytes]:
        """Fix `body`: recurse into containers, re-encode a leaf that needs it."""
        if not self.needs_fix(body):
            return fields, sep, body
        view = _header_view(fields)
        ctype = view.get_content_type()
        if view.get_content_maintype() == "multipart":
            boundary = view.get_boundary()
            # An empty boundary is invalid (RFC 2046 §5.1.1) but Python's parser, and so
            # the part list we deliver from, still splits at "--" lines.
            if boundary is not None and depth < _MAX_DEPTH:
                delimiter = boundary.encode("utf-8", "surrogateescape")
                return fields, sep, self.multipart(body, delimiter, depth)
            return fields, sep, _cut_long(body)
        cte = str(view.get("content-transfer-encoding", "")).strip().lower()
        if cte == "base64":
            return fields, sep, _rewrap_base64(body)
        if cte == "quoted-printable":
            return fields, sep, _soft_break_qp(body)
        if cte not in _IDENTITY_CTE:
            return fields, sep, _cut_long(body)  # x-uuencode and friends: cannot re-encode
        if ctype in _NEVER_ENCODED:
            if ctype != "message/partial" and depth < _MAX_DEPTH:
                return fields, sep, self.part(body, depth + 1)
            return fields, sep, _cut_long(body)
        if view.get_content_maintype() in ("text", "message"):
            new_cte, new_body = b"quoted-printable", _encode_qp(body)
        else:
            new_cte, new_body = b"base64", _encode_base64(body)
        return _set_cte(fields, new_cte, top=top), _CRLF, new_body

    def multipart(self, body: bytes, boundary: bytes, depth: int) -> bytes:
        """Fix each body part; delimiter lines and untouched parts stay as they are."""
        dash = b"--" + boundary
        lines = body.split(_CRLF)
        delimiters = [i for i, line in enumerate(lines) if _is_delimiter(line, dash)]
        if not delimiters:
            return _CRLF.join(_split_long(lines))
        # Groups of lines are re-joined with CRLF; an empty group would add a line.
        first = delimiters[0]
        out: list[bytes] = [_CRLF.join(_split_long(lines[:first]))] if first else []
        for n, index in enumerate(delimiters):
            out.append(lines[index])
            if lines[index][len(dash) :].rstrip(b" \t") == b"--":  # the close delimiter
                if index + 1 < len(lines):
                    out.append(_CRLF.join(_split_long(lines[index + 1 :])))
                break
            following = delimiters[n + 1] if n + 1 < len(delimiters) else len(lines)
            if following > index + 1:
                out.append(self.part(_CRLF.join(lines[index + 1 : following]), depth + 1))
        return _CRLF.join(out)

    def part(self, data: bytes, depth: int) -> bytes:
        """One body part (or an encapsulated message), headers folded, body fixed."""
        fields, sep, body = _split_entity(data)
        fields, sep, body = self.entity(fields, sep, body, depth=depth, top=False)
        return b"".join(_fold(f) for f in fields) + sep + body


def _is_delimiter(line: bytes, dash: bytes) -> bool:
    return line.startswith(dash) and line[len(dash) :].rstrip(b" \t") in (b"", b"--")


def _cut_long(body: bytes) -> bytes:
    """Last resort for a body we cannot re-encode: cut its over-long lines."""
    return _CRLF.join(_split_long(body.split(_CRLF)))


def _split_long(lines: list[bytes]) -> list[bytes]:
    """Cut lines nobody reads (preamble, epilogue) into 998-octet pieces."""
    out: list[bytes] = []
    for line in lines:
        while len(line) > MAX_LINE_OCTETS:
            out.append(line[:MAX_LINE_OCTETS])
            line = line[MAX_LINE_OCTETS:]
        out.append(line)
    return out


def _set_cte(fields: list[bytes], cte: bytes, *, top: bool) -> list[bytes]:
    """Replace every Content-Transfer-Encoding field by one naming `cte`."""
    new = b"Content-Transfer-Encoding: " + cte + _CRLF
    out: list[bytes] = []
    placed = False
    for field in fields:
        if _field_name(field) == "content-transfer-encoding":
            if not placed:
                out.append(new)
                placed = True
            continue
        out.append(field if field.endswith(_CRLF) else field + _CRLF)
    if not placed:
        out.append(new)
    if top and not any(_field_name(f) == "mime-version" for f in out):
        # Without MIME-Version the new Content-Transfer-Encoding means nothing (RFC 2045 §4).
        out.append(b"MIME-Version: 1.0" + _CRLF)
    return out


def _encode_qp(body: bytes) -> bytes:
    """Quoted-printable whose decoding is exactly `body` (CRLF stays a hard line break)."""
    encoded = binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)
    if _CRLF not in body:
        # b2a_qp picks LF soft breaks when the input has no line end to copy.
        encoded = encoded.replace(b"\n", _CRLF)
    return encoded


def _encode_base64(body: bytes) -> bytes:
    return base64.encodebytes(body).replace(b"\n", _CRLF)


def _rewrap_base64(body: bytes) -> bytes:
    """Line breaks carry no data in base64 (RFC 2045 §6.8), so long lines are just cut."""
    out: list[bytes] = []
    for line in body.split(_CRLF):
        if len(line) <= MAX_LINE_OCTETS:
            out.append(line)
            continue
        out.extend(line[i : i + _QP_LINE] for i in range(0, len(line), _QP_LINE))
    return _CRLF.join(out)


def _soft_break_qp(body: bytes) -> bytes:
    """Insert ``=CRLF`` soft breaks into long quoted-printable lines, never inside ``=XX``."""
    out: list[bytes] = []
    for line in body.split(_CRLF):
        if len(line) <= MAX_LINE_OCTETS:
            out.append(line)
            continue
        pieces: list[bytes] = []
        start = 0
        while len(line) - start > _QP_LINE:
            cut = start + _QP_LINE - 1  # room for the "=" of the soft break
            escape = line.rfind(b"=", max(start, cut - 2), cut)
            if escape != -1:
                cut = escape  # do not split an escape sequence
            pieces.append(line[start:cut] + b"=")
            start = cut
        pieces.append(line[start:])
        out.append(_CRLF.join(pieces))
    return _CRLF.join(out)
