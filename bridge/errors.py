"""The exception tree of smtp-bridge.

Expected results of a delivery attempt are *values* (see `bridge.model.Outcome`), not
exceptions. Exceptions are for things the caller must answer for::

    BridgeError
    ├── ConfigError              .problems: [(key_path, message)]  → CLI exit 78 (EX_CONFIG)
    │   └── ProviderSettingsError   one provider's settings block is wrong
    ├── MessageError             .smtp_reply (5xx)                 → rejected at DATA
    │   ├── MessageTooLarge
    │   └── UnroutableRecipient  (550 5.1.1 at RCPT)
    └── SpoolError               .smtp_reply (4xx)                 → 451/452 at DATA
        ├── SpoolFull            (452 4.3.1: the sender keeps the mail)
        └── SpoolCorrupt

Each class carries the data its handler needs to answer, so no handler parses messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "BridgeError",
    "ConfigError",
    "MessageError",
    "MessageTooLarge",
    "ProviderSettingsError",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolFull",
    "UnroutableRecipient",
]

KeyPath = tuple[str | int, ...]


class BridgeError(Exception):
    """Root of every error smtp-bridge raises on purpose."""


def format_key_path(path: Sequence[str | int]) -> str:
    """Render a key path the way a user reads YAML: ``routes[0].match.recipients``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


class ConfigError(BridgeError):
    """The configuration is invalid; `problems` lists every mistake with its key path."""

    def __init__(self, problems: Iterable[tuple[KeyPath, str]]) -> None:
        self.problems: list[tuple[KeyPath, str]] = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        """One line per problem: ``key.path: message``."""
        return "\n".join(f"{format_key_path(p)}: {m}" for p, m in self.problems)


class ProviderSettingsError(ConfigError):
    """A provider's own settings block failed its schema."""


class MessageError(BridgeError):
    """The client sent something we refuse for good; `smtp_reply` is the 5xx to send."""

    smtp_reply = "554 5.6.0 Message rejected"

    def __init__(self, detail: str, smtp_reply: str | None = None) -> None:
        super().__init__(detail)
        if smtp_reply is not None:
            self.smtp_reply = smtp_reply


class MessageTooLarge(MessageError):
    """The message exceeds the size limit of the listener or of its route."""

    smtp_reply = "552 5.3.4 Message size exceeds fixed maximum message size"


class UnroutableRecipient(MessageError):
    """No route accepts this recipient."""

    smtp_reply = "550 5.1.1 Recipient not accepted here"


class SpoolError(BridgeError):
    """The spool could not store or update a message; `smtp_reply` is the 4xx to send."""

    smtp_reply = "451 4.3.0 Temporary failure, please try again later"


class SpoolFull(SpoolError):
    """The spool has no room (entry limit, disk reserve, or SQLITE_FULL)."""

    smtp_reply = "452 4.3.1 Insufficient system storage, please try again later"


class SpoolCorrupt(SpoolError):
    """An entry in the spool cannot be read back (moved to dead with a reason)."""
