"""What the five JSON-only adapters (SendGrid, Postmark, Resend, Brevo, Mailjet) share.

None of these APIs takes raw MIME, so each adapter decomposes the parsed `Message` into
the API's own fields. The rules they all follow live here, once:

Rule 1 — the envelope is the authority. Deliver to ``message.envelope.rcpt_to``, each
address once, and nobody else. A To/Cc header address that is also in the envelope is
sent in that role with its display name; an envelope address in neither is sent as Bcc;
a header address outside the envelope (another route's share of a split message, or a
header the client never RCPT'd) is left out, which also removes it from the visible
headers. That loss is reported, not silent.

Rule 2 — every API here insists on at least one To recipient. When no envelope
recipient is in To, no honest To header exists, so each recipient gets a copy of their
own, addressed To them alone: nobody learns who else received it. (`copies()`.)

Rule 3 — what an API cannot carry is collected as short notes while the body is built,
from the same code path, so ``unsupported(message)`` can never drift from what is sent.

Rule 4 — bodies are deterministic UTF-8 JSON (`json_body()`), so a retry sends the
same bytes and tests can compare them.

Everything here is pure: no clock, no environment, no I/O.
"""

from __future__ import annotations

import base64
import email.utils
import json
import re
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from bridge.model import Address, Attachment, Delivered, Message, Outcome, Permanent, Retryable
from bridge.providers.base import Flow, Provider, ProviderSettings, body_excerpt, parse_retry_after

__all__ = [
    "EMPTY_BODY_TEXT",
    "EMPTY_SUBJECT",
    "ApiSettings",
    "JsonMailProvider",
    "Part",
    "Recipients",
    "address_key",
    "body_parts",
    "classify",
    "clean_name",
    "combine_copies",
    "combine_items",
    "copies",
    "custom_headers",
    "envelope_notes",
    "format_address",
    "is_inline",
    "is_transient_status",
    "json_body",
    "json_document",
    "part_notes",
    "parts",
    "rate_limit_delay",
    "reason",
    "require_sender",
    "required_bodies",
    "required_subject",
    "sender_of",
    "split_recipients",
]

#: Sent as the text body when a message has neither text nor HTML (an attachment-only
#: mail). Every API here rejects a message without a body, and SendGrid rejects an empty
#: string (content value minLength 1); one space renders as nothing in every client.
EMPTY_BODY_TEXT = " "

#: Sent as the subject to the APIs that require one (SendGrid, Resend, Brevo) when the
#: message has none: a missing Subject header is legal mail, and one space keeps the
#: subject line visibly empty instead of inventing words.
EMPTY_SUBJECT = " "


# --- settings ------------------------------------------------------------------------


class ApiSettings(ProviderSettings):
    """Settings shared by the JSON APIs: `base_url` is scheme, host and optional port.

    The adapter appends the API's own path (``/v3/mail/send`` …), so a proxy or a test
    sink can stand in for the production host. Plain ``http://`` is accepted only for a
    loopback host: the API key travels in a request header.
    """


# --- addresses and recipients ----------------------------------------------------------


def address_key(email: str) -> str:
    """The form two addresses are compared in: case-insensitive, as every MTA treats them."""
    return email.strip().lower()


def clean_name(name: str | None) -> str | None:
    """A display name fit for a JSON field: control characters and runs of blanks
    become one space (a CR/LF here would be header injection at the provider)."""
    if not name:
        return None
    cleaned = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", name).split())
    return cleaned or None


def format_address(address: Address) -> str:
    """``"Display Name" <addr>`` or a bare ``addr``, for APIs that take address strings.

    The name is always quoted, so commas, dots and non-ASCII need no case analysis;
    the receiving API parses it with an RFC 5322 parser.
    """
    name = clean_name(address.name)
    if name is None:
        return address.email
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{address.email}>'


@dataclass(frozen=True, slots=True)
class Recipients:
    """One copy's recipients, split by the role the API will show them in."""

    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]

    @property
    def count(self) -> int:
        """How many envelope recipients this copy reaches."""
        return len(self.to) + len(self.cc) + len(self.bcc)


