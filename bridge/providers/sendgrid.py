"""SendGrid Mail Send v3: ``POST /v3/mail/send`` with a JSON body.

Spec: ``specs/sendgrid/tsg_mail_v3.json`` (request body ``PostMailSend``); facts in
PROVIDERS.md §1. The API takes no raw MIME, so the message is decomposed
(`bridge.providers.jsonmail`).

Recipients: one personalization holds To, Cc and Bcc when the envelope has a To
recipient. A personalization must have a ``to``, so a message without one (Bcc-only)
gets one personalization per recipient, each addressed To that recipient alone.

Answers: 202 is delivered, the provider id is the ``X-Message-Id`` header; 408, 429
and 5xx are retried, 429 after ``Retry-After`` or the ``X-RateLimit-Reset`` epoch;
every other status (400 validation, 401/403 key problems, 413 too large) is permanent.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import httpx
from pydantic import SecretStr

from bridge.model import Address, Delivered, Message, Outcome
from bridge.providers import jsonmail
from bridge.providers.base import ProviderSettings
from bridge.providers.jsonmail import ApiSettings, JsonMailProvider

__all__ = ["SendGridProvider", "SendGridSettings"]

PRODUCTION_URL = "https://api.sendgrid.com"
EU_URL = "https://api.eu.sendgrid.com"
PATH = "/v3/mail/send"

# Spec description of `headers`: these cannot be overridden.
FORBIDDEN_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)


class SendGridSettings(ApiSettings):
    """`type: sendgrid` settings.

    `region: eu` selects ``api.eu.sendgrid.com`` (EU regional subusers); an explicit
    `base_url` wins over it. `sandbox_mode` has SendGrid validate without delivering.
    """

    api_key: SecretStr
    region: Literal["global", "eu"] = "global"
    sandbox_mode: bool = False


class SendGridProvider(JsonMailProvider[SendGridSettings]):
    """Sends through SendGrid's Mail Send API."""

    settings_model: ClassVar[type[ProviderSettings]] = SendGridSettings
    type: ClassVar[str] = "sendgrid"
    # "< 30 MB" for the whole JSON payload; the raw MIME is about as large (its
    # attachments are already base64), so the raw size is capped a little lower.
    default_max_message_size: ClassVar[int | None] = 29_000_000
    # "1000 total recipients across to+cc+bcc of all personalizations".
    default_max_recipients: ClassVar[int | None] = 1000

    @property
    def url(self) -> str:
        """The Mail Send endpoint for this account."""
        base = self.settings.base_url or (
            EU_URL if self.settings.region == "eu" else PRODUCTION_URL
        )
        return base + PATH

    def document(self, message: Message) -> tuple[dict[str, Any], list[str]]:
        """The Mail Send body and the notes about what it cannot carry."""
        notes = jsonmail.envelope_notes(message)
        sender = jsonmail.require_sender(message)
        recipients, _ = jsonmail.split_recipients(message)

        def who(addr: Address) -> dict[str, str]:
            out = {"email": addr.email}
            name = jsonmail.clean_name(addr.name)
            if name is not None and any(c in name for c in ",;"):
                # Mail Send limitation: ',' and ';' are refused in to/cc/bcc names.
                name = jsonmail.clean_name(name.replace(",", " ").replace(";", " "))
                notes.append(f"',' and ';' removed from the display name of {addr.email}")
            if name is not None:
                out["name"] = name
            return out

        personalizations = []
        for copy in jsonmail.copies(recipients):
            p: dict[str, Any] = {"to": [who(a) for a in copy.to]}
            if copy.cc:
                p["cc"] = [who(a) for a in copy.cc]
            if copy.bcc:
                p["bcc"] = [who(a) for a in copy.bcc]
            personalizations.append(p)

        doc: dict[str, Any] = {"personalizations": personalizations, "from": _plain(sender)}
        if len(message.reply_to) == 1:
            doc["reply_to"] = _plain(message.reply_to[0])
        elif message.reply_to:
            doc["reply_to_list"] = list(
                {a.email.lower(): _plain(a) for a in message.reply_to}.values()
            )
        doc["subject"] = jsonmail.required_subject(message, notes)

        text, html = jsonmail.required_bodies(message, notes)
        content = []
        # Mail Send rule: text/plain must come before text/html.
        if text is not None:
            content.append({"type": "text/plain", "value": text})
        if html is not None:
            content.append({"type": "text/html", "value": html})
        doc["content"] = content

        items = jsonmail.parts(message)
        notes += jsonmail.part_notes(items)
        if items:
            doc["attachments"] = [_attachment(p) for p in items]

        headers, header_notes = jsonmail.custom_headers(
            message, forbidden=FORBIDDEN_HEADERS, forbidden_prefixes=("x-sg-",)
        )
        notes += header_notes
        if headers:
            doc["headers"] = dict(headers)
        if self.settings.sandbox_mode:
            doc["mail_settings"] = {"sandbox_mode": {"enable": True}}
        return doc, list(dict.fromkeys(notes))

    def build_requests(self, message: Message) -> tuple[httpx.Request, ...]:
        """One request: every copy is a personalization of the same call."""
        doc, _ = self.document(message)
        headers = {
            "Authorization": f"Bearer {self.settings.api_key.get_secret_value()}",
            "Content-Type": "application/json",
            "User-Agent": "smtp-bridge",
        }
        return (httpx.Request("POST", self.url, content=jsonmail.json_body(doc), headers=headers),)

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """What this message loses on the way through Mail Send."""
        return tuple(self.document(message)[1])

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """202 delivered (id from X-Message-Id); 408/429/5xx retryable; others permanent."""
        if 200 <= response.status_code < 300:
            return Delivered(
                status=response.status_code,
                provider_message_id=response.headers.get("x-message-id") or None,
            )
        return jsonmail.classify(response, _error_detail(response), delay=_delay)


def _plain(addr: Address) -> dict[str, str]:
    out = {"email": addr.email}
    name = jsonmail.clean_name(addr.name)
    if name is not None:
        out["name"] = name
    return out


def _attachment(part: jsonmail.Part) -> dict[str, str]:
    out = {
        "content": part.content_b64,
        "filename": part.filename,
        "type": part.content_type,
        "disposition": "inline" if part.inline else "attachment",
    }
    if part.content_id is not None:
        out["content_id"] = part.content_id
    return out


def _delay(response: httpx.Response) -> float | None:
    return jsonmail.rate_limit_delay(
        response, reset_header="x-ratelimit-reset", reset_is_epoch=True
    )


def _error_detail(response: httpx.Response) -> str | None:
    """``field: message`` pairs from the spec's ErrorResponse ``{"errors": [...]}``."""
    doc = jsonmail.json_document(response)
    if not isinstance(doc, dict) or not isinstance(doc.get("errors"), list):
        return None
    out = []
    for err in doc["errors"]:
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            field = err.get("field")
            out.append(f"{field}: {err['message']}" if isinstance(field, str) else err["message"])
    return "; ".join(out) or None
