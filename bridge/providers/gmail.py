"""Gmail API: ``users.messages.send`` with the raw message.

Authentication is OAuth 2.0 with scope ``gmail.send``, either

* a user's **refresh token** (``client_id``, ``client_secret``, ``refresh_token``: the
  RFC 6749 §6 refresh grant), or
* a Workspace **service account with domain-wide delegation** (``service_account_file``,
  ``subject`` = the mailbox to send as, default `sender`): google-auth parses the key
  and signs the RS256 JWT (``iss`` the service account, ``sub`` the mailbox, ``aud``
  the token URL), sent as ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``.

The token request is yielded by `flow` like any API call; see `bridge.providers.oauth`.

Recipients and headers
----------------------
Gmail has no envelope: it mails the To, Cc and Bcc header addresses of the raw message.
The SMTP envelope is the delivery authority, so the message goes out as `prepare_raw`
makes it (CRLF, one of each unique field, no over-long lines) with

* one ``Bcc:`` header naming the envelope recipients that are in neither To nor Cc
  (case 22; Gmail removes Bcc from what recipients see), and
* To and Cc rewritten to the envelope addresses they contain, *only* when they name
  someone outside the envelope — another route's share of a split message, or an
  address the client never RCPT'd (case 23). Any address left in To/Cc would be
  mailed; there is no way to show it without sending to it. The rewritten fields keep
  each remaining address's display name; `unsupported` names the ones removed.

Small messages go as JSON ``{"raw": base64url}`` to ``/gmail/v1/…/messages/send``; a
message whose JSON would exceed 1 MB (Google answers "Request payload size exceeds the
limit: 1048576 bytes" for some accounts) is sent as a media upload,
``/upload/gmail/v1/…/messages/send?uploadType=media`` with ``Content-Type:
message/rfc822``, up to the method's 35 MiB (36,700,160 bytes).

Answers: 200 with a Message resource is delivered (its ``id`` is the provider id). 401
is retried once with a new token, then retryable; 403 for a rate or daily limit
(``userRateLimitExceeded``, ``rateLimitExceeded``, ``dailyLimitExceeded``), 408, 429 and
5xx are retryable; other 4xx (``invalidArgument``, ``failedPrecondition``, a 403 for a
domain policy or missing permission, 404) are permanent.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Generator, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from google.auth import jwt as google_jwt
from google.oauth2 import service_account
from pydantic import Field, SecretStr, field_validator, model_validator

from bridge.model import Address, Delivered, Message, Outcome, Permanent, Retryable
from bridge.providers.base import Provider, ProviderSettings
from bridge.providers.jsonmail import (
    ApiSettings,
    address_key,
    classify,
    clean_name,
    json_body,
    json_document,
    sender_of,
    split_recipients,
)
from bridge.providers.oauth import (
    MemoryTokenStore,
    OAuthClient,
    TokenGrant,
    bearer,
    check_endpoint,
    form_request,
)
from bridge.providers.rawmime import prepare_raw

__all__ = [
    "GmailProvider",
    "GmailSettings",
    "RefreshTokenGrant",
    "ServiceAccountGrant",
    "restrict_recipient_fields",
]

# google-auth's py.typed covers only part of it: these two entry points are unannotated.
_from_info: Callable[[dict[str, Any]], Any] = service_account.Credentials.from_service_account_info
_encode_jwt: Callable[[Any, dict[str, Any]], bytes] = google_jwt.encode

DEFAULT_BASE_URL = "https://gmail.googleapis.com"
DEFAULT_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret
GMAIL_SEND_SCOPE = "https://www.googleapis.com/auth/gmail.send"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

#: The media upload's maxSize in the discovery document (35 MiB).
MAX_UPLOAD_BYTES = 36_700_160
#: Largest JSON body sent to the non-upload endpoint.
MAX_JSON_BYTES = 1_000_000
#: Lifetime of the delegation JWT; Google accepts at most one hour.
ASSERTION_LIFETIME = 3600
#: 403 reasons that are quota, not permission (Gmail API "Handle errors").
RATE_LIMIT_REASONS = frozenset({"userRateLimitExceeded", "rateLimitExceeded", "quotaExceeded"})
DAILY_LIMIT_REASONS = frozenset({"dailyLimitExceeded"})
#: A daily sending limit will not lift in minutes; wait an hour before trying again.
DAILY_LIMIT_DELAY = 3600.0


class GmailSettings(ApiSettings):
    """`type: gmail` settings: a refresh token, or a service account with delegation."""

    client_id: str | None = None
    client_secret: SecretStr | None = None
    refresh_token: SecretStr | None = None
    service_account: SecretStr | None = None
    subject: str | None = None
    sender: str | None = None
    token_url: str = DEFAULT_TOKEN_URL
    scope: str = Field(default=GMAIL_SEND_SCOPE, min_length=1)

    @field_validator("token_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return check_endpoint(value)

    @field_validator("max_message_size")
    @classmethod
    def _gmail_cap(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_UPLOAD_BYTES:
            raise ValueError(f"Gmail accepts messages up to 35 MiB ({MAX_UPLOAD_BYTES} bytes)")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> GmailSettings:
        user = (self.client_id, self.client_secret, self.refresh_token)
        if self.service_account is not None:
            if any(x is not None for x in user):
                raise ValueError(
                    "give either service_account or client_id/client_secret/refresh_token"
                )
            _service_account_info(self.service_account.get_secret_value())
            if (self.subject or self.sender) is None:
                raise ValueError("a service account needs subject (or sender): the mailbox")
        elif any(x is None for x in user):
            raise ValueError("give client_id, client_secret and refresh_token, or service_account")
        return self


def _service_account_info(text: str) -> dict[str, Any]:
    """The parsed JSON key; ValueError unless google-auth accepts it."""
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise ValueError("service_account is not a JSON key file") from exc
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ValueError('service_account is not a key of "type": "service_account"')
    try:
        _from_info(info)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"service_account key is unusable: {exc}") from exc
    return info


# --- token grants ----------------------------------------------------------------------------


class RefreshTokenGrant(TokenGrant):
    """The refresh grant (RFC 6749 §6) with the client secret in the body, as Google wants."""

    label = "Google token endpoint"

    def __init__(self, settings: GmailSettings) -> None:
        assert settings.client_id is not None
        assert settings.client_secret is not None
        assert settings.refresh_token is not None
        self.url = settings.token_url
        self._fields = {
            "grant_type": "refresh_token",
            "client_id": settings.client_id,
            "client_secret": settings.client_secret.get_secret_value(),
            "refresh_token": settings.refresh_token.get_secret_value(),
        }

    def request(self, now: float) -> httpx.Request:
        """The same form every time; `now` is not needed."""
        return form_request(self.url, self._fields)


class ServiceAccountGrant(TokenGrant):
    """The JWT-bearer grant of a delegated service account, signed by google-auth."""

    label = "Google token endpoint"

    def __init__(self, settings: GmailSettings) -> None:
        assert settings.service_account is not None
        info = _service_account_info(settings.service_account.get_secret_value())
        credentials = _from_info(info)
        self.url = settings.token_url
        self._signer = credentials.signer
        self.issuer: str = credentials.service_account_email
        self.subject = settings.subject or settings.sender
        self.scope = settings.scope

    def claims(self, now: float) -> dict[str, Any]:
        """The claims google-auth's service account signs, stamped with `now`."""
        issued = int(now)
        return {
            "iss": self.issuer,
            "sub": self.subject,
            "scope": self.scope,
            "aud": self.url,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }

    def request(self, now: float) -> httpx.Request:
        """``grant_type=…jwt-bearer`` with a fresh RS256 assertion."""
        assertion = _encode_jwt(self._signer, self.claims(now))
        return form_request(
            self.url,
            {"grant_type": JWT_BEARER_GRANT, "assertion": assertion.decode("ascii")},
        )


