"""Raw RFC 5322 / MIME bytes → the neutral, frozen `bridge.model.Message`.

`parse_message` is pure and total: whatever bytes arrive, it returns a fully populated
`Message` and never raises. A MIME defect is something to work around, never a reason to
lose mail that the SMTP side has already answered 250 for.

Strategy: `email.parser.BytesParser(policy=email.policy.default)` does the structural
work (it already copes with bare LF, a missing header/body separator, ``Name:value``
without a space and an unclosed multipart). Around it this module fixes what it gets
wrong for a relay:

* Text. Every string that leaves this module passes `_clean`: raw 8-bit bytes that the
  parser smuggled through as lone surrogates (U+DC80–U+DCFF) are decoded as UTF-8, or as
  windows-1252 when they are not UTF-8; C1 controls (U+0080–U+009F), which only appear
  when windows-1252 bytes were decoded as ISO-8859-1, become the windows-1252 characters
  the sender meant (the WHATWG Encoding Standard maps the ``iso-8859-1``, ``latin1`` and
  ``us-ascii`` labels to windows-1252 for exactly this reason).
* Bodies are decoded here, not by `get_content()`, which raises on unknown charsets.
* Addresses are parsed from the raw header after the 8-bit bytes became real Unicode,
  because the header registry leaves non-ASCII local parts as surrogates (bpo-36893).
* ``message/*`` attachments are cut out of the original bytes so that they are exact;
  re-serialising the parsed tree would change folding and line endings.
* ``winmail.dat`` (TNEF) is kept as it is, and the files inside it are added too.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import quopri
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.headerregistry import AddressHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.message import Message as StdMessage
from email.parser import BytesParser
from email.policy import EmailPolicy
from email.utils import getaddresses, parsedate_to_datetime
from typing import Literal, TypeVar

from bridge.model import Address, Attachment, Envelope, Header, Message

__all__ = ["parse_message"]

_T = TypeVar("_T")


class _BoundedPolicy(EmailPolicy):
    """`policy.default`, except that MIME parameter headers are cut at `_MAX_MIME_HEADER`.

    The parameter parser is quadratic in the number of RFC 2231 sections: a 200 KB
    Content-Type of ``p0*0*=x; p1*1*=x; ...`` takes 15 s, and it runs again for every
    `get_content_type()`. Real Content-Type and Content-Disposition fields are a few
    hundred octets; a name or boundary never comes near the cut.
    """

    def header_fetch_parse(self, name: str, value: str) -> str:
        if len(value) > _MAX_MIME_HEADER and name.lower() in _MIME_PARAMETER_HEADERS:
            value = value[:_MAX_MIME_HEADER]
        return super().header_fetch_parse(name, value)  # type: ignore[no-any-return]


_PARSER = BytesParser(policy=_BoundedPolicy())
_ADDRESS_LIST = HeaderRegistry(default_class=AddressHeader, use_default_map=False)

# The header parser of the email package has super-linear corners; a header value longer
# than this is used as it is (8-bit bytes still decoded) instead of being tokenised.
_MAX_PARSED_HEADER = 32 * 1024
# The address parser of the header registry is quadratic in the tokens of one phrase
# (16 KB of '"' takes 2.5 s); longer address lists go to compat32's linear parser.
_MAX_REGISTRY_ADDRESSES = 4 * 1024
_MAX_MIME_HEADER = 8 * 1024
_MIME_PARAMETER_HEADERS = frozenset({"content-type", "content-disposition"})
# Deeper MIME nesting than this is not mail but an attack; the rest is ignored.
_MAX_DEPTH = 64

_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
_HEADER_BREAK = re.compile(r"[\r\n\x00]")
_SURROGATE_RUN = re.compile("[\udc80-\udcff]+")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_C1_CONTROL = re.compile("[\x80-\x9f]")
_MESSAGE_ID = re.compile(r"<[^<>]*>")
_FILENAME_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
# A line the feedparser reads as part of the header block (email.feedparser.headerRE).
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")

# WHATWG Encoding Standard labels whose meaning differs from Python's codec of that name.
_WINDOWS_1252_LABELS = frozenset(
    {
        "iso-8859-1",
        "iso8859-1",
        "iso_8859-1",
        "iso_8859-1:1987",
        "iso-ir-100",
        "iso88591",
        "latin1",
        "latin-1",
        "l1",
        "cp819",
        "ibm819",
        "csisolatin1",
        "windows-1252",
        "cp1252",
        "x-cp1252",
    }
)
# ASCII cannot carry 8-bit bytes, so when they appear the label is wrong: they are tried
# as UTF-8 first (what current software sends) and then as windows-1252.
_ASCII_LABELS = frozenset(
    {"us-ascii", "ascii", "us", "ansi_x3.4-1968", "iso646-us", "csascii", "default"}
)
_CODEC_ALIASES = {
    "iso-8859-9": "cp1254",
    "iso8859-9": "cp1254",
    "latin5": "cp1254",
    "iso-8859-11": "cp874",
    "tis-620": "cp874",
    "windows-874": "cp874",
    "gb2312": "gb18030",
    "gb_2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "big5": "big5hkscs",
    "iso-8859-8-i": "iso-8859-8",
    "x-mac-roman": "mac_roman",
    "unicode-1-1-utf-8": "utf-8",
}
# Codecs Python knows that make no sense as a body charset (they interpret ASCII).
_REFUSED_CODECS = frozenset(
    {"idna", "punycode", "raw-unicode-escape", "unicode-escape", "undefined"}
)

_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
_TYPES_BY_EXTENSION = {
    "txt": "text/plain",
    "csv": "text/csv",
    "htm": "text/html",
    "html": "text/html",
    "rtf": "application/rtf",
    "pdf": "application/pdf",
    "doc": "application/msword",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xls": "application/vnd.ms-excel",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "ppt": "application/vnd.ms-powerpoint",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "zip": "application/zip",
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "eml": "message/rfc822",
    "xml": "application/xml",
}


def parse_message(
    raw: bytes,
    envelope: Envelope,
    *,
    id: str,
    received_at: datetime,
    default_sender: str | None = None,
) -> Message:
    """Parse one message as received into the provider-neutral `Message`.

    Args:
        raw: The message bytes exactly as received (after dot-unstuffing).
        envelope: MAIL FROM / RCPT TO of the transaction: the delivery authority.
        id: The spool id of the message.
        received_at: When the bridge accepted the message.
        default_sender: The route's configured sender, used as `from_` when neither
            the From header nor the envelope gives one. ``"Name <addr>"`` is allowed.

    Returns:
        The parsed message. Malformed input gives a best-effort message, never an error.
    """
    try:
        return _parse(raw, envelope, id, received_at, default_sender)
    except Exception:  # last resort; the mail is already accepted
        return _unparsed(raw, envelope, id, received_at, default_sender)


# --------------------------------------------------------------------------- the parts


@dataclass
class _Collected:
    """Bodies and attachments found while walking the MIME tree."""

    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)


def _parse(
    raw: bytes,
    envelope: Envelope,
    id_: str,
    received_at: datetime,
    default_sender: str | None,
) -> Message:
    msg = _PARSER.parsebytes(raw)
    raw_headers = [(str(name), str(value)) for name, value in msg.raw_items()]

    def first(name: str) -> str | None:
        lname = name.lower()
        for hname, value in raw_headers:
            if hname.strip().lower() == lname:
                return value
        return None

    to = _dedupe(_addresses(first("To")))
    seen_to = {a.email.lower() for a in to}
    cc = tuple(a for a in _dedupe(_addresses(first("Cc"))) if a.email.lower() not in seen_to)
    found = _Collected()
    _walk(msg, raw, None, 0, found)
    subject = first("Subject")
    return Message(
        id=id_,
        received_at=received_at,
        envelope=envelope,
        from_=_sender(_addresses(first("From")), envelope, default_sender),
        sender=next(iter(_addresses(first("Sender"))), None),
        to=to,
        cc=cc,
        bcc=_bcc(envelope, to + cc),
        reply_to=_dedupe(_addresses(first("Reply-To"))),
        subject=None if subject is None else _decode_header(subject),
        text=found.text,
        html=found.html,
        message_id=_verbatim(first("Message-ID")),
        in_reply_to=_verbatim(first("In-Reply-To")),
        references=_references(first("References")),
        date=_date(first("Date")),
        headers=tuple(
            Header(name=_clean(name).strip(), value=_decode_header(value))
            for name, value in raw_headers
        ),
        attachments=tuple(found.attachments),
        raw=raw,
    )


def _unparsed(
    raw: bytes,
    envelope: Envelope,
    id_: str,
    received_at: datetime,
    default_sender: str | None,
) -> Message:
    """The message when parsing failed outright: everything as text, envelope-driven."""
    text = _clean(raw.decode("utf-8", "surrogateescape")).replace("\r\n", "\n")
    return Message(
        id=id_,
        received_at=received_at,
        envelope=envelope,
        from_=_sender([], envelope, default_sender),
        sender=None,
        to=(),
        cc=(),
        bcc=_bcc(envelope, ()),
        reply_to=(),
        subject=None,
        text=text,
        html=None,
        message_id=None,
        in_reply_to=None,
        references=(),
        date=None,
        headers=(),
        attachments=(),
        raw=raw,
    )


def _attempt(call: Callable[[], _T], default: _T) -> _T:
    """`call()`, or `default` when it raises.

    The email package has known crashes (IndexError, AttributeError, HeaderParseError ...)
    on hostile input in almost every accessor; each of them is a place to degrade, not
    to fail.
    """
    try:
        return call()
    except Exception:
        return default


# --------------------------------------------------------------------------- text


def _clean(text: str) -> str:
    """Make `text` safe to hand on: no lone surrogates, no C1 controls.

    Runs of U+DC80–U+DCFF are raw bytes (``surrogateescape``); they are decoded as UTF-8
    or, failing that, as windows-1252. C1 controls are windows-1252 bytes that were
    decoded as ISO-8859-1, and become the windows-1252 characters.
    """
    if text.isascii():
        return text
    text = _SURROGATE_RUN.sub(_decode_escaped_bytes, text)
    text = _LONE_SURROGATE.sub("\ufffd", text)
    return _C1_CONTROL.sub(_c1_to_cp1252, text)


def _decode_escaped_bytes(match: re.Match[str]) -> str:
    data = bytes(ord(char) - 0xDC00 for char in match.group())
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _c1_to_cp1252(match: re.Match[str]) -> str:
    return bytes([ord(match.group())]).decode("cp1252", "replace")


def _codec_for(charset: str | None) -> str | None:
    """The Python codec to decode a declared charset with; None for "guess"."""
    label = (charset or "").strip().strip("\"'").lower()
    if not label or label in _ASCII_LABELS:
        return None
    if label in _WINDOWS_1252_LABELS:
        return "cp1252"
    label = _CODEC_ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError):
        return None
    if info.name in _REFUSED_CODECS or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _decode_body(data: bytes, charset: str | None) -> str:
    """Decode a text part's bytes; line endings become LF."""
    codec = _codec_for(charset)
    try:
        # Undecodable bytes become surrogates here and get their second chance in _clean.
        text = data.decode(codec or "utf-8", "surrogateescape")
    except Exception:  # a codec may fail in ways beyond UnicodeError
        text = data.decode("utf-8", "surrogateescape")
    return _clean(text).replace("\r\n", "\n")


