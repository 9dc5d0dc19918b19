"""The delivery status notification builder: structure, safety and odd originals."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Any

import pytest

from bridge.dsn import build_dsn
from bridge.mime import parse_message
from bridge.model import Envelope

ARRIVAL = datetime(2024, 3, 15, 12, 0, tzinfo=UTC)
NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)
ORIGINAL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <q1.2024@example.com>\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)
PARSER = BytesParser(policy=policy.default)


def make(**overrides: Any) -> bytes:
    """A DSN built from defaults with `overrides`; fails the test when it is None."""
    arguments: dict[str, Any] = {
        "original": ORIGINAL,
        "envelope": Envelope("alice@example.com", ("bob@example.org",), helo="client.example"),
        "reason": 'HTTP 400: {"message":"invalid from"}',
        "status": 400,
        "permanent": True,
        "reporting_mta": "mx.example.net",
        "arrival": ARRIVAL,
        "now": NOW,
        "message_id": "<dsn.0001@mx.example.net>",
    }
    arguments.update(overrides)
    dsn = build_dsn(**arguments)
    assert dsn is not None
    return dsn


def parse(dsn: bytes) -> tuple[EmailMessage, list[EmailMessage]]:
    """The parsed DSN and its top-level parts."""
    message = PARSER.parsebytes(dsn)
    assert isinstance(message, EmailMessage)
    return message, list(message.iter_parts())  # type: ignore[arg-type]


def status_blocks(part: EmailMessage) -> list[dict[str, str]]:
    """The field blocks of a message/delivery-status part: per-message, then per-recipient."""
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [{k: str(v) for k, v in block.items()} for block in blocks if isinstance(block, Message)]


def recipient_blocks(part: EmailMessage) -> list[dict[str, str]]:
    """The per-recipient field blocks of a message/delivery-status part."""
    return status_blocks(part)[1:]


def headers_part_bytes(part: EmailMessage) -> bytes:
    """The decoded bytes of the text/rfc822-headers part."""
    content = part.get_payload(decode=True)
    assert isinstance(content, bytes)
    return content


def assert_crlf_only(dsn: bytes) -> None:
    """Every line ends in CRLF and none is longer than 998 octets."""
    assert dsn.endswith(b"\r\n")
    assert [] == re.findall(rb"[^\r]\n|\r[^\n]", dsn)
    assert [] == [line for line in dsn.split(b"\r\n") if len(line) > 998]


def test_structure_is_a_delivery_status_report() -> None:
    """The DSN is multipart/report with text, delivery-status and rfc822-headers parts."""
    message, parts = parse(make())
    assert "multipart/report" == message.get_content_type()
    assert "delivery-status" == message.get_param("report-type")
    assert ["text/plain", "message/delivery-status", "text/rfc822-headers"] == [
        p.get_content_type() for p in parts
    ]
    assert [] == message.defects


def test_top_level_headers() -> None:
    """From, To, Subject, Auto-Submitted, Date, Message-ID and threading are set."""
    message, _ = parse(make())
    expected = {
        "From": "Mail Delivery System <MAILER-DAEMON@mx.example.net>",
        "Subject": "Undelivered Mail Returned to Sender",
        "Auto-Submitted": "auto-replied",
        "Date": "Wed, 20 Mar 2024 12:00:00 +0000",
        "Message-ID": "<dsn.0001@mx.example.net>",
        "In-Reply-To": "<q1.2024@example.com>",
        "References": "<q1.2024@example.com>",
        "MIME-Version": "1.0",
    }
    assert expected == {name: str(message[name]) for name in expected}
    assert b"\r\nTo: <alice@example.com>\r\n" in make()


def test_postmaster_replaces_mailer_daemon() -> None:
    """A configured postmaster address is the From address."""
    message, _ = parse(make(postmaster="postmaster@example.net"))
    assert "Mail Delivery System <postmaster@example.net>" == str(message["From"])


def test_human_text_names_recipients_and_reason() -> None:
    """The first part says which host, which recipients and why, in UTF-8."""
    _, parts = parse(make(envelope=Envelope("a@example.com", ("bob@example.org", "jürgen@x.de"))))
    text = parts[0].get_content().replace("\r\n", "\n")
    assert text.startswith("This is the mail system at host mx.example.net.\n")
    assert "  <bob@example.org>\n  <jürgen@x.de>\n" in text
    assert 'Reason: HTTP 400: {"message":"invalid from"}\n' in text


def test_permanent_status_fields() -> None:
    """A permanent refusal reports 5.0.0 with the HTTP status in the Diagnostic-Code."""
    envelope = Envelope("a@example.com", ("b@example.org", "c@example.org"), helo="client.example")
    _, parts = parse(make(envelope=envelope))
    per_message = status_blocks(parts[1])[0]
    assert "dns; mx.example.net" == per_message["Reporting-MTA"]
    assert "dns; client.example" == per_message["Received-From-MTA"]
    assert "Fri, 15 Mar 2024 12:00:00 +0000" == per_message["Arrival-Date"]
    expected = [
        {
            "Final-Recipient": f"rfc822; {rcpt}",
            "Action": "failed",
            "Status": "5.0.0",
            "Diagnostic-Code": 'http; 400 HTTP 400: {"message":"invalid from"}',
            "Last-Attempt-Date": "Wed, 20 Mar 2024 12:00:00 +0000",
        }
        for rcpt in ("b@example.org", "c@example.org")
    ]
    assert expected == recipient_blocks(parts[1])


def test_expired_status_fields() -> None:
    """An expiry reports Action failed with 4.4.7; without a status only the reason."""
    _, parts = parse(make(permanent=False, status=None, reason="gave up after 432000s"))
    [block] = recipient_blocks(parts[1])
    assert ("failed", "4.4.7") == (block["Action"], block["Status"])
    assert "http; gave up after 432000s" == block["Diagnostic-Code"]
    assert "Delivery was retried until the message expired" in parts[0].get_content()


def test_null_sender_gets_no_dsn() -> None:
    """A null reverse-path is never answered with a DSN."""
    dsn = build_dsn(
        original=ORIGINAL,
        envelope=Envelope("", ("bob@example.org",)),
        reason="HTTP 400",
        status=400,
        permanent=True,
        reporting_mta="mx.example.net",
        arrival=ARRIVAL,
        now=NOW,
        message_id="<dsn.2@mx.example.net>",
    )
    assert None is dsn


def test_auto_submitted_original_still_gets_dsn() -> None:
    """Auto-generated mail with a real sender is still told that it was lost."""
    original = b"Auto-Submitted: auto-generated\r\nSubject: cron\r\n\r\nout\r\n"
    _, parts = parse(make(original=original))
    assert 3 == len(parts)


@pytest.mark.parametrize(
    "reason",
    [
        "HTTP 400\r\nBcc: evil@example.com",
        "HTTP 400\nFinal-Recipient: rfc822; evil@example.com\n\nAction: delivered",
        "HTTP 400\r\n\r\n--=_dsn_ fake boundary\rStatus: 2.0.0\x00\x1b[31m\u2028\udcc3Bcc: x@y",
    ],
)
def test_reason_cannot_inject_lines(reason: str) -> None:
    """CR, LF and other controls in the reason never start a header or field of their own."""
    dsn = make(reason=reason, envelope=Envelope("a@example.com", ("b@example.org",)))
    message, parts = parse(dsn)
    assert None is message["Bcc"]
    assert 3 == len(parts)
    [block] = recipient_blocks(parts[1])
    assert ["Final-Recipient", "Action", "Status", "Diagnostic-Code", "Last-Attempt-Date"] == list(
        block
    )
    assert ("failed", "5.0.0") == (block["Action"], block["Status"])
    assert_crlf_only(dsn)


def test_long_reason_is_bounded_and_folded() -> None:
    """A huge reason is cut to a bounded Diagnostic-Code folded into short lines."""
    dsn = make(reason="word " * 5000)
    _, parts = parse(dsn)
    [block] = recipient_blocks(parts[1])
    assert block["Diagnostic-Code"].endswith("...")
    assert len(block["Diagnostic-Code"]) < 1000
    status_body = dsn.split(b"Content-Type: message/delivery-status\r\n\r\n")[1].split(b"--=_")[0]
    assert [] == [line for line in status_body.split(b"\r\n") if len(line) > 78]


@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc", "abcd", "abcde"])
def test_cut_never_splits_an_escape(prefix: str) -> None:
    """Bounding an escaped reason or address never leaves half of a \\x{HEX} behind."""
    envelope = Envelope("a@example.com", (prefix + "ü" * 400 + "@example.org",))
    _, parts = parse(make(reason=prefix + "ü" * 400, envelope=envelope))
    [block] = recipient_blocks(parts[1])
    for value in (block["Diagnostic-Code"], block["Final-Recipient"]):
        assert value.endswith("\\x{FC}...")
        assert len(value) <= 910


def test_non_ascii_reason_keeps_report_7bit() -> None:
    """Non-ASCII in the reason is escaped in the report and kept in the human text."""
    dsn = make(reason="Empfänger unbekannt")
    _, parts = parse(dsn)
    [block] = recipient_blocks(parts[1])
    assert "http; 400 Empf\\x{E4}nger unbekannt" == block["Diagnostic-Code"]
    assert "Reason: Empfänger unbekannt" in parts[0].get_content()
    assert dsn.isascii()


def test_smtputf8_sender_and_recipient() -> None:
    """A UTF-8 sender goes raw into To; a UTF-8 recipient uses the RFC 6533 utf-8 type."""
    envelope = Envelope("jörg@example.org", ("jürgen@example.org", "b=c+d@example.org"))
    dsn = make(envelope=envelope)
    _, parts = parse(dsn)
    received = parse_message(dsn, Envelope("", ("jörg@example.org",)), id="d", received_at=NOW)
    assert ["jörg@example.org"] == [address.email for address in received.to]
    assert "\r\nTo: <jörg@example.org>\r\n".encode() in dsn
    assert [
        "utf-8; j\\x{FC}rgen@example.org",
        "rfc822; b=c+d@example.org",
    ] == [block["Final-Recipient"] for block in recipient_blocks(parts[1])]
    assert_crlf_only(dsn)


def test_bare_lf_original_headers_become_crlf() -> None:
    """A bare-LF original gives its header block with CRLF, body left out."""
    original = b"From: nas@example.com\nSubject: Backup\n  finished\n\nJob: nightly\n"
    _, parts = parse(make(original=original))
    assert b"From: nas@example.com\r\nSubject: Backup\r\n  finished\r\n" == headers_part_bytes(
        parts[2]
    )


def test_header_only_original() -> None:
    """An original that is only headers, without a final newline, is attached whole."""
    _, parts = parse(make(original=b"Subject: only headers\r\nX-A: 1"))
    assert b"Subject: only headers\r\nX-A: 1\r\n" == headers_part_bytes(parts[2])


def test_original_without_separator() -> None:
    """Without a blank line the header block ends at the first line that is no field."""
    original = b"Subject: Weekly report\r\nMessage-ID: <w13@example.com>\r\nHello team,\r\nbye\r\n"
    message, parts = parse(make(original=original))
    assert b"Subject: Weekly report\r\nMessage-ID: <w13@example.com>\r\n" == headers_part_bytes(
        parts[2]
    )
    assert "<w13@example.com>" == str(message["In-Reply-To"])


def test_mbox_from_line_is_skipped() -> None:
    """An mbox 'From ' envelope line is not a header and is left out."""
    original = b"From alice@example.com Fri Mar 15 12:00:00 2024\nSubject: s\n\nb\n"
    _, parts = parse(make(original=original))
    assert b"Subject: s\r\n" == headers_part_bytes(parts[2])


@pytest.mark.parametrize(
    "original",
    [b"", b"\x00\xff\xfe binary junk\r\n\r\n", b"\r\n\r\nbody only", b" leading space: x\r\n"],
)
def test_no_header_lines_means_no_headers_part(original: bytes) -> None:
    """Input without any header line gives a DSN with just the text and the report."""
    dsn = make(original=original)
    message, parts = parse(dsn)
    assert ["text/plain", "message/delivery-status"] == [p.get_content_type() for p in parts]
    assert None is message["In-Reply-To"]
    assert_crlf_only(dsn)


@pytest.mark.parametrize(
    ("header", "charset"),
    [
        ("Subject: Grüße".encode(), "utf-8"),
        (b"Subject: Gr\xfc\xdfe", None),
        (b"X-Long: " + b"a" * 2000, "utf-8"),
        (b"X-CR: a\rb", "utf-8"),
    ],
)
def test_unclean_headers_are_quoted_printable(header: bytes, charset: str | None) -> None:
    """8-bit bytes, overlong lines and bare CR are kept exactly, in quoted-printable."""
    original = b"From: a@example.com\r\n" + header + b"\r\n\r\nbody\r\n"
    dsn = make(original=original)
    _, parts = parse(dsn)
    assert "quoted-printable" == parts[2]["Content-Transfer-Encoding"]
    assert charset == parts[2].get_param("charset")
    assert original.split(b"\r\n\r\n")[0] + b"\r\n" == headers_part_bytes(parts[2])
    assert dsn.split(b"\r\n\r\n", 1)[1].isascii()
    assert_crlf_only(dsn)


def test_clean_headers_are_attached_as_they_are() -> None:
    """A 7-bit header block is attached unencoded."""
    dsn = make()
    assert None is parse(dsn)[1][2]["Content-Transfer-Encoding"]
    assert b"\r\n\r\n" + ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n\r\n--=_dsn_" in dsn


def test_header_block_of_a_huge_original_is_bounded() -> None:
    """A header block beyond the cap is cut at a line boundary and the body never read."""
    original = b"".join(b"X-H%05d: %s\r\n" % (i, b"v" * 50) for i in range(5000))
    original += b"\r\n" + b"x" * 10_000_000
    attached = headers_part_bytes(parse(make(original=original))[1][2])
    assert 60 * 1024 < len(attached) <= 64 * 1024
    assert attached.endswith(b"v\r\n")
    assert original.startswith(attached)


def test_output_is_deterministic() -> None:
    """The same input gives the same bytes; another message id another boundary."""
    assert make() == make()
    first, second = parse(make())[0], parse(make(message_id="<dsn.2@mx>"))[0]
    assert first.get_boundary() != second.get_boundary()


def test_boundary_avoids_content() -> None:
    """An original that contains the boundary gets another one and still parses."""
    boundary = parse(make())[0].get_boundary()
    assert boundary is not None
    original = f"X-Trap: --{boundary}\r\n\r\n".encode()
    message, parts = parse(make(original=original))
    assert boundary != message.get_boundary()
    assert 3 == len(parts)
    assert original.removesuffix(b"\r\n") == headers_part_bytes(parts[2])


def test_dates_keep_their_offset() -> None:
    """Date and Arrival-Date are written in the offset of the datetimes given."""
    cet = timezone(timedelta(hours=1))
    message, parts = parse(make(now=NOW.astimezone(cet), arrival=ARRIVAL.astimezone(cet)))
    assert "Wed, 20 Mar 2024 13:00:00 +0100" == str(message["Date"])
    assert "Fri, 15 Mar 2024 13:00:00 +0100" == status_blocks(parts[1])[0]["Arrival-Date"]


def test_naive_datetime_is_refused() -> None:
    """A naive datetime is a caller error."""
    with pytest.raises(ValueError, match="timezone-aware"):
        make(now=datetime(2024, 3, 20, 12, 0))


def test_project_parser_reads_it_like_a_bounce() -> None:
    """bridge.mime sees the subject, the MAILER-DAEMON sender, the text and 2 attachments."""
    dsn = make()
    message = parse_message(dsn, Envelope("", ("alice@example.com",)), id="dsn-1", received_at=NOW)
    assert "Undelivered Mail Returned to Sender" == message.subject
    assert ("MAILER-DAEMON@mx.example.net", "Mail Delivery System") == (
        message.from_.email if message.from_ else None,
        message.from_.name if message.from_ else None,
    )
    assert message.text is not None
    assert message.text.startswith("This is the mail system at host mx.example.net.")
    assert ["message/delivery-status", "text/rfc822-headers"] == [
        a.content_type for a in message.attachments
    ]
