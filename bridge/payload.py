"""`Message` → the message-v1 JSON document (``bridge/schemas/message-v1.schema.json``).

The document is plain JSON-ready data: strings, numbers, lists, dicts and None. Bytes go
out as standard base64, times as RFC 3339. Key order follows the schema so that the
document reads the same way the schema does.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from bridge.model import Address, Attachment, Message

__all__ = ["SCHEMA_VERSION", "message_v1"]

SCHEMA_VERSION = 1
"""The ``version`` field of the documents this module writes."""


def message_v1(message: Message, *, include_raw: bool = False) -> dict[str, Any]:
    """Build the message-v1 document for one message.

    Args:
        message: The parsed message.
        include_raw: Add ``raw``, the message as received, base64-encoded.

    Returns:
        A dict that validates against message-v1 and serialises with `json.dumps`.
    """
    envelope = message.envelope
    document: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "id": message.id,
        "received_at": _rfc3339(message.received_at),
        "envelope": {
            "mail_from": envelope.mail_from,
            "rcpt_to": list(envelope.rcpt_to),
            "helo": envelope.helo,
            "client_address": envelope.client_address,
            "auth_user": envelope.auth_user,
        },
        "from": _address(message.from_),
        "sender": _address(message.sender),
        "to": _addresses(message.to),
        "cc": _addresses(message.cc),
        "bcc": _addresses(message.bcc),
        "reply_to": _addresses(message.reply_to),
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
        "message_id": message.message_id,
        "in_reply_to": message.in_reply_to,
        "references": list(message.references),
        "date": None if message.date is None else _rfc3339(message.date),
        "headers": [{"name": h.name, "value": h.value} for h in message.headers],
        "attachments": [_attachment(a) for a in message.attachments],
    }
    if include_raw:
        document["raw"] = _base64(message.raw)
    return document


def _rfc3339(moment: datetime) -> str:
    # RFC 3339 needs an offset; a naive time here can only be the bridge's own UTC clock.
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.isoformat()


def _address(address: Address | None) -> dict[str, str | None] | None:
    if address is None:
        return None
    return {"name": address.name, "email": address.email}


def _addresses(addresses: tuple[Address, ...]) -> list[dict[str, str | None]]:
    return [{"name": a.name, "email": a.email} for a in addresses]


def _attachment(attachment: Attachment) -> dict[str, Any]:
    return {
        "filename": attachment.filename,
        "content_type": attachment.content_type,
        "disposition": attachment.disposition,
        "content_id": attachment.content_id,
        "size": attachment.size,
        "sha256": attachment.sha256,
        "content": _base64(attachment.content),
    }


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
