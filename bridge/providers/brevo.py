"""Brevo (ex-Sendinblue) transactional email: ``POST /v3/smtp/email`` with a JSON body.

Spec: ``specs/brevo/swagger_definition_v3.yml`` (``sendSmtpEmail``); facts in
PROVIDERS.md §8.

Recipients: ``to`` is required (``messageVersions`` is for templated batches, not for
one SMTP message), so a message whose envelope has no To recipient is sent as one
request per recipient, each To that recipient alone. Each request carries an
idempotency key, the spool id (``-<n>`` per copy when there are several), as the
``idempotencyKey`` entry of the ``headers`` object, where Brevo's spec puts it.

What the API cannot carry: inline (cid) images, since attachments have no content-id
field (they are sent as ordinary attachments); attachment content types, which Brevo
derives from the file name and its extension allow-list; more than one Reply-To; names
over 70 characters.

Answers: 201 (202 when scheduled) is delivered with ``messageId``; 429 is retried after
``x-sib-ratelimit-reset``; 408 and 5xx are retried; every other 4xx (400 invalid or
missing parameter, 401 key, 402 out of credit, 403 permission) is permanent.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from bridge.model import Address, Delivered, Message, Outcome
from bridge.providers import jsonmail
from bridge.providers.base import ProviderSettings
from bridge.providers.jsonmail import ApiSettings, JsonMailProvider

__all__ = ["BrevoProvider", "BrevoSettings"]

PRODUCTION_URL = "https://api.brevo.com"
PATH = "/v3/smtp/email"
MAX_NAME = 70

# The spec's attachment extension allow-list (`sendSmtpEmail.attachment` description).
_ALLOWED = """
    xlsx xls ods docx docm doc csv pdf txt gif jpg jpeg png tif tiff rtf bmp cgm css shtml
    html htm zip xml ppt pptx tar ez ics mobi msg pub eps odt mp3 m4a m4v wma ogg flac wav
    aif aifc aiff mp4 mov avi mkv mpeg mpg wmv pkpass xlsm
"""
ALLOWED_EXTENSIONS = frozenset(_ALLOWED.split())


class BrevoSettings(ApiSettings):
    """`type: brevo` settings."""

    api_key: SecretStr


class BrevoProvider(JsonMailProvider[BrevoSettings]):
    """Sends through Brevo's transactional email API."""

    settings_model: ClassVar[type[ProviderSettings]] = BrevoSettings
    type: ClassVar[str] = "brevo"
    # "Transactional email ≤ 20 MB including attachments" (help centre).
    default_max_message_size: ClassVar[int | None] = 20_000_000
    # 99 recipients per message; the spec's 2000 counts all messageVersions together.
    default_max_recipients: ClassVar[int | None] = 99

    def documents(self, message: Message) -> tuple[list[dict[str, Any]], list[str]]:
        """One ``sendSmtpEmail`` per copy, and the notes about what they cannot carry."""
        notes = jsonmail.envelope_notes(message)
        sender = jsonmail.require_sender(message)
        recipients, _ = jsonmail.split_recipients(message)

        def who(addr: Address) -> dict[str, str]:
            out = {"email": addr.email}
            name = jsonmail.clean_name(addr.name)
            if name is not None and len(name) > MAX_NAME:
                notes.append(f"display name of {addr.email} cut to {MAX_NAME} characters")
                name = name[:MAX_NAME].rstrip()
            if name is not None:
                out["name"] = name
            return out

        shared: dict[str, Any] = {}
        if message.reply_to:
            shared["replyTo"] = who(message.reply_to[0])
            if len(message.reply_to) > 1:
                notes.append("Reply-To addresses after the first (the API takes one)")
        shared["subject"] = jsonmail.required_subject(message, notes)
        text, html = jsonmail.required_bodies(message, notes)
        if html is not None:
            shared["htmlContent"] = html
        if text is not None:
            shared["textContent"] = text
        items = jsonmail.parts(message)
        notes += jsonmail.part_notes(items)
        for part in items:
            if part.inline:
                notes.append(f"inline image {part.filename} sent as an attachment (no cid)")
            extension = part.filename.rpartition(".")[2].lower() if "." in part.filename else ""
            if extension not in ALLOWED_EXTENSIONS:
                notes.append(f"attachment {part.filename}: extension not on Brevo's allow-list")
        if items:
            shared["attachment"] = [{"content": p.content_b64, "name": p.filename} for p in items]
        headers, header_notes = jsonmail.custom_headers(message)
        notes += header_notes

        copies = jsonmail.copies(recipients)
        docs = []
        for n, copy in enumerate(copies, 1):
            doc: dict[str, Any] = {"sender": who(sender), "to": [who(a) for a in copy.to]}
            if copy.cc:
                doc["cc"] = [who(a) for a in copy.cc]
            if copy.bcc:
                doc["bcc"] = [who(a) for a in copy.bcc]
            key = message.id if len(copies) == 1 else f"{message.id}-{n}"
            docs.append(doc | shared | {"headers": {**dict(headers), "idempotencyKey": key}})
        return docs, list(dict.fromkeys(notes))

    def build_requests(self, message: Message) -> tuple[httpx.Request, ...]:
        """One POST per copy."""
        docs, _ = self.documents(message)
        url = (self.settings.base_url or PRODUCTION_URL) + PATH
        headers = {
            "api-key": self.settings.api_key.get_secret_value(),
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": "smtp-bridge",
        }
        return tuple(
            httpx.Request("POST", url, content=jsonmail.json_body(doc), headers=headers)
            for doc in docs
        )

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """What this message loses on the way through Brevo."""
        return tuple(self.documents(message)[1])

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """2xx delivered (``messageId``); 408/429/5xx retryable; other 4xx permanent."""
        doc = jsonmail.json_document(response)
        status = response.status_code
        if 200 <= status < 300:
            ids: list[str] = []
            if isinstance(doc, dict):
                if isinstance(doc.get("messageId"), str):
                    ids.append(doc["messageId"])
                if isinstance(doc.get("messageIds"), list):
                    ids += [i for i in doc["messageIds"] if isinstance(i, str)]
            return Delivered(status=status, provider_message_id=",".join(ids) or None)
        detail = None
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            code = doc.get("code")
            detail = f"{code}: {doc['message']}" if isinstance(code, str) else doc["message"]
        return jsonmail.classify(response, detail, delay=_delay)


def _delay(response: httpx.Response) -> float | None:
    return jsonmail.rate_limit_delay(response, reset_header="x-sib-ratelimit-reset")
