"""`bridge.mime.parse_message`: every branch, on the small fixtures in tests/fixtures/mail."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bridge.mime
from bridge.mime import _registry_addresses, parse_message
from bridge.model import Address, Envelope, Header, Message
from bridge.payload import message_v1

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mail"
RECEIVED = datetime(2024, 4, 8, 12, 0, tzinfo=UTC)
ENVELOPE = Envelope(mail_from="env@example.com", rcpt_to=("rcpt@example.org",))
FORBIDDEN = re.compile("[\ud800-\udfff\x80-\x9f]")


def parse(raw: bytes, envelope: Envelope = ENVELOPE, default_sender: str | None = None) -> Message:
    """Parse with fixed id and time."""
    return parse_message(
        raw, envelope, id="q-1", received_at=RECEIVED, default_sender=default_sender
    )


def fixture(name: str, envelope: Envelope = ENVELOPE) -> Message:
    """Parse one fixture file."""
    return parse((FIXTURES / name).read_bytes(), envelope)


def crlf(text: str) -> bytes:
    """A message written with LF in the test, sent with CRLF."""
    return text.replace("\n", "\r\n").encode("utf-8")


def strings_of(message: Message) -> list[str]:
    """Every string the message-v1 document of `message` carries."""
    found: list[str] = []

    def visit(node: object) -> None:
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                found.append(str(key))
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(message_v1(message))
    return found


# --------------------------------------------------------------------------- bodies


def test_plain_message_fields() -> None:
    """A plain QP message gives decoded subject, text, ids, date and every header."""
    message = fixture("plain.eml")

    assert Address("anna@example.com", "Anna Schmidt") == message.from_
    assert Address("relay@example.com") == message.sender
    assert (Address("bob@example.org"),) == message.to
    assert (Address("desk@example.com", "Desk"),) == message.reply_to
    assert "Grüße from the plain fixture" == message.subject
    assert "Hallo Bob,\nschöne Grüße.\n" == message.text
    assert None is message.html
    assert "<plain-1@example.com>" == message.message_id
    assert "<parent-0@example.com>" == message.in_reply_to
    assert ("<root-0@example.com>", "<parent-0@example.com>") == message.references
    assert datetime(2024, 4, 1, 10, 0, tzinfo=UTC) == message.date
    assert Header("X-Folded", "first part second part") == message.headers[9]
    assert 13 == len(message.headers)
    assert (FIXTURES / "plain.eml").read_bytes() == message.raw


def test_alternative_gives_text_and_html() -> None:
    """multipart/alternative yields both bodies; preamble and epilogue are dropped."""
    message = fixture("alternative.eml")

    assert "Plain version." == message.text
    assert "<p>HTML version – ok</p>\n" == message.html
    assert () == message.attachments


def test_related_inline_images() -> None:
    """In multipart/related a part with a Content-ID is inline, one without is attached."""
    message = fixture("related.eml")

    assert '<img src="cid:img1@example.com"><img src="cid:img2">' == message.html
    assert None is message.text
    assert [
        (None, "image/png", "inline", "img1@example.com", 71),
        ("second.png", "image/png", "inline", "img2", 71),
        ("loose.png", "image/png", "attachment", None, 71),
    ] == [
        (a.filename, a.content_type, a.disposition, a.content_id, a.size)
        for a in message.attachments
    ]


def test_mixed_attachments_not_bodies() -> None:
    """Text parts with a filename or attachment disposition, or after the body, are files."""
    message = fixture("mixed.eml")

    assert "The body." == message.text
    assert None is message.html
    assert [
        ("notes.txt", "text/plain", b"Attached notes, not the body."),
        (None, "text/html", b"<p>an attached page without a name</p>"),
        (None, "text/plain", b"A second inline text part."),
        ("Rechnung März.bin", "application/octet-stream", b"\x00\x01\x02\x03"),
        ("Prüfung€.pdf", "application/pdf", b"%PDF-"),
    ] == [(a.filename, a.content_type, a.content) for a in message.attachments]


def test_attached_message_exact_bytes() -> None:
    """A message/rfc822 part is one attachment: its exact bytes, named after its subject."""
    raw = (FIXTURES / "attached-message.eml").read_bytes()
    inner_start = raw.index(b'From: "Original Sender"')
    inner_end = raw.index(b"--inner--") + len(b"--inner--")
    message = fixture("attached-message.eml")
    first, second = message.attachments

    assert "See the attached message." == message.text
    assert 2 == len(message.attachments)
    assert ("Original: report_Q1.eml", "message/rfc822", "attachment") == (
        first.filename,
        first.content_type,
        first.disposition,
    )
    assert raw[inner_start:inner_end] == first.content
    assert "named.eml" == second.filename
    assert b"From: a@example.net\r\nSubject: Named\r\n\r\nNamed body." == second.content


def test_attached_message_without_subject_is_message_eml() -> None:
    """An attached message with neither filename nor subject is called message.eml."""
    raw = crlf(
        "From: a@example.com\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
        "Content-Type: text/plain\n\nx\n--b\nContent-Type: message/rfc822\n\n"
        "From: b@example.com\n\ninner\n--b--\n"
    )
    message = parse(raw)

    assert ["message.eml"] == [a.filename for a in message.attachments]
    assert b"From: b@example.com\r\n\r\ninner" == message.attachments[0].content


def test_attached_message_base64_is_decoded() -> None:
    """A base64-encoded message/rfc822 (against RFC 2046) is still carried decoded."""
    inner = base64.b64encode(b"Subject: inner\r\n\r\nbody").decode()
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: message/rfc822\n"
        f"Content-Transfer-Encoding: base64\n\n{inner}\n--b--\n"
    )
    message = parse(raw)

    assert b"Subject: inner\r\n\r\nbody" == message.attachments[0].content


def test_attached_message_when_slicing_disagrees() -> None:
    """When the boundary scan and the parser disagree, the message part is re-serialised."""
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: message/rfc822\n\n"
        "Subject: inner\n\nbody\n--b\r--b--\n"
    )
    message = parse(raw)

    assert [b"Subject: inner"] == [a.content[:14] for a in message.attachments]


def test_attached_message_bad_base64_kept_as_is() -> None:
    """A message/rfc822 part whose base64 cannot be decoded is carried as sent."""
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: message/rfc822\n"
        "Content-Transfer-Encoding: base64\n\nabc\n--b--\n"
    )
    message = parse(raw)

    assert [b"abc"] == [a.content for a in message.attachments]


def test_attached_message_quoted_printable_and_bare_lf() -> None:
    """A quoted-printable message/rfc822 in a bare-LF message is decoded from its slice."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: message/rfc822\n"
        b"Content-Transfer-Encoding: quoted-printable\n\nSubject: q\n\nx=3Dy\n--b--\n"
    )
    message = parse(raw)

    assert [("q.eml", b"Subject: q\n\nx=y")] == [
        (a.filename, a.content) for a in message.attachments
    ]


