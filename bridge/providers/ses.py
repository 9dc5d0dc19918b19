"""Amazon SES v2: ``SendEmail`` with raw content, signed with AWS Signature Version 4.

``POST {base_url or https://email.{region}.amazonaws.com}/v2/email/outbound-emails``
(rest-json; ``specs/aws-sesv2/service-2.json``). The body carries:

* ``Content.Raw.Data``: the message, base64 (`bridge.providers.rawmime.prepare_raw` with
  `SES_UNIQUE_FIELDS`: SES refuses a message that repeats any of those fields, and
  lines over 1000 characters; no Bcc header).
* ``Destination.ToAddresses``: every envelope recipient. With raw content SES delivers
  to the Destination and builds no header from it, so blind copies stay blind. SES has
  no SMTPUTF8: IDN domains are sent as punycode; a non-ASCII local part is reported by
  `SESProvider.unsupported` (SES will refuse it).
* ``FromEmailAddress``: the header From address (falling back to the envelope sender):
  the identity SES checks is verified. Optional ``ConfigurationSetName``.

Signing needs the time, so `build_request` returns the unsigned request and `flow`
signs it with the ``now`` the worker passes in (`sign`, botocore's `SigV4Auth` with
signing name ``ses``; no hand-written crypto). Credentials are the settings' static
keys, or whatever the standard AWS chain finds: looking that up is I/O (environment,
files, instance metadata), so it lives in `resolve_credentials`, for start-up.

Answers (model ``SendEmail`` errors; x-amzn-ErrorType header or JSON ``__type``):

* 200 ``{"MessageId": ...}``: delivered, id recorded (SES also rewrites Message-ID).
* Retried: TooManyRequestsException, LimitExceededException, throttling, InternalFailure,
  ServiceUnavailable, expired signatures or tokens, and any 408/429/5xx.
* Permanent: MessageRejected, MailFromDomainNotVerifiedException,
  AccountSuspendedException, SendingPausedException, NotFoundException,
  BadRequestException, authentication failures, and any other 4xx.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any, ClassVar

import botocore.session
import httpx
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from pydantic import Field, SecretStr, model_validator

from bridge.errors import ProviderSettingsError
from bridge.model import Delivered, Message, Outcome, Permanent, Retryable
from bridge.providers.base import Flow, Provider, ProviderSettings, parse_retry_after
from bridge.providers.rawmime import SES_UNIQUE_FIELDS, prepare_raw

__all__ = [
    "SESProvider",
    "SESSettings",
    "resolve_credentials",
    "sign",
    "static_credentials",
]

#: The signing name of SES v2 (model metadata ``signingName``).
SIGNING_NAME = "ses"
PATH = "/v2/email/outbound-emails"

#: Error codes worth another attempt (the model's exceptions plus AWS-wide ones).
RETRYABLE_CODES = frozenset(
    {
        "TooManyRequestsException",
        "LimitExceededException",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "InternalFailure",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        # The signature or the temporary credentials aged out; the next attempt is
        # signed afresh (and refreshable credentials renew themselves).
        "RequestExpired",
        "ExpiredToken",
        "ExpiredTokenException",
        # Our credentials or signature were refused: the bridge's configuration is at
        # fault, not the message. Mail waits while the operator fixes the keys instead
        # of bouncing (the same rule as an HTTP 401 in bridge/retry.py).
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "MissingAuthenticationToken",
        "AccessDeniedException",
    }
)
#: Error codes that no retry can fix (alert on the account ones).
PERMANENT_CODES = frozenset(
    {
        "MessageRejected",
        "MailFromDomainNotVerifiedException",
        "AccountSuspendedException",
        "SendingPausedException",
        "NotFoundException",
        "BadRequestException",
    }
)


class SESSettings(ProviderSettings):
    """`type: ses` settings. Without keys the standard AWS credential chain is used."""

    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    configuration_set: str | None = None

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> SESSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        return self


def static_credentials(settings: SESSettings) -> Credentials | None:
    """The keys written in the settings, or None when the AWS chain is to be used."""
    if settings.access_key_id is None or settings.secret_access_key is None:
        return None
    token = settings.session_token.get_secret_value() if settings.session_token else None
    return Credentials(
        settings.access_key_id.get_secret_value(),
        settings.secret_access_key.get_secret_value(),
        token,
    )


def resolve_credentials(settings: SESSettings) -> Credentials:
    """Static keys from the settings, else the standard AWS chain. Does I/O: call at start-up.

    The chain (botocore) reads ``AWS_*`` environment variables, the shared credentials
    and config files, SSO and web-identity tokens, and container or EC2 instance
    metadata. Credentials it returns may be refreshable: botocore renews them when
    they near expiry, inside `get_frozen_credentials`.

    Raises:
        ProviderSettingsError: Neither the settings nor the chain provide credentials.
    """
    static = static_credentials(settings)
    if static is not None:
        return static
    found: Credentials | None = botocore.session.Session().get_credentials()
    if found is None:
        raise ProviderSettingsError(
            [
                (
                    ("access_key_id",),
                    "no AWS credentials: set access_key_id and secret_access_key, or "
                    "provide them through the AWS environment, files or instance role",
                )
            ]
        )
    return found


class _SigV4At(SigV4Auth):  # type: ignore[misc]  # botocore is untyped
    """botocore's SigV4 signer, told the time instead of reading the clock.

    `SigV4Auth.add_auth` stamps ``request.context["timestamp"]`` with the current time
    and then calls `_modify_request_before_signing`, the hook botocore's own subclasses
    (S3) override; every later step reads the timestamp from the context. Replacing it
    there makes the whole signature a function of `timestamp`.
    """

    def __init__(self, credentials: ReadOnlyCredentials, region: str, timestamp: str) -> None:
        super().__init__(credentials, SIGNING_NAME, region)
        self._timestamp = timestamp

    def _modify_request_before_signing(self, request: AWSRequest) -> None:
        request.context["timestamp"] = self._timestamp
        super()._modify_request_before_signing(request)


def sign(
    request: httpx.Request,
    credentials: Credentials | ReadOnlyCredentials,
    region: str,
    now: float,
) -> httpx.Request:
    """`request` with SigV4 headers (Authorization, X-Amz-Date, token) for time `now`.

    Every header of `request` is signed except the ones botocore leaves out (User-Agent,
    hop-by-hop headers), so send the result as it is.

    Args:
        request: The unsigned request; its body must be in memory.
        credentials: Static or frozen credentials (refreshable ones are frozen first).
        region: The AWS region of the endpoint.
        now: Unix time of signing.
    """
    frozen = (
        credentials.get_frozen_credentials()
        if isinstance(credentials, Credentials)
        else credentials
    )
    body = request.read()
    aws = AWSRequest(
        method=request.method,
        url=str(request.url),
        data=body,
        headers=dict(request.headers.items()),
    )
    timestamp = datetime.fromtimestamp(now, UTC).strftime(SIGV4_TIMESTAMP)
    _SigV4At(frozen, region, timestamp).add_auth(aws)
    return httpx.Request(
        request.method, request.url, content=body, headers=dict(aws.headers.items())
    )


class SESProvider(Provider[SESSettings]):
    """Sends the raw message through SES v2 ``SendEmail``.

    Args:
        settings: The validated settings block.
        credentials: From `resolve_credentials`; defaults to the settings' static keys.

    Raises:
        ProviderSettingsError: No credentials were given and the settings hold no keys.
    """

    settings_model: ClassVar[type[ProviderSettings]] = SESSettings
    type: ClassVar[str] = "ses"
    #: SES quotas: 40 MB per message after base64 (a 30 MB message, less JSON overhead
    #: and headroom), 50 recipients per message.
    default_max_message_size: ClassVar[int | None] = 29_000_000
    default_max_recipients: ClassVar[int | None] = 50

    def __init__(self, settings: SESSettings, credentials: Credentials | None = None) -> None:
        super().__init__(settings)
        found = credentials or static_credentials(settings)
        if found is None:
            raise ProviderSettingsError(
                [
                    (
                        ("access_key_id",),
                        "no credentials: construct with "
                        "SESProvider.with_resolved_credentials() for the AWS chain",
                    )
                ]
            )
        self.credentials: Credentials = found

    @classmethod
    def with_resolved_credentials(cls, settings: SESSettings) -> SESProvider:
        """The provider with `resolve_credentials` (I/O: start-up only)."""
        return cls(settings, resolve_credentials(settings))

    @classmethod
    def create(cls, settings: ProviderSettings) -> SESProvider:
        """Start-up: static keys from the settings, else the standard AWS chain."""
        assert isinstance(settings, SESSettings)
        return cls.with_resolved_credentials(settings)

    @property
    def url(self) -> str:
        """The SendEmail endpoint."""
        base = self.settings.base_url or f"https://email.{self.settings.region}.amazonaws.com"
        return base.rstrip("/") + PATH

    def payload(self, message: Message) -> dict[str, Any]:
        """The ``SendEmailRequest`` document (wire form: the raw data in base64)."""
        mime = prepare_raw(message.raw, unique_fields=SES_UNIQUE_FIELDS)
        doc: dict[str, Any] = {}
        sender = message.from_.email if message.from_ else message.envelope.mail_from
        if sender:
            doc["FromEmailAddress"] = _ascii_domain(sender)
        doc["Destination"] = {
            "ToAddresses": [_ascii_domain(rcpt) for rcpt in message.envelope.rcpt_to]
        }
        doc["Content"] = {"Raw": {"Data": base64.b64encode(mime).decode("ascii")}}
        if self.settings.configuration_set:
            doc["ConfigurationSetName"] = self.settings.configuration_set
        return doc

    def build_request(self, message: Message) -> httpx.Request:
        """The unsigned SendEmail POST; `flow` signs it (signing needs the time)."""
        body = json.dumps(self.payload(message), separators=(",", ":")).encode("ascii")
        return httpx.Request(
            "POST",
            self.url,
            content=body,
            headers={"Content-Type": "application/json", "User-Agent": "smtp-bridge"},
        )

    def flow(self, message: Message, now: float) -> Flow:
        """One signed round trip, signed with the time the worker passes in."""
        request = sign(self.build_request(message), self.credentials, self.settings.region, now)
        response = yield request
        return self.interpret_response(response)

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """200 delivered (MessageId kept); throttling and 5xx retryable; else permanent."""
        status = response.status_code
        doc = _json(response)
        if 200 <= status < 300:
            message_id = doc.get("MessageId")
            return Delivered(
                status=status,
                provider_message_id=message_id if isinstance(message_id, str) else None,
            )
        code = error_code(response, doc)
        text = doc.get("message") or doc.get("Message") or ""
        reason = " ".join(f"HTTP {status} {code or ''}: {text}".split())[:300].rstrip(": ")
        if code in PERMANENT_CODES:
            return Permanent(reason=reason, status=status)
        if code in RETRYABLE_CODES or status in (408, 429) or status >= 500:
            return Retryable(reason=reason, status=status, retry_after=parse_retry_after(response))
        return Permanent(reason=reason, status=status)

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """Addresses SES cannot carry: it has no SMTPUTF8, so no non-ASCII local part."""
        addresses = [message.envelope.mail_from, *message.envelope.rcpt_to]
        if message.from_:
            addresses.append(message.from_.email)
        if any(not a.rpartition("@")[0].isascii() for a in addresses if a):
            return ("non-ASCII local part (SES does not support SMTPUTF8)",)
        return ()


def error_code(response: httpx.Response, doc: dict[str, Any]) -> str | None:
    """The AWS error code of an answer, from x-amzn-ErrorType or the JSON body."""
    raw = response.headers.get("x-amzn-errortype") or doc.get("__type") or doc.get("code")
    if not isinstance(raw, str) or not raw:
        return None
    # "MessageRejected:http://internal.amazon.com/..." or "com.amazonaws.x#MessageRejected"
    return raw.split(":", 1)[0].rsplit("#", 1)[-1] or None


def _ascii_domain(address: str) -> str:
    """`address` with an IDN domain in punycode, as SES requires; else unchanged."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        doc = json.loads(response.content)
    except (ValueError, httpx.ResponseNotRead):
        return {}
    return doc if isinstance(doc, dict) else {}
