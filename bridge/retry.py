"""The retry decision: data plus one pure function.

Theory of operation
-------------------
Rule 1. The worker records ``attempts += 1`` *before* it sends (spool.begin_attempt), so a
        message that crashes the process still moves towards dead-letter.
Rule 2. A definite answer decides: Delivered → Ack; Permanent → DeadLetter. Except an
        HTTP 401: the API refused *our* credentials, which says nothing about the message,
        so it is retried like any of our own faults (the mail waits while the operator
        fixes the key, instead of bouncing everything sent meanwhile).
Rule 3. A Retryable outcome waits ``uniform(0, min(max_delay, first_delay · 2^(n-1)))``
        ("full jitter", AWS Architecture Blog 2015), but never less than ``first_delay/2``
        so a burst of failures cannot turn into a hot loop; a provider's own Retry-After
        (or rate-limit reset) wins when it is longer, capped at `max_delay` · 6 so one odd
        header cannot park mail for days.
Rule 4. Retrying stops at `max_age` after acceptance (Postfix's maximal_queue_lifetime,
        default 5 days) or after `max_attempts` when set: then DeadLetter. A retry that
        would fall after the deadline is moved to the deadline, so the last attempt is
        made rather than skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bridge.config import RetryConfig
from bridge.model import Delivered, Outcome, Permanent, Retryable

__all__ = ["Ack", "DeadLetter", "Decision", "RetryAt", "backoff", "decide", "effective"]


@dataclass(frozen=True, slots=True)
class Ack:
    """Delivered: record it and stop."""


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Try again at `when` (unix time)."""

    when: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Give up: the entry goes dead, with `reason`."""

    reason: str


Decision = Ack | RetryAt | DeadLetter


def backoff(policy: RetryConfig, attempt: int, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    ceiling = min(policy.max_delay, policy.first_delay * 2.0 ** max(0, attempt - 1))
    floor = min(ceiling, policy.first_delay / 2.0)
    return floor + rng.random() * (ceiling - floor)


def decide(
    policy: RetryConfig,
    *,
    attempt: int,
    accepted_at: float,
    outcome: Outcome,
    now: float,
    rng: random.Random,
) -> Decision:
    """What to do after attempt number `attempt` ended with `outcome`.

    Args:
        policy: The retry settings.
        attempt: 1 for the first attempt.
        accepted_at: When the message got its 250 (unix time).
        outcome: What the attempt produced.
        now: The current unix time.
        rng: Source of jitter (seeded in tests).

    Returns:
        Ack, RetryAt or DeadLetter.
    """
    outcome = effective(outcome)
    if isinstance(outcome, Delivered):
        return Ack()
    if isinstance(outcome, Permanent):
        return DeadLetter(reason=outcome.reason)
    deadline = accepted_at + policy.max_age
    if policy.max_attempts is not None and attempt >= policy.max_attempts:
        return DeadLetter(reason=f"gave up after {attempt} attempts: {outcome.reason}")
    if now >= deadline:
        return DeadLetter(
            reason=f"gave up after {policy.max_age:.0f}s in the queue: {outcome.reason}"
        )
    delay = backoff(policy, attempt, rng)
    if outcome.retry_after is not None:
        delay = max(delay, min(outcome.retry_after, policy.max_delay * 6))
    return RetryAt(when=min(now + delay, deadline))


def effective(outcome: Outcome) -> Outcome:
    """The outcome as the policy reads it: a permanent 401 is retryable (see the top)."""
    if isinstance(outcome, Permanent) and outcome.status == 401:
        return Retryable(reason=f"{outcome.reason} (credentials refused)", status=401)
    return outcome