def test_attached_message_with_cr_line_endings_is_reserialised() -> None:
    """With bare-CR line endings the source cannot be sliced, so the part is re-serialised."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\r--b\rContent-Type: message/rfc822\r\r"
        b"Subject: inner\r\rbody\r--b\rContent-Type: multipart/alternative; boundary=c\r\r"
        b"--c\rContent-Type: text/plain\r\rtext\r--c--\r--b--\r"
    )
    message = parse(raw)

    assert [b"Subject: inner\r\n\r\nbody"] == [a.content for a in message.attachments]
    assert "text" == message.text


def test_part_headers_without_separator() -> None:
    """A part whose headers run straight into its body is sliced where the parser splits."""
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nhi\n"
        "--b\nContent-Type: message/rfc822\nno header here\n--b--\n"
    )
    message = parse(raw)

    assert [b"no header here"] == [a.content for a in message.attachments]


def test_non_ascii_rfc2231_boundary() -> None:
    """A boundary that decodes to non-ASCII cannot be split; its content is kept as text."""
    raw = (
        "Content-Type: multipart/mixed; boundary*=utf-8''%C3%A4\n\n--\u00e4\n"
        "Content-Type: multipart/alternative; boundary=in\n\n--in\nContent-Type: text/plain\n\n"
        "plain\n--in\nContent-Type: text/html\n\n<i>h</i>\n--in--\n--\u00e4--\n"
    ).encode()
    message = parse(raw)

    assert "plain\n--in\nContent-Type: text/html\n\n<i>h</i>" in (message.text or "")


def test_second_html_part_is_attachment() -> None:
    """Only the first text/html part is the html body; a later one is an attachment."""
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/html\n\n<p>1</p>\n"
        "--b\nContent-Type: text/html\n\n<p>2</p>\n--b--\n"
    )
    message = parse(raw)

    assert "<p>1</p>" == message.html
    assert [("text/html", b"<p>2</p>")] == [
        (a.content_type, a.content) for a in message.attachments
    ]


def test_delivery_status_is_one_attachment() -> None:
    """message/delivery-status is one attachment of its exact bytes, not walked into."""
    raw = crlf(
        "Content-Type: multipart/report; boundary=r\n\n--r\nContent-Type: text/plain\n\n"
        "bounced\n--r\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n"
        "Action: failed\n--r--\n"
    )
    message = parse(raw)

    assert "bounced" == message.text
    assert [("message/delivery-status", b"Reporting-MTA: dns; x\r\n\r\nAction: failed")] == [
        (a.content_type, a.content) for a in message.attachments
    ]


def test_top_level_non_text_is_attachment() -> None:
    """A single-part non-text message has no body and one attachment."""
    raw = crlf("Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\nJVBERi0=\n")
    message = parse(raw)

    assert None is message.text
    assert [("application/pdf", b"%PDF-", "attachment")] == [
        (a.content_type, a.content, a.disposition) for a in message.attachments
    ]


def test_multipart_without_boundary_is_text() -> None:
    """A multipart that names no boundary is read as plain text."""
    message = parse(crlf("Content-Type: multipart/mixed\n\nJust text.\n"))

    assert "Just text.\n" == message.text


def test_bare_lf_and_mixed_line_endings() -> None:
    """Bare LF and mixed line endings parse; text uses LF only."""
    raw = b"Subject: mixed\nFrom: a@example.com\r\n\nline one\r\nline two\nline three\r\n"
    message = parse(raw)

    assert "mixed" == message.subject
    assert "line one\nline two\nline three\n" == message.text


def test_missing_separator_and_no_space_after_colon() -> None:
    """Headers without a space after the colon and without a blank line still parse."""
    message = parse(b"Subject:tight\r\nFrom:a@example.com\r\nHello there,\r\nbody.\r\n")

    assert "tight" == message.subject
    assert Address("a@example.com") == message.from_
    assert "Hello there,\nbody.\n" == message.text


def test_duplicate_headers_first_wins() -> None:
    """For duplicated headers the first value is used and every copy is listed."""
    raw = crlf(
        "Subject: first\nSubject: second\nMessage-ID: <a@x>\nMessage-Id: <b@x>\n"
        "Content-Type: text/html\nContent-Type: text/plain\n\n<p>x</p>\n"
    )
    message = parse(raw)

    assert "first" == message.subject
    assert "<a@x>" == message.message_id
    assert "<p>x</p>\n" == message.html
    assert ["Subject", "Subject"] == [h.name for h in message.headers[:2]]


def test_unclosed_nested_multipart() -> None:
    """An inner multipart that never closes still yields its parts and the outer ones."""
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=out\n\n--out\n"
        "Content-Type: multipart/alternative; boundary=in\n\n--in\nContent-Type: text/plain\n\n"
        "plain\n--in\nContent-Type: text/html\n\n<b>html</b>\n--out\n"
        "Content-Type: application/zip; name=a.zip\n\nPK\n"
    )
    message = parse(raw)

    assert "plain" == message.text
    assert "<b>html</b>" == message.html
    assert ["a.zip"] == [a.filename for a in message.attachments]


# --------------------------------------------------------------------------- charsets


def test_mislabelled_utf8_falls_back_to_cp1252() -> None:
    """Bytes that are not valid UTF-8 under a utf-8 label are read as windows-1252."""
    message = fixture("bad-charset.eml")

    assert "Preis: 10 €, Grüße “zitiert” \ufffd\n" == message.text


def test_unknown_and_refused_charsets() -> None:
    """Unknown charsets and non-text codecs decode as UTF-8, else windows-1252."""
    message = fixture("unknown-charset.eml")

    assert "Grüße in UTF-8" == message.text
    assert "<p>Grüße in cp1252</p>" == message.html


@pytest.mark.parametrize(
    ("charset", "body", "expected"),
    [
        ("iso-8859-1", b"\x80 \x84x\x93", "€ „x“"),
        ("latin1", b"caf\xe9", "café"),
        ("us-ascii", b"\xe2\x82\xac", "€"),
        ("us-ascii", b"\x80", "€"),
        ("iso-8859-15", b"\xa4", "€"),
        ("shift_jis", b"\x82\xa0", "あ"),
        ("utf-16", "hé".encode("utf-16"), "hé"),
        ('"UTF-8"', "ü".encode(), "ü"),
        ("idna", b"xn--a", "xn--a"),
        ("x-unknown", b"\xfc", "ü"),
    ],
)
def test_body_charsets(charset: str, body: bytes, expected: str) -> None:
    """Declared charsets decode per WHATWG; latin1 is windows-1252, junk falls back."""
    raw = b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n\r\n" + body
    message = parse(raw)

    assert expected == message.text


def test_codec_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A codec that fails outright is replaced by the UTF-8 fallback."""
    monkeypatch.setattr(bridge.mime, "_codec_for", lambda charset: "no-such-codec")
    message = parse(b"Content-Type: text/plain\r\n\r\nGr\xc3\xbc\xc3\x9fe")

    assert "Grüße" == message.text


