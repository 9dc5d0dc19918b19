"""The provider adapter contract and the pure helpers adapters share.

An adapter knows one email API and does no I/O: `build_request(message)` returns an
`httpx.Request`, `interpret_response(response)` returns an `Outcome`. Adapters that
need more than one round trip (OAuth token grants, upload sessions) override `flow()`,
a generator that yields requests and receives responses, like httpx's auth flows; the
delivery worker is the only code that actually sends them.

Adapters never read the clock or the environment. Where a flow needs the time (token
expiry, request signing) it is handed `now` by the caller.
"""

from __future__ import annotations

import builtins
import dataclasses
import email.utils
import ipaddress
import re
from abc import ABC, abstractmethod
from collections.abc import Generator
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

from bridge.model import Delivered, Message, Outcome, Permanent, Retryable

__all__ = [
    "Flow",
    "Provider",
    "ProviderSettings",
    "check_endpoint",
    "classify_status",
    "is_loopback_host",
    "parse_retry_after",
]

Flow = Generator[httpx.Request, httpx.Response, Outcome]


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(value: str, *, allow_query: bool = False) -> str:
    """An API or OAuth endpoint URL: https, or plain http to a loopback host only.

    Keys and tokens travel in headers, so plain http to anywhere else would put them on
    the wire. `allow_query` admits a query (URLs a provider hands out, webhook URLs).

    Returns:
        The URL without a trailing slash.

    Raises:
        ValueError: anything else.
    """
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute https:// URL")
    if (parts.query and not allow_query) or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError("plain http:// is only allowed to a loopback address")
    return value.rstrip("/")


class ProviderSettings(BaseModel):
    """Settings every provider account accepts; each provider subclasses it.

    `max_message_size` / `max_recipients` override the provider's published limits
    (None: use the adapter's default). They are enforced at SMTP time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str | None = None
    ca_file: str | None = None
    max_message_size: int | None = Field(default=None, gt=0)
    max_recipients: int | None = Field(default=None, gt=0)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        # Scheme, host and optional port: the adapter appends the API's own paths.
        return None if value is None else check_endpoint(value)

    @field_validator("*", mode="after")
    @classmethod
    def _usable_in_http(cls, value: object, info: ValidationInfo) -> object:
        # Keys, tokens and header values end up in HTTP header fields. A stray CR from an
        # env file written on Windows, or a non-ASCII byte, would otherwise fail every
        # request (with the secret quoted in the transport error, or an encoding error
        # in the adapter). The message never repeats the value.
        if info.field_name in _MULTILINE_FIELDS:
            return value
        header_bound = isinstance(value, SecretStr | dict)
        if isinstance(value, SecretStr) and not value.get_secret_value():
            raise ValueError("is empty")
        for where, text in _strings(value):
            if _UNSAFE_TEXT.search(text):
                raise ValueError(f"{where}contains a control character (CR, LF, NUL, ...)")
            if text != text.strip(" \t"):
                raise ValueError(f"{where}has leading or trailing whitespace")
            if header_bound and not text.isascii():
                raise ValueError(f"{where}contains non-ASCII characters (sent in an HTTP header)")
        return value


_UNSAFE_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


#: PEM and JSON key material: multi-line by nature, and never sent as a header.
_MULTILINE_FIELDS = frozenset({"certificate", "private_key", "service_account"})


def _strings(value: object) -> list[tuple[str, str]]:
    """(where, text) for the strings of a settings value: itself, or a dict's items."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        return [("", value)]
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for key, item in value.items():
            out += [(f"{key}: ", t) for t in (key, item) if isinstance(t, str)]
        return out
    return []


S = TypeVar("S", bound=ProviderSettings)


