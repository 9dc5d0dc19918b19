"""Pacing and failover decisions: pure state machines that are handed the clock.

* `TokenBucket` — requests/s or recipients/s for one provider account. `reserve(n, now)`
  takes n tokens and returns how long the caller must wait before using them, so bursts
  up to the bucket size go out at once and the long-run rate stays at `rate`.
* `Circuit` — per provider account: after `threshold` retryable failures in a row it
  opens for `cooldown` seconds, so a failover chain stops waiting on an API that is down;
  then one trial attempt is let through (half-open) and its outcome closes or reopens it.
* `choose_provider` — which account of a route's chain makes an attempt.

Failover rule: a definite answer (delivered or permanent) from one account is final and is
never followed by a send through another; only retryable failures move along the chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

__all__ = ["Circuit", "TokenBucket", "choose_provider"]


@dataclasses.dataclass
class TokenBucket:
    """A token bucket of `capacity` tokens refilled at `rate` tokens per second."""

    rate: float
    capacity: float
    tokens: float = dataclasses.field(default=-1.0)
    updated: float | None = None

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        if self.tokens < 0:
            self.tokens = self.capacity

    def reserve(self, amount: float, now: float) -> float:
        """Take `amount` tokens (may go into debt); seconds to wait before using them.

        An amount larger than the capacity is allowed (one message with many recipients)
        and simply waits for the debt to be repaid, instead of blocking for ever.
        """
        if self.updated is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclasses.dataclass
class Circuit:
    """Closed → open after `threshold` consecutive failures → half-open after `cooldown`."""

    threshold: int = 5
    cooldown: float = 30.0
    failures: int = 0
    opened_at: float | None = None
    trial: bool = False

    def allows(self, now: float) -> bool:
        """May an attempt go to this account now? In half-open state, only one at a time."""
        if self.opened_at is None:
            return True
        if now - self.opened_at < self.cooldown or self.trial:
            return False
        self.trial = True
        return True

    def record(self, *, ok: bool, now: float) -> None:
        """Feed back an attempt: `ok` for any definite answer, False for retryable."""
        self.trial = False
        if ok:
            self.failures = 0
            self.opened_at = None
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = now

    def is_open(self, now: float) -> bool:
        """True while attempts are held back."""
        return self.opened_at is not None and now - self.opened_at < self.cooldown


def choose_provider(
    chain: Sequence[str],
    *,
    attempt: int,
    failover_after: int,
    allows: Callable[[str], bool],
) -> str:
    """The account for attempt number `attempt` (1-based) of an entry on this chain.

    Every `failover_after` retryable failures move one step along the chain (the last
    account keeps the rest). An account whose circuit is open is skipped in favour of
    the next one; if every later account is open too, earlier ones are tried. When every
    account is held back the scheduled one is used anyway: a circuit exists to steer mail
    to an alternative, not to hold it back (the retry backoff already spaces attempts).
    """
    if not chain:
        raise ValueError("a route has at least one provider account")
    start = min((attempt - 1) // max(1, failover_after), len(chain) - 1)
    order = [*chain[start:], *reversed(chain[:start])]
    for name in order:
        if allows(name):
            return name
    return chain[start]
