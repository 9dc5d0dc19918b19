"""Mailjet Send API v3.1: ``POST /v3.1/send`` with a JSON ``Messages`` array.

No official machine-readable spec exists; facts from Mailjet's own docs source
(mailjet/api-documentation ``guides/_send-api.md``), summarised in PROVIDERS.md §9.

Recipients: each message needs at least one ``To``, so a message whose envelope has no
To recipient becomes one entry of ``Messages`` per recipient, each To that recipient
alone: still one HTTP call (at most 50 recipients, so at most 50 messages).

Inline images go in ``InlinedAttachments`` with their ``ContentID``; the HTML keeps its
``cid:`` references. Headers Mailjet sets itself or has a property for (send-0011) are
not passed through. ``CustomID`` carries the spool id so events can be correlated.

Answers: every message in the body has its own ``Status``. All ``success``: delivered,
recording each recipient's ``MessageID`` (the id Mailjet's events and message API
use). A refused message is permanent unless its errors say 429 or 5xx; a call with no
``Messages`` is classified by its HTTP status (401 bad key, 400 malformed: permanent;
429 and 5xx, whose bodies may be plain text or HTML: retried).
"""

from __future__ import annotations

import base64
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from bridge.model import Address, Delivered, Message, Outcome, Permanent, Retryable
from bridge.providers import jsonmail
from bridge.providers.base import ProviderSettings
from bridge.providers.jsonmail import ApiSettings, JsonMailProvider

__all__ = ["MailjetProvider", "MailjetSettings"]

PRODUCTION_URL = "https://api.mailjet.com"
PATH = "/v3.1/send"
MAX_SUBJECT = 255

# send-0011: headers with a dedicated property, or that Mailjet sets itself.
FORBIDDEN_HEADERS = frozenset(
    {
        "from",
        "sender",
        "subject",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "return-path",
        "delivered-to",
        "dkim-signature",
        "domainkey-status",
        "received",
        "received-spf",
        "authentication-results",
        "date",
        "message-id",
        "list-id",
        "x-mailer",
        "user-agent",
        "x-csa-complaints",
        "x-feedback-id",
    }
)
FORBIDDEN_PREFIXES = ("x-mj-", "x-mailjet-")


class MailjetSettings(ApiSettings):
    """`type: mailjet` settings: the API key pair; `sandbox_mode` validates only."""

    api_key: SecretStr
    secret_key: SecretStr
    sandbox_mode: bool = False


