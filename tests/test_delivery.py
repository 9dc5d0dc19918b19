"""The delivery worker: real spool, httpx.MockTransport, a settable clock, run_once()."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from bridge.app import build_accounts
from bridge.config import Config
from bridge.delivery import DeliveryWorker
from bridge.model import Envelope
from bridge.spool import NewEntry, Spool, State

RAW = b"From: A <a@example.com>\r\nTo: b@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Api:
    """A scripted API: answers from a list, records every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def spool(tmp_path: Path, clock: Clock) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool.sqlite3", min_free_space=0, clock=clock)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def worker_for(
    make_config: Callable[..., Config], spool: Spool, clock: Clock
) -> Callable[[Api], DeliveryWorker]:
    config = make_config(url="https://hooks.example.net/in")
    accounts = build_accounts(config)

    def make(api: Api) -> DeliveryWorker:
        client = httpx.AsyncClient(transport=httpx.MockTransport(api))
        return DeliveryWorker(
            config, spool, accounts, {"hook": client}, clock=clock, rng=random.Random(3)
        )

    return make


async def queue(spool: Spool, rcpts: tuple[str, ...] = ("b@example.org",)) -> str:
    env = Envelope(mail_from="a@example.com", rcpt_to=rcpts)
    (eid,) = await spool.put(RAW, [NewEntry(route=0, provider="hook", envelope=env)])
    return eid


async def test_delivered_on_2xx_with_idempotency_key(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker]
) -> None:
    """A 202 delivers; the request carries the spool id as Idempotency-Key and payload id."""
    api = Api(httpx.Response(202, json={"id": "recv-1"}))
    eid = await queue(spool)

    count = await worker_for(api).run_once()

    entry = await spool.get(eid)
    assert 1 == count
    assert entry is not None
    assert (State.DELIVERED, 202, "recv-1") == (
        entry.state,
        entry.last_status,
        entry.provider_message_id,
    )
    (request,) = api.requests
    assert eid == request.headers["idempotency-key"]
    doc = json.loads(request.content)
    assert (eid, ["b@example.org"], "hello") == (
        doc["id"],
        doc["envelope"]["rcpt_to"],
        doc["subject"],
    )


async def test_500_then_200_is_retried_and_delivered(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker], clock: Clock
) -> None:
    """A 500 defers the entry; once due again, a 200 delivers it on attempt 2."""
    api = Api(httpx.Response(500, text="oops"), httpx.Response(200))
    worker = worker_for(api)
    eid = await queue(spool)

    await worker.run_once()
    deferred = await spool.get(eid)
    assert deferred is not None
    clock.now = deferred.next_at
    await worker.run_once()

    delivered = await spool.get(eid)
    assert (State.DEFERRED, 500, "HTTP 500: oops") == (
        deferred.state,
        deferred.last_status,
        deferred.last_error,
    )
    assert 1_700_000_000.0 + 0.5 <= deferred.next_at <= 1_700_000_000.0 + 1
    assert delivered is not None
    assert (State.DELIVERED, 2) == (delivered.state, delivered.attempts)
    assert 2 == len(api.requests)


async def test_deferred_entry_is_not_sent_before_it_is_due(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker]
) -> None:
    """run_once right after a failure sends nothing (no hot retry loop)."""
    api = Api(httpx.Response(503))
    worker = worker_for(api)
    await queue(spool)

    first = await worker.run_once()
    second = await worker.run_once()

    assert (1, 0) == (first, second)
    assert 1 == len(api.requests)


async def test_429_with_retry_after_waits_that_long(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker]
) -> None:
    """A 429 with Retry-After: 45 reschedules 45 s later (longer than the 10 s max_delay)."""
    api = Api(httpx.Response(429, headers={"Retry-After": "45"}))
    eid = await queue(spool)

    await worker_for(api).run_once()

    entry = await spool.get(eid)
    assert entry is not None
    assert (State.DEFERRED, 1_700_000_045.0) == (entry.state, entry.next_at)


