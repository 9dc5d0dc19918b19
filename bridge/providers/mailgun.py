"""Mailgun: ``POST /v3/{domain}/messages.mime``, the raw-MIME passthrough endpoint.

The request is ``multipart/form-data`` with one ``to`` field per envelope recipient (the
delivery set: Mailgun sends to these and only these) and the message as the file part
``message`` (`bridge.providers.rawmime.prepare_raw`: no Bcc header, so blind copies stay
blind). Click and open tracking are switched off for the message, because tracking
rewrites links and adds a pixel, and the body must arrive as the client sent it.

Auth is HTTP Basic with user ``api`` and the API key as password. Hosts: US
``https://api.mailgun.net`` (default), EU ``https://api.eu.mailgun.net`` (``region: eu``);
``base_url`` overrides both. The domain travels in the path, the key never in the URL.

Answers (Mailgun API reference, "API Response Codes"):

* 200 ``{"id": "<...>", "message": "Queued. Thank you."}``: delivered; ``id`` recorded.
* 404: retried. Mailgun documents it as possibly temporary (a domain just added is
  eventually consistent); the retry policy's attempt and age limits end it.
* 408, 429 and 5xx: retried, honouring ``Retry-After``.
* Other 4xx (400 bad address, 401 bad key, 403 forbidden, 413 too large): permanent.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import ClassVar, Literal
from urllib.parse import quote

import httpx
from pydantic import SecretStr, field_validator

from bridge.model import Message, Outcome, Retryable
from bridge.providers.base import (
    Provider,
    ProviderSettings,
    body_excerpt,
    classify_status,
    parse_retry_after,
)
from bridge.providers.rawmime import prepare_raw

__all__ = ["MailgunProvider", "MailgunSettings"]

HOSTS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}


class MailgunSettings(ProviderSettings):
    """`type: mailgun` settings."""

    api_key: SecretStr
    domain: str
    region: Literal["us", "eu"] = "us"
    #: Leave Mailgun's click/open tracking to the account defaults instead of off.
    tracking: bool = False

    @field_validator("domain")
    @classmethod
    def _plain_domain(cls, value: str) -> str:
        value = value.strip()
        if not value or "/" in value or any(c.isspace() for c in value):
            raise ValueError("must be the sending domain, e.g. mg.example.com")
        return value


class MailgunProvider(Provider[MailgunSettings]):
    """Sends the raw message through ``messages.mime``."""

    settings_model: ClassVar[type[ProviderSettings]] = MailgunSettings
    type: ClassVar[str] = "mailgun"
    #: Mailgun "Sending messages": 25 MB per message; batches of at most 1000 recipients.
    default_max_message_size: ClassVar[int | None] = 25_000_000
    default_max_recipients: ClassVar[int | None] = 1000

    @property
    def url(self) -> str:
        """The ``messages.mime`` endpoint of the configured domain."""
        base = (self.settings.base_url or HOSTS[self.settings.region]).rstrip("/")
        return f"{base}/v3/{quote(self.settings.domain, safe='')}/messages.mime"

    def build_request(self, message: Message) -> httpx.Request:
        """A multipart POST: ``to`` per envelope recipient and the MIME as ``message``."""
        mime = prepare_raw(message.raw)
        data: dict[str, list[str]] = {"to": list(message.envelope.rcpt_to)}
        if not self.settings.tracking:
            data |= {"o:tracking": ["no"], "o:tracking-clicks": ["no"], "o:tracking-opens": ["no"]}
        # A boundary derived from the content cannot occur in it, and keeps the request
        # a pure function of the message (httpx would draw a random one).
        boundary = "smtp-bridge-" + hashlib.sha256(mime).hexdigest()[:32]
        credentials = b"api:" + self.settings.api_key.get_secret_value().encode("utf-8")
        return httpx.Request(
            "POST",
            self.url,
            data=data,
            files={"message": ("message.eml", mime, "message/rfc822")},
            headers={
                "Authorization": "Basic " + base64.b64encode(credentials).decode("ascii"),
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "User-Agent": "smtp-bridge",
            },
        )

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """200 delivered (``id`` kept); 404 and 408/429/5xx retryable; other 4xx permanent."""
        doc = _json(response)
        if response.status_code == 404:
            return Retryable(
                reason=f"HTTP 404: {body_excerpt(response)}".rstrip(": "),
                status=404,
                retry_after=parse_retry_after(response),
            )
        provider_id = doc.get("id")
        return classify_status(
            response, provider_message_id=provider_id if isinstance(provider_id, str) else None
        )

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """Nothing: the raw MIME carries every part of the message."""
        return ()


def _json(response: httpx.Response) -> dict[str, object]:
    try:
        doc = json.loads(response.content)
    except (ValueError, httpx.ResponseNotRead):
        return {}
    return doc if isinstance(doc, dict) else {}
