"""OAuth 2.0 bearer tokens for the Graph and Gmail adapters, as requests and values.

Theory of operation
-------------------
Rule 1 — the token grant is just another request of the flow. When an adapter's
``flow(message, now)`` needs a bearer token and the cache holds none that is still
fresh at `now`, it *yields the token request itself* (``POST .../token``, form-encoded)
and reads the answer. The token exchange therefore goes through the delivery worker's
one httpx client, with the account's ``ca_file``, the same timeouts and the same
transport-error table as the API call; nothing here does I/O or reads the clock.

Rule 2 — the libraries build, we send. msal and google-auth are used for what they
are good at, without their HTTP: msal signs the certificate client assertion
(``JwtAssertionCreator``) and keeps Graph's tokens (``msal.TokenCache``, which takes
`now`); google-auth parses service-account keys and signs the delegation JWT
(``service_account.Credentials`` + ``jwt.encode``). Letting them do their own HTTP was
rejected: msal fetches the tenant's OpenID configuration with a GET before any grant,
both read the wall clock for expiry, google-auth retries token calls behind our retry
policy's back, and each would need a second, blocking HTTP client beside ours.

Rule 3 — refresh before expiry. A token is used until ``refresh_margin`` seconds (5 min,
msal's own margin) before it expires; a token living less than twice the margin is used
for the first half of its life.

Rule 4 — a 401 from the API drops the token and is retried once. `OAuthClient.call`
drops exactly the token that was refused (never a newer one another flow fetched),
fetches a fresh one and repeats the request once; a second 401 goes back to the
adapter, which reports it as retryable.

Rule 5 — a refused grant is retryable. ``invalid_client``, ``invalid_grant`` and friends
mean the account's credentials are wrong or revoked, not that the message is bad: the
mail stays in the spool (the retry policy's ``max_age`` still bounds it) while the
operator fixes the secret, and the reason names the OAuth error.

Flows are generators; several may run at once for one account. On a cold start each
may fetch its own token (at most ``delivery.concurrency`` grants); later flows share the
cached one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import httpx

from bridge.model import Permanent, Retryable
from bridge.providers.base import body_excerpt, check_endpoint, parse_retry_after
from bridge.providers.jsonmail import json_document

__all__ = [
    "FORM_CONTENT_TYPE",
    "AccessToken",
    "MemoryTokenStore",
    "OAuthClient",
    "TokenGrant",
    "TokenStore",
    "bearer",
    "check_endpoint",
    "form_request",
    "read_token_response",
]

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

#: Seconds before expiry at which a cached token is replaced (msal uses the same 5 min).
DEFAULT_REFRESH_MARGIN = 300.0

#: RFC 6749 §5.1 makes expires_in optional; without it we assume an hour, as Google does.
DEFAULT_LIFETIME = 3600.0

TokenFlow = Generator[httpx.Request, httpx.Response, "AccessToken | Retryable | Permanent"]
CallFlow = Generator[httpx.Request, httpx.Response, "httpx.Response | Retryable | Permanent"]


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and the times (epoch seconds) it should be replaced and expires."""

    value: str = ""
    refresh_at: float = 0.0
    expires_at: float = 0.0

    def __repr__(self) -> str:
        return f"AccessToken(value=<{len(self.value)} chars>, refresh_at={self.refresh_at})"

    @classmethod
    def issued(cls, value: str, now: float, lifetime: float, margin: float) -> AccessToken:
        """A token obtained at `now` that lives `lifetime` seconds (Rule 3)."""
        lead = min(margin, lifetime / 2)
        return cls(value=value, refresh_at=now + lifetime - lead, expires_at=now + lifetime)

    def fresh(self, now: float) -> bool:
        """Whether the token may still be sent at `now`."""
        return now < self.refresh_at


class TokenStore(Protocol):
    """Where an account's token lives between flows."""

    def load(self, now: float) -> AccessToken | None:
        """The cached token that is still fresh at `now`, if any."""

    def save(self, grant: Mapping[str, Any], now: float) -> AccessToken:
        """Remember a successful token response (its JSON object) received at `now`."""

    def drop(self, value: str) -> None:
        """Forget the token `value` (the API refused it); a newer token is kept."""