def test_8bit_headers() -> None:
    """Raw 8-bit header bytes decode as UTF-8, else windows-1252; latin1 words as cp1252."""
    message = fixture("8bit-header.eml")

    assert Address("jörg@example.org", "Jörg Weiß") == message.from_
    assert (Address("m@example.org", "Müller"),) == message.to
    assert "Grüße – cp1252 raw" == message.subject
    assert "€ raw utf-8" == message.header("X-Unicode")
    assert "Body with raw UTF-8 and no charset: ä\n" == message.text


def test_encoded_word_latin1_gives_cp1252() -> None:
    """An iso-8859-1 encoded word with byte 0x80 decodes to the euro sign."""
    message = parse(
        b"Subject: =?iso-8859-1?q?=80_=96?=\r\nFrom: =?latin1?q?=80?= <e@x.org>\r\n\r\n"
    )

    assert "€ –" == message.subject
    assert Address("e@x.org", "€") == message.from_


def test_encoded_word_unknown_charset() -> None:
    """An encoded word in an unknown charset falls back without surrogates."""
    message = parse(b"Subject: =?x-foo?q?Gr=C3=BC=C3=9Fe?= =?x-bar?q?=FC?=\r\n\r\n")

    assert "Grüßeü" == message.subject


def test_encoded_line_breaks_in_a_header_become_spaces() -> None:
    """CR, LF and NUL hidden in encoded words cannot start a new header line downstream."""
    message = parse(
        b"Subject: =?utf-8?q?x_=0D=0ABcc:_x@evil.example=00?=\r\n"
        b"X-Note: =?utf-8?b?YQ0KYg==?=\r\n\r\n"
    )

    assert "x   Bcc: x@evil.example " == message.subject
    assert "a  b" == message.header("X-Note")


