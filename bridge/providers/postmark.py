"""Postmark: ``POST /email`` (``/email/batch`` for per-recipient copies) with JSON bodies.

Spec: ``specs/postmark/postmark-server-swagger2.yml`` (``SendEmailRequest``; the file
predates ``MessageStream``, documented on postmarkapp.com); facts in PROVIDERS.md §3.

Recipients: To/Cc/Bcc are comma-separated address strings. ``To`` is required, so a
message whose envelope has no To recipient goes through ``/email/batch`` as one message
per recipient, each To that recipient alone: still one HTTP call.

Inline images: an attachment with ``ContentID`` set to ``cid:<content-id>``, the form of
Postmark's own examples (whether the bare id also works is unverified, PROVIDERS.md §13).

Answers: 200 with ``ErrorCode: 0`` is delivered (provider id ``MessageID``); a batch is
read item by item. 422 carries an ``ErrorCode``: 100 (maintenance) and 429 (rate limit)
are retried, every other code (300 invalid request, 406 inactive recipient, 411
forbidden attachment, ...) is permanent. HTTP 408, 429 and 5xx are retried; 401, 404,
413 are permanent.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from bridge.model import Address, Delivered, Message, Outcome, Permanent, Retryable
from bridge.providers import jsonmail
from bridge.providers.base import ProviderSettings, parse_retry_after
from bridge.providers.jsonmail import ApiSettings, JsonMailProvider, Recipients, format_address

__all__ = ["PostmarkProvider", "PostmarkSettings"]

PRODUCTION_URL = "https://api.postmarkapp.com"
#: ErrorCodes that say "not now" rather than "never" (Postmark API overview error table).
RETRYABLE_CODES = frozenset({100, 429})


class PostmarkSettings(ApiSettings):
    """`type: postmark` settings.

    `message_stream` names the transactional stream to send on (Postmark's default is
    ``outbound``). The server token ``POSTMARK_API_TEST`` validates without sending.
    """

    server_token: SecretStr
    message_stream: str | None = None


class PostmarkProvider(JsonMailProvider[PostmarkSettings]):
    """Sends through Postmark's Email API."""

    settings_model: ClassVar[type[ProviderSettings]] = PostmarkSettings
    type: ClassVar[str] = "postmark"
    # "10 MB total message incl. attachments, measured after base64".
    default_max_message_size: ClassVar[int | None] = 10_000_000
    # "Max 50" recipients (To+Cc+Bcc treated as one total, PROVIDERS.md §3).
    default_max_recipients: ClassVar[int | None] = 50

    def documents(self, message: Message) -> tuple[list[dict[str, Any]], list[str]]:
        """One ``SendEmailRequest`` per copy, and the notes about what they cannot carry."""
        notes = jsonmail.envelope_notes(message)
        sender = jsonmail.require_sender(message)
        recipients, _ = jsonmail.split_recipients(message)

        shared: dict[str, Any] = {"From": format_address(sender)}
        if message.subject:
            shared["Subject"] = message.subject
        text, html = jsonmail.required_bodies(message, notes)
        if text is not None:
            shared["TextBody"] = text
        if html is not None:
            shared["HtmlBody"] = html
        if message.reply_to:
            shared["ReplyTo"] = ", ".join(format_address(a) for a in message.reply_to)
        headers, header_notes = jsonmail.custom_headers(message, repeatable=True)
        notes += header_notes
        if headers:
            shared["Headers"] = [{"Name": n, "Value": v} for n, v in headers]
        items = jsonmail.parts(message)
        notes += jsonmail.part_notes(items)
        if items:
            shared["Attachments"] = [_attachment(p) for p in items]
        if self.settings.message_stream:
            shared["MessageStream"] = self.settings.message_stream

        docs = [_addressed(copy, shared) for copy in jsonmail.copies(recipients)]
        return docs, list(dict.fromkeys(notes))

    def build_requests(self, message: Message) -> tuple[httpx.Request, ...]:
        """One request: ``/email`` for a single copy, ``/email/batch`` for several."""
        docs, _ = self.documents(message)
        base = self.settings.base_url or PRODUCTION_URL
        if len(docs) == 1:
            url, body = base + "/email", jsonmail.json_body(docs[0])
        else:
            url, body = base + "/email/batch", jsonmail.json_body(docs)
        headers = {
            "X-Postmark-Server-Token": self.settings.server_token.get_secret_value(),
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": "smtp-bridge",
        }
        return (httpx.Request("POST", url, content=body, headers=headers),)

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """What this message loses on the way through Postmark's API."""
        return tuple(self.documents(message)[1])

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """ErrorCode 0 delivered; codes 100/429 and HTTP 408/429/5xx retryable; else permanent."""
        doc = jsonmail.json_document(response)
        status = response.status_code
        if 200 <= status < 300:
            if isinstance(doc, list):
                return jsonmail.combine_items([_item(i, status) for i in doc], status)
            return _item(doc, status)
        if isinstance(doc, dict) and isinstance(doc.get("ErrorCode"), int):
            code = doc["ErrorCode"]
            detail = f"ErrorCode {code}: {doc.get('Message', '')}".rstrip(": ")
            if code in RETRYABLE_CODES:
                return Retryable(
                    reason=jsonmail.reason(response, detail),
                    status=status,
                    retry_after=parse_retry_after(response),
                )
            return jsonmail.classify(response, detail)
        return jsonmail.classify(response, None)


def _addressed(copy: Recipients, shared: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"From": shared["From"], "To": _joined(copy.to)}
    if copy.cc:
        doc["Cc"] = _joined(copy.cc)
    if copy.bcc:
        doc["Bcc"] = _joined(copy.bcc)
    doc.update((k, v) for k, v in shared.items() if k != "From")
    return doc


def _joined(addresses: tuple[Address, ...]) -> str:
    return ", ".join(format_address(a) for a in addresses)


def _attachment(part: jsonmail.Part) -> dict[str, str]:
    out = {"Name": part.filename, "Content": part.content_b64, "ContentType": part.content_type}
    if part.content_id is not None:
        out["ContentID"] = f"cid:{part.content_id}"
    return out


def _item(doc: Any, status: int) -> Outcome:
    """One ``SendEmailResponse``: ErrorCode 0 is accepted, anything else is classified."""
    if not isinstance(doc, dict):
        # A 2xx without a readable body: Postmark took the message.
        return Delivered(status=status)
    code = doc.get("ErrorCode", 0)
    if code == 0:
        message_id = doc.get("MessageID")
        return Delivered(status=status, provider_message_id=message_id or None)
    to = f"{doc['To']}: " if isinstance(doc.get("To"), str) and doc["To"] else ""
    why = f"{to}ErrorCode {code}: {doc.get('Message', '')}".rstrip(": ")
    if code in RETRYABLE_CODES:
        return Retryable(reason=why, status=status)
    return Permanent(reason=why, status=status)
