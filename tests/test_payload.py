"""`bridge.payload.message_v1`: the exact message-v1 document for a Message."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from bridge.model import Address, Attachment, Envelope, Header, Message
from bridge.payload import SCHEMA_VERSION, message_v1
from tests.casefiles import CASES_DIR

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "bridge" / "schemas" / "message-v1.schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)


def make_message(**changes: Any) -> Message:
    """A fully populated message; keyword arguments replace fields."""
    fields: dict[str, Any] = {
        "id": "q-42",
        "received_at": datetime(2024, 4, 8, 12, 0, 1, tzinfo=UTC),
        "envelope": Envelope(
            mail_from="",
            rcpt_to=("jürgen@example.org", "hidden@example.net"),
            helo="mx.example.net",
            client_address="192.0.2.7",
            auth_user="scanner",
        ),
        "from_": Address("MAILER-DAEMON@mx.example.net", "Mail Delivery System"),
        "sender": None,
        "to": (Address("jürgen@example.org", "Jürgen Groß"),),
        "cc": (Address("cc@example.org"),),
        "bcc": (Address("hidden@example.net"),),
        "reply_to": (),
        "subject": "Grüße – €",
        "text": "Hallo\n",
        "html": None,
        "message_id": "<m1@example.net>",
        "in_reply_to": None,
        "references": ("<r1@x>", "<r2@x>"),
        "date": datetime(2024, 3, 19, 14, 0, tzinfo=timezone(timedelta(hours=1))),
        "headers": (Header("Subject", "Grüße – €"), Header("X-Empty", "")),
        "attachments": (
            Attachment("logo.png", "image/png", "inline", "logo@x", b"\x89PNG"),
            Attachment(None, "message/delivery-status", "attachment", None, b""),
        ),
        "raw": b"Subject: x\r\n\r\nHallo\r\n",
    }
    fields.update(changes)
    return Message(**fields)


def test_document_is_exact() -> None:
    """Every field maps to its message-v1 key with the documented encoding."""
    document = message_v1(make_message())

    assert {
        "version": 1,
        "id": "q-42",
        "received_at": "2024-04-08T12:00:01+00:00",
        "envelope": {
            "mail_from": "",
            "rcpt_to": ["jürgen@example.org", "hidden@example.net"],
            "helo": "mx.example.net",
            "client_address": "192.0.2.7",
            "auth_user": "scanner",
        },
        "from": {"name": "Mail Delivery System", "email": "MAILER-DAEMON@mx.example.net"},
        "sender": None,
        "to": [{"name": "Jürgen Groß", "email": "jürgen@example.org"}],
        "cc": [{"name": None, "email": "cc@example.org"}],
        "bcc": [{"name": None, "email": "hidden@example.net"}],
        "reply_to": [],
        "subject": "Grüße – €",
        "text": "Hallo\n",
        "html": None,
        "message_id": "<m1@example.net>",
        "in_reply_to": None,
        "references": ["<r1@x>", "<r2@x>"],
        "date": "2024-03-19T14:00:00+01:00",
        "headers": [
            {"name": "Subject", "value": "Grüße – €"},
            {"name": "X-Empty", "value": ""},
        ],
        "attachments": [
            {
                "filename": "logo.png",
                "content_type": "image/png",
                "disposition": "inline",
                "content_id": "logo@x",
                "size": 4,
                "sha256": hashlib.sha256(b"\x89PNG").hexdigest(),
                "content": "iVBORw==",
            },
            {
                "filename": None,
                "content_type": "message/delivery-status",
                "disposition": "attachment",
                "content_id": None,
                "size": 0,
                "sha256": hashlib.sha256(b"").hexdigest(),
                "content": "",
            },
        ],
    } == document


def test_document_validates_against_schema() -> None:
    """The document passes the message-v1 JSON Schema with format checks."""
    errors = [e.message for e in VALIDATOR.iter_errors(message_v1(make_message()))]

    assert [] == errors


def test_raw_only_on_request() -> None:
    """``raw`` is present, as base64 of the bytes received, only with include_raw."""
    message = make_message()
    with_raw = message_v1(message, include_raw=True)

    assert "raw" not in message_v1(message)
    assert message.raw == base64.b64decode(with_raw["raw"], validate=True)
    assert [] == [e.message for e in VALIDATOR.iter_errors(with_raw)]


def test_null_date_and_naive_received_at() -> None:
    """A missing date is null; a naive received_at is taken as UTC."""
    document = message_v1(make_message(date=None, received_at=datetime(2024, 4, 8, 12, 0)))

    assert None is document["date"]
    assert "2024-04-08T12:00:00+00:00" == document["received_at"]
    assert [] == [e.message for e in VALIDATOR.iter_errors(document)]


def test_no_sender_at_all() -> None:
    """A message without any sender carries from null and still validates."""
    document = message_v1(make_message(from_=None, sender=Address("s@example.com")))

    assert None is document["from"]
    assert {"name": None, "email": "s@example.com"} == document["sender"]
    assert [] == [e.message for e in VALIDATOR.iter_errors(document)]


def test_document_is_json_utf8() -> None:
    """The document serialises to UTF-8 JSON and reads back equal."""
    document = message_v1(make_message(), include_raw=True)
    encoded = json.dumps(document, ensure_ascii=False).encode("utf-8")

    assert document == json.loads(encoded)


def test_keys_follow_schema() -> None:
    """The document uses only keys the schema defines, and all the required ones."""
    document = message_v1(make_message(), include_raw=True)

    assert set(SCHEMA["properties"]) == set(document)
    assert set(SCHEMA["required"]) <= set(document)
    assert SCHEMA_VERSION == SCHEMA["properties"]["version"]["const"]


def test_packaged_schema_matches_shared() -> None:
    """The schema copy shipped in the package is the shared one, byte for byte."""
    shared = CASES_DIR.parent / "schemas" / "message-v1.schema.json"
    if not shared.is_file():
        pytest.skip(f"{shared} is not present")

    assert shared.read_bytes() == SCHEMA_PATH.read_bytes()
