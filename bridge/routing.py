"""Which route delivers which recipient: a pure function of the config's routes.

Routes are tried in order and the first whose patterns match wins, per recipient. A
message whose recipients resolve to different routes is split at acceptance time into
one spool entry per route, so a failure at one provider never re-sends through another.

Patterns are shell globs compared case-insensitively against the whole address. A
pattern with no ``@`` and no wildcard is a domain (``example.com`` = ``*@example.com``),
and ``@example.com`` means the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from bridge.config import Route

__all__ = ["matches", "resolve", "split_by_route"]


def _normalise(pattern: str) -> str:
    pattern = pattern.strip().lower()
    if pattern.startswith("@"):
        return "*" + pattern
    if "@" not in pattern and not any(c in pattern for c in "*?["):
        return "*@" + pattern
    return pattern


def matches(address: str, patterns: Sequence[str]) -> bool:
    """True when `address` matches any of `patterns`."""
    addr = address.lower()
    return any(fnmatchcase(addr, _normalise(p)) for p in patterns)


def resolve(recipient: str, sender: str, routes: Sequence[Route]) -> int | None:
    """Index of the first route for (`sender`, `recipient`), or None when none matches.

    A route with `match.sender` set only applies to those senders; the null sender
    (empty string) matches only the pattern ``<>`` there.
    """
    for index, route in enumerate(routes):
        if route.match.sender is not None:
            if sender == "":
                if "<>" not in route.match.sender:
                    continue
            elif not matches(sender, [p for p in route.match.sender if p != "<>"]):
                continue
        if matches(recipient, route.match.recipients):
            return index
    return None


def split_by_route(
    recipients: Sequence[str], sender: str, routes: Sequence[Route]
) -> dict[int, list[str]]:
    """Group recipients by route index, keeping their order; unroutable ones are left out."""
    groups: dict[int, list[str]] = {}
    for rcpt in recipients:
        index = resolve(rcpt, sender, routes)
        if index is not None:
            groups.setdefault(index, []).append(rcpt)
    return groups