async def test_400_is_dead_and_not_retried(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker], clock: Clock
) -> None:
    """A 400 is permanent: the entry goes dead with the reason, and is never sent again."""
    api = Api(httpx.Response(400, json={"error": "bad sender"}))
    worker = worker_for(api)
    eid = await queue(spool)

    await worker.run_once()
    clock.now += 86400
    await worker.run_once()

    entry = await spool.get(eid)
    assert entry is not None
    assert (State.DEAD, 400) == (entry.state, entry.last_status)
    assert 'HTTP 400: {"error":"bad sender"}' == entry.last_error
    assert 1 == sum(1 for r in api.requests if json.loads(r.content)["id"] == eid)


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectTimeout("connect timed out"),
        httpx.ReadTimeout("read timed out"),
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("peer closed"),
    ],
)
async def test_transport_errors_are_retryable(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker], error: Exception
) -> None:
    """Timeouts and connection failures defer the entry; nothing is lost or dead."""
    eid = await queue(spool)

    await worker_for(Api(error)).run_once()

    entry = await spool.get(eid)
    assert entry is not None
    assert State.DEFERRED == entry.state
    assert str(error) in (entry.last_error or "")


async def test_local_protocol_error_is_retryable_without_its_text(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker]
) -> None:
    """An error about our own request (it may quote our headers) is recorded by type only."""
    eid = await queue(spool)
    error = httpx.LocalProtocolError("Illegal header value b'Bearer SECRET-TOKEN\\r'")

    await worker_for(Api(error)).run_once()

    entry = await spool.get(eid)
    assert entry is not None
    assert State.DEFERRED == entry.state
    assert "HTTP error: LocalProtocolError" == entry.last_error


async def test_401_is_logged_and_counted_as_a_retry(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker]
) -> None:
    """A refused key keeps mail waiting, and the log line says retry, not permanent."""
    eid = await queue(spool)

    with capture_logs() as logs:
        await worker_for(Api(httpx.Response(401, text="bad key"))).run_once()

    entry = await spool.get(eid)
    (line,) = [e for e in logs if e["event"] == "delivery_attempt"]
    assert entry is not None
    assert State.DEFERRED == entry.state
    assert ("retry", 401, "RetryAt") == (line["outcome"], line["status"], line["decision"])


async def test_api_echoing_our_token_does_not_put_it_in_the_log_or_spool(
    make_config: Callable[..., Config], spool: Spool, clock: Clock
) -> None:
    """A 400 body that quotes our Authorization header is stored and logged redacted."""
    hook = {"type": "webhook", "url": "https://hooks.example.net/in",
            "headers": {"Authorization": "Bearer tok-secret-XYZ123"}}  # fmt: skip
    config = make_config(providers={"hook": hook})
    echo = httpx.Response(400, text="bad request; you sent Authorization: Bearer tok-secret-XYZ123")
    client = httpx.AsyncClient(transport=httpx.MockTransport(Api(echo)))
    worker = DeliveryWorker(
        config, spool, build_accounts(config), {"hook": client}, clock=clock, rng=random.Random(3)
    )
    eid = await queue(spool)

    with capture_logs() as logs:
        await worker.run_once()

    entry = await spool.get(eid)
    assert entry is not None
    assert "you sent Authorization: [redacted]" in (entry.last_error or "")
    assert "tok-secret-XYZ123" not in repr(logs) + repr(await spool.attempts(eid))


async def test_max_age_turns_retryable_into_dead(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker], clock: Clock
) -> None:
    """After max_age of failures the entry goes dead instead of retrying for ever."""
    worker = worker_for(Api(httpx.Response(503)))
    eid = await queue(spool)
    clock.now += 5 * 86400 + 1

    await worker.run_once()

    entry = await spool.get(eid)
    assert entry is not None
    assert State.DEAD == entry.state
    assert (entry.last_error or "").startswith("gave up after 432000s in the queue")