def split_recipients(message: Message) -> tuple[Recipients, tuple[Address, ...]]:
    """The envelope recipients by role, and the To/Cc addresses left out (Rule 1).

    Returns:
        ``(recipients, left_out)``: `left_out` are header addresses not in the envelope.
    """
    envelope: dict[str, str] = {}
    for rcpt in message.envelope.rcpt_to:
        envelope.setdefault(address_key(rcpt), rcpt)
    placed: set[str] = set()
    left_out: list[Address] = []

    def pick(header: Sequence[Address]) -> tuple[Address, ...]:
        chosen = []
        for addr in header:
            key = address_key(addr.email)
            if key not in envelope:
                left_out.append(addr)
            elif key not in placed:
                placed.add(key)
                chosen.append(addr)
        return tuple(chosen)

    to = pick(message.to)
    cc = pick(message.cc)
    bcc_names = {address_key(a.email): a.name for a in message.bcc}
    bcc = tuple(
        Address(rcpt, bcc_names.get(key)) for key, rcpt in envelope.items() if key not in placed
    )
    return Recipients(to, cc, bcc), tuple(left_out)


def copies(recipients: Recipients) -> tuple[Recipients, ...]:
    """The copies to send (Rule 2): one, or one per recipient when nobody is in To."""
    if recipients.to:
        return (recipients,)
    return tuple(Recipients((addr,), (), ()) for addr in (*recipients.cc, *recipients.bcc))


def envelope_notes(message: Message) -> list[str]:
    """The losses every JSON API shares: recipients, Sender and Message-ID."""
    recipients, left_out = split_recipients(message)
    notes = []
    if left_out:
        shown = ", ".join(a.email for a in left_out)
        notes.append(f"To/Cc addresses outside this envelope are not shown: {shown}")
    if not recipients.to and recipients.count > 1:
        notes.append("no To recipient in the envelope: each recipient gets a separate copy")
    if recipients.cc and not recipients.to:
        notes.append("Cc recipients are shown as To on their own copies")
    sender = sender_of(message)
    if message.sender is not None and (
        sender is None or address_key(message.sender.email) != address_key(sender.email)
    ):
        notes.append("Sender header (the API has no field for it)")
    if message.message_id:
        # Replies will reference the provider's Message-ID, not the one the sending
        # application recorded. (Date is also restamped, but within seconds: no note.)
        notes.append("Message-ID (the provider assigns its own)")
    return notes


def sender_of(message: Message) -> Address | None:
    """The From address to send with: the header's, else the envelope sender.

    The parser already falls back to the envelope and the route's default sender; this
    repeats the envelope step so an adapter never sends an empty From.
    """
    if message.from_ is not None:
        return message.from_
    if message.envelope.mail_from:
        return Address(message.envelope.mail_from)
    return None


# --- bodies and attachments -------------------------------------------------------------


def body_parts(message: Message) -> tuple[str | None, str | None]:
    """``(text, html)``; an empty part counts as absent (the APIs reject empty strings)."""
    return message.text or None, message.html or None


def required_bodies(message: Message, notes: list[str]) -> tuple[str | None, str | None]:
    """`body_parts`, with a single-space text when there is neither (APIs demand one)."""
    text, html = body_parts(message)
    if text is None and html is None:
        notes.append("no text or HTML body: a single space is sent as text")
        return EMPTY_BODY_TEXT, None
    return text, html


def required_subject(message: Message, notes: list[str]) -> str:
    """The subject, or a single space for the APIs that demand one (noted)."""
    if message.subject:
        return message.subject
    notes.append("empty subject sent as a single space (the API requires one)")
    return EMPTY_SUBJECT


@dataclass(frozen=True, slots=True)
class Part:
    """One attachment or inline image, ready for a JSON API."""

    filename: str
    content_type: str
    content_b64: str
    inline: bool
    content_id: str | None
    named: bool  # False when the filename was made up because the MIME part had none


_EXTENSIONS = {
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "application/json": ".json",
    "application/xml": ".xml",
    "application/msword": ".doc",
    "application/vnd.ms-excel": ".xls",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/tiff": ".tif",
    "text/plain": ".txt",
    "text/csv": ".csv",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/xml": ".xml",
    "message/rfc822": ".eml",
}
"""A small fixed table for naming unnamed parts; `mimetypes` would read the host's files."""


def _bare_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _content_id(attachment: Attachment) -> str | None:
    if not attachment.content_id:
        return None
    return attachment.content_id.strip().strip("<>").strip() or None


def is_inline(attachment: Attachment, html: str | None) -> bool:
    """Whether a part is an inline image: it has a Content-ID and is either marked inline
    or referenced from the HTML as ``cid:`` (a related part without a disposition)."""
    cid = _content_id(attachment)
    if cid is None:
        return False
    if attachment.disposition == "inline":
        return True
    return html is not None and f"cid:{cid}".lower() in html.lower()