def _unfold(value: str) -> str:
    return "".join(_LINE_BREAKS.split(value))


def _decode_header(value: str) -> str:
    """A raw header value → unfolded text with RFC 2047 encoded words decoded."""
    text = _clean(_unfold(value))
    if "=?" not in text or len(text) > _MAX_PARSED_HEADER:
        return text
    # The token list keeps undecodable bytes as surrogates, so that _clean can give them
    # the windows-1252 fallback; str() of a header object would make them U+FFFD.
    decoded = _clean(_attempt(lambda: str(UnstructuredHeader.value_parser(text)), text))
    # An encoded word may carry CR, LF or NUL (=?utf-8?q?x=0D=0ABcc:...?=): as a space they
    # cannot end a header line in an API that writes the value into MIME.
    return _HEADER_BREAK.sub(" ", decoded)


def _verbatim(value: str | None) -> str | None:
    if value is None:
        return None
    return _clean(_unfold(value)).strip() or None


def _references(value: str | None) -> tuple[str, ...]:
    text = _verbatim(value)
    if text is None:
        return ()
    return tuple(_MESSAGE_ID.findall(text)) or tuple(text.split())


def _date(value: str | None) -> datetime | None:
    text = _verbatim(value)
    if text is None:
        return None
    try:
        parsed = parsedate_to_datetime(text)
    except Exception:  # TypeError, ValueError, OverflowError, IndexError ...
        return None
    # "-0000" means UTC with the sender's local zone unknown (RFC 5322 3.3).
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- addresses