# --- the message bytes -----------------------------------------------------------------------


def _format_address(address: Address) -> bytes:
    """One mailbox for a header: RFC 2047 for a non-ASCII name, RFC 6532 for an address."""
    name = clean_name(address.name)
    spec = address.email.encode("utf-8")
    if name is None:
        return spec
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        encoded = base64.b64encode(name.encode("utf-8")).decode("ascii")
        return f"=?utf-8?b?{encoded}?= <".encode("ascii") + spec + b">"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <'.encode("ascii") + spec + b">"


def _address_field(name: bytes, addresses: Sequence[Address]) -> bytes:
    items = [_format_address(a) for a in addresses]
    return name + b": " + b",\r\n ".join(items) + b"\r\n"


def restrict_recipient_fields(
    prepared: bytes, to: Sequence[Address], cc: Sequence[Address]
) -> bytes:
    """Replace the top-level To and Cc fields of `prepared` (the output of `prepare_raw`).

    A field without any ``@`` (``To: undisclosed-recipients:;``) addresses nobody and is
    kept as it is. Graph's MIME path uses this too.

    Args:
        prepared: CRLF message bytes with at most one To and one Cc field.
        to: The addresses the new To field lists; empty drops the field.
        cc: The same for Cc.

    Returns:
        The message with the new fields where the old ones were; body bytes unchanged.
    """
    end = prepared.find(b"\r\n\r\n")
    head, rest = (prepared, b"") if end < 0 else (prepared[: end + 2], prepared[end + 2 :])
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1]:
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    replacement = {b"to": (b"To", to), b"cc": (b"Cc", cc)}
    out: list[bytes] = []
    for item in fields:
        key = item.split(b":", 1)[0].strip().lower()
        if key in replacement and b"@" not in item.split(b":", 1)[-1]:
            # No address at all (``undisclosed-recipients:;``): nobody to mail, kept.
            replacement.pop(key)
            out.append(item)
            continue
        if key in replacement:
            label, addresses = replacement.pop(key)
            if addresses:
                out.append(_address_field(label, addresses))
            continue
        out.append(item)
    for label, addresses in replacement.values():
        if addresses:
            out.append(_address_field(label, addresses))
    return b"".join(out) + rest


