"""Microsoft Graph: send as one mailbox with ``POST /v1.0/users/{sender}/sendMail``.

Authentication is the OAuth 2.0 client-credentials grant of Entra ID (application
permission **Mail.Send**; **Mail.ReadWrite** too for large mail, below), with a client
secret or a certificate. The token request is yielded by `flow` like any API call, the
certificate assertion is signed by msal and tokens are kept in an ``msal.TokenCache``
fed with the worker's `now`: see `bridge.providers.oauth` for the whole design.

Which request a message becomes
-------------------------------
Graph has no envelope: with either body format it mails exactly the To, Cc and Bcc
recipients of the message it is given. The SMTP envelope is the delivery authority, so:

1. **MIME** (``Content-Type: text/plain``, base64 of the message, `prepare_raw`) keeps
   the message as sent: both bodies, every header, the MIME structure, S/MIME. It is
   used when ``save_to_sent_items: true`` and every To/Cc address is in the envelope;
   envelope recipients outside To/Cc go into one ``Bcc:`` header (case 22). Graph offers
   no way to skip the Sent Items copy for MIME (microsoft-graph-docs#18698), which is
   why the default, ``save_to_sent_items: false``, cannot use it.
2. **JSON** ``{"message": …, "saveToSentItems": …}`` otherwise. Recipients come from
   the envelope by role (`jsonmail.split_recipients`): a To/Cc address outside the
   envelope — another route's share of a split message, or an address the client
   never RCPT'd (case 23) — is left out of the headers, because any address shown in
   To/Cc is also mailed. JSON carries one body (HTML if any, else text) and only
   ``X-`` custom headers; `unsupported` names what is lost.
3. **Draft + attachments** when that request would exceed Graph's 4 MB request limit
   (case 27): ``POST /users/{sender}/messages`` creates a draft without attachments;
   each attachment of at most 3 MB is added with ``POST …/attachments``, larger ones
   through ``createUploadSession`` and ``PUT`` ranges of at most 3.2 MB to the
   pre-authenticated upload URL (no bearer token); ``POST …/send`` sends it. Graph
   refuses upload sessions for files under its minimum size (about 2–3 MB,
   ``ErrorAttachmentSizeShouldNotBeLessThanMinimumSize``), hence the split. Needs
   **Mail.ReadWrite**, and Graph keeps the sent draft in Sent Items whatever
   ``save_to_sent_items`` says. A draft left by a failure before ``send`` is deleted.

Answers: 202 is delivered (Graph returns no message id). 401 is retried once with a
new token, then retryable; 408, 429 and 5xx are retryable (``Retry-After`` honoured);
400 (``ErrorInvalidRecipients``, ``ErrorMimeContentInvalidBase64String`` …), 403
(``ErrorAccessDenied``, ``ErrorSendAsDenied``), 404 and 413 are permanent.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlsplit

import httpx
import msal
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from msal.oauth2cli import JwtAssertionCreator
from pydantic import Field, SecretStr, field_validator, model_validator

from bridge.model import Address, Attachment, Delivered, Message, Outcome, Permanent, Retryable
from bridge.providers.base import Provider, ProviderSettings
from bridge.providers.gmail import restrict_recipient_fields
from bridge.providers.jsonmail import (
    ApiSettings,
    Part,
    Recipients,
    body_parts,
    classify,
    clean_name,
    custom_headers,
    json_body,
    json_document,
    part_notes,
    parts,
    sender_of,
    split_recipients,
)
from bridge.providers.oauth import (
    DEFAULT_REFRESH_MARGIN,
    AccessToken,
    OAuthClient,
    TokenGrant,
    bearer,
    check_endpoint,
    form_request,
    lifetime,
)
from bridge.providers.rawmime import prepare_raw

__all__ = [
    "ClientCredentialsGrant",
    "GraphProvider",
    "GraphSettings",
    "MsalTokenStore",
]

DEFAULT_BASE_URL = "https://graph.microsoft.com"
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

MB = 1024 * 1024
#: The tenant's default message size limit (createUploadSession docs), and Graph's cap.
DEFAULT_MAX_MESSAGE_SIZE = 35 * MB
MAX_MESSAGE_SIZE_LIMIT = 150 * MB
#: "The maximum request length supported is 4MB"; kept under 4,000,000 bytes for headroom.
MAX_REQUEST_BYTES = 4_000_000
#: Attachments up to this size are POSTed whole (base64 in JSON stays under 4 MB).
MAX_SIMPLE_ATTACHMENT = 3_000_000
#: Upload-session range size: under 4 MB, a multiple of 320 KiB as Graph's uploads prefer.
UPLOAD_CHUNK = 10 * 320 * 1024
#: Lifetime of a certificate client assertion (msal uses 10 minutes too).
ASSERTION_LIFETIME = 600


class GraphSettings(ApiSettings):
    """`type: graph` settings.

    Give either `client_secret` or a certificate: `private_key` (PEM, usually as
    ``private_key_file``) with `certificate` (PEM, ``certificate_file``) or its SHA-1
    `thumbprint` as shown in the app registration.
    """

    tenant_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    certificate: str | None = None
    private_key: SecretStr | None = None
    thumbprint: str | None = None
    sender: str = Field(min_length=3)
    authority: str = DEFAULT_AUTHORITY
    scope: str = GRAPH_SCOPE
    save_to_sent_items: bool = False

    @field_validator("authority")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return check_endpoint(value)

    @field_validator("tenant_id")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if "/" in value or "?" in value or "#" in value or value != value.strip():
            raise ValueError("must be the tenant id or domain, not a URL")
        return value

    @field_validator("thumbprint")
    @classmethod
    def _thumbprint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        hexed = value.replace(":", "").replace(" ", "").lower()
        if len(hexed) != 40 or any(c not in "0123456789abcdef" for c in hexed):
            raise ValueError("must be the certificate's SHA-1 thumbprint (40 hex digits)")
        return hexed

    @field_validator("max_message_size")
    @classmethod
    def _graph_cap(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_MESSAGE_SIZE_LIMIT:
            raise ValueError("Graph accepts messages up to 150 MB (157286400 bytes)")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> GraphSettings:
        if (self.client_secret is None) == (self.private_key is None):
            raise ValueError(
                "give either client_secret or private_key (with certificate or thumbprint)"
            )
        if self.private_key is not None:
            if self.certificate is None and self.thumbprint is None:
                raise ValueError("private_key needs certificate or thumbprint")
            _load_key(self.private_key.get_secret_value())
            if self.certificate is not None:
                _load_certificate(self.certificate)
        elif self.certificate is not None or self.thumbprint is not None:
            raise ValueError("certificate and thumbprint belong to private_key, not client_secret")
        return self


def _load_key(pem: str) -> Any:
    try:
        return serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("private_key is not an unencrypted PEM private key") from exc


def _load_certificate(pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode("utf-8"))
    except ValueError as exc:
        raise ValueError("certificate is not a PEM X.509 certificate") from exc


# --- tokens --------------------------------------------------------------------------------


class ClientCredentialsGrant(TokenGrant):
    """The client-credentials token request of Entra ID (v2.0 endpoint).

    With a certificate, msal's `JwtAssertionCreator` signs the client assertion the way
    msal itself does for Entra: PS256 with the certificate's SHA-256 thumbprint
    (``x5t#S256``), or RS256 with ``x5t`` when only a SHA-1 thumbprint is configured.
    """

    label = "Entra ID token endpoint"

    def __init__(self, settings: GraphSettings) -> None:
        self.url = f"{settings.authority}/{quote(settings.tenant_id, safe='')}/oauth2/v2.0/token"
        self.client_id = settings.client_id
        self.scope = settings.scope
        self._secret = settings.client_secret
        self._creator: Any = None
        if settings.private_key is not None:
            key = _load_key(settings.private_key.get_secret_value())
            if settings.certificate is not None:
                cert = _load_certificate(settings.certificate)
                sha256 = cert.fingerprint(hashes.SHA256()).hex()
                self._creator = JwtAssertionCreator(key, "PS256", sha256_thumbprint=sha256)
            else:
                self._creator = JwtAssertionCreator(
                    key, "RS256", sha1_thumbprint=settings.thumbprint
                )

    def request(self, now: float) -> httpx.Request:
        """``grant_type=client_credentials`` with the secret or a fresh assertion."""
        fields = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "scope": self.scope,
        }
        if self._creator is not None:
            issued = int(now)
            assertion = self._creator.create_normal_assertion(
                audience=self.url,
                issuer=self.client_id,
                issued_at=issued,
                expires_at=issued + ASSERTION_LIFETIME,
                assertion_id=str(uuid.uuid4()),
            )
            fields["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            fields["client_assertion"] = assertion.decode("ascii")
        else:
            assert self._secret is not None
            fields["client_secret"] = self._secret.get_secret_value()
        return form_request(self.url, fields)


class MsalTokenStore:
    """Graph tokens in an `msal.TokenCache`, always queried with the flow's `now`."""

    _AT = msal.TokenCache.CredentialType.ACCESS_TOKEN

    def __init__(
        self,
        *,
        client_id: str,
        authority: str,
        scope: str,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
    ) -> None:
        self.cache = msal.TokenCache()
        self.refresh_margin = refresh_margin
        self._query = {"client_id": client_id, "environment": urlsplit(authority).netloc}
        self._scope = [scope]

    def load(self, now: float) -> AccessToken | None:
        """The cached token that is fresh at `now` (msal's ``refresh_on`` respected)."""
        for entry in self.cache.search(self._AT, target=self._scope, query=self._query, now=now):
            cached = float(entry["cached_at"])
            token = AccessToken.issued(
                entry["secret"],
                cached,
                float(entry["expires_on"]) - cached,
                self.refresh_margin,
            )
            if "refresh_on" in entry:
                refresh = min(token.refresh_at, float(entry["refresh_on"]))
                token = AccessToken(token.value, refresh, token.expires_at)
            if token.fresh(now):
                return token
        return None

    def save(self, grant: Any, now: float) -> AccessToken:
        """Add a token response to the cache as msal would after its own grant."""
        issued = int(now)
        event = {**self._query, "scope": self._scope, "response": dict(grant)}
        self.cache.add(event, now=issued)
        return AccessToken.issued(
            str(grant["access_token"]), issued, lifetime(grant), self.refresh_margin
        )

    def drop(self, value: str) -> None:
        """Remove the token `value` from the cache."""
        for entry in list(
            self.cache.search(self._AT, target=self._scope, query=self._query, now=0)
        ):
            if entry["secret"] == value:
                self.cache.remove_at(entry)


# --- the plan for one message ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one message is sent, and what that way cannot carry."""

    kind: Literal["mime", "json", "draft"]
    body: bytes
    notes: tuple[str, ...] = ()
    attachments: tuple[tuple[Part, Attachment], ...] = field(default=())


def _email_address(address: Address) -> dict[str, Any]:
    inner: dict[str, str] = {"address": address.email}
    name = clean_name(address.name)
    if name is not None:
        inner["name"] = name
    return {"emailAddress": inner}


def _file_attachment(part: Part) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": part.filename,
        "contentType": part.content_type,
        "contentBytes": part.content_b64,
        "isInline": part.inline,
    }
    if part.content_id is not None:
        doc["contentId"] = part.content_id
    return doc