class MemoryTokenStore:
    """The simplest `TokenStore`: one token in memory."""

    def __init__(self, *, refresh_margin: float = DEFAULT_REFRESH_MARGIN) -> None:
        self.refresh_margin = refresh_margin
        self._token: AccessToken | None = None

    def load(self, now: float) -> AccessToken | None:
        """The cached token if it is fresh at `now`."""
        token = self._token
        return token if token is not None and token.fresh(now) else None

    def save(self, grant: Mapping[str, Any], now: float) -> AccessToken:
        """Store the token of a validated grant response."""
        token = AccessToken.issued(
            str(grant["access_token"]), now, lifetime(grant), self.refresh_margin
        )
        self._token = token
        return token

    def drop(self, value: str) -> None:
        """Forget the token if it is the one named."""
        if self._token is not None and self._token.value == value:
            self._token = None


def lifetime(grant: Mapping[str, Any]) -> float:
    """``expires_in`` of a token response in seconds (a string is accepted, as msal does)."""
    try:
        seconds = float(grant.get("expires_in", DEFAULT_LIFETIME))
    except (TypeError, ValueError):
        return DEFAULT_LIFETIME
    return seconds if math.isfinite(seconds) and seconds > 0 else DEFAULT_LIFETIME


class TokenGrant(ABC):
    """Builds the token request of one account (client credentials, refresh, JWT bearer)."""

    #: Names the grant in reasons: "Entra ID token endpoint", "Google token endpoint".
    label: str = "token endpoint"

    @abstractmethod
    def request(self, now: float) -> httpx.Request:
        """The token request to send at `now` (assertions are signed for that time)."""


def form_request(url: str, fields: Mapping[str, str]) -> httpx.Request:
    """A form-encoded POST, the only shape RFC 6749 §4.4/§6 token endpoints accept."""
    return httpx.Request(
        "POST",
        url,
        content=urlencode(fields).encode("ascii"),
        headers={
            "Content-Type": FORM_CONTENT_TYPE,
            "Accept": "application/json",
            "User-Agent": "smtp-bridge",
        },
    )


def read_token_response(
    response: httpx.Response, label: str = "token endpoint"
) -> Mapping[str, Any] | Retryable | Permanent:
    """Check a token endpoint's answer (RFC 6749 §5.1 / §5.2).

    Returns:
        The JSON object of a usable bearer token, or a `Retryable` saying why not
        (every failure of the grant is retryable, Rule 5).
    """
    status = response.status_code
    doc = json_document(response)
    if status == 200 and isinstance(doc, dict):
        token = doc.get("access_token")
        kind = str(doc.get("token_type", "Bearer"))
        if isinstance(token, str) and token and kind.lower() == "bearer":
            return doc
        return Retryable(reason=f"{label}: HTTP 200 without a bearer access_token", status=200)
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        detail = doc["error"]
        description = doc.get("error_description")
        if isinstance(description, str) and description:
            detail += ": " + " ".join(description.split())[:240]
        why = f"{label} refused the grant (HTTP {status}, {detail})"
    else:
        why = f"{label}: HTTP {status}: {body_excerpt(response)}".rstrip(": ")
    return Retryable(reason=why, status=status, retry_after=parse_retry_after(response))


class OAuthClient:
    """Bearer tokens for one account: cache first, grant when needed (Rules 1, 3, 4).

    Args:
        grant: Builds the token request.
        store: Keeps the token between flows.
    """

    def __init__(self, grant: TokenGrant, store: TokenStore) -> None:
        self.grant = grant
        self.store = store

    def token(self, now: float) -> TokenFlow:
        """A fresh token: from the store, or by yielding the grant request (use ``yield from``)."""
        cached = self.store.load(now)
        if cached is not None:
            return cached
        response = yield self.grant.request(now)
        grant = read_token_response(response, self.grant.label)
        if isinstance(grant, (Retryable, Permanent)):
            return grant
        return self.store.save(grant, now)

    def call(self, build: Callable[[str], httpx.Request], now: float) -> CallFlow:
        """Send ``build(access_token)``; on 401 drop that token and send once more.

        Returns:
            The API's response (possibly a second 401), or the outcome of a failed grant.
        """
        response: httpx.Response | None = None
        for _ in range(2):
            token = yield from self.token(now)
            if not isinstance(token, AccessToken):
                return token
            response = yield build(token.value)
            if response.status_code != 401:
                return response
            self.store.drop(token.value)
        assert response is not None
        return response


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for `token`."""
    return {"Authorization": f"Bearer {token}"}