def parts(message: Message) -> tuple[Part, ...]:
    """The message's attachments and inline images, base64 encoded without line breaks."""
    _, html = body_parts(message)
    out = []
    for n, att in enumerate(message.attachments, 1):
        inline = is_inline(att, html)
        filename = clean_name(att.filename)
        if filename is None:
            stem = "inline" if inline else "attachment"
            filename = f"{stem}-{n}{_EXTENSIONS.get(_bare_type(att.content_type), '.bin')}"
        out.append(
            Part(
                filename=filename,
                content_type=att.content_type or "application/octet-stream",
                content_b64=base64.b64encode(att.content).decode("ascii"),
                inline=inline,
                content_id=_content_id(att) if inline else None,
                named=att.filename is not None and clean_name(att.filename) is not None,
            )
        )
    return tuple(out)


def part_notes(items: Iterable[Part]) -> list[str]:
    """Notes for parts whose filename had to be made up."""
    return [f"unnamed part sent as {p.filename}" for p in items if not p.named]


# --- custom headers ---------------------------------------------------------------------

_FORWARDED = frozenset(
    {
        "in-reply-to",
        "references",
        "auto-submitted",
        "precedence",
        "importance",
        "priority",
        "sensitivity",
        "keywords",
        "comments",
        "organization",
        "disposition-notification-to",
        "thread-topic",
        "thread-index",
        "feedback-id",
    }
)
_FORWARDED_PREFIXES = ("x-", "list-")

# Carried by dedicated fields, or rewritten by every hop anyway: never forwarded, and
# not worth a note (Message-ID, Date and Sender get notes from `envelope_notes`).
_STRUCTURAL = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "received",
        "return-path",
        "delivered-to",
        "dkim-signature",
        "domainkey-signature",
        "authentication-results",
        "received-spf",
    }
)
_STRUCTURAL_PREFIXES = ("content-", "arc-")


def _clean_value(value: str) -> str:
    return " ".join(re.sub(r"[\r\n\x00]", " ", value).split())


def custom_headers(
    message: Message,
    *,
    forbidden: frozenset[str] = frozenset(),
    forbidden_prefixes: tuple[str, ...] = (),
    repeatable: bool = False,
) -> tuple[list[tuple[str, str]], list[str]]:
    """The top-level headers to pass through the API's custom-header field.

    Threading and list headers (In-Reply-To, References, List-*), the usual
    informational ones and every ``X-`` header are forwarded, minus the API's own
    `forbidden` names (lower-case) and prefixes. An API whose header field is a JSON
    object takes one value per name (`repeatable` False): later repeats are dropped.

    Returns:
        ``(headers, notes)``: headers in message order, notes about what was dropped.
    """
    out: list[tuple[str, str]] = []
    notes: list[str] = []
    seen: set[str] = set()
    for header in message.headers:
        lname = header.name.lower()
        if lname in _STRUCTURAL or lname.startswith(_STRUCTURAL_PREFIXES):
            continue
        if lname in forbidden or lname.startswith(forbidden_prefixes):
            notes.append(f"header {header.name} (the API forbids it)")
            continue
        if lname not in _FORWARDED and not lname.startswith(_FORWARDED_PREFIXES):
            notes.append(f"header {header.name}")
            continue
        if lname in seen and not repeatable:
            notes.append(f"repeated header {header.name} (one value per name)")
            continue
        seen.add(lname)
        out.append((header.name, _clean_value(header.value)))
    return out, notes


# --- requests -----------------------------------------------------------------------------