# --- the adapter ------------------------------------------------------------------------------


class GmailProvider(Provider[GmailSettings]):
    """Sends through one Gmail or Workspace mailbox with the Gmail API."""

    settings_model: ClassVar[type[ProviderSettings]] = GmailSettings
    type: ClassVar[str] = "gmail"
    default_max_message_size: ClassVar[int | None] = MAX_UPLOAD_BYTES
    #: Gmail's per-message recipient limit (To + Cc + Bcc).
    default_max_recipients: ClassVar[int | None] = 500

    def __init__(self, settings: GmailSettings) -> None:
        super().__init__(settings)
        base = settings.base_url or DEFAULT_BASE_URL
        user = quote(settings.sender, safe="@") if settings.sender else "me"
        self.send_url = f"{base}/gmail/v1/users/{user}/messages/send"
        self.upload_url = f"{base}/upload/gmail/v1/users/{user}/messages/send"
        grant: TokenGrant
        if settings.service_account is not None:
            grant = ServiceAccountGrant(settings)
        else:
            grant = RefreshTokenGrant(settings)
        self.oauth = OAuthClient(grant, MemoryTokenStore())

    def prepared(self, message: Message) -> bytes:
        """The raw message as Gmail gets it: Bcc for envelope-only recipients, To and Cc
        rewritten from the envelope recipients they name.

        Gmail mails every address in To, Cc and Bcc, as *it* parses them. The fields are
        always rewritten, not only when our parser sees an outsider: ``ok@x.org;
        other@y.org`` or a 5 KB field may parse differently there, and then the envelope
        would no longer decide who gets the mail.
        """
        recipients, _ = split_recipients(message)
        raw = prepare_raw(message.raw, bcc_header=[a.email for a in recipients.bcc])
        return restrict_recipient_fields(raw, recipients.to, recipients.cc)

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """What Gmail will not deliver as written."""
        _, left_out = split_recipients(message)
        notes = []
        if left_out:
            shown = ", ".join(a.email for a in left_out)
            notes.append(f"To/Cc addresses outside this envelope are not shown: {shown}")
        sender = sender_of(message)
        mailbox = self.settings.sender
        if sender is not None and mailbox and address_key(sender.email) != address_key(mailbox):
            notes.append(f"From {sender.email} (Gmail sends as {mailbox} unless it is an alias)")
        return tuple(notes)

    def build_request(self, message: Message, token: str | None = None) -> httpx.Request:
        """The messages.send request: JSON ``raw`` when small, a media upload otherwise."""
        return self._request(self.prepared(message), token)

    def _request(self, raw: bytes, token: str | None) -> httpx.Request:
        headers = {"User-Agent": "smtp-bridge", "Accept": "application/json"}
        if token is not None:
            headers.update(bearer(token))
        body = json_body({"raw": base64.urlsafe_b64encode(raw).decode("ascii")})
        if len(body) <= MAX_JSON_BYTES:
            headers["Content-Type"] = "application/json"
            return httpx.Request("POST", self.send_url, content=body, headers=headers)
        headers["Content-Type"] = "message/rfc822"
        return httpx.Request(
            "POST", self.upload_url, params={"uploadType": "media"}, content=raw, headers=headers
        )

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """200 delivered with Gmail's message id; see the module docstring for failures."""
        status = response.status_code
        doc = json_document(response)
        if 200 <= status < 300:
            gid = doc.get("id") if isinstance(doc, dict) else None
            return Delivered(
                status=status, provider_message_id=gid if isinstance(gid, str) else None
            )
        error = doc.get("error") if isinstance(doc, dict) else None
        reasons: set[str] = set()
        detail = None
        if isinstance(error, dict):
            for item in error.get("errors") or []:
                if isinstance(item, dict) and isinstance(item.get("reason"), str):
                    reasons.add(item["reason"])
            found = [
                str(x)
                for x in (error.get("status"), error.get("message"))
                if isinstance(x, str) and x
            ]
            detail = ": ".join(found) or None
        outcome = classify(response, detail)
        if status == 401:
            return Retryable(reason=outcome.reason, status=401)
        if status == 403 and reasons & DAILY_LIMIT_REASONS:
            return Retryable(reason=outcome.reason, status=403, retry_after=DAILY_LIMIT_DELAY)
        if status == 403 and reasons & RATE_LIMIT_REASONS:
            return Retryable(reason=outcome.reason, status=403)
        return outcome

    def flow(
        self, message: Message, now: float
    ) -> Generator[httpx.Request, httpx.Response, Outcome]:
        """A token if none is cached, then messages.send (once more after a 401)."""
        too_big = Permanent(reason=f"message exceeds Gmail's limit of {MAX_UPLOAD_BYTES} bytes")
        if len(message.raw) > MAX_UPLOAD_BYTES:
            return too_big
        raw = self.prepared(message)
        if len(raw) > MAX_UPLOAD_BYTES:
            return too_big
        result = yield from self.oauth.call(lambda t: self._request(raw, t), now)
        if not isinstance(result, httpx.Response):
            return result
        return self.interpret_response(result)
