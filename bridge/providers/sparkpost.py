"""SparkPost: ``POST /api/v1/transmissions`` with ``content.email_rfc822``.

The message goes as RFC 822 content (`bridge.providers.rawmime.prepare_raw`, with
``utf8=True`` because the content is a JSON string: an 8-bit body in another charset is
re-encoded so its bytes survive). ``recipients`` lists the envelope, one plain
``address.email`` each: SparkPost builds no To header for ``email_rfc822`` content
(recipient-lists.apib, "Constructing Headers"), so ``header_to`` is not needed and Bcc
recipients stay invisible because the prepared MIME has no Bcc header.

Options (transmissions.apib): open and click tracking are off by default, because both
rewrite the body; ``perform_substitutions`` is false so ``{{...}}`` in a body part is
delivered literally. SparkPost still runs the top-level headers through its template
engine, which `SparkPostProvider.unsupported` reports.

Auth: ``Authorization: <api key>``. Hosts: ``https://api.sparkpost.com`` (default) and
``https://api.eu.sparkpost.com`` (``region: eu``); ``base_url`` overrides both.

Answers (index.apib, "Errors"):

* 200 ``{"results": {"id", "total_accepted_recipients", ...}}``: delivered, ``id``
  recorded. If SparkPost accepted none of the recipients, nothing was sent: permanent.
* 420 "Exceed Sending Limit" (daily, monthly or sandbox quota): retried, an hour later
  unless the answer says otherwise.
* 408, 429 and 5xx: retried, honouring ``Retry-After``.
* Every other status (400, 401, 403, 404, 405, 409, 413, 415, 422): permanent.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import httpx
from pydantic import SecretStr

from bridge.model import Message, Outcome, Permanent, Retryable
from bridge.providers.base import (
    Provider,
    ProviderSettings,
    body_excerpt,
    classify_status,
    parse_retry_after,
)
from bridge.providers.rawmime import prepare_raw

__all__ = ["SparkPostProvider", "SparkPostSettings"]

HOSTS = {"us": "https://api.sparkpost.com", "eu": "https://api.eu.sparkpost.com"}

#: How long to wait after a 420 (a sending quota is spent) when SparkPost does not say.
QUOTA_DEFER = 3600.0


class SparkPostSettings(ProviderSettings):
    """`type: sparkpost` settings."""

    api_key: SecretStr
    region: Literal["us", "eu"] = "us"
    open_tracking: bool = False
    click_tracking: bool = False
    #: Mark the mail transactional (SparkPost then skips its non-transactional suppressions).
    transactional: bool | None = None
    ip_pool: str | None = None
    campaign_id: str | None = None


class SparkPostProvider(Provider[SparkPostSettings]):
    """Sends the raw message as a one-off transmission."""

    settings_model: ClassVar[type[ProviderSettings]] = SparkPostSettings
    type: ClassVar[str] = "sparkpost"
    #: transmissions.apib: content (text, html, attachments, inline images) up to 20 MB.
    #: No fixed cap on the number of recipients is documented.
    default_max_message_size: ClassVar[int | None] = 20_000_000
    default_max_recipients: ClassVar[int | None] = None

    @property
    def url(self) -> str:
        """The transmissions endpoint."""
        base = (self.settings.base_url or HOSTS[self.settings.region]).rstrip("/")
        return f"{base}/api/v1/transmissions"

    def payload(self, message: Message) -> dict[str, Any]:
        """The transmission document for `message`."""
        mime = prepare_raw(message.raw, utf8=True)
        options: dict[str, Any] = {
            "open_tracking": self.settings.open_tracking,
            "click_tracking": self.settings.click_tracking,
            "perform_substitutions": False,
        }
        if self.settings.transactional is not None:
            options["transactional"] = self.settings.transactional
        if self.settings.ip_pool:
            options["ip_pool"] = self.settings.ip_pool
        doc: dict[str, Any] = {
            "options": options,
            "recipients": [{"address": {"email": rcpt}} for rcpt in message.envelope.rcpt_to],
            # Header bytes that are not UTF-8 cannot travel in JSON; unsupported() says so.
            "content": {"email_rfc822": mime.decode("utf-8", errors="replace")},
        }
        if self.settings.campaign_id:
            doc["campaign_id"] = self.settings.campaign_id
        return doc

    def build_request(self, message: Message) -> httpx.Request:
        """A JSON POST of the transmission, the API key as the Authorization value."""
        body = json.dumps(self.payload(message), ensure_ascii=False, separators=(",", ":"))
        return httpx.Request(
            "POST",
            self.url,
            content=body.encode("utf-8"),
            headers={
                "Authorization": self.settings.api_key.get_secret_value(),
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "smtp-bridge",
            },
        )

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """200 delivered (transmission id kept); 420/408/429/5xx retryable; else permanent."""
        status = response.status_code
        if status == 420:
            wait = parse_retry_after(response)
            return Retryable(
                reason=f"HTTP 420 sending limit exceeded: {body_excerpt(response)}".rstrip(": "),
                status=420,
                retry_after=QUOTA_DEFER if wait is None else wait,
            )
        results = _results(response)
        if 200 <= status < 300 and results.get("total_accepted_recipients") == 0:
            return Permanent(
                reason=f"HTTP {status}: no recipient accepted: {body_excerpt(response)}",
                status=status,
            )
        transmission_id = results.get("id")
        return classify_status(
            response,
            provider_message_id=str(transmission_id) if transmission_id is not None else None,
        )

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """What SparkPost would alter: non-UTF-8 header bytes, ``{{`` in the headers."""
        head = prepare_raw(message.raw).split(b"\r\n\r\n", 1)[0]
        problems: list[str] = []
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            problems.append("header bytes that are not UTF-8 (sent as U+FFFD)")
        if b"{{" in head:
            problems.append("'{{' in a header (SparkPost substitutes headers)")
        return tuple(problems)


def _results(response: httpx.Response) -> dict[str, Any]:
    try:
        doc = json.loads(response.content)
    except (ValueError, httpx.ResponseNotRead):
        return {}
    results = doc.get("results") if isinstance(doc, dict) else None
    return results if isinstance(results, dict) else {}
