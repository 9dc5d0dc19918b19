"""The durable spool: SQLite in WAL mode, one writer thread, group commit.

Theory of operation
-------------------
Rule 1 (durability order). `put()` resolves only after the COMMIT holding the message and
        its envelope has returned with ``synchronous=FULL`` (the WAL is fsynced). The SMTP
        side says 250 only after that; RFC 5321 §6.1: a 250 after DATA accepts
        responsibility for the message, and it must survive a crash of the host.
Rule 2 (group commit). All database work runs on one thread. It takes every job that is
        waiting and runs them in one transaction, each inside its own SAVEPOINT, so
        concurrent arrivals share one fsync while one failing job cannot spoil another.
        No job's result is handed back before the COMMIT that covers it.
Rule 3 (states). An entry is queued → inflight → delivered | deferred (with next_at) |
        dead. `claim_due()` moves due entries to inflight and adds 1 to `attempts` in the
        same transaction, *before* anything is sent, so a message that crashes the
        process still progresses towards dead-letter. `finish()` records the outcome,
        the attempt log row and the new state in one transaction. Nothing is ever
        claimed by deleting it.
Rule 4 (recovery). `recover()` runs before the listener opens and turns every entry left
        inflight by a crash back into due work. Delivery is therefore at-least-once: an
        attempt in flight at the crash is made again (adapters send the spool id as an
        idempotency key where the API has one).
Rule 5 (bodies apart). The raw bytes live in `bodies`, shared by the entries a route split
        made from one message, and never change. State updates touch only the small
        `entries` row, so they never rewrite a body into the WAL. A body is deleted once
        every entry made from it is delivered; dead entries keep theirs for requeueing.
Rule 6 (full disk; STYLE.md §2d). A WAL can only shrink through a checkpoint, and a
        checkpoint needs room to grow the database file. So: the auto-checkpoint interval
        is small and ``journal_size_limit`` truncates the WAL after it; `put()` refuses
        new mail (SpoolFull → 452) unless the free space, counting the database's own
        free pages, exceeds a reserve plus twice the message; after SQLITE_FULL the
        transaction is rolled back and a checkpoint is run. Delivery bookkeeping is small
        and frees body pages, so the queue keeps draining while the disk is full.
        ``secure_delete=FAST`` avoids Debian's default of rewriting every deleted page.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bridge.errors import SpoolCorrupt, SpoolError, SpoolFull
from bridge.model import Envelope

__all__ = ["Claim", "Entry", "NewEntry", "Spool", "SpoolStats", "State", "new_id"]

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bodies (
    id       TEXT PRIMARY KEY,
    raw      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    id                  TEXT PRIMARY KEY,
    body_id             TEXT NOT NULL,
    route               INTEGER NOT NULL,
    provider            TEXT NOT NULL,
    mail_from           TEXT NOT NULL,
    rcpt_to             TEXT NOT NULL,
    envelope            TEXT NOT NULL,
    size                INTEGER NOT NULL,
    state               TEXT NOT NULL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    created_at          REAL NOT NULL,
    next_at             REAL NOT NULL,
    updated_at          REAL NOT NULL,
    last_error          TEXT,
    last_status         INTEGER,
    provider_message_id TEXT,
    message_id          TEXT,
    bounce_id           TEXT
);
CREATE INDEX IF NOT EXISTS entries_due ON entries (state, next_at);
CREATE INDEX IF NOT EXISTS entries_body ON entries (body_id);
CREATE TABLE IF NOT EXISTS attempts (
    entry_id    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    provider    TEXT NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL NOT NULL,
    outcome     TEXT NOT NULL,
    status      INTEGER,
    detail      TEXT,
    PRIMARY KEY (entry_id, attempt)
);
"""

#: WAL pages between automatic checkpoints (x 4 KiB). Small on purpose: see Rule 6.
WAL_AUTOCHECKPOINT_PAGES = 64
#: Bytes the WAL file is truncated to after a checkpoint.
JOURNAL_SIZE_LIMIT = 256 * 1024
#: The most jobs one transaction takes (bounds latency of a single commit).
MAX_BATCH = 256


class State(enum.StrEnum):
    """Where an entry is in its life."""

    QUEUED = "queued"
    INFLIGHT = "inflight"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    DEAD = "dead"