def json_body(document: Any) -> bytes:
    """Deterministic UTF-8 JSON: non-ASCII kept as is, no insignificant whitespace."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


S = TypeVar("S", bound=ProviderSettings)


class JsonMailProvider(Provider[S]):
    """An adapter that may need one request per copy (Rule 2).

    Subclasses implement `build_requests` and `interpret_response`. A message that needs
    several requests is sent copy after copy; the first failure ends the flow with that
    failure, so a retry starts again from the first copy (adapters with idempotency
    keys give each copy its own key, which makes the repeat harmless).
    """

    @abstractmethod
    def build_requests(self, message: Message) -> tuple[httpx.Request, ...]:
        """Every request that together delivers `message`, in order (at least one)."""

    def build_request(self, message: Message) -> httpx.Request:
        """The request that sends `message`.

        Raises:
            ValueError: the message needs several requests (use `flow`) or has no From.
        """
        requests = self.build_requests(message)
        if len(requests) != 1:
            raise ValueError(f"this message needs {len(requests)} requests; use flow()")
        return requests[0]

    def flow(self, message: Message, now: float) -> Flow:
        """Send each copy in turn; stop at the first copy that is not delivered."""
        if sender_of(message) is None:
            return Permanent(reason="message has no From address and no envelope sender")
        requests = self.build_requests(message)
        outcomes: list[Delivered] = []
        for n, request in enumerate(requests, 1):
            response = yield request
            outcome = self.interpret_response(response)
            if not isinstance(outcome, Delivered):
                return _nth(outcome, n, len(requests), len(outcomes))
            outcomes.append(outcome)
        return combine_copies(outcomes)


def _nth(outcome: Retryable | Permanent, n: int, total: int, done: int) -> Outcome:
    if total == 1:
        return outcome
    prefix = f"copy {n} of {total} ({done} delivered): "
    if isinstance(outcome, Retryable):
        return Retryable(prefix + outcome.reason, outcome.status, outcome.retry_after)
    return Permanent(prefix + outcome.reason, outcome.status)


def combine_copies(outcomes: Sequence[Delivered]) -> Delivered:
    """One `Delivered` for several accepted copies: provider ids joined by commas."""
    ids = [o.provider_message_id for o in outcomes if o.provider_message_id]
    status = outcomes[-1].status if outcomes else None
    return Delivered(status=status, provider_message_id=",".join(dict.fromkeys(ids)) or None)


def require_sender(message: Message) -> Address:
    """`sender_of(message)`, or ValueError: no API here accepts a message without From."""
    sender = sender_of(message)
    if sender is None:
        raise ValueError("message has no From address and no envelope sender")
    return sender


# --- responses ------------------------------------------------------------------------------


def json_document(response: httpx.Response) -> Any:
    """The response body as JSON, or None when it is empty or not JSON."""
    try:
        content = response.content
    except httpx.ResponseNotRead:
        return None
    if not content.strip():
        return None
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


def rate_limit_delay(
    response: httpx.Response,
    *,
    reset_header: str | None = None,
    reset_is_epoch: bool = False,
) -> float | None:
    """Seconds to wait before retrying: ``Retry-After`` first, then the API's reset header.

    A reset header in epoch seconds (SendGrid's ``X-RateLimit-Reset``) is measured against
    the response's own ``Date`` header, which keeps this pure; without a Date, None.
    """
    delay = parse_retry_after(response)
    if delay is not None or reset_header is None:
        return delay
    value = _number(response.headers.get(reset_header))
    if value is None or not reset_is_epoch:
        return value
    date_value = response.headers.get("date")
    if date_value is None:
        return None
    try:
        now = email.utils.parsedate_to_datetime(date_value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, value - now)


def reason(response: httpx.Response, detail: str | None) -> str:
    """``HTTP <status>: <detail>``, falling back to a bounded excerpt of the body."""
    text = detail or body_excerpt(response)
    text = " ".join(text.split())[:300]
    return f"HTTP {response.status_code}: {text}" if text else f"HTTP {response.status_code}"


def is_transient_status(status: int) -> bool:
    """408, 429 and 5xx: the statuses every API here documents as worth retrying."""
    return status in (408, 429) or status >= 500


def classify(
    response: httpx.Response,
    detail: str | None,
    *,
    delay: Callable[[httpx.Response], float | None] = parse_retry_after,
) -> Retryable | Permanent:
    """A failed response as Retryable (408, 429, 5xx) or Permanent (every other status)."""
    status = response.status_code
    why = reason(response, detail)
    if is_transient_status(status):
        return Retryable(reason=why, status=status, retry_after=delay(response))
    return Permanent(reason=why, status=status)


def combine_items(outcomes: Sequence[Outcome], status: int | None) -> Outcome:
    """One outcome for a call that carried several copies, each answered on its own
    (a Postmark batch, a Mailjet ``Messages`` array).

    All accepted: delivered. Otherwise retryable if any refused copy may succeed later
    (a retry re-sends the accepted copies too: these APIs have no idempotency key), and
    permanent if every refusal is final; the reason counts what was accepted.
    """
    failures = [o for o in outcomes if not isinstance(o, Delivered)]
    if not failures:
        return combine_copies([o for o in outcomes if isinstance(o, Delivered)])
    accepted = len(outcomes) - len(failures)
    prefix = f"{accepted} of {len(outcomes)} copies accepted; " if accepted else ""
    why = prefix + "; ".join(dict.fromkeys(f.reason for f in failures))
    retryable = [f for f in failures if isinstance(f, Retryable)]
    if retryable:
        delays = [f.retry_after for f in retryable if f.retry_after is not None]
        return Retryable(reason=why, status=status, retry_after=max(delays) if delays else None)
    return Permanent(reason=why, status=status)