def test_mime_parameter_header_beyond_8k_is_cut_before_parsing() -> None:
    """16,000 RFC 2231 sections (a quadratic parse) are cut at 8 KiB: later ones are unread."""
    params = "".join(f"; p{i}*{i % 3}*=x" for i in range(16000))
    raw = (
        "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nGrüße\r\n--b\r\n"
        f'Content-Type: text/plain; name="early.txt"{params}; charset=utf-8\r\n'
        f'Content-Disposition: attachment{params}; filename="late.txt"\r\n\r\nx\r\n--b--\r\n'
    ).encode()

    message = parse(raw)

    assert "Grüße" == message.text
    assert 1 == len(message.attachments)
    assert "late.txt" != message.attachments[0].filename


def test_long_address_list_goes_to_the_linear_parser_with_names_decoded() -> None:
    """Over 4 KiB, To is read by compat32's parser; encoded names are still decoded."""
    to = ", ".join(f'"=?utf-8?q?J=C3=B6rg_{i}?=" <j{i}@example.org>' for i in range(300))
    raw = f"From: a@example.com\r\nTo: {to}\r\n\r\nhi\r\n".encode()

    message = parse(raw)

    assert 300 == len(message.to)
    assert Address("j299@example.org", "Jörg 299") == message.to[-1]
    with pytest.raises(ValueError, match="too long for the header registry"):
        _registry_addresses(to)


