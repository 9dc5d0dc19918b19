"""Helpers for the raw-MIME adapter tests: `Message` values built by hand, form parsing."""

from __future__ import annotations

from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from typing import Any

import httpx

from bridge.model import Address, Envelope, Message

PARSER = BytesParser(policy=policy.default)

#: To Anna, Cc Ben, a blind copy for Carl (only in the envelope), and a Bcc header that
#: must never reach the API.
RAW = (
    b"From: Harness Sender <sender@example.com>\r\n"
    b"To: Anna Alpha <anna@example.org>\r\n"
    b"Cc: Ben Beta <ben@example.org>\r\n"
    b"Bcc: carl@example.net\r\n"
    b"Subject: Three recipients\r\n"
    b"Date: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
    b"Message-ID: <three.1@provider-check.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"\r\n"
    b"To Anna, Cc Ben, and a blind copy for Carl.\r\n"
)
RCPTS = ("anna@example.org", "ben@example.org", "carl@example.net")


def make_message(
    raw: bytes = RAW,
    rcpt_to: tuple[str, ...] = RCPTS,
    mail_from: str = "sender@example.com",
    *,
    smtputf8: bool = False,
) -> Message:
    """A `Message` built directly (the MIME parser is not under test here)."""
    parsed = PARSER.parsebytes(raw)
    frm = parsed["From"].addresses[0] if parsed["From"] else None
    return Message(
        id="01JTESTSPOOLID0000000000000",
        received_at=datetime(2026, 12, 3, 12, 0, 1, tzinfo=UTC),
        envelope=Envelope(mail_from=mail_from, rcpt_to=rcpt_to, smtputf8=smtputf8),
        from_=Address(frm.addr_spec, frm.display_name or None) if frm else None,
        sender=None,
        to=(),
        cc=(),
        bcc=(),
        reply_to=(),
        subject=str(parsed["Subject"]) if parsed["Subject"] else None,
        text=None,
        html=None,
        message_id=str(parsed["Message-ID"]) if parsed["Message-ID"] else None,
        in_reply_to=None,
        references=(),
        date=None,
        headers=(),
        attachments=(),
        raw=raw,
    )


def parse_form(request: httpx.Request) -> list[tuple[str, str | None, str | None, bytes]]:
    """multipart/form-data fields as (name, filename, content type, exact bytes)."""
    body = request.read()
    ctype = request.headers["content-type"]
    head = PARSER.parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode(), headersonly=True)
    delimiter = b"--" + str(head.get_param("boundary")).encode()
    chunks = body.split(b"\r\n" + delimiter)
    assert chunks[0].startswith(delimiter)
    assert chunks[-1].startswith(b"--")
    fields = []
    for chunk in [chunks[0][len(delimiter) :], *chunks[1:-1]]:
        part_head, _, data = chunk[2:].partition(b"\r\n\r\n")
        part = PARSER.parsebytes(part_head + b"\r\n\r\n", headersonly=True)
        name = part.get_param("name", header="content-disposition")
        content_type = part.get_content_type() if part["Content-Type"] else None
        fields.append((str(name), part.get_filename(), content_type, data))
    return fields


def response(status: int, body: Any = None, **headers: str) -> httpx.Response:
    """A response as the API would send it: JSON `body`, or raw bytes/str as given."""
    if isinstance(body, dict | list):
        return httpx.Response(status, json=body, headers=headers)
    content = body.encode() if isinstance(body, str) else (body or b"")
    return httpx.Response(status, content=content, headers=headers)