def _message_document(
    message: Message, recipients: Recipients, left_out: Sequence[Address]
) -> tuple[dict[str, Any], list[str]]:
    """The Graph `message` resource (without attachments) and the notes of what it drops."""
    notes: list[str] = []
    if left_out:
        shown = ", ".join(a.email for a in left_out)
        notes.append(f"To/Cc addresses outside this envelope are not shown: {shown}")
    text, html = body_parts(message)
    doc: dict[str, Any] = {}
    if message.subject is not None:
        doc["subject"] = message.subject
    if html is not None:
        doc["body"] = {"contentType": "html", "content": html}
        if text is not None:
            notes.append("text alternative (Graph JSON carries one body: the HTML is sent)")
    else:
        doc["body"] = {"contentType": "text", "content": text or ""}
    sender = sender_of(message)
    if sender is not None:
        doc["from"] = _email_address(sender)
    for key, group in (
        ("toRecipients", recipients.to),
        ("ccRecipients", recipients.cc),
        ("bccRecipients", recipients.bcc),
    ):
        if group:
            doc[key] = [_email_address(a) for a in group]
    if message.reply_to:
        doc["replyTo"] = [_email_address(a) for a in message.reply_to]
    forwarded, dropped = custom_headers(message, repeatable=True)
    headers = []
    for name, value in forwarded:
        if name.lower().startswith("x-"):
            headers.append({"name": name, "value": value})
        else:
            dropped.append(f"header {name} (Graph JSON takes X- headers only)")
    if headers:
        doc["internetMessageHeaders"] = headers
    notes.extend(dropped)
    if message.sender is not None:
        notes.append("Sender header (Graph sets it from the mailbox)")
    if message.message_id:
        notes.append("Message-ID (Graph assigns its own)")
    return doc, notes


