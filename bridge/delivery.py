"""The delivery worker: the only code that sends HTTP.

For each due entry: parse the stored bytes (pure), let the provider adapter build its
requests (pure), send them over the shared client, read the outcome (pure), let the
retry policy decide (pure), record it in the spool. Foreign exceptions are translated
here, in one table, and nowhere else; nothing above this module catches httpx errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from bridge import health
from bridge.config import AccountLimits, Config
from bridge.dsn import build_dsn
from bridge.mime import parse_message
from bridge.model import Delivered, Envelope, Outcome, Permanent, Retryable
from bridge.pacing import Circuit, TokenBucket, choose_provider
from bridge.providers.base import Flow, Provider, ProviderSettings
from bridge.retry import Ack, DeadLetter, RetryAt, decide, effective
from bridge.spool import Claim, NewEntry, Spool, State

__all__ = ["DeliveryWorker", "build_clients", "send_flow"]

log = structlog.get_logger("bridge.delivery")

#: httpx exception → reason. Every transport failure is retryable: the request may or
#: may not have reached the provider, and at-least-once delivery means we try again.
_TRANSPORT_ERRORS: tuple[tuple[type[httpx.HTTPError], str], ...] = (
    (httpx.ConnectTimeout, "timed out connecting"),
    (httpx.TimeoutException, "timed out waiting for the API"),
    (httpx.ConnectError, "could not connect"),
    (httpx.NetworkError, "network error"),
    (httpx.RemoteProtocolError, "the API broke the HTTP protocol"),
    (httpx.HTTPError, "HTTP error"),
)


def _transport_outcome(exc: httpx.HTTPError) -> Retryable:
    for cls, reason in _TRANSPORT_ERRORS:
        if isinstance(exc, cls):
            if cls is httpx.HTTPError:
                # Not the network's words but ours (e.g. h11 refusing a header value),
                # which may quote the request's own headers: keys and tokens.
                return Retryable(reason=f"{reason}: {type(exc).__name__}")
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return Retryable(reason=f"{reason}: {detail}")
    raise AssertionError("unreachable: httpx.HTTPError is the last row")  # pragma: no cover


def build_clients(
    config: Config, accounts: Mapping[str, Provider[ProviderSettings]]
) -> dict[str, httpx.AsyncClient]:
    """One AsyncClient per distinct CA setting, shared by the accounts that use it.

    TLS verification is always on; `ca_file` only changes which CAs are trusted.
    """
    timeout = httpx.Timeout(config.delivery.timeout)
    limits = httpx.Limits(
        max_connections=config.delivery.concurrency,
        max_keepalive_connections=config.delivery.concurrency,
    )
    by_ca: dict[str | None, httpx.AsyncClient] = {}
    out: dict[str, httpx.AsyncClient] = {}
    for name, provider in accounts.items():
        ca = provider.settings.ca_file
        if ca not in by_ca:
            verify: ssl.SSLContext | bool = True
            if ca is not None:
                verify = ssl.create_default_context(cafile=str(config.resolve_path(ca)))
            by_ca[ca] = httpx.AsyncClient(
                verify=verify, timeout=timeout, limits=limits, follow_redirects=False
            )
        out[name] = by_ca[ca]
    return out


def _step(flow: Flow, response: httpx.Response | None) -> tuple[bool, Any]:
    """Advance a flow by one step: (True, next request) or (False, outcome).

    Runs in a worker thread (see `send_flow`); StopIteration is caught here because it
    cannot travel through an asyncio future.
    """
    try:
        request = next(flow) if response is None else flow.send(response)
    except StopIteration as stop:
        return False, stop.value
    return True, request


async def send_flow(
    provider: Provider[ProviderSettings],
    message: Any,
    client: httpx.AsyncClient,
    now: float,
) -> Outcome:
    """Drive a provider's request/response flow over `client`; transport errors → Retryable.

    The adapter's own steps (building JSON or re-encoding MIME, which takes seconds for
    a 30 MB message) run in a worker thread, so they never stall the SMTP sessions that
    share the event loop.
    """
    flow = provider.flow(message, now)
    try:
        more, value = await asyncio.to_thread(_step, flow, None)
        while more:
            try:
                response = await client.send(value)
            except httpx.HTTPError as exc:
                return _transport_outcome(exc)
            more, value = await asyncio.to_thread(_step, flow, response)
        outcome: Outcome = value
        return outcome
    finally:
        flow.close()


class DeliveryWorker:
    """Takes due entries from the spool and delivers them, `concurrency` at a time.

    Args:
        config: The validated configuration.
        spool: The open spool.
        accounts: Provider adapter per account name.
        clients: HTTP client per account name (see `build_clients`).
        clock: Unix time source.
        rng: Jitter source for the retry policy.
    """

    def __init__(
        self,
        config: Config,
        spool: Spool,
        accounts: Mapping[str, Provider[ProviderSettings]],
        clients: Mapping[str, httpx.AsyncClient],
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.accounts = accounts
        self.clients = clients
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self.concurrency = config.delivery.concurrency
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._circuits: dict[str, Circuit] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def wake(self) -> None:
        """New mail was queued: look for due work now."""
        self._wake.set()

    @property
    def inflight(self) -> int:
        """Attempts running right now."""
        return len(self._inflight)

    async def run_once(self) -> int:
        """Claim every entry due now, attempt each once, wait for all. Returns the count.

        The burst mode tests use: no sleeping, no polling.
        """
        total = 0
        while True:
            claims = await self.spool.claim_due(self.clock(), self.concurrency)
            if not claims:
                return total
            await asyncio.gather(*(self._attempt(c) for c in claims))
            total += len(claims)

    async def run_forever(self) -> None:
        """Deliver until `stop()`; sleeps until the next due time or a wake-up."""
        last_purge = last_gauge = 0.0
        while not self._stopping:
            now = self.clock()
            if now - last_purge > 3600:
                last_purge = now
                with contextlib.suppress(Exception):
                    await self.spool.purge(now)
            if now - last_gauge > 15:
                last_gauge = now
                with contextlib.suppress(Exception):
                    stats = await self.spool.stats()
                    for state, count in stats.counts.items():
                        health.QUEUE_ENTRIES.labels(state=state).set(count)
            free = self.concurrency - len(self._inflight)
            claims = await self.spool.claim_due(now, free) if free > 0 else []
            for claim in claims:
                task = asyncio.create_task(self._attempt(claim))
                self._inflight.add(task)
                task.add_done_callback(self._done)
            if claims and len(claims) == free:
                # The pool is full: wait for a slot before claiming more.
                await self._wait_for_slot()
                continue
            await self._sleep_until_due()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery_task_failed", exc_info=task.exception())

    async def _wait_for_slot(self) -> None:
        self._wake.clear()
        if len(self._inflight) >= self.concurrency:
            await self._wake.wait()

    async def _sleep_until_due(self) -> None:
        self._wake.clear()
        next_due = await self.spool.next_due_at()
        timeout = 60.0 if next_due is None else max(0.0, next_due - self.clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=min(timeout, 60.0))

    async def stop(self, grace: float) -> int:
        """Stop claiming; let attempts in flight finish for up to `grace` seconds.

        Attempts still running after that are cancelled; their entries stay inflight in
        the spool and `recover()` makes them due at the next start (at-least-once).

        Returns:
            How many attempts were cut off. Their worker threads (a parse of a huge
            message) may still be running: a thread cannot be cancelled.
        """
        self._stopping = True
        self._wake.set()
        if not self._inflight:
            return 0
        _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        return len(pending)

    def _circuit(self, name: str) -> Circuit:
        circuit = self._circuits.get(name)
        if circuit is None:
            account = self.config.providers.get(name)
            limits = account.limits if account else AccountLimits()
            circuit = Circuit(threshold=limits.circuit_threshold, cooldown=limits.circuit_cooldown)
            self._circuits[name] = circuit
        return circuit

    @contextlib.asynccontextmanager
    async def _paced(self, name: str, recipients: int) -> AsyncIterator[None]:
        """Hold the account's concurrency slot and wait for its rate-limit tokens."""
        account = self.config.providers.get(name)
        limits = account.limits if account else AccountLimits()
        if limits.concurrency is not None and name not in self._slots:
            self._slots[name] = asyncio.Semaphore(limits.concurrency)
        slot = self._slots.get(name)
        async with slot if slot is not None else contextlib.nullcontext():
            wait = 0.0
            now = self.clock()
            for key, rate, amount in (
                ("req", limits.requests_per_second, 1),
                ("rcpt", limits.recipients_per_second, recipients),
            ):
                if rate is None:
                    continue
                bucket = self._buckets.get((name, key))
                if bucket is None:
                    bucket = self._buckets[(name, key)] = TokenBucket(rate, max(1.0, rate))
                wait = max(wait, bucket.reserve(amount, now))
            if wait > 0:
                await asyncio.sleep(wait)
            yield

    async def _attempt(self, claim: Claim) -> None:
        entry = claim.entry
        started = self.clock()
        t0 = time.monotonic()
        route = self.config.routes[entry.route] if entry.route < len(self.config.routes) else None
        chain = self.config.chain(route) if route else (entry.provider,)
        name = choose_provider(
            chain,
            attempt=entry.attempts,
            failover_after=route.failover_after if route else 1,
            allows=lambda n: self._circuit(n).allows(started),
        )
        bound = structlog.contextvars.bound_contextvars(
            spool_id=entry.id, provider=name, attempt=entry.attempts
        )
        with bound:
            message = None
            provider = self.accounts.get(name)
            if provider is None:
                outcome: Outcome = Retryable(reason=f"provider account {name!r} is not configured")
            else:
                try:
                    # Parsing a large message is CPU work: keep it off the event loop.
                    message = await asyncio.to_thread(
                        parse_message,
                        claim.raw,
                        entry.envelope,
                        id=entry.id,
                        received_at=datetime.fromtimestamp(entry.created_at, UTC),
                        default_sender=route.default_sender if route else None,
                    )
                    if entry.attempts == 1:
                        missing = provider.unsupported(message)
                        if missing:
                            log.warning("provider_cannot_carry", features=list(missing))
                    async with self._paced(name, len(entry.envelope.rcpt_to)):
                        outcome = await send_flow(provider, message, self.clients[name], started)
                except Exception as exc:
                    # A bug of ours (parser, adapter) must not strand the entry inflight:
                    # it is retried, and a fixed release can deliver it.
                    log.error("delivery_internal_error", exc_info=exc)
                    outcome = Retryable(reason=f"internal error: {type(exc).__name__}")
                # From here on a 401 is what the policy makes of it: retryable, in the
                # circuit, the log line and the metric alike.
                outcome = provider.redact(effective(outcome))
                self._circuit(name).record(ok=not isinstance(outcome, Retryable), now=self.clock())
            decision = decide(
                self.config.delivery.retry,
                attempt=entry.attempts,
                accepted_at=entry.created_at,
                outcome=outcome,
                now=self.clock(),
                rng=self.rng,
            )
            # Bookkeeping must land even if shutdown cancels us now: shield it.
            await asyncio.shield(self._record(claim, outcome, decision, started, name))
            health.DELIVERY_ATTEMPTS.labels(provider=name, outcome=_label(outcome)).inc()
            log.info(
                "delivery_attempt",
                route=route.name if route and route.name else entry.route,
                message_id=message.message_id if message else entry.message_id,
                outcome=_label(outcome),
                status=getattr(outcome, "status", None),
                reason=getattr(outcome, "reason", None),
                provider_message_id=getattr(outcome, "provider_message_id", None),
                decision=type(decision).__name__,
                next_at=decision.when if isinstance(decision, RetryAt) else None,
                duration_ms=round((time.monotonic() - t0) * 1000, 1),
                recipients=len(entry.envelope.rcpt_to),
            )

    async def _record(
        self, claim: Claim, outcome: Outcome, decision: object, started: float, name: str
    ) -> None:
        entry = claim.entry
        status = getattr(outcome, "status", None)
        if isinstance(decision, Ack):
            assert isinstance(outcome, Delivered)
            await self.spool.finish(
                entry,
                state=State.DELIVERED,
                started_at=started,
                outcome="delivered",
                status=status,
                provider_message_id=outcome.provider_message_id,
                provider=name,
            )
        elif isinstance(decision, RetryAt):
            await self.spool.finish(
                entry,
                state=State.DEFERRED,
                started_at=started,
                outcome="retry",
                status=status,
                detail=getattr(outcome, "reason", None),
                next_at=decision.when,
                provider=name,
            )
        else:
            assert isinstance(decision, DeadLetter)
            bounce = self._bounce(claim, outcome, decision)
            bounce_id = await self.spool.finish(
                entry,
                state=State.DEAD,
                started_at=started,
                outcome="permanent" if isinstance(outcome, Permanent) else "expired",
                status=status,
                detail=decision.reason,
                provider=name,
                bounce=bounce,
            )
            health.DEAD_LETTERS.labels(bounced="yes" if bounce_id else "no").inc()
            log.warning("delivery_dead", reason=decision.reason, bounce_id=bounce_id)
            if bounce_id:
                self.wake()

    def _bounce(
        self, claim: Claim, outcome: Outcome, decision: DeadLetter
    ) -> tuple[bytes, NewEntry] | None:
        """The DSN for an entry that went dead, or None (null sender, bounces off).

        It goes back through the same route, with the null reverse-path, so a bounce
        can never bounce (RFC 5321 §6.1, RFC 3464).
        """
        entry = claim.entry
        route = self.config.routes[entry.route] if entry.route < len(self.config.routes) else None
        if route is None or not route.bounces or entry.envelope.mail_from == "":
            return None
        if entry.bounce_id is not None:
            # Requeued by an operator and dead again: the sender was told once already.
            return None
        now = datetime.fromtimestamp(self.clock(), UTC)
        hostname = self.config.listen.hostname
        dsn = build_dsn(
            original=claim.raw,
            envelope=entry.envelope,
            reason=decision.reason,
            status=getattr(outcome, "status", None),
            permanent=isinstance(outcome, Permanent),
            reporting_mta=hostname,
            arrival=datetime.fromtimestamp(entry.created_at, UTC),
            now=now,
            message_id=f"<dsn.{entry.id}@{hostname}>",
            postmaster=route.bounce_from or route.default_sender or "",
        )
        if dsn is None:
            return None
        envelope = Envelope(mail_from="", rcpt_to=(entry.envelope.mail_from,))
        return dsn, NewEntry(route=entry.route, provider=route.provider, envelope=envelope)


def _label(outcome: Outcome) -> str:
    if isinstance(outcome, Delivered):
        return "delivered"
    if isinstance(outcome, Retryable):
        return "retry"
    return "permanent"
