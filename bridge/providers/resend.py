"""Resend: ``POST /emails`` with a JSON body and an ``Idempotency-Key``.

Spec: ``specs/resend/resend.json`` (``SendEmailRequest``); facts in PROVIDERS.md §7.

Recipients: ``to`` is required, so a message whose envelope has no To recipient is sent
as one request per recipient, each To that recipient alone. (``/emails/batch`` would be
one call, but it drops attachments.) Every request carries an ``Idempotency-Key``: the
spool id, with ``-<n>`` appended per copy when there are several, so a re-sent attempt
after a crash or a partial failure is recognised by Resend for 24 hours and not
delivered twice.

Answers: 200 ``{"id"}`` is delivered; 429 (rate limit, daily or monthly quota) is
retried after ``retry-after`` or ``ratelimit-reset``; 409
``concurrent_idempotent_requests`` is retried; 5xx and 408 are retried; every other
status (400/422 validation, 401/403 key or domain problems, 409 key reused with a
different body) is permanent.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from bridge.model import Delivered, Message, Outcome, Retryable
from bridge.providers import jsonmail
from bridge.providers.base import ProviderSettings
from bridge.providers.jsonmail import ApiSettings, JsonMailProvider, format_address

__all__ = ["ResendProvider", "ResendSettings"]

PRODUCTION_URL = "https://api.resend.com"
PATH = "/emails"


class ResendSettings(ApiSettings):
    """`type: resend` settings."""

    api_key: SecretStr


class ResendProvider(JsonMailProvider[ResendSettings]):
    """Sends through Resend's Emails API."""

    settings_model: ClassVar[type[ProviderSettings]] = ResendSettings
    type: ClassVar[str] = "resend"
    # "40 MB per email after base64".
    default_max_message_size: ClassVar[int | None] = 40_000_000
    # `to` is "Max 50"; cc/bcc have no stated cap, so 50 is taken as the total.
    default_max_recipients: ClassVar[int | None] = 50

    def documents(self, message: Message) -> tuple[list[dict[str, Any]], list[str]]:
        """One ``SendEmailRequest`` per copy, and the notes about what they cannot carry."""
        notes = jsonmail.envelope_notes(message)
        sender = jsonmail.require_sender(message)
        recipients, _ = jsonmail.split_recipients(message)

        shared: dict[str, Any] = {}
        shared["subject"] = jsonmail.required_subject(message, notes)
        if message.reply_to:
            shared["reply_to"] = [format_address(a) for a in message.reply_to]
        text, html = jsonmail.required_bodies(message, notes)
        if html is not None:
            shared["html"] = html
        if text is not None:
            shared["text"] = text
        headers, header_notes = jsonmail.custom_headers(message)
        notes += header_notes
        if headers:
            shared["headers"] = dict(headers)
        items = jsonmail.parts(message)
        notes += jsonmail.part_notes(items)
        if items:
            shared["attachments"] = [_attachment(p) for p in items]

        docs = []
        for copy in jsonmail.copies(recipients):
            doc: dict[str, Any] = {
                "from": format_address(sender),
                "to": [format_address(a) for a in copy.to],
            }
            if copy.cc:
                doc["cc"] = [format_address(a) for a in copy.cc]
            if copy.bcc:
                doc["bcc"] = [format_address(a) for a in copy.bcc]
            docs.append(doc | shared)
        return docs, list(dict.fromkeys(notes))

    def build_requests(self, message: Message) -> tuple[httpx.Request, ...]:
        """One POST per copy, each with its own idempotency key."""
        docs, _ = self.documents(message)
        url = (self.settings.base_url or PRODUCTION_URL) + PATH
        requests = []
        for n, doc in enumerate(docs, 1):
            key = message.id if len(docs) == 1 else f"{message.id}-{n}"
            headers = {
                "Authorization": f"Bearer {self.settings.api_key.get_secret_value()}",
                "Content-Type": "application/json",
                # Documented as 1-256 characters; spool ids are far shorter.
                "Idempotency-Key": key[:256],
                "User-Agent": "smtp-bridge",
            }
            requests.append(
                httpx.Request("POST", url, content=jsonmail.json_body(doc), headers=headers)
            )
        return tuple(requests)

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """What this message loses on the way through Resend."""
        return tuple(self.documents(message)[1])

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """200 delivered (body ``id``); 408/429/5xx and concurrent-key 409 retryable."""
        doc = jsonmail.json_document(response)
        status = response.status_code
        if 200 <= status < 300:
            email_id = doc.get("id") if isinstance(doc, dict) else None
            return Delivered(
                status=status, provider_message_id=email_id if isinstance(email_id, str) else None
            )
        name = doc.get("name") if isinstance(doc, dict) else None
        detail = None
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            detail = f"{name}: {doc['message']}" if isinstance(name, str) else doc["message"]
        if status == 409 and name == "concurrent_idempotent_requests":
            # Another attempt with the same key is still in flight: ask again shortly.
            return Retryable(
                reason=jsonmail.reason(response, detail),
                status=status,
                retry_after=_delay(response),
            )
        return jsonmail.classify(response, detail, delay=_delay)


def _attachment(part: jsonmail.Part) -> dict[str, str]:
    # The spec marks `content` as format binary; over JSON it is the base64 text
    # (docs: dashboard/emails/attachments).
    out = {
        "content": part.content_b64,
        "filename": part.filename,
        "content_type": part.content_type,
    }
    if part.content_id is not None:
        out["content_id"] = part.content_id
    return out


def _delay(response: httpx.Response) -> float | None:
    return jsonmail.rate_limit_delay(response, reset_header="ratelimit-reset")