# --- the adapter ------------------------------------------------------------------------------


class GraphProvider(Provider[GraphSettings]):
    """Sends through one Exchange Online mailbox with Microsoft Graph."""

    settings_model: ClassVar[type[ProviderSettings]] = GraphSettings
    type: ClassVar[str] = "graph"
    default_max_message_size: ClassVar[int | None] = DEFAULT_MAX_MESSAGE_SIZE
    #: Exchange Online's default recipient limit per message.
    default_max_recipients: ClassVar[int | None] = 500

    def __init__(self, settings: GraphSettings) -> None:
        super().__init__(settings)
        self.base_url = settings.base_url or DEFAULT_BASE_URL
        self.user_url = f"{self.base_url}/v1.0/users/{quote(settings.sender, safe='@')}"
        self.oauth = OAuthClient(
            ClientCredentialsGrant(settings),
            MsalTokenStore(
                client_id=settings.client_id,
                authority=settings.authority,
                scope=settings.scope,
            ),
        )

    # planning (pure, no token)

    def _plan(self, message: Message) -> _Plan:
        recipients, left_out = split_recipients(message)
        save = self.settings.save_to_sent_items
        if save and not left_out:
            raw = prepare_raw(message.raw, bcc_header=[a.email for a in recipients.bcc])
            # Graph reads the recipients of a MIME message from its headers, as it parses
            # them: To and Cc are rewritten from the envelope recipients (see Gmail's).
            raw = restrict_recipient_fields(raw, recipients.to, recipients.cc)
            body = base64.b64encode(raw)
            if len(body) <= MAX_REQUEST_BYTES:
                return _Plan("mime", body)
        doc, notes = _message_document(message, recipients, left_out)
        items = parts(message)
        notes.extend(part_notes(items))
        full = dict(doc)
        if items:
            full["attachments"] = [_file_attachment(p) for p in items]
        body = json_body({"message": full, "saveToSentItems": save})
        if len(body) <= MAX_REQUEST_BYTES:
            return _Plan("json", body, tuple(notes))
        if not save:
            notes.append("Sent Items copy (Graph keeps one of every draft it sends)")
        return _Plan(
            "draft",
            json_body(doc),
            tuple(notes),
            tuple(zip(items, message.attachments, strict=True)),
        )

    def unsupported(self, message: Message) -> tuple[str, ...]:
        """What the request chosen for `message` cannot carry (empty for MIME)."""
        return self._plan(message).notes

    def build_request(self, message: Message, token: str | None = None) -> httpx.Request:
        """The sendMail request for `message`, with `token` as bearer when given.

        Raises:
            ValueError: the message needs the draft path (several requests; use `flow`).
        """
        plan = self._plan(message)
        if plan.kind == "draft":
            raise ValueError("this message exceeds one sendMail request; use flow()")
        return self._send_mail(plan, token)

    def _send_mail(self, plan: _Plan, token: str | None) -> httpx.Request:
        ctype = "text/plain" if plan.kind == "mime" else "application/json"
        return self._api("POST", f"{self.user_url}/sendMail", token, plan.body, ctype)

    def _api(
        self,
        method: str,
        url: str,
        token: str | None,
        body: bytes = b"",
        content_type: str | None = "application/json",
    ) -> httpx.Request:
        headers = {"User-Agent": "smtp-bridge", "Accept": "application/json"}
        if token is not None:
            headers.update(bearer(token))
        if body and content_type is not None:
            headers["Content-Type"] = content_type
        return httpx.Request(method, url, content=body, headers=headers)

    # answers

    def interpret_response(self, response: httpx.Response) -> Outcome:
        """202 (any 2xx) delivered; see the module docstring for the failures."""
        if 200 <= response.status_code < 300:
            return Delivered(status=response.status_code)
        return _failure(response)

    # the flow

    def flow(
        self, message: Message, now: float
    ) -> Generator[httpx.Request, httpx.Response, Outcome]:
        """Token if needed, then sendMail, or the draft path for large mail."""
        if sender_of(message) is None:
            return Permanent(reason="message has no From address and no envelope sender")
        plan = self._plan(message)
        if plan.kind != "draft":
            result = yield from self.oauth.call(lambda t: self._send_mail(plan, t), now)
            if not isinstance(result, httpx.Response):
                return result
            return self.interpret_response(result)
        return (yield from self._draft_flow(plan, now))

    def _draft_flow(
        self, plan: _Plan, now: float
    ) -> Generator[httpx.Request, httpx.Response, Outcome]:
        created = yield from self.oauth.call(
            lambda t: self._api("POST", f"{self.user_url}/messages", t, plan.body), now
        )
        if not isinstance(created, httpx.Response):
            return created
        if not 200 <= created.status_code < 300:
            return _failure(created, "creating the draft")
        doc = json_document(created)
        draft_id = doc.get("id") if isinstance(doc, dict) else None
        if not isinstance(draft_id, str) or not draft_id:
            return Retryable(reason="creating the draft: the answer has no message id")
        message_url = f"{self.user_url}/messages/{quote(draft_id, safe='')}"
        for n, (part, attachment) in enumerate(plan.attachments, 1):
            step = f"attachment {n} of {len(plan.attachments)} ({part.filename})"
            if attachment.size <= MAX_SIMPLE_ATTACHMENT:
                failed = yield from self._post_attachment(message_url, part, now)
            else:
                failed = yield from self._upload_attachment(message_url, part, attachment, now)
            if failed is not None:
                yield from self.oauth.call(lambda t: self._api("DELETE", message_url, t), now)
                return _prefixed(failed, step)
        sent = yield from self.oauth.call(
            lambda t: self._api("POST", f"{message_url}/send", t), now
        )
        if not isinstance(sent, httpx.Response):
            return sent
        if 200 <= sent.status_code < 300:
            return Delivered(status=sent.status_code)
        return _failure(sent, "sending the draft")

    def _post_attachment(
        self, message_url: str, part: Part, now: float
    ) -> Generator[httpx.Request, httpx.Response, Retryable | Permanent | None]:
        body = json_body(_file_attachment(part))
        result = yield from self.oauth.call(
            lambda t: self._api("POST", f"{message_url}/attachments", t, body), now
        )
        if not isinstance(result, httpx.Response):
            return result
        return None if 200 <= result.status_code < 300 else _failure(result)

    def _upload_attachment(
        self, message_url: str, part: Part, attachment: Attachment, now: float
    ) -> Generator[httpx.Request, httpx.Response, Retryable | Permanent | None]:
        item: dict[str, Any] = {
            "attachmentType": "file",
            "name": part.filename,
            "size": attachment.size,
            "contentType": part.content_type,
            "isInline": part.inline,
        }
        if part.content_id is not None:
            item["contentId"] = part.content_id
        body = json_body({"AttachmentItem": item})
        session = yield from self.oauth.call(
            lambda t: self._api("POST", f"{message_url}/attachments/createUploadSession", t, body),
            now,
        )
        if not isinstance(session, httpx.Response):
            return session
        if not 200 <= session.status_code < 300:
            return _failure(session)
        doc = json_document(session)
        upload_url = doc.get("uploadUrl") if isinstance(doc, dict) else None
        if not isinstance(upload_url, str) or not _usable_upload_url(upload_url):
            return Retryable(reason="createUploadSession answered without a usable uploadUrl")
        data = attachment.content
        total = len(data)
        start = _next_start(doc, 0)
        while start < total:
            chunk = data[start : start + UPLOAD_CHUNK]
            end = start + len(chunk) - 1
            # The upload URL carries its own authorization: a bearer token here is refused.
            response = yield httpx.Request(
                "PUT",
                upload_url,
                content=chunk,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {start}-{end}/{total}",
                    "User-Agent": "smtp-bridge",
                },
            )
            if response.status_code == 201:
                return None
            if response.status_code != 200:
                return _failure(response)
            following = _next_start(json_document(response), end + 1)
            if following <= start:
                return Retryable(reason=f"upload session made no progress at byte {start}")
            start = following
        return Retryable(reason="upload session did not confirm the last range")


