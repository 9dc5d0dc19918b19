"""The retry decision, every branch, with a seeded RNG and no sleeping."""

from __future__ import annotations

import random

import pytest

from bridge.config import RetryConfig
from bridge.model import Delivered, Permanent, Retryable
from bridge.retry import Ack, DeadLetter, RetryAt, backoff, decide

POLICY = RetryConfig(first_delay=10, max_delay=600, max_age=5 * 86400)
T0 = 1_700_000_000.0


def run(
    outcome: object, *, attempt: int = 1, now: float = T0, policy: RetryConfig = POLICY
) -> object:
    return decide(policy, attempt=attempt, accepted_at=T0, outcome=outcome, now=now,  # type: ignore[arg-type]
                  rng=random.Random(7))  # fmt: skip


def test_delivered_is_ack() -> None:
    """A delivered outcome acknowledges the entry."""
    assert Ack() == run(Delivered(status=202))


def test_permanent_is_dead_letter_without_retry() -> None:
    """A permanent answer goes dead at once, carrying the provider's reason."""
    assert DeadLetter(reason="HTTP 400: bad") == run(Permanent(reason="HTTP 400: bad", status=400))


def test_retryable_waits_within_the_jittered_window() -> None:
    """Attempt n waits between first_delay/2 and min(max_delay, first_delay·2^(n-1))."""
    for attempt, ceiling in [(1, 10), (2, 20), (3, 40), (7, 600), (30, 600)]:
        decision = run(Retryable(reason="503"), attempt=attempt)
        assert isinstance(decision, RetryAt)
        assert 5 <= decision.when - T0 <= ceiling


def test_backoff_is_spread_by_jitter() -> None:
    """Full jitter spreads retries instead of synchronising them."""
    rng = random.Random(1)

    waits = {round(backoff(POLICY, 8, rng)) for _ in range(50)}

    assert len(waits) > 20


def test_retry_after_longer_than_backoff_wins() -> None:
    """A provider's Retry-After is honoured when it asks for longer."""
    decision = run(Retryable(reason="429", status=429, retry_after=120))

    assert RetryAt(when=T0 + 120) == decision


def test_retry_after_is_capped() -> None:
    """An absurd Retry-After cannot park mail beyond six max_delays."""
    decision = run(Retryable(reason="429", retry_after=10**9))

    assert RetryAt(when=T0 + 3600) == decision


def test_max_age_reached_is_dead_letter() -> None:
    """After max_age in the queue a retryable failure goes dead."""
    decision = run(Retryable(reason="503"), attempt=40, now=T0 + 5 * 86400)

    assert isinstance(decision, DeadLetter)
    assert decision.reason.startswith("gave up after 432000s in the queue: 503")


def test_last_retry_is_moved_to_the_deadline() -> None:
    """A retry that would fall after max_age happens at max_age instead."""
    decision = run(Retryable(reason="503"), attempt=40, now=T0 + 5 * 86400 - 1)

    assert RetryAt(when=T0 + 5 * 86400) == decision


@pytest.mark.parametrize(("attempt", "dead"), [(2, False), (3, True)])
def test_max_attempts(attempt: int, dead: bool) -> None:
    """With max_attempts set, the attempt that reaches it goes dead."""
    policy = RetryConfig(first_delay=1, max_delay=10, max_age=86400, max_attempts=3)

    decision = run(Retryable(reason="x"), attempt=attempt, policy=policy)

    assert dead == isinstance(decision, DeadLetter)


def test_401_is_retried_not_bounced() -> None:
    """A refused API key is our fault, not the message's: retried, never dead at once."""
    decision = run(Permanent(reason="HTTP 401: bad key", status=401))

    assert isinstance(decision, RetryAt)