PENDING = (State.QUEUED.value, State.INFLIGHT.value, State.DEFERRED.value)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(now: float, randomness: bytes) -> str:
    """A 26-character, time-sortable id (ULID layout: 48-bit ms time + 80 random bits)."""
    value = (int(now * 1000) & (2**48 - 1)) << 80 | int.from_bytes(randomness[:10], "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


@dataclass(frozen=True, slots=True)
class NewEntry:
    """One route's share of an accepted message."""

    route: int
    provider: str
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Entry:
    """An entry as stored (without its body)."""

    id: str
    body_id: str
    route: int
    provider: str
    envelope: Envelope
    size: int
    state: State
    attempts: int
    created_at: float
    next_at: float
    updated_at: float
    last_error: str | None
    last_status: int | None
    provider_message_id: str | None
    message_id: str | None
    #: For a dead entry: the entry id of the delivery status notification sent back.
    bounce_id: str | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """An entry claimed for one attempt, with its raw bytes."""

    entry: Entry
    raw: bytes


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One row of an entry's delivery log."""

    attempt: int
    provider: str
    started_at: float
    ended_at: float
    outcome: str
    status: int | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Counts per state, the oldest pending entry's acceptance time, the next due time."""

    counts: dict[str, int]
    oldest_pending_at: float | None
    next_due_at: float | None


def _envelope_json(env: Envelope) -> str:
    return json.dumps(
        {
            "mail_from": env.mail_from,
            "rcpt_to": list(env.rcpt_to),
            "helo": env.helo,
            "client_address": env.client_address,
            "auth_user": env.auth_user,
            "smtputf8": env.smtputf8,
        },
        ensure_ascii=False,
    )


def _envelope_from_json(text: str) -> Envelope:
    d = json.loads(text)
    return Envelope(
        mail_from=d["mail_from"],
        rcpt_to=tuple(d["rcpt_to"]),
        helo=d.get("helo"),
        client_address=d.get("client_address"),
        auth_user=d.get("auth_user"),
        smtputf8=bool(d.get("smtputf8", False)),
    )


_ENTRY_COLUMNS = (
    "id, body_id, route, provider, envelope, size, state, attempts, created_at, next_at, "
    "updated_at, last_error, last_status, provider_message_id, message_id, bounce_id"
)


def _entry(row: Sequence[Any]) -> Entry:
    try:
        return Entry(
            id=row[0],
            body_id=row[1],
            route=int(row[2]),
            provider=row[3],
            envelope=_envelope_from_json(row[4]),
            size=int(row[5]),
            state=State(row[6]),
            attempts=int(row[7]),
            created_at=float(row[8]),
            next_at=float(row[9]),
            updated_at=float(row[10]),
            last_error=row[11],
            last_status=row[12],
            provider_message_id=row[13],
            message_id=row[14],
            bounce_id=row[15],
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise SpoolCorrupt(f"entry {row[0]!r} cannot be read: {exc}") from exc


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    write: bool


class Spool:
    """The durable queue. All methods are coroutines; the work runs on one thread.

    Args:
        path: The SQLite file; its directory is created if needed.
        max_entries: Most pending entries; `put` raises SpoolFull beyond it.
        min_free_space: Bytes of free disk kept back for bookkeeping (Rule 6).
        retention: Seconds delivered and dead entries stay queryable.
        clock: The time source (unix seconds), injectable for tests.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_entries: int = 100_000,
        min_free_space: int = 1024 * 1024,
        retention: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_entries = max_entries
        self.min_free_space = min_free_space
        self.retention = retention
        self.clock = clock
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._page_size = 4096
        self._batch_pending: int | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def open(self, *, exclusive: bool = False) -> None:
        """Open (or create) the database and start the writer thread.

        Args:
            exclusive: Hold ``<spool>.lock`` until `close` (the daemon does): a second
                daemon on the same spool would take the first one's entries in flight
                for crashed ones and send them again. `queue` commands open it shared.

        Raises:
            SpoolError: the file cannot be opened, is not a spool, or (exclusive) another
                daemon holds it.
        """
        if self._thread is not None:
            return
        if exclusive:
            self._lock_fd = await asyncio.to_thread(self._take_lock)
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()
        await self._submit(self._init_db, write=False)

    async def close(self) -> None:
        """Finish queued jobs, checkpoint, and stop the thread."""
        if self._thread is None:
            return
        with contextlib.suppress(SpoolError):
            await self._submit(self._checkpoint_truncate, write=False)
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _take_lock(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = f"{self.path}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"{self.path} is in use by another smtp-bridge serve (lock {lock_path})"
            ) from None
        return fd

    def _init_db(self, _: sqlite3.Connection | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The spool holds whole messages: owner-only from the first byte, whatever the
        # umask. SQLite gives its -wal and -shm files the database file's mode.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=FAST")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise SpoolError(f"spool schema {row[0]} is not {SCHEMA_VERSION}")
            self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        except sqlite3.Error as exc:
            conn.close()
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        self._conn = conn

    # ------------------------------------------------------------------ the thread

    async def _submit(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        if self._thread is None:
            raise SpoolError("spool is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, future, loop, write))
        return await future

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            batch = [job]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
            if stop:
                break
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run_batch(self, batch: list[_Job]) -> None:
        conn = self._conn
        results: list[tuple[_Job, bool, Any]] = []
        if conn is None:
            # Only the opening job may run without a connection.
            for job in batch:
                results.append(self._call(job, None))
            self._resolve(results)
            return
        writes = [j for j in batch if j.write]
        reads = [j for j in batch if not j.write]
        for job in reads:
            results.append(self._call(job, conn))
        if writes:
            results.extend(self._run_writes(conn, writes))
        self._resolve(results)

    def _call(self, job: _Job, conn: sqlite3.Connection | None) -> tuple[_Job, bool, Any]:
        try:
            return job, True, job.fn(conn)  # type: ignore[arg-type]
        except SpoolError as exc:
            return job, False, exc
        except sqlite3.Error as exc:
            return job, False, self._translate(exc)
        except Exception as exc:  # a bug in a job must not kill the writer thread
            return job, False, exc

    def _translate(self, exc: sqlite3.Error) -> SpoolError:
        if _is_full(exc):
            return SpoolFull(f"spool storage is full: {exc}")
        return SpoolError(f"spool error: {exc}")

    def _run_writes(
        self, conn: sqlite3.Connection, jobs: list[_Job]
    ) -> list[tuple[_Job, bool, Any]]:
        """Run write jobs in one transaction; see Rule 2.

        SQLite may roll the whole transaction back by itself on SQLITE_FULL or an I/O
        error. Then the jobs that had already run are undone too: the job that caused
        it fails, and the others are run again in a fresh transaction (each round drops
        one job, so this ends), so one over-large message cannot fail the bookkeeping of
        deliveries that shared its batch.
        """
        done: list[tuple[_Job, bool, Any]] = []
        while jobs:
            results, poisoned = self._try_writes(conn, jobs)
            if poisoned is None:
                return done + results
            done.append(poisoned)
            jobs = [j for j in jobs if j is not poisoned[0]]
        return done

    def _try_writes(
        self, conn: sqlite3.Connection, jobs: list[_Job]
    ) -> tuple[list[tuple[_Job, bool, Any]], tuple[_Job, bool, Any] | None]:
        self._batch_pending = None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = self._translate(exc)
            self._after_failure(conn, exc)
            return [(j, False, err) for j in jobs], None
        results: list[tuple[_Job, bool, Any]] = []
        for job in jobs:
            try:
                conn.execute("SAVEPOINT job")
            except sqlite3.Error as exc:
                results.append((job, False, self._translate(exc)))
                continue
            outcome = self._call(job, conn)
            if not conn.in_transaction:
                # SQLite rolled everything back on its own (SQLITE_FULL, I/O error).
                self._after_failure(
                    conn, outcome[2] if isinstance(outcome[2], sqlite3.Error) else None
                )
                return [], outcome
            try:
                if not outcome[1]:
                    conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            except sqlite3.Error as exc:
                outcome = (job, False, self._translate(exc))
            results.append(outcome)
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Nothing in this batch is durable: every job fails, none is acknowledged.
            err = self._translate(exc)
            self._after_failure(conn, exc)
            return [(j, False, err) for j, _, _ in results], None
        return results, None

    def _after_failure(self, conn: sqlite3.Connection, exc: sqlite3.Error | None) -> None:
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        if exc is None or _is_full(exc):
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @staticmethod
    def _resolve(results: list[tuple[_Job, bool, Any]]) -> None:
        for job, ok, value in results:
            job.loop.call_soon_threadsafe(_settle, job.future, ok, value)

    # ------------------------------------------------------------------ space

    def _pending_in_batch(self, conn: sqlite3.Connection) -> int:
        """Pending entries, counted once per write batch (COUNT(*) grows with the queue).

        Within one transaction only puts add pending entries, and each put updates the
        cached value; the cache dies with the batch, so a rollback cannot skew it.
        """
        if self._batch_pending is None:
            self._batch_pending = int(
                conn.execute(
                    "SELECT COUNT(*) FROM entries WHERE state IN (?, ?, ?)", PENDING
                ).fetchone()[0]
            )
        return self._batch_pending

    def _free_bytes(self, conn: sqlite3.Connection) -> int:
        st = os.statvfs(self.path.parent)
        free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        return st.f_bavail * st.f_frsize + free_pages * self._page_size

    def _checkpoint_truncate(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ------------------------------------------------------------------ operations

    async def put(
        self,
        raw: bytes,
        entries: Sequence[NewEntry],
        *,
        message_id: str | None = None,
    ) -> list[str]:
        """Store one accepted message and its per-route entries; durable on return.

        Args:
            raw: The message exactly as received (after dot-unstuffing).
            entries: One per route the recipients resolved to.
            message_id: The Message-ID header, for operators' queries.

        Returns:
            The new entry ids, in the order of `entries`.

        Raises:
            SpoolFull: no room (entry limit or disk reserve); the client should retry.
            SpoolError: the spool could not store the message.
        """
        now = self.clock()
        ids = [new_id(now, os.urandom(10)) for _ in entries]
        body_id = ids[0] if ids else new_id(now, os.urandom(10))

        def job(conn: sqlite3.Connection) -> list[str]:
            pending = self._pending_in_batch(conn)
            if pending + len(entries) > self.max_entries:
                raise SpoolFull(f"spool holds {pending} pending entries (max {self.max_entries})")
            free = self._free_bytes(conn)
            needed = self.min_free_space + 2 * len(raw)
            if free < needed:
                raise SpoolFull(f"free space {free} B is below the reserve {needed} B")
            self._insert(conn, body_id, ids, raw, entries, now, message_id)
            self._batch_pending = pending + len(entries)
            return ids

        return await self._submit(job)

    @staticmethod
    def _insert(
        conn: sqlite3.Connection,
        body_id: str,
        ids: Sequence[str],
        raw: bytes,
        entries: Sequence[NewEntry],
        now: float,
        message_id: str | None,
    ) -> None:
        conn.execute("INSERT INTO bodies (id, raw) VALUES (?, ?)", (body_id, raw))
        conn.executemany(
            "INSERT INTO entries (id, body_id, route, provider, mail_from, rcpt_to, envelope,"
            " size, state, attempts, created_at, next_at, updated_at, message_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
            [
                (
                    eid,
                    body_id,
                    e.route,
                    e.provider,
                    e.envelope.mail_from,
                    json.dumps(list(e.envelope.rcpt_to), ensure_ascii=False),
                    _envelope_json(e.envelope),
                    len(raw),
                    State.QUEUED.value,
                    now,
                    now,
                    now,
                    message_id,
                )
                for eid, e in zip(ids, entries, strict=True)
            ],
        )

    async def recover(self) -> int:
        """Make entries left inflight by a crash due again; returns how many."""
        now = self.clock()

        def job(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE entries SET state=?, next_at=MIN(next_at, ?), updated_at=?,"
                " last_error=COALESCE(last_error, 'interrupted') WHERE state=?",
                (State.QUEUED.value, now, now, State.INFLIGHT.value),
            )
            return int(cur.rowcount)

        return await self._submit(job)

    async def claim_due(self, now: float, limit: int) -> list[Claim]:
        """Claim up to `limit` due entries for one attempt each.

        The claimed entries become inflight and their attempt counter is incremented in
        the same transaction, before anything is sent (Rule 3).
        """
        if limit <= 0:
            return []

        def job(conn: sqlite3.Connection) -> list[Claim]:
            rows = conn.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE state IN (?, ?) AND next_at <= ?"  # noqa: S608 - column list is a constant
                " ORDER BY next_at LIMIT ?",
                (State.QUEUED.value, State.DEFERRED.value, now, limit),
            ).fetchall()
            claims = []
            for row in rows:
                body = conn.execute("SELECT raw FROM bodies WHERE id=?", (row[1],)).fetchone()
                if body is None:
                    conn.execute(
                        "UPDATE entries SET state=?, last_error=?, updated_at=? WHERE id=?",
                        (State.DEAD.value, "message body missing from spool", now, row[0]),
                    )
                    continue
                conn.execute(
                    "UPDATE entries SET state=?, attempts=attempts+1, updated_at=? WHERE id=?",
                    (State.INFLIGHT.value, now, row[0]),
                )
                entry = _entry(row)
                claimed = dataclasses.replace(
                    entry, state=State.INFLIGHT, attempts=entry.attempts + 1, updated_at=now
                )
                claims.append(Claim(entry=claimed, raw=bytes(body[0])))
            return claims

        return await self._submit(job)

    async def finish(
        self,
        entry: Entry,
        *,
        state: State,
        started_at: float,
        outcome: str,
        status: int | None = None,
        detail: str | None = None,
        next_at: float | None = None,
        provider_message_id: str | None = None,
        provider: str | None = None,
        bounce: tuple[bytes, NewEntry] | None = None,
    ) -> str | None:
        """Record the end of an attempt: the log row, the new state, in one transaction.

        Args:
            entry: The claimed entry.
            state: DELIVERED, DEFERRED (with `next_at`) or DEAD.
            started_at: When the attempt began.
            outcome: ``delivered``, ``retry`` or ``permanent`` for the log.
            status: The HTTP status, when there was one.
            detail: Why (error text), bounded by the caller.
            next_at: For DEFERRED, when to try again.
            provider_message_id: The provider's id for a delivered message.
            provider: The provider account that made the attempt (failover may differ).
            bounce: For DEAD: a delivery status notification to queue in the same
                transaction, so a crash cannot leave a dead entry without its bounce.

        Returns:
            The id of the queued bounce entry, if one was given.
        """
        if state not in (State.DELIVERED, State.DEFERRED, State.DEAD):
            raise ValueError(f"cannot finish an attempt in state {state}")
        now = self.clock()
        bounce_id = new_id(now, os.urandom(10)) if bounce is not None else None

        def job(conn: sqlite3.Connection) -> str | None:
            if bounce is not None and bounce_id is not None:
                self._insert(conn, bounce_id, [bounce_id], bounce[0], [bounce[1]], now, None)
            conn.execute(
                "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.id, entry.attempts, provider or entry.provider, started_at, now, outcome,
                 status, detail),
            )  # fmt: skip
            conn.execute(
                "UPDATE entries SET state=?, next_at=?, updated_at=?, last_error=?, last_status=?,"
                " provider_message_id=COALESCE(?, provider_message_id),"
                " bounce_id=COALESCE(?, bounce_id) WHERE id=?",
                (
                    state.value,
                    next_at if next_at is not None else entry.next_at,
                    now,
                    None if state is State.DELIVERED else detail,
                    status,
                    provider_message_id,
                    bounce_id,
                    entry.id,
                ),
            )
            if state is State.DELIVERED:
                self._drop_body_if_done(conn, entry.body_id)
            return bounce_id

        return await self._submit(job)

    def _drop_body_if_done(self, conn: sqlite3.Connection, body_id: str) -> None:
        left = conn.execute(
            "SELECT COUNT(*) FROM entries WHERE body_id=? AND state != ?",
            (body_id, State.DELIVERED.value),
        ).fetchone()[0]
        if left == 0:
            conn.execute("DELETE FROM bodies WHERE id=?", (body_id,))

    async def retry_now(self, entry_id: str) -> bool:
        """Make a deferred or dead entry due now; False if it cannot be retried."""
        now = self.clock()

        def job(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE entries SET state=?, next_at=?, updated_at=? WHERE id=? AND state IN (?, ?)"
                " AND EXISTS (SELECT 1 FROM bodies WHERE bodies.id = entries.body_id)",
                (State.QUEUED.value, now, now, entry_id, State.DEFERRED.value, State.DEAD.value),
            )
            return cur.rowcount == 1

        return await self._submit(job)

    async def purge(self, now: float) -> int:
        """Forget delivered and dead entries older than the retention; returns how many."""
        cutoff = now - self.retention

        def job(conn: sqlite3.Connection) -> int:
            doomed = conn.execute(
                "SELECT id, body_id FROM entries WHERE state IN (?, ?) AND updated_at < ?",
                (State.DELIVERED.value, State.DEAD.value, cutoff),
            ).fetchall()
            for eid, _ in doomed:
                conn.execute("DELETE FROM entries WHERE id=?", (eid,))
                conn.execute("DELETE FROM attempts WHERE entry_id=?", (eid,))
            for body_id in {b for _, b in doomed}:
                left = conn.execute(
                    "SELECT COUNT(*) FROM entries WHERE body_id=?", (body_id,)
                ).fetchone()[0]
                if left == 0:
                    conn.execute("DELETE FROM bodies WHERE id=?", (body_id,))
            return len(doomed)

        return await self._submit(job)

    # ------------------------------------------------------------------ queries

    async def get(self, entry_id: str) -> Entry | None:
        """One entry by id (a unique prefix of at least 6 characters also works)."""

        def job(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id=?",  # noqa: S608 - constant columns
                (entry_id,),
            ).fetchone()
            if row is None and 6 <= len(entry_id) <= 64 and entry_id.isalnum():
                # Ids are alphanumeric, so a prefix with % or _ (LIKE wildcards) is no id.
                rows = conn.execute(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id LIKE ? LIMIT 2",  # noqa: S608
                    (entry_id.upper() + "%",),
                ).fetchall()
                row = rows[0] if len(rows) == 1 else None
            return _entry(row) if row else None

        return await self._submit(job, write=False)

    async def attempts(self, entry_id: str) -> list[AttemptRecord]:
        """The delivery log of one entry, oldest first."""

        def job(conn: sqlite3.Connection) -> list[AttemptRecord]:
            rows = conn.execute(
                "SELECT attempt, provider, started_at, ended_at, outcome, status, detail"
                " FROM attempts WHERE entry_id=? ORDER BY attempt",
                (entry_id,),
            ).fetchall()
            return [AttemptRecord(*r) for r in rows]

        return await self._submit(job, write=False)

    async def list(self, *, state: State | None = None, limit: int = 100) -> list[Entry]:
        """Entries, newest first, optionally of one state."""

        def job(conn: sqlite3.Connection) -> list[Entry]:
            if state is None:
                rows = conn.execute(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries ORDER BY id DESC LIMIT ?",  # noqa: S608
                    (limit,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE state=? ORDER BY id DESC LIMIT ?",  # noqa: S608
                    (state.value, limit),
                ).fetchall()
            return [_entry(r) for r in rows]

        return await self._submit(job, write=False)

    async def stats(self) -> SpoolStats:
        """Counts per state, and when the oldest and the next due entries are due."""

        def job(conn: sqlite3.Connection) -> SpoolStats:
            counts = {s.value: 0 for s in State}
            for st, n in conn.execute("SELECT state, COUNT(*) FROM entries GROUP BY state"):
                counts[st] = n
            oldest = conn.execute(
                "SELECT MIN(created_at) FROM entries WHERE state IN (?, ?, ?)", PENDING
            ).fetchone()[0]
            nxt = conn.execute(
                "SELECT MIN(next_at) FROM entries WHERE state IN (?, ?)",
                (State.QUEUED.value, State.DEFERRED.value),
            ).fetchone()[0]
            return SpoolStats(counts=counts, oldest_pending_at=oldest, next_due_at=nxt)

        return await self._submit(job, write=False)

    async def next_due_at(self) -> float | None:
        """When the next queued or deferred entry is due, or None if there is none."""

        def job(conn: sqlite3.Connection) -> float | None:
            value = conn.execute(
                "SELECT MIN(next_at) FROM entries WHERE state IN (?, ?)",
                (State.QUEUED.value, State.DEFERRED.value),
            ).fetchone()[0]
            return None if value is None else float(value)

        return await self._submit(job, write=False)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the awaiting task was cancelled; the job's effect still stands
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
