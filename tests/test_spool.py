"""The spool: durability order, states, recovery, limits, on a real SQLite file."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.errors import SpoolError, SpoolFull
from bridge.model import Envelope
from bridge.spool import NewEntry, Spool, State, new_id


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


ENV = Envelope(mail_from="a@example.com", rcpt_to=("b@example.org",))


def entry(route: int = 0, provider: str = "hook", env: Envelope = ENV) -> NewEntry:
    return NewEntry(route=route, provider=provider, envelope=env)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def spool(tmp_path: Path, clock: Clock) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool.sqlite3", min_free_space=0, clock=clock)
    await s.open()
    yield s
    await s.close()


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the file with a separate connection, as a second process would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_put_is_readable_by_another_connection_when_it_returns(spool: Spool) -> None:
    """Once put() returns, the body and envelope are committed (visible to a new connection)."""
    raw = b"Subject: x\r\n\r\nbody\r\n"

    (eid,) = await spool.put(raw, [entry()], message_id="<m@x>")

    assert [(raw,)] == rows(spool.path, "SELECT raw FROM bodies")
    assert [(eid, "queued", "<m@x>")] == rows(
        spool.path, "SELECT id, state, message_id FROM entries"
    )


async def test_wal_and_full_sync_are_on(spool: Spool) -> None:
    """The database runs in WAL mode (synchronous is per connection and set on ours)."""
    assert [("wal",)] == rows(spool.path, "PRAGMA journal_mode")


async def test_route_split_shares_one_body(spool: Spool) -> None:
    """Two entries from one message store the bytes once."""
    e1 = Envelope(mail_from="a@x.com", rcpt_to=("b@one.org",))
    e2 = Envelope(mail_from="a@x.com", rcpt_to=("c@two.org", "d@two.org"))

    ids = await spool.put(b"raw", [entry(0, "one", e1), entry(1, "two", e2)])

    assert 2 == len(ids)
    assert [(1,)] == rows(spool.path, "SELECT COUNT(*) FROM bodies")
    got = await spool.get(ids[1])
    assert got is not None
    assert ("c@two.org", "d@two.org") == got.envelope.rcpt_to
    assert "two" == got.provider


async def test_concurrent_puts_all_land(spool: Spool) -> None:
    """Many concurrent arrivals are all stored (group commit does not drop any)."""
    ids = await asyncio.gather(*(spool.put(f"m{i}".encode(), [entry()]) for i in range(200)))

    assert 200 == len({i for (i,) in ids})
    assert [(200,)] == rows(spool.path, "SELECT COUNT(*) FROM entries")


async def test_claim_increments_attempts_before_sending(spool: Spool, clock: Clock) -> None:
    """claim_due marks entries inflight with attempts+1 in the stored row."""
    (eid,) = await spool.put(b"raw", [entry()])

    claims = await spool.claim_due(clock(), 10)

    assert [eid] == [c.entry.id for c in claims]
    assert b"raw" == claims[0].raw
    assert 1 == claims[0].entry.attempts
    assert [("inflight", 1)] == rows(spool.path, "SELECT state, attempts FROM entries")
    assert [] == await spool.claim_due(clock(), 10)


async def test_recover_makes_inflight_due_again(tmp_path: Path, clock: Clock) -> None:
    """An entry left inflight by a crash is due again after reopening and recover()."""
    path = tmp_path / "s.sqlite3"
    first = Spool(path, min_free_space=0, clock=clock)
    await first.open()
    (eid,) = await first.put(b"raw", [entry()])
    await first.claim_due(clock(), 1)
    await first.close()  # as if the process had died after claiming

    second = Spool(path, min_free_space=0, clock=clock)
    await second.open()
    recovered = await second.recover()
    claims = await second.claim_due(clock(), 10)
    await second.close()

    assert 1 == recovered
    assert [eid] == [c.entry.id for c in claims]
    assert 2 == claims[0].entry.attempts


async def test_deferred_waits_for_next_at(spool: Spool, clock: Clock) -> None:
    """A deferred entry is not claimed before its next_at, and is after."""
    await spool.put(b"raw", [entry()])
    (claim,) = await spool.claim_due(clock(), 1)
    await spool.finish(
        claim.entry, state=State.DEFERRED, started_at=clock(), outcome="retry", status=503,
        detail="HTTP 503", next_at=clock() + 60,
    )  # fmt: skip

    early = await spool.claim_due(clock() + 59, 1)
    late = await spool.claim_due(clock() + 60, 1)

    assert [] == early
    assert 1 == len(late)
    assert 2 == late[0].entry.attempts


async def test_delivered_keeps_log_and_drops_body(spool: Spool, clock: Clock) -> None:
    """Delivery records status and provider id, keeps the entry, frees the body."""
    (eid,) = await spool.put(b"raw", [entry()])
    (claim,) = await spool.claim_due(clock(), 1)

    await spool.finish(
        claim.entry, state=State.DELIVERED, started_at=clock(), outcome="delivered", status=202,
        provider_message_id="pm-1",
    )  # fmt: skip

    got = await spool.get(eid)
    assert got is not None
    assert (State.DELIVERED, 1, 202, "pm-1", None) == (
        got.state, got.attempts, got.last_status, got.provider_message_id, got.last_error,
    )  # fmt: skip
    assert [(0,)] == rows(spool.path, "SELECT COUNT(*) FROM bodies")
    (attempt,) = await spool.attempts(eid)
    assert ("delivered", 202) == (attempt.outcome, attempt.status)


async def test_body_kept_until_every_split_entry_is_delivered(spool: Spool, clock: Clock) -> None:
    """A shared body survives while one of its entries is still pending."""
    await spool.put(b"raw", [entry(0), entry(1)])
    first, second = await spool.claim_due(clock(), 2)

    await spool.finish(first.entry, state=State.DELIVERED, started_at=clock(), outcome="delivered")
    kept = rows(spool.path, "SELECT COUNT(*) FROM bodies")
    await spool.finish(second.entry, state=State.DELIVERED, started_at=clock(), outcome="delivered")

    assert [(1,)] == kept
    assert [(0,)] == rows(spool.path, "SELECT COUNT(*) FROM bodies")


async def test_dead_entry_can_be_retried(spool: Spool, clock: Clock) -> None:
    """retry_now brings a dead entry back with its body; a delivered one cannot be."""
    (eid,) = await spool.put(b"raw", [entry()])
    (claim,) = await spool.claim_due(clock(), 1)
    await spool.finish(claim.entry, state=State.DEAD, started_at=clock(), outcome="permanent",
                       status=400, detail="HTTP 400: bad")  # fmt: skip

    dead = await spool.get(eid)
    retried = await spool.retry_now(eid)
    again = await spool.claim_due(clock(), 1)

    assert dead is not None
    assert (State.DEAD, "HTTP 400: bad") == (dead.state, dead.last_error)
    assert retried
    assert [b"raw"] == [c.raw for c in again]


async def test_max_entries_refuses_with_spool_full(tmp_path: Path) -> None:
    """Beyond max_entries pending entries, put raises SpoolFull (452 at SMTP)."""
    s = Spool(tmp_path / "s.sqlite3", max_entries=2, min_free_space=0)
    await s.open()
    await s.put(b"1", [entry()])
    await s.put(b"2", [entry()])

    with pytest.raises(SpoolFull) as info:
        await s.put(b"3", [entry()])
    await s.close()

    assert info.value.smtp_reply.startswith("452 4.3.1")


async def test_free_space_reserve_refuses_with_spool_full(tmp_path: Path) -> None:
    """When free disk is below the reserve plus twice the message, put refuses."""
    s = Spool(tmp_path / "s.sqlite3", min_free_space=2**62)
    await s.open()

    with pytest.raises(SpoolFull):
        await s.put(b"raw", [entry()])
    stats = await s.stats()
    await s.close()

    assert 0 == sum(stats.counts.values())


async def test_sqlite_full_fails_the_put_and_spool_keeps_working(spool: Spool) -> None:
    """SQLITE_FULL (here via max_page_count) fails only that put; later small writes work."""
    (small,) = await spool.put(b"small", [entry()])

    def cap(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages + 2}")

    await spool._submit(cap, write=False)
    with pytest.raises(SpoolFull):
        await spool.put(b"x" * 200_000, [entry()])
    claims = await spool.claim_due(spool.clock(), 10)
    await spool.finish(claims[0].entry, state=State.DELIVERED, started_at=0.0, outcome="delivered")

    got = await spool.get(small)
    assert got is not None
    assert State.DELIVERED == got.state
    assert [(1,)] == rows(spool.path, "SELECT COUNT(*) FROM entries")


async def test_purge_forgets_old_final_entries(spool: Spool, clock: Clock) -> None:
    """Delivered entries older than the retention are deleted; pending ones never are."""
    (old,) = await spool.put(b"a", [entry()])
    (claim,) = await spool.claim_due(clock(), 1)
    await spool.finish(claim.entry, state=State.DELIVERED, started_at=clock(), outcome="delivered")
    (pending,) = await spool.put(b"b", [entry()])

    purged = await spool.purge(clock() + spool.retention + 1)

    assert 1 == purged
    assert await spool.get(old) is None
    assert await spool.get(pending) is not None


async def test_get_by_unique_prefix(spool: Spool) -> None:
    """Operators may type a unique prefix of an id."""
    (eid,) = await spool.put(b"a", [entry()])

    got = await spool.get(eid[:12].lower())

    assert got is not None
    assert eid == got.id


def test_new_id_sorts_by_time() -> None:
    """Ids are 26 Crockford characters and sort by creation time."""
    a = new_id(1000.0, bytes(10))
    b = new_id(1000.001, bytes(10))

    assert 26 == len(a)
    assert a < b


async def test_spool_files_are_owner_only(tmp_path: Path) -> None:
    """The database and its WAL are created 0600, whatever the umask."""
    old = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "spool.sqlite3", min_free_space=0)
        await spool.open()
        await spool.put(
            b"Subject: x\r\n\r\nhi\r\n",
            [
                NewEntry(
                    route=0,
                    provider="hook",
                    envelope=Envelope(mail_from="a@example.com", rcpt_to=("b@example.org",)),
                )
            ],
        )
        modes = await asyncio.to_thread(
            lambda: {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        )
        await spool.close()
    finally:
        os.umask(old)

    assert {"spool.sqlite3": 0o600, "spool.sqlite3-wal": 0o600, "spool.sqlite3-shm": 0o600} == modes


async def test_exclusive_open_keeps_a_second_daemon_out(tmp_path: Path) -> None:
    """Two daemons on one spool would resend each other's entries: the second is refused."""
    first = Spool(tmp_path / "spool.sqlite3", min_free_space=0)
    second = Spool(tmp_path / "spool.sqlite3", min_free_space=0)
    reader = Spool(tmp_path / "spool.sqlite3", min_free_space=0)
    await first.open(exclusive=True)

    with pytest.raises(SpoolError, match="in use by another smtp-bridge serve"):
        await second.open(exclusive=True)
    await reader.open()  # the queue commands still get in
    await reader.close()
    await first.close()
    await second.open(exclusive=True)  # free again once the first has closed
    await second.close()