def _addresses(value: str | None) -> list[Address]:
    """Every usable mailbox of an address-list header, groups flattened."""
    if value is None:
        return []
    text = _clean(_unfold(value))
    pairs = _attempt(lambda: _registry_addresses(text), None)
    if pairs is None:  # fall back to the forgiving compat32 parser
        nothing: list[tuple[str, str]] = []
        pairs = _attempt(lambda: [(_decode_header(n), a) for n, a in getaddresses([text])], nothing)
    out: list[Address] = []
    for name, addr in pairs:
        email = _clean(addr).strip()
        local, at, domain = email.rpartition("@")
        if not at or not local or not domain or "<" in email or ">" in email:
            continue
        display = " ".join(_clean(name).split())
        out.append(Address(email=email, name=display or None))
    return out


def _registry_addresses(text: str) -> list[tuple[str, str]]:
    if len(text) > _MAX_REGISTRY_ADDRESSES:
        raise ValueError("too long for the header registry")
    header = _ADDRESS_LIST("to", text)
    return [(a.display_name, a.addr_spec) for a in getattr(header, "addresses", ())]


def _dedupe(addresses: Iterable[Address]) -> tuple[Address, ...]:
    seen: set[str] = set()
    out: list[Address] = []
    for address in addresses:
        key = address.email.lower()
        if key not in seen:
            seen.add(key)
            out.append(address)
    return tuple(out)