def test_surrogate_free_output() -> None:
    """No string of the document holds surrogates or C1 controls."""
    raw = (
        b"From: \xff\xfe <\xc3\xa4@example.org>\r\nSubject: \xed\xa0\x80 \x9d \xc2\x85\r\n"
        b"X-Bad: =?utf-8?b?7aCA?=\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        b"\xed\xa0\x80 \xc2\x80 \xff"
    )
    message = parse(raw)

    assert [] == [s for s in strings_of(message) if FORBIDDEN.search(s)]
    assert "í\xa0€ \ufffd …" == message.subject


# --------------------------------------------------------------------------- parameters


def test_rfc2231_and_rfc2047_filenames() -> None:
    """Filenames in RFC 2047 words and RFC 2231 latin1 form decode to Unicode."""
    names = [a.filename for a in fixture("mixed.eml").attachments]

    assert "Rechnung März.bin" in names
    assert "Prüfung€.pdf" in names


def test_rfc2231_charset_on_content_type() -> None:
    """``charset*=us-ascii'en'utf-8`` selects UTF-8 for the body."""
    raw = b"Content-Type: text/plain; charset*=us-ascii'en'utf-8\r\n\r\n\xc3\xbc"
    message = parse(raw)

    assert "ü" == message.text


def test_content_id_without_brackets_and_blank() -> None:
    """A Content-ID is given without angle brackets, and a blank one is None."""
    raw = crlf(
        "Content-Type: multipart/related; boundary=r\n\n--r\nContent-Type: text/html\n\n"
        "<p/>\n--r\nContent-Type: image/gif\nContent-ID: < x@y >\n\nGIF\n--r\n"
        "Content-Type: image/gif\nContent-ID: <>\n\nGIF\n--r--\n"
    )
    message = parse(raw)

    assert [("x@y", "inline"), (None, "attachment")] == [
        (a.content_id, a.disposition) for a in message.attachments
    ]


# --------------------------------------------------------------------------- addresses


def test_groups_and_dedupe() -> None:
    """Groups flatten, empty groups give nothing, duplicates and unusable entries drop."""
    message = fixture(
        "groups.eml",
        Envelope(
            mail_from="env@example.com",
            rcpt_to=("A@EXAMPLE.ORG", "d@example.org", "hidden@example.net", "Hidden@example.net"),
        ),
    )

    assert Address("real@example.com", "Real Sender") == message.from_
    assert (
        Address("a@example.org"),
        Address("b@example.org", "B"),
        Address("c@example.org"),
    ) == message.to
    assert (Address("d@example.org"),) == message.cc
    assert (Address("hidden@example.net"),) == message.bcc
    assert (Address("r1@example.com"),) == message.reply_to


def test_bcc_is_envelope_minus_headers() -> None:
    """Every envelope recipient absent from To and Cc is Bcc, in envelope order."""
    raw = crlf("To: One <one@example.org>\nCc: two@example.org\n\nx\n")
    envelope = Envelope(
        mail_from="s@example.com",
        rcpt_to=("three@example.org", "TWO@example.org", "one@EXAMPLE.org", "four@example.org"),
    )
    message = parse(raw, envelope)

    assert (Address("three@example.org"), Address("four@example.org")) == message.bcc


def test_no_from_uses_envelope() -> None:
    """Without a From header the envelope sender is used."""
    message = fixture("no-from.eml")

    assert Address("env@example.com") == message.from_
    assert None is message.date


def test_no_from_null_sender_uses_default() -> None:
    """Without From and with the null sender, the configured default sender is used."""
    envelope = Envelope(mail_from="", rcpt_to=("r@example.org",))
    raw = (FIXTURES / "no-from.eml").read_bytes()

    assert (
        Address("def@example.com", "Bridge")
        == parse(raw, envelope, "Bridge <def@example.com>").from_
    )
    assert Address("plain-default") == parse(raw, envelope, "plain-default").from_
    assert None is parse(raw, envelope).from_


def test_null_sender_keeps_from_header() -> None:
    """A bounce (null envelope sender) keeps its From header address."""
    envelope = Envelope(mail_from="", rcpt_to=("r@example.org",))
    message = parse(
        crlf("From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\n\nx\n"), envelope
    )

    assert Address("MAILER-DAEMON@mx.example.net", "Mail Delivery System") == message.from_