def _usable_upload_url(url: str) -> bool:
    try:
        check_endpoint(url, allow_query=True)
    except ValueError:
        return False
    return True


def _next_start(doc: Any, default: int) -> int:
    """The first byte Graph expects next (``nextExpectedRanges: ["start-"]``)."""
    ranges = doc.get("nextExpectedRanges") if isinstance(doc, dict) else None
    if isinstance(ranges, list) and ranges and isinstance(ranges[0], str):
        head = ranges[0].split("-", 1)[0].strip()
        if head.isdigit():
            return int(head)
    return default


def _error_detail(response: httpx.Response) -> str | None:
    doc = json_document(response)
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    text = error.get("message")
    found = [str(x) for x in (code, text) if isinstance(x, str) and x]
    return ": ".join(found) or None


def _failure(response: httpx.Response, step: str | None = None) -> Retryable | Permanent:
    """A failed Graph answer: 401, 408, 429 and 5xx retryable, every other status permanent."""
    outcome = classify(response, _error_detail(response))
    if response.status_code == 401:
        outcome = Retryable(reason=outcome.reason, status=401)
    return _prefixed(outcome, step) if step else outcome


def _prefixed(outcome: Retryable | Permanent, step: str) -> Retryable | Permanent:
    if isinstance(outcome, Retryable):
        return Retryable(f"{step}: {outcome.reason}", outcome.status, outcome.retry_after)
    return Permanent(f"{step}: {outcome.reason}", outcome.status)