def _bcc(envelope: Envelope, visible: Iterable[Address]) -> tuple[Address, ...]:
    """Envelope recipients that no To or Cc header shows (compared case-insensitively)."""
    seen = {a.email.lower() for a in visible}
    out: list[Address] = []
    for rcpt in envelope.rcpt_to:
        key = rcpt.lower()
        if rcpt and key not in seen:
            seen.add(key)
            out.append(Address(email=rcpt))
    return tuple(out)


def _sender(
    from_header: list[Address], envelope: Envelope, default_sender: str | None
) -> Address | None:
    if from_header:
        return from_header[0]
    if envelope.mail_from:
        return Address(email=envelope.mail_from)
    if default_sender:
        parsed = _addresses(default_sender)
        return parsed[0] if parsed else Address(email=default_sender)
    return None


# --------------------------------------------------------------------------- the tree


def _walk(
    part: StdMessage, raw: bytes | None, parent: str | None, depth: int, found: _Collected
) -> None:
    """Depth-first: the first plain and html body parts, everything else an attachment.

    `raw` is this part's exact source bytes (headers and body) when known.
    """
    if depth > _MAX_DEPTH:
        return
    ctype = _content_type(part)
    if ctype.startswith("message/"):
        found.attachments.append(_message_attachment(part, raw, ctype, parent))
        return
    if part.is_multipart():
        children = [c for c in _payload_list(part) if isinstance(c, StdMessage)]
        slices = _child_slices(part, raw, len(children))
        for index, child in enumerate(children):
            _walk(child, slices[index] if slices else None, ctype, depth + 1, found)
        return
    filename = _filename(part)
    disposition = _disposition(part)
    is_body_type = ctype in ("text/plain", "text/html") or ctype.startswith("multipart/")
    if is_body_type and disposition != "attachment" and filename is None:
        if ctype == "text/html":
            if found.html is None:
                found.html = _decode_body(_content(part), _charset(part))
                return
        elif found.text is None:
            found.text = _decode_body(_content(part), _charset(part))
            return
    content = _content(part)
    found.attachments.append(
        Attachment(
            filename=filename,
            content_type=ctype,
            disposition=_attachment_disposition(disposition, parent, part),
            content_id=_content_id(part),
            content=content,
        )
    )
    if ctype in _TNEF_TYPES or (filename or "").lower() == "winmail.dat":
        found.attachments.extend(_tnef_attachments(content))