def test_unusable_from_header_falls_back() -> None:
    """A From header with no usable address (``<>``, no domain) falls back to the envelope."""
    message = parse(crlf("From: <>, root\n\nx\n"))

    assert Address("env@example.com") == message.from_


def test_address_parser_crash_uses_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the header registry raises, the compat32 address parser is used."""

    def broken(name: str, value: str) -> None:
        raise IndexError("registry bug")

    monkeypatch.setattr(bridge.mime, "_ADDRESS_LIST", broken)
    message = parse(
        crlf("From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\nTo: a@x.org, b@y.org\n\nx\n")
    )

    assert Address("j@example.org", "Jörg") == message.from_
    assert (Address("a@x.org"), Address("b@y.org")) == message.to


def test_huge_header_is_not_tokenised() -> None:
    """A header longer than the parse limit is kept as text, not run through the parser."""
    many = ", ".join(f"u{i}@example.org" for i in range(4000))
    subject = "=?utf-8?q?x?= " + "y" * 40000
    message = parse(crlf(f"To: {many}\nSubject: {subject}\n\nx\n"))

    assert 4000 == len(message.to)
    assert subject == message.subject


# --------------------------------------------------------------------------- header fields


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "Tue, 12 Mar 2024 03:15:07 +0100",
            datetime(2024, 3, 12, 3, 15, 7, tzinfo=timezone(timedelta(hours=1))),
        ),
        ("Tue, 12 Mar 2024 03:15:07 -0000", datetime(2024, 3, 12, 3, 15, 7, tzinfo=UTC)),
        ("yesterday", None),
        ("Tue, 99 Foo 2024 99:99:99 +9999", None),
    ],
)
def test_date(value: str, expected: datetime | None) -> None:
    """Date is an aware datetime; -0000 is UTC; junk is None."""
    message = parse(crlf(f"Date: {value}\n\nx\n"))

    assert expected == message.date


def test_references_without_brackets() -> None:
    """References without angle brackets split on whitespace; ids are kept verbatim."""
    message = parse(crlf("References: a@x  b@y\nIn-Reply-To:  <p@x> (comment)\nMessage-ID:\n\nx\n"))

    assert ("a@x", "b@y") == message.references
    assert "<p@x> (comment)" == message.in_reply_to
    assert None is message.message_id


def test_absent_subject_is_none() -> None:
    """A message without Subject has subject None."""
    assert None is parse(crlf("From: a@example.com\n\nx\n")).subject


# --------------------------------------------------------------------------- TNEF


def tnef_attribute(level: int, attribute: int, data: bytes) -> bytes:
    """One TNEF attribute with its checksum."""
    checksum = sum(data) & 0xFFFF
    return (
        bytes([level])
        + attribute.to_bytes(4, "little")
        + len(data).to_bytes(4, "little")
        + data
        + checksum.to_bytes(2, "little")
    )


def mapi_string(prop_type: int, prop_id: int, text: str) -> bytes:
    """One single-valued MAPI string property as attAttachment stores it."""
    raw = text.encode("utf-16-le" if prop_type == 0x1F else "cp1252") + b"\x00" * 2
    padded = raw + b"\x00" * (-len(raw) % 4)
    return (
        prop_type.to_bytes(2, "little")
        + prop_id.to_bytes(2, "little")
        + (1).to_bytes(4, "little")
        + len(raw).to_bytes(4, "little")
        + padded
    )


def build_tnef() -> bytes:
    """A TNEF blob with two attachments, one named through MAPI properties."""
    props = (
        (4).to_bytes(4, "little")
        # PR_ATTACH_SIZE (PT_LONG), then a named property (GUID + name), then strings.
        + (0x0003).to_bytes(2, "little")
        + (0x0E20).to_bytes(2, "little")
        + (5).to_bytes(4, "little")
        + (0x001E).to_bytes(2, "little")
        + (0x8001).to_bytes(2, "little")
        + b"G" * 16
        + (1).to_bytes(4, "little")
        + (6).to_bytes(4, "little")
        + b"n\x00m\x00\x00\x00\x00\x00"
        + (1).to_bytes(4, "little")
        + (2).to_bytes(4, "little")
        + b"x\x00\x00\x00"
        + mapi_string(0x1F, 0x3707, "Größenliste März.xlsx")
        + mapi_string(0x1E, 0x370E, "application/vnd.ms-excel")
    )
    return (
        (0x223E9F78).to_bytes(4, "little")
        + b"\x01\x00"
        + tnef_attribute(1, 0x00069007, (850).to_bytes(4, "little") + b"\x00" * 4)
        + tnef_attribute(2, 0x00069002, b"\x01\x00" + b"\xff" * 12)
        + tnef_attribute(2, 0x00018010, b"GRSSEN~1.XLS" + b"\x00")
        + tnef_attribute(2, 0x0006800F, b"sheet")
        + tnef_attribute(2, 0x00069005, props)
        + tnef_attribute(2, 0x00069002, b"\x01\x00" + b"\xff" * 12)
        + tnef_attribute(2, 0x00018010, b"notes\x00")
        + tnef_attribute(2, 0x0006800F, b"n")
        + tnef_attribute(2, 0x00069002, b"\x01\x00")
        + tnef_attribute(2, 0x00018010, b"empty.txt\x00")
    )


def tnef_message(blob: bytes, ctype: str = "application/ms-tnef") -> bytes:
    """A message carrying `blob` as winmail.dat."""
    body = base64.encodebytes(blob).decode()
    return crlf(
        "Content-Type: multipart/mixed; boundary=t\n\n--t\nContent-Type: text/plain\n\nhi\n"
        f"--t\nContent-Type: {ctype}; name=winmail.dat\nContent-Transfer-Encoding: base64\n\n"
        f"{body}--t--\n"
    )


def test_tnef_files_extracted() -> None:
    """Files inside winmail.dat follow it, named by their long filename when there is one."""
    blob = build_tnef()
    message = parse(tnef_message(blob))

    assert [
        ("winmail.dat", "application/ms-tnef", blob),
        ("Größenliste März.xlsx", "application/vnd.ms-excel", b"sheet"),
        ("notes", "application/octet-stream", b"n"),
    ] == [(a.filename, a.content_type, a.content) for a in message.attachments]


def test_tnef_by_filename_and_damaged() -> None:
    """A winmail.dat sent as octet-stream is read too; a damaged one is kept, not extracted."""
    good = parse(tnef_message(build_tnef(), "application/octet-stream"))
    broken = fixture("broken-tnef.eml")
    blob = build_tnef()
    truncated = parse(tnef_message(blob[: blob.index(b"G" * 16)]))
    not_tnef = parse(tnef_message(b"PK\x03\x04 not tnef"))
    stub = parse(tnef_message(b"x\x9f"))

    assert 3 == len(good.attachments)
    assert ["winmail.dat"] == [a.filename for a in broken.attachments]
    assert [
        ("winmail.dat", "application/ms-tnef"),
        ("GRSSEN~1.XLS", "application/vnd.ms-excel"),
    ] == [(a.filename, a.content_type) for a in truncated.attachments]
    assert ["winmail.dat"] == [a.filename for a in not_tnef.attachments]
    assert ["winmail.dat"] == [a.filename for a in stub.attachments]


def test_tnef_unknown_property_type_stops_reading() -> None:
    """An unknown MAPI property type ends property reading but keeps the file."""
    props = (1).to_bytes(4, "little") + (0x0099).to_bytes(2, "little") + b"\x00\x00"
    blob = (
        (0x223E9F78).to_bytes(4, "little")
        + b"\x01\x00"
        + tnef_attribute(2, 0x00018010, b"a.pdf\x00")
        + tnef_attribute(2, 0x0006800F, b"%PDF")
        + tnef_attribute(2, 0x00069005, props)
        + tnef_attribute(1, 0x00069007, (99999).to_bytes(4, "little"))
    )
    message = parse(tnef_message(blob))

    assert [("a.pdf", "application/pdf")] == [
        (a.filename, a.content_type) for a in message.attachments[1:]
    ]


def test_tnef_numeric_named_property_and_truncated_properties() -> None:
    """A named property with a numeric id is skipped; truncated properties end reading."""
    named = (
        (0x001F).to_bytes(2, "little")
        + (0x8002).to_bytes(2, "little")
        + b"G" * 16
        + (0).to_bytes(4, "little")
        + (7).to_bytes(4, "little")
        + (1).to_bytes(4, "little")
        + (2).to_bytes(4, "little")
        + b"x\x00\x00\x00"
    )
    props = (3).to_bytes(4, "little") + named + mapi_string(0x1F, 0x1234, "ignored")
    props += mapi_string(0x1F, 0x3707, "long-name.pdf")
    cut = (2).to_bytes(4, "little") + (0x001F).to_bytes(2, "little")
    fixed = (1).to_bytes(4, "little") + (0x1003).to_bytes(2, "little") + b"\x00\x00"
    fixed += (99).to_bytes(4, "little")
    blob = (
        (0x223E9F78).to_bytes(4, "little")
        + b"\x01\x00"
        + tnef_attribute(2, 0x00069002, b"")
        + tnef_attribute(2, 0x0006800F, b"one")
        + tnef_attribute(2, 0x00069005, props)
        + tnef_attribute(2, 0x00069002, b"")
        + tnef_attribute(2, 0x0006800F, b"two")
        + tnef_attribute(2, 0x00069005, fixed)
        + tnef_attribute(2, 0x00069002, b"")
        + tnef_attribute(2, 0x00018010, b"three.txt\x00")
        + tnef_attribute(2, 0x0006800F, b"three")
        + tnef_attribute(2, 0x00069005, cut)
    )
    message = parse(tnef_message(blob))

    assert [("long-name.pdf", b"one"), (None, b"two"), ("three.txt", b"three")] == [
        (a.filename, a.content) for a in message.attachments[1:]
    ]


# --------------------------------------------------------------------------- robustness


def test_deep_nesting_does_not_raise() -> None:
    """Absurdly deep multipart nesting parses without an error."""
    depth = 300
    head = "".join(
        f"--b{i}\nContent-Type: multipart/mixed; boundary=b{i + 1}\n\n" for i in range(depth)
    )
    raw = crlf(f"Content-Type: multipart/mixed; boundary=b0\n\n{head}--b{depth}\n\ntext\n")
    message = parse(raw)

    assert isinstance(message, Message)


def test_parse_failure_gives_text_only_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """If parsing fails outright, the whole message becomes the text; the envelope rules."""

    def broken(*args: object) -> Message:
        raise RecursionError("too deep")

    monkeypatch.setattr(bridge.mime, "_parse", broken)
    message = parse(b"Subject: x\r\n\r\nGr\xfc\xdfe\r\n")

    assert "Subject: x\n\nGrüße\n" == message.text
    assert Address("env@example.com") == message.from_
    assert (Address("rcpt@example.org"),) == message.bcc
    assert () == message.headers


def test_large_message_is_linear() -> None:
    """A 20 MB message with many parts parses with every attachment intact."""
    chunk = base64.encodebytes(bytes(range(256)) * 4096).decode()
    parts = "".join(
        f"--b\nContent-Type: application/octet-stream; name=f{i}.bin\n"
        f"Content-Transfer-Encoding: base64\n\n{chunk}"
        for i in range(15)
    )
    raw = crlf(f"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nbody\n{parts}--b--\n")
    message = parse(raw)

    assert 15 == len(message.attachments)
    assert {hashlib.sha256(bytes(range(256)) * 4096).hexdigest()} == {
        a.sha256 for a in message.attachments
    }


def check_total(raw: bytes) -> None:
    """parse_message returns a JSON-safe, surrogate-free message for `raw`."""
    message = parse(raw)
    document = message_v1(message, include_raw=True)
    json.dumps(document, ensure_ascii=False).encode("utf-8")

    assert raw == message.raw
    assert [] == [s for s in strings_of(message) if FORBIDDEN.search(s)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    """Any byte string parses into a clean message."""
    check_total(raw)


SEEDS = sorted(FIXTURES.glob("*.eml"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 3), st.binary(min_size=1, max_size=12)),
        max_size=8,
    ),
)
def test_mutated_messages_never_raise(seed: Path, edits: list[tuple[float, int, bytes]]) -> None:
    """Real fixtures with bytes inserted, replaced or cut still parse into clean messages."""
    raw = bytearray(seed.read_bytes())
    for where, kind, data in edits:
        pos = int(where * len(raw))
        if kind == 0:
            raw[pos:pos] = data
        elif kind == 1:
            raw[pos : pos + len(data)] = data
        elif kind == 2:
            del raw[pos : pos + len(data)]
        else:
            raw[pos:pos] = b"\r\n" + data + b"\r\n"
    check_total(bytes(raw))
