"""Pacing and failover decisions: token buckets, circuits, the provider chain."""

from __future__ import annotations

import pytest

from bridge.pacing import Circuit, TokenBucket, choose_provider


def test_bucket_allows_a_burst_then_paces_at_the_rate() -> None:
    """Up to `capacity` go at once; after that each token waits 1/rate seconds."""
    bucket = TokenBucket(rate=2, capacity=2)

    waits = [bucket.reserve(1, now=100.0) for _ in range(4)]

    assert [0.0, 0.0, 0.5, 1.0] == waits


def test_bucket_refills_over_time() -> None:
    """Tokens come back at `rate` per second, up to the capacity."""
    bucket = TokenBucket(rate=10, capacity=10)
    bucket.reserve(10, now=0.0)

    assert 0.0 == bucket.reserve(5, now=0.5)
    assert pytest.approx(0.1) == bucket.reserve(1, now=0.5)


def test_bucket_takes_more_than_capacity_by_waiting() -> None:
    """One message with more recipients than the bucket holds waits, never blocks for ever."""
    bucket = TokenBucket(rate=100, capacity=100)

    assert pytest.approx(1.5) == bucket.reserve(250, now=1.0)


def test_circuit_opens_after_threshold_and_half_opens_after_cooldown() -> None:
    """Five failures open it; after the cooldown exactly one trial attempt goes through."""
    circuit = Circuit(threshold=5, cooldown=30)
    for _ in range(5):
        circuit.record(ok=False, now=0.0)

    closed_early = circuit.allows(10.0)
    trial = circuit.allows(31.0)
    second = circuit.allows(31.0)
    circuit.record(ok=True, now=32.0)

    assert (False, True, False) == (closed_early, trial, second)
    assert circuit.allows(32.0)


def test_circuit_failed_trial_reopens() -> None:
    """A failed half-open trial opens the circuit for another cooldown."""
    circuit = Circuit(threshold=1, cooldown=30)
    circuit.record(ok=False, now=0.0)
    assert circuit.allows(30.0)

    circuit.record(ok=False, now=30.0)

    assert not circuit.allows(59.0)
    assert circuit.is_open(59.0)


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c"), (50, "c")]
)
def test_chain_moves_on_every_failover_after_attempts(attempt: int, expected: str) -> None:
    """With failover_after=2 each account gets two attempts, the last keeps the rest."""
    assert expected == choose_provider(
        ["a", "b", "c"], attempt=attempt, failover_after=2, allows=lambda _: True
    )


def test_open_circuit_is_skipped_for_the_next_account() -> None:
    """While the scheduled account's circuit is open, the next one delivers."""
    assert "b" == choose_provider(
        ["a", "b"], attempt=1, failover_after=3, allows=lambda n: n != "a"
    )


def test_all_open_falls_back_to_the_scheduled_account() -> None:
    """A circuit steers mail elsewhere; it never holds mail back when there is nowhere else."""
    assert "b" == choose_provider(["a", "b"], attempt=4, failover_after=3, allows=lambda _: False)
