"""Frozen values that flow through the bridge.

SMTP in → `Envelope` + raw bytes → spool → `mime.parse_message` → `Message` →
provider adapter → `Outcome` (`Delivered` | `Retryable` | `Permanent`).

These classes do no I/O and hold no behaviour beyond small derived properties, so they
are safe to share between tasks and to compare in tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

__all__ = [
    "Address",
    "Attachment",
    "Delivered",
    "Envelope",
    "Header",
    "Message",
    "Outcome",
    "Permanent",
    "Retryable",
]


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox: a Unicode addr-spec and an optional decoded display name."""

    email: str
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.email:
            raise ValueError("Address.email must not be empty")


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP client said in MAIL FROM / RCPT TO: the delivery authority.

    `mail_from` is the empty string for the null reverse-path ``<>``, never ``"<>"``.
    """

    mail_from: str
    rcpt_to: tuple[str, ...]
    helo: str | None = None
    client_address: str | None = None
    auth_user: str | None = None
    smtputf8: bool = False

    def __post_init__(self) -> None:
        if not self.rcpt_to:
            raise ValueError("Envelope.rcpt_to must name at least one recipient")
        if self.mail_from == "<>":
            raise ValueError("the null reverse-path is the empty string, not '<>'")


@dataclass(frozen=True, slots=True)
class Header:
    """A top-level header: the name as sent, the value decoded and unfolded."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class Attachment:
    """A non-body MIME part, with its decoded bytes."""

    filename: str | None
    content_type: str
    disposition: Literal["attachment", "inline"]
    content_id: str | None
    content: bytes = field(repr=False)

    @property
    def size(self) -> int:
        """Length of the decoded bytes."""
        return len(self.content)

    @property
    def sha256(self) -> str:
        """SHA-256 of the decoded bytes, lower-case hex."""
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True, slots=True)
class Message:
    """The provider-neutral message: everything message-v1 carries.

    `envelope` is the delivery set (after a route split, that route's subset).
    `bcc` holds envelope recipients that appear in neither To nor Cc.
    `from_` falls back to the envelope sender, then to the route's default sender.
    `raw` is the message exactly as received (after dot-unstuffing).
    """

    id: str
    received_at: datetime
    envelope: Envelope
    from_: Address | None
    sender: Address | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    subject: str | None
    text: str | None
    html: str | None
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    date: datetime | None
    headers: tuple[Header, ...]
    attachments: tuple[Attachment, ...]
    raw: bytes = field(repr=False)

    def header(self, name: str) -> str | None:
        """The first top-level header called `name` (case-insensitive), or None."""
        lname = name.lower()
        for h in self.headers:
            if h.name.lower() == lname:
                return h.value
        return None


# --- outcomes of one delivery attempt: values, not exceptions (h11's "events are values")


@dataclass(frozen=True, slots=True)
class Delivered:
    """The provider accepted the message."""

    status: int | None = None
    provider_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Retryable:
    """The attempt failed in a way that may succeed later.

    `retry_after` is in seconds from now, when the provider said (Retry-After, a
    rate-limit reset); None lets the retry policy choose.
    """

    reason: str
    status: int | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Permanent:
    """The provider refused the message for good; retrying cannot help."""

    reason: str
    status: int | None = None


Outcome = Delivered | Retryable | Permanent