class Provider(ABC, Generic[S]):
    """One configured provider account: pure request building and response reading."""

    # `settings_model` is declared before `type` on purpose: once a class body binds the
    # name `type`, mypy reads later `type[...]` annotations in that body as the attribute.
    # Subclasses: assign `settings_model = XSettings` first, or leave it unannotated.
    #: The pydantic model for this provider's settings block.
    settings_model: ClassVar[builtins.type[ProviderSettings]]
    #: The `type:` value in the config file.
    type: ClassVar[str]
    #: The API's own limits, used when the settings do not override them.
    default_max_message_size: ClassVar[int | None] = None
    default_max_recipients: ClassVar[int | None] = None

    def __init__(self, settings: S) -> None:
        self.settings = settings

    @classmethod
    def create(cls, settings: ProviderSettings) -> Provider[Any]:
        """Build the adapter for a running bridge (start-up, I/O allowed).

        The default is the constructor; SES overrides it to look up the AWS credential
        chain once, here, instead of inside the pure request building.
        """
        return cls(settings)  # type: ignore[arg-type]

    @classmethod
    def parse_settings(cls, raw: dict[str, Any]) -> ProviderSettings:
        """Validate a settings block; raises pydantic.ValidationError."""
        return cls.settings_model.model_validate(raw)

    @property
    def max_message_size(self) -> int | None:
        """Largest raw message (bytes) this account will take."""
        return self.settings.max_message_size or self.default_max_message_size

    @property
    def max_recipients(self) -> int | None:
        """Most envelope recipients one message may have at this account."""
        return self.settings.max_recipients or self.default_max_recipients

    @abstractmethod
    def build_request(self, message: Message) -> httpx.Request:
        """The HTTP request that sends `message` (envelope recipients only)."""

    @abstractmethod
    def interpret_response(self, response: httpx.Response) -> Outcome:
        """Classify the API's answer as delivered, retryable or permanent."""

    def secrets(self) -> tuple[str, ...]:
        """The values of this account that must never be logged, stored or bounced.

        Every secret setting, and every header value (and its last word: the token of
        ``Bearer <token>``) of a webhook. An API that echoes our request in its error
        body must not put them into the log, the spool or a DSN.
        """
        found: list[str] = []
        for value in self.settings.__dict__.values():
            if isinstance(value, SecretStr):
                found.append(value.get_secret_value())
            elif isinstance(value, dict):
                for item in value.values():
                    if isinstance(item, str):
                        found += [item, item.split()[-1] if item.split() else item]
        # Short values would blank out ordinary words; real keys are long.
        return tuple(sorted({v for v in found if len(v) >= 8}, key=len, reverse=True))

    def redact(self, outcome: Outcome) -> Outcome:
        """`outcome` with any of `secrets` in its reason replaced by ``[redacted]``."""
        if isinstance(outcome, Delivered):
            return outcome
        reason = outcome.reason
        for secret in self.secrets():
            reason = reason.replace(secret, "[redacted]")
        return outcome if reason == outcome.reason else dataclasses.replace(outcome, reason=reason)

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """Parts of `message` this API cannot carry (logged once per message, never silent)."""
        return ()

    def flow(self, message: Message, now: float) -> Flow:
        """Yield requests, receive responses, return the outcome. One round trip here."""
        response = yield self.build_request(message)
        return self.interpret_response(response)


def classify_status(response: httpx.Response, *, provider_message_id: str | None = None) -> Outcome:
    """The default reading of an HTTP status.

    2xx delivered; 408, 429 and 5xx retryable (honouring Retry-After); any other
    status permanent. The reason carries a short, bounded excerpt of the body so the
    delivery log says why, without storing a provider's whole error page.
    """
    status = response.status_code
    if 200 <= status < 300:
        return Delivered(status=status, provider_message_id=provider_message_id)
    reason = f"HTTP {status}: {body_excerpt(response)}".rstrip(": ")
    if status in (408, 429) or status >= 500:
        return Retryable(reason=reason, status=status, retry_after=parse_retry_after(response))
    return Permanent(reason=reason, status=status)


def body_excerpt(response: httpx.Response, limit: int = 300) -> str:
    """The first `limit` characters of a response body, on one line."""
    try:
        text = response.content[: limit * 4].decode("utf-8", errors="replace")
    except httpx.ResponseNotRead:
        return ""
    return " ".join(text.split())[:limit]


def parse_retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    An HTTP-date is measured against the response's own ``Date`` header, so this stays
    a pure function of the response; without one, the date form is ignored and the
    retry policy chooses.
    """
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        date_header = response.headers.get("date")
        if date_header is None:
            return None
        now = email.utils.parsedate_to_datetime(date_header)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - now).total_seconds())