async def test_bcc_recipients_are_delivered_and_listed(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker]
) -> None:
    """Envelope recipients missing from To/Cc arrive as bcc, and all are in rcpt_to."""
    api = Api(httpx.Response(200))
    await queue(spool, ("b@example.org", "hidden@example.net"))

    await worker_for(api).run_once()

    doc = json.loads(api.requests[0].content)
    assert ["b@example.org", "hidden@example.net"] == doc["envelope"]["rcpt_to"]
    assert [{"name": None, "email": "hidden@example.net"}] == doc["bcc"]


async def test_concurrency_bounds_one_burst(
    spool: Spool, make_config: Callable[..., Config], clock: Clock
) -> None:
    """With concurrency 2, five due entries are sent in bursts of at most two at a time."""
    config = make_config(delivery={"concurrency": 2})
    in_flight = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        import asyncio

        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    worker = DeliveryWorker(config, spool, build_accounts(config), {"hook": client}, clock=clock)
    for _ in range(5):
        await queue(spool)

    count = await worker.run_once()

    assert 5 == count
    assert 2 == peak


@pytest.fixture
def two_accounts(make_config: Callable[..., Config]) -> Config:
    return make_config(
        providers={
            "primary": {"type": "webhook", "url": "https://primary.example.net/in"},
            "backup": {"type": "webhook", "url": "https://backup.example.net/in"},
        },
        routes=[
            {"provider": "primary", "failover": ["backup"], "failover_after": 1, "bounces": False}
        ],
    )


def routed(api: Api) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(api))


async def queue_to(spool: Spool, provider: str) -> str:
    env = Envelope(mail_from="a@example.com", rcpt_to=("b@example.org",))
    (eid,) = await spool.put(RAW, [NewEntry(route=0, provider=provider, envelope=env)])
    return eid


async def test_failover_after_retryable_failure_goes_to_the_next_account(
    spool: Spool, two_accounts: Config, clock: Clock
) -> None:
    """A 503 from the primary makes the next attempt go through the backup account."""
    primary, backup = Api(httpx.Response(503)), Api(httpx.Response(202))
    clients = {"primary": routed(primary), "backup": routed(backup)}
    worker = DeliveryWorker(two_accounts, spool, build_accounts(two_accounts), clients, clock=clock)
    eid = await queue_to(spool, "primary")

    await worker.run_once()
    entry = await spool.get(eid)
    assert entry is not None
    clock.now = entry.next_at
    await worker.run_once()

    done = await spool.get(eid)
    log = await spool.attempts(eid)
    assert (1, 1) == (len(primary.requests), len(backup.requests))
    assert done is not None
    assert State.DELIVERED == done.state
    assert [("primary", "retry"), ("backup", "delivered")] == [(a.provider, a.outcome) for a in log]


async def test_permanent_answer_is_never_followed_by_another_account(
    spool: Spool, two_accounts: Config, clock: Clock
) -> None:
    """A definite refusal from the primary is final: the backup is never asked."""
    primary, backup = Api(httpx.Response(400)), Api(httpx.Response(202))
    clients = {"primary": routed(primary), "backup": routed(backup)}
    worker = DeliveryWorker(two_accounts, spool, build_accounts(two_accounts), clients, clock=clock)
    eid = await queue_to(spool, "primary")

    await worker.run_once()
    clock.now += 3600
    await worker.run_once()

    entry = await spool.get(eid)
    assert entry is not None
    assert State.DEAD == entry.state
    assert (1, 0) == (len(primary.requests), len(backup.requests))


async def test_account_rate_limit_spaces_requests(
    spool: Spool, make_config: Callable[..., Config]
) -> None:
    """requests_per_second 20 sends a burst of 20 at once, then paces the rest."""
    import time as _time

    config = make_config(
        providers={
            "hook": {
                "type": "webhook",
                "url": "https://h.example.net/in",
                "limits": {"requests_per_second": 20},
            }
        }
    )
    sent_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent_at.append(_time.monotonic())
        return httpx.Response(200)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    worker = DeliveryWorker(config, spool, build_accounts(config), {"hook": client})
    for _ in range(30):
        await queue(spool)

    await worker.run_once()

    span = max(sent_at) - min(sent_at)
    assert 30 == len(sent_at)
    assert 0.4 <= span < 2.0