def _payload_list(part: StdMessage) -> list[object]:
    payload = part.get_payload()
    return list(payload) if isinstance(payload, list) else []


def _content_type(part: StdMessage) -> str:
    return _clean(_attempt(part.get_content_type, "application/octet-stream")).lower()


def _charset(part: StdMessage) -> str | None:
    charset = _attempt(part.get_content_charset, None)
    return charset if isinstance(charset, str) else None


def _content(part: StdMessage) -> bytes:
    """The decoded bytes of a leaf part (transfer encoding removed)."""
    payload = part.get_payload()
    fallback = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""
    undecodable: object = fallback
    data = _attempt(lambda: part.get_payload(decode=True), undecodable)
    return data if isinstance(data, bytes) else fallback


def _filename(part: StdMessage) -> str | None:
    name = _attempt(part.get_filename, None)
    if not isinstance(name, str):
        return None
    return _decode_header(name).strip() or None


def _disposition(part: StdMessage) -> str | None:
    value = _attempt(part.get_content_disposition, None)
    return value.lower() if isinstance(value, str) else None


def _content_id(part: StdMessage) -> str | None:
    value = part.get("Content-ID")
    if value is None:
        return None
    text = _clean(_unfold(str(value))).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text or None


def _attachment_disposition(
    disposition: str | None, parent: str | None, part: StdMessage
) -> Literal["attachment", "inline"]:
    if disposition == "inline":
        return "inline"
    if disposition == "attachment":
        return "attachment"
    if parent == "multipart/related" and _content_id(part) is not None:
        return "inline"
    return "attachment"


def _message_attachment(
    part: StdMessage, raw: bytes | None, ctype: str, parent: str | None
) -> Attachment:
    """A ``message/*`` part as an attachment carrying the embedded message's bytes."""
    content = _message_bytes(part, raw)
    filename = _filename(part)
    if filename is None and ctype in ("message/rfc822", "message/global"):
        inner = _payload_list(part)
        subject = inner[0].get("Subject") if inner and isinstance(inner[0], StdMessage) else None
        title = _FILENAME_UNSAFE.sub("_", _decode_header(str(subject))).strip() if subject else ""
        filename = (title or "message") + ".eml"
    return Attachment(
        filename=filename,
        content_type=ctype,
        disposition=_attachment_disposition(_disposition(part), parent, part),
        content_id=_content_id(part),
        content=content,
    )


def _message_bytes(part: StdMessage, raw: bytes | None) -> bytes:
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if raw is not None:
        body = raw[_body_start(raw) :]
        try:
            if cte == "base64":
                return base64.b64decode(body)
            if cte == "quoted-printable":
                return quopri.decodestring(body)
        except (binascii.Error, ValueError):
            pass
        return body
    # The source slice is unknown (the tree and our boundary scan disagreed): serialise.
    verbatim = policy.default.clone(refold_source="none", linesep="\r\n")
    inner = [m for m in _payload_list(part) if isinstance(m, EmailMessage)]
    return _attempt(lambda: b"\r\n".join(m.as_bytes(policy=verbatim) for m in inner), b"")


# --------------------------------------------------------------------------- raw slicing


