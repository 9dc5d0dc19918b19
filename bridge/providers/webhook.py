"""Generic JSON webhook: POST the message-v1 document to a URL of the operator's.

The body is our public format, `bridge/schemas/message-v1.schema.json`. The spool id goes
out twice, as the payload's `id` and as an ``Idempotency-Key`` header, so a receiver can
drop the duplicate that at-least-once delivery may produce after a crash.

Answers: any 2xx is delivered; 408, 429 and 5xx are retried (Retry-After honoured);
every other status is permanent.
"""

from __future__ import annotations

import json
from typing import ClassVar

import httpx
from pydantic import Field, field_validator

from bridge.model import Message, Outcome
from bridge.payload import message_v1
from bridge.providers.base import Provider, ProviderSettings, check_endpoint, classify_status

__all__ = ["WebhookProvider", "WebhookSettings"]


class WebhookSettings(ProviderSettings):
    """`type: webhook` settings."""

    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    include_raw: bool = False

    @field_validator("url")
    @classmethod
    def _https_unless_loopback(cls, value: str) -> str:
        check_endpoint(value, allow_query=True)
        return value  # kept exactly: the path (and a trailing slash) is the receiver's


class WebhookProvider(Provider[WebhookSettings]):
    """POSTs message-v1 JSON."""

    settings_model: ClassVar[type[ProviderSettings]] = WebhookSettings
    type: ClassVar[str] = "webhook"

    def build_request(self, message: Message) -> httpx.Request:
        """A POST of the message-v1 document, with the spool id as idempotency key."""
        body = json.dumps(
            message_v1(message, include_raw=self.settings.include_raw),
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Idempotency-Key": message.id,
            "User-Agent": "smtp-bridge",
        }
        headers.update(self.settings.headers)
        return httpx.Request("POST", self.settings.url, content=body, headers=headers)

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """2xx delivered; 408/429/5xx retryable; other 4xx permanent."""
        provider_id = None
        if response.headers.get("content-type", "").startswith("application/json"):
            try:
                doc = response.json()
            except ValueError:
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                provider_id = doc["id"]
        return classify_status(response, provider_message_id=provider_id)