async def test_flow_that_decides_without_sending_is_recorded() -> None:
    """An adapter flow may return an outcome before yielding any request."""
    from bridge.delivery import send_flow
    from bridge.model import Permanent

    class Decider:
        def flow(self, message: object, now: float):  # type: ignore[no-untyped-def]
            return Permanent(reason="nothing to send")
            yield  # a generator that returns at once

    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))

    outcome = await send_flow(Decider(), None, client, 0.0)  # type: ignore[arg-type]

    assert Permanent(reason="nothing to send") == outcome


async def test_dead_entry_sends_a_dsn_to_the_sender_through_the_same_route(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker]
) -> None:
    """A permanent refusal queues a multipart/report bounce to the envelope sender, null path."""
    api = Api(httpx.Response(400, json={"error": "bad"}), httpx.Response(200))
    worker = worker_for(api)
    eid = await queue(spool)

    await worker.run_once()

    dead = await spool.get(eid)
    assert dead is not None
    assert dead.bounce_id is not None
    bounce = await spool.get(dead.bounce_id)
    assert bounce is not None
    assert ("", ("a@example.com",)) == (bounce.envelope.mail_from, bounce.envelope.rcpt_to)
    assert State.DELIVERED == bounce.state
    doc = json.loads(api.requests[1].content)
    assert "Undelivered Mail Returned to Sender" == doc["subject"]
    assert ["a@example.com"] == doc["envelope"]["rcpt_to"]
    assert "" == doc["envelope"]["mail_from"]
    assert ["message/delivery-status", "text/rfc822-headers"] == [
        a["content_type"] for a in doc["attachments"]
    ]


async def test_a_bounce_never_bounces(
    spool: Spool, worker_for: Callable[[Api], DeliveryWorker]
) -> None:
    """A dead entry with the null sender (itself a bounce) queues no DSN."""
    api = Api(httpx.Response(400))
    env = Envelope(mail_from="", rcpt_to=("b@example.org",))
    (eid,) = await spool.put(RAW, [NewEntry(route=0, provider="hook", envelope=env)])

    await worker_for(api).run_once()

    entry = await spool.get(eid)
    assert entry is not None
    assert (State.DEAD, None) == (entry.state, entry.bounce_id)
    assert 1 == len(api.requests)


async def test_route_with_bounces_off_queues_no_dsn(
    spool: Spool, make_config: Callable[..., Config], clock: Clock
) -> None:
    """routes[].bounces: false records the dead entry without sending a DSN."""
    config = make_config(routes=[{"provider": "hook", "bounces": False}])
    api = Api(httpx.Response(400))
    client = httpx.AsyncClient(transport=httpx.MockTransport(api))
    worker = DeliveryWorker(config, spool, build_accounts(config), {"hook": client}, clock=clock)
    eid = await queue(spool)

    await worker.run_once()

    entry = await spool.get(eid)
    assert entry is not None
    assert (State.DEAD, None) == (entry.state, entry.bounce_id)


async def test_bounce_from_and_no_second_bounce_after_requeue(
    spool: Spool, make_config: Callable[..., Config], clock: Clock
) -> None:
    """The DSN comes from routes[].bounce_from; a requeued entry that dies again stays quiet."""
    config = make_config(routes=[{"provider": "hook", "bounce_from": "postmaster@example.com"}])
    api = Api(httpx.Response(400))
    client = httpx.AsyncClient(transport=httpx.MockTransport(api))
    worker = DeliveryWorker(config, spool, build_accounts(config), {"hook": client}, clock=clock)
    eid = await queue(spool)

    await worker.run_once()
    first = await spool.get(eid)
    assert first is not None
    assert await spool.retry_now(eid)
    await worker.run_once()

    again = await spool.get(eid)
    bounces = [json.loads(r.content) for r in api.requests if json.loads(r.content)["id"] != eid]
    assert again is not None
    assert first.bounce_id == again.bounce_id
    assert 1 == len(bounces)
    assert "postmaster@example.com" == bounces[0]["from"]["email"]