def _body_start(raw: bytes) -> int:
    """Offset where the body begins, with the feedparser's idea of where headers end."""
    pos = 0
    first = True
    length = len(raw)
    while pos < length:
        end = raw.find(b"\n", pos)
        nxt = length if end < 0 else end + 1
        line = raw[pos:nxt].rstrip(b"\r\n")
        if not line:
            return nxt
        if not (first and line.startswith(b"From ")) and not _HEADER_LINE.match(line):
            return pos
        first = False
        pos = nxt
    return length


def _child_slices(part: StdMessage, raw: bytes | None, expected: int) -> list[bytes] | None:
    """The source bytes of each child of a multipart, or None if they cannot be trusted."""
    boundary = _attempt(part.get_boundary, None)
    if raw is None or boundary is None:
        return None
    delimiter = boundary.encode("utf-8", "surrogateescape")
    body = raw[_body_start(raw) :]
    pattern = re.compile(rb"^--" + re.escape(delimiter) + rb"(--)?[ \t]*\r?$", re.MULTILINE)
    slices: list[bytes] = []
    start: int | None = None
    for match in pattern.finditer(body):
        if start is not None:
            # The line break before a delimiter belongs to it (RFC 2046 5.1.1); with
            # re.MULTILINE, ^ only matches after an LF.
            end = match.start() - 1
            if body[end - 1 : end] == b"\r":
                end -= 1
            slices.append(body[start : max(start, end)])
        if match.group(1):
            start = None
            break
        start = match.end() + (2 if body[match.end() : match.end() + 2] == b"\r\n" else 1)
    if start is not None:
        slices.append(body[min(start, len(body)) :])
    return slices if len(slices) == expected else None


# --------------------------------------------------------------------------- TNEF
#
# Transport Neutral Encapsulation Format ([MS-OXTNEF] 2.1.3): a signature, a 16-bit key,
# then attributes: level (1 byte), id (32 bits: type << 16 | id), length (32 bits), data,
# 16-bit checksum. Each attachment starts with attAttachRendData; its title, data and MAPI
# properties (attAttachment, holding the long filename and MIME tag) follow.

_TNEF_SIGNATURE = 0x223E9F78
_ATT_OEM_CODEPAGE = 0x9007
_ATT_ATTACH_DATA = 0x800F
_ATT_ATTACH_TITLE = 0x8010
_ATT_ATTACH_REND_DATA = 0x9002
_ATT_ATTACHMENT = 0x9005
_LEVEL_ATTACHMENT = 2
_PR_ATTACH_LONG_FILENAME = 0x3707
_PR_ATTACH_MIME_TAG = 0x370E
_PT_STRING8 = 0x001E
_PT_UNICODE = 0x001F
_MAPI_VARIABLE = frozenset({0x000D, _PT_STRING8, _PT_UNICODE, 0x0102})
_MAPI_FIXED = {0x0002: 4, 0x0003: 4, 0x0004: 4, 0x0005: 8, 0x0006: 8, 0x0007: 8, 0x000A: 4}
_MAPI_FIXED |= {0x000B: 4, 0x0014: 8, 0x0040: 8, 0x0048: 16}


@dataclass
class _TnefFile:
    title: str | None = None
    long_name: str | None = None
    mime_tag: str | None = None
    data: bytes = b""


def _u16(data: bytes, pos: int) -> int:
    if pos + 2 > len(data):
        raise ValueError("truncated TNEF")
    return int.from_bytes(data[pos : pos + 2], "little")


def _u32(data: bytes, pos: int) -> int:
    if pos + 4 > len(data):
        raise ValueError("truncated TNEF")
    return int.from_bytes(data[pos : pos + 4], "little")