class MailjetProvider(JsonMailProvider[MailjetSettings]):
    """Sends through Mailjet's Send API v3.1."""

    settings_model: ClassVar[type[ProviderSettings]] = MailjetSettings
    type: ClassVar[str] = "mailjet"
    # Attachments and inline parts "≤ 15 MB total"; the raw message bounds them.
    default_max_message_size: ClassVar[int | None] = 15_000_000
    # 50 recipients, counted over To, Cc and Bcc of the whole call.
    default_max_recipients: ClassVar[int | None] = 50

    def document(self, message: Message) -> tuple[dict[str, Any], list[str]]:
        """The Send API body and the notes about what it cannot carry."""
        notes = jsonmail.envelope_notes(message)
        sender = jsonmail.require_sender(message)
        recipients, _ = jsonmail.split_recipients(message)

        shared: dict[str, Any] = {}
        if message.reply_to:
            shared["ReplyTo"] = _contact(message.reply_to[0])
            if len(message.reply_to) > 1:
                notes.append("Reply-To addresses after the first (the API takes one)")
        if message.subject:
            shared["Subject"] = message.subject[:MAX_SUBJECT]
            if len(message.subject) > MAX_SUBJECT:
                notes.append(f"subject cut to {MAX_SUBJECT} characters")
        text, html = jsonmail.required_bodies(message, notes)
        if text is not None:
            shared["TextPart"] = text
        if html is not None:
            shared["HTMLPart"] = html
        items = jsonmail.parts(message)
        notes += jsonmail.part_notes(items)
        attachments = [_file(p) for p in items if not p.inline]
        inlined = [_file(p) | {"ContentID": p.content_id} for p in items if p.inline]
        if attachments:
            shared["Attachments"] = attachments
        if inlined:
            shared["InlinedAttachments"] = inlined
        headers, header_notes = jsonmail.custom_headers(
            message, forbidden=FORBIDDEN_HEADERS, forbidden_prefixes=FORBIDDEN_PREFIXES
        )
        notes += header_notes
        if headers:
            shared["Headers"] = dict(headers)
        shared["CustomID"] = message.id

        messages = []
        for copy in jsonmail.copies(recipients):
            entry: dict[str, Any] = {
                "From": _contact(sender),
                "To": [_contact(a) for a in copy.to],
            }
            if copy.cc:
                entry["Cc"] = [_contact(a) for a in copy.cc]
            if copy.bcc:
                entry["Bcc"] = [_contact(a) for a in copy.bcc]
            messages.append(entry | shared)
        doc: dict[str, Any] = {"Messages": messages}
        if self.settings.sandbox_mode:
            doc["SandboxMode"] = True
        return doc, list(dict.fromkeys(notes))

    def build_requests(self, message: Message) -> tuple[httpx.Request, ...]:
        """One request: every copy is an entry of ``Messages``."""
        doc, _ = self.document(message)
        url = (self.settings.base_url or PRODUCTION_URL) + PATH
        pair = (
            f"{self.settings.api_key.get_secret_value()}:"
            f"{self.settings.secret_key.get_secret_value()}"
        )
        headers = {
            "Authorization": "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii"),
            "Content-Type": "application/json",
            "User-Agent": "smtp-bridge",
        }
        return (httpx.Request("POST", url, content=jsonmail.json_body(doc), headers=headers),)

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """What this message loses on the way through the Send API."""
        return tuple(self.document(message)[1])

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """Each message's Status decides; without ``Messages``, the HTTP status does."""
        doc = jsonmail.json_document(response)
        status = response.status_code
        messages = doc.get("Messages") if isinstance(doc, dict) else None
        if isinstance(messages, list) and messages:
            return jsonmail.combine_items([_message(m, status) for m in messages], status)
        if 200 <= status < 300:
            return Delivered(status=status)
        detail = None
        if isinstance(doc, dict) and isinstance(doc.get("ErrorMessage"), str):
            code = doc.get("ErrorCode") or doc.get("ErrorIdentifier")
            detail = f"{code}: {doc['ErrorMessage']}" if code else doc["ErrorMessage"]
        return jsonmail.classify(response, detail)


def _contact(addr: Address) -> dict[str, str]:
    out = {"Email": addr.email}
    name = jsonmail.clean_name(addr.name)
    if name is not None:
        out["Name"] = name
    return out


def _file(part: jsonmail.Part) -> dict[str, Any]:
    return {
        "ContentType": part.content_type,
        "Filename": part.filename,
        "Base64Content": part.content_b64,
    }


def _message(entry: Any, status: int) -> Outcome:
    """One element of the response's ``Messages`` array."""
    if not isinstance(entry, dict):
        return Permanent(reason="unreadable message result", status=status)
    if entry.get("Status") == "success":
        ids = [
            str(r["MessageID"])
            for role in ("To", "Cc", "Bcc")
            for r in entry.get(role) or []
            if isinstance(r, dict) and r.get("MessageID") is not None
        ]
        return Delivered(status=status, provider_message_id=",".join(ids) or None)
    errors = [e for e in entry.get("Errors") or [] if isinstance(e, dict)]
    texts = []
    transient = False
    for err in errors:
        code = err.get("ErrorCode") or err.get("ErrorIdentifier") or ""
        related = ", ".join(r for r in err.get("ErrorRelatedTo") or [] if isinstance(r, str))
        text = f"{code}: {err.get('ErrorMessage', '')}".strip(": ")
        texts.append(f"{text} ({related})" if related else text)
        err_status = err.get("StatusCode")
        transient |= isinstance(err_status, int) and jsonmail.is_transient_status(err_status)
    why = "; ".join(texts) or f"message status {entry.get('Status')!r}"
    if transient:
        return Retryable(reason=why, status=status)
    return Permanent(reason=why, status=status)