def _tnef_attachments(data: bytes) -> list[Attachment]:
    """The files inside a TNEF (winmail.dat) blob; [] when it is not valid TNEF."""
    files: list[_TnefFile] = []
    codepage = "cp1252"
    try:
        if _u32(data, 0) != _TNEF_SIGNATURE:
            return []
        pos = 6
        while pos + 9 <= len(data):
            level = data[pos]
            attribute = _u32(data, pos + 1) & 0xFFFF
            length = _u32(data, pos + 5)
            value = data[pos + 9 : pos + 9 + length]
            if len(value) != length:
                break
            pos += 9 + length + 2
            if attribute == _ATT_OEM_CODEPAGE and length >= 4:
                codepage = _tnef_codec(_u32(value, 0))
            if level != _LEVEL_ATTACHMENT:
                continue
            if attribute == _ATT_ATTACH_REND_DATA or not files:
                files.append(_TnefFile())
            current = files[-1]
            if attribute == _ATT_ATTACH_TITLE:
                current.title = _tnef_string(value, codepage)
            elif attribute == _ATT_ATTACH_DATA:
                current.data = value
            elif attribute == _ATT_ATTACHMENT:
                try:
                    _tnef_properties(value, current, codepage)
                except (ValueError, IndexError):
                    pass  # damaged properties cost the long filename, not later files
    except (ValueError, IndexError):
        pass
    out: list[Attachment] = []
    for item in files:
        if not item.data:
            continue
        name = item.long_name or item.title
        out.append(
            Attachment(
                filename=name,
                content_type=_guess_type(name, item.mime_tag),
                disposition="attachment",
                content_id=None,
                content=item.data,
            )
        )
    return out


def _tnef_codec(codepage: int) -> str:
    try:
        return codecs.lookup(f"cp{codepage}").name
    except LookupError:
        return "cp1252"


def _tnef_string(value: bytes, codec: str) -> str | None:
    text = _clean(value.split(b"\x00", 1)[0].decode(codec, "replace")).strip()
    return text or None


def _tnef_properties(data: bytes, target: _TnefFile, codec: str) -> None:
    """Read the MAPI properties of attAttachment that name the file ([MS-OXTNEF] 2.1.3.4)."""
    count = _u32(data, 0)
    pos = 4
    for _ in range(min(count, 4096)):
        ptype = _u16(data, pos)
        pid = _u16(data, pos + 2)
        pos += 4
        if pid >= 0x8000:  # named property: GUID, kind, then a number or a name
            kind = _u32(data, pos + 16)
            pos += 20
            if kind == 0:
                pos += 4
            else:
                pos += 4 + _pad4(_u32(data, pos))
        base = ptype & 0x0FFF
        values: list[bytes] = []
        if base in _MAPI_VARIABLE:
            n = _u32(data, pos)
            pos += 4
            for _ in range(min(n, 4096)):
                size = _u32(data, pos)
                values.append(data[pos + 4 : pos + 4 + size])
                pos += 4 + _pad4(size)
        elif base in _MAPI_FIXED:
            n = _u32(data, pos) if ptype & 0x1000 else 1
            pos += (4 if ptype & 0x1000 else 0) + n * _MAPI_FIXED[base]
        else:
            return  # an unknown type has an unknown size: stop reading
        if pos > len(data):
            return
        if values and base in (_PT_STRING8, _PT_UNICODE):
            text = _tnef_string_value(values[0], base, codec)
            if pid == _PR_ATTACH_LONG_FILENAME:
                target.long_name = text
            elif pid == _PR_ATTACH_MIME_TAG:
                target.mime_tag = text


def _tnef_string_value(value: bytes, ptype: int, codec: str) -> str | None:
    if ptype == _PT_UNICODE:
        text = value.decode("utf-16-le", "replace").split("\x00", 1)[0]
        return _clean(text).strip() or None
    return _tnef_string(value, codec)


def _pad4(size: int) -> int:
    return (size + 3) & ~3


def _guess_type(filename: str | None, declared: str | None) -> str:
    if declared and re.fullmatch(r"[\w.+-]+/[\w.+-]+", declared):
        return declared.lower()
    _, dot, extension = (filename or "").rpartition(".")
    if not dot:
        return "application/octet-stream"
    return _TYPES_BY_EXTENSION.get(extension.lower(), "application/octet-stream")
