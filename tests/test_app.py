"""End to end in one process: SMTP in → spool → worker → real HTTPS receiver → JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import jsonschema
import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.receiver import ReceivedMessage, Receiver

SCHEMA = json.loads(
    (Path(__file__).parents[1] / "bridge" / "schemas" / "message-v1.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


class Inbox:
    """Collects what a Receiver stored and lets a test wait for N documents."""

    def __init__(self) -> None:
        self.messages: list[ReceivedMessage] = []
        self._changed = asyncio.Event()

    def __call__(self, message: ReceivedMessage) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = 20) -> list[Any]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < n:
                self._changed.clear()
                await self._changed.wait()
        return [m.document for m in self.messages]


async def delivered_count(bridge: Bridge, n: int, timeout: float = 10) -> int:
    """Wait until the spool records `n` delivered entries (the receiver hears first)."""
    async with asyncio.timeout(timeout):
        while (count := (await bridge.spool.stats()).counts["delivered"]) < n:
            await asyncio.sleep(0.02)
    return count


@pytest.fixture
async def live(
    tmp_path: Path, make_config: Callable[..., Config]
) -> AsyncIterator[Callable[..., Any]]:
    """Start receivers and a running bridge whose providers point at them."""
    receivers: list[Receiver] = []
    bridges: list[Bridge] = []

    async def receiver(name: str = "r", **options: Any) -> tuple[Receiver, Inbox]:
        inbox = Inbox()
        rec = Receiver("127.0.0.1", 0, tmp_path / name, on_message=inbox, **options)
        await rec.start()
        receivers.append(rec)
        return rec, inbox

    async def bridge(config: Config) -> Bridge:
        b = await Bridge.start(config, smtp_port=0)
        bridges.append(b)
        return b

    yield lambda: (receiver, bridge)
    for b in bridges:
        await b.stop()
    for r in receivers:
        await r.close()


async def test_message_arrives_as_valid_message_v1_json(
    live: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """A mail sent with aiosmtplib reaches the HTTPS receiver as schema-valid JSON, Bcc kept."""
    receiver, start = live()
    rec, inbox = await receiver()
    bridge = await start(
        make_config(url=f"{rec.url}/messages", ca_file=str(rec.cert_paths.ca_cert))
    )
    msg = (
        "From: Jörg <jorg@example.com>\r\nTo: Ann <ann@example.org>\r\n"
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMessage-ID: <e2e-1@example.com>\r\n\r\nhallo\r\n"
    ).encode()

    await aiosmtplib.send(
        msg, sender="jorg@example.com", recipients=["ann@example.org", "secret@example.net"],
        hostname="127.0.0.1", port=bridge.smtp_port,
    )  # fmt: skip
    (doc,) = await inbox.wait_for(1)

    VALIDATOR.validate(doc)
    assert ["ann@example.org", "secret@example.net"] == doc["envelope"]["rcpt_to"]
    assert [{"name": None, "email": "secret@example.net"}] == doc["bcc"]
    assert "Grüße" == doc["subject"]
    assert "<e2e-1@example.com>" == doc["message_id"]
    assert doc["id"] == inbox.messages[0].idempotency_key
    assert 1 == await delivered_count(bridge, 1)


async def test_route_split_delivers_each_recipient_once_through_its_own_route(
    live: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """Recipients matching different routes go to different providers, each only its own."""
    receiver, start = live()
    eu, eu_inbox = await receiver("eu")
    other, other_inbox = await receiver("other")
    config = make_config(
        providers={
            "eu": {"type": "webhook", "url": f"{eu.url}/m", "ca_file": str(eu.cert_paths.ca_cert)},
            "rest": {
                "type": "webhook",
                "url": f"{other.url}/m",
                "ca_file": str(other.cert_paths.ca_cert),
            },
        },
        routes=[
            {"match": {"recipients": ["*.eu", "eu.example.org"]}, "provider": "eu"},
            {"match": {"recipients": ["*"]}, "provider": "rest"},
        ],
    )
    bridge = await start(config)

    await aiosmtplib.send(
        b"Subject: split\r\n\r\nx\r\n", sender="a@example.com",
        recipients=["x@eu.example.org", "y@example.com", "z@eu.example.org"],
        hostname="127.0.0.1", port=bridge.smtp_port,
    )  # fmt: skip
    (eu_doc,) = await eu_inbox.wait_for(1)
    (other_doc,) = await other_inbox.wait_for(1)

    assert ["x@eu.example.org", "z@eu.example.org"] == eu_doc["envelope"]["rcpt_to"]
    assert ["y@example.com"] == other_doc["envelope"]["rcpt_to"]
    assert eu_doc["id"] != other_doc["id"]


async def test_outage_then_recovery_delivers_everything_once(
    live: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """While the API answers 503 mail keeps being accepted; after recovery all arrive."""
    receiver, start = live()
    rec, inbox = await receiver(statuses=[503] * 6)
    config = make_config(
        url=f"{rec.url}/messages",
        ca_file=str(rec.cert_paths.ca_cert),
        delivery={"retry": {"first_delay": "100ms", "max_delay": "300ms"}},
    )
    bridge = await start(config)

    for i in range(3):
        await aiosmtplib.send(
            f"Subject: outage {i}\r\n\r\nx\r\n".encode(), sender="a@example.com",
            recipients=["b@example.org"], hostname="127.0.0.1", port=bridge.smtp_port,
        )  # fmt: skip
    docs = await inbox.wait_for(3)

    assert ["outage 0", "outage 1", "outage 2"] == sorted(d["subject"] for d in docs)
    assert 3 == await delivered_count(bridge, 3)
    assert 3 == len(inbox.messages)


async def test_failover_to_backup_account_over_real_https(
    live: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """With the primary API answering 503, the backup account delivers after failover_after."""
    receiver, start = live()
    primary, primary_inbox = await receiver("primary", status=503)
    backup, backup_inbox = await receiver("backup")
    config = make_config(
        providers={
            "primary": {"type": "webhook", "url": f"{primary.url}/m",
                        "ca_file": str(primary.cert_paths.ca_cert)},
            "backup": {"type": "webhook", "url": f"{backup.url}/m",
                       "ca_file": str(backup.cert_paths.ca_cert)},
        },
        routes=[{"provider": "primary", "failover": ["backup"], "failover_after": 2}],
        delivery={"retry": {"first_delay": "50ms", "max_delay": "100ms"}},
    )  # fmt: skip
    bridge = await start(config)

    await aiosmtplib.send(
        b"Subject: failover\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@example.org"],
        hostname="127.0.0.1", port=bridge.smtp_port,
    )  # fmt: skip
    (doc,) = await backup_inbox.wait_for(1)

    assert 1 == await delivered_count(bridge, 1)
    assert "failover" == doc["subject"]
    assert [] == primary_inbox.messages
    log = await bridge.spool.attempts(doc["id"])
    assert [("primary", "retry"), ("primary", "retry"), ("backup", "delivered")] == [
        (a.provider, a.outcome) for a in log
    ]


async def test_account_rate_limit_over_real_https(
    live: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """requests_per_second 4 spreads 8 messages over about a second at the receiver."""
    import time

    receiver, start = live()
    rec, inbox = await receiver()
    arrivals: list[float] = []
    original = inbox.__call__

    def stamp(message: ReceivedMessage) -> None:
        arrivals.append(time.monotonic())
        original(message)

    rec.on_message = stamp
    config = make_config(
        providers={
            "hook": {"type": "webhook", "url": f"{rec.url}/m",
                     "ca_file": str(rec.cert_paths.ca_cert),
                     "limits": {"requests_per_second": 4}},
        },
    )  # fmt: skip
    bridge = await start(config)
    bridge.worker_task.cancel()  # queue everything first, then deliver in one burst
    for i in range(8):
        await aiosmtplib.send(
            f"Subject: r{i}\r\n\r\nx\r\n".encode(), sender="a@example.com",
            recipients=["b@example.org"], hostname="127.0.0.1", port=bridge.smtp_port,
        )  # fmt: skip

    await bridge.worker.run_once()

    assert 8 == len(arrivals)
    assert 0.8 <= max(arrivals) - min(arrivals) < 3.0


async def test_hanging_api_times_out_and_does_not_exhaust_the_pool(
    make_config: Callable[..., Config],
) -> None:
    """An API that accepts connections and never answers: each attempt times out and is
    retried, the worker finishes its burst, and SMTP keeps accepting meanwhile."""
    import time

    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answer, never close

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = make_config(
        url=f"https://127.0.0.1:{port}/m",
        delivery={
            "timeout": "300ms",
            "concurrency": 2,
            "retry": {"first_delay": "30s", "max_delay": "60s"},
        },
    )
    bridge = await Bridge.start(config, smtp_port=0, run_worker=False)
    try:
        for i in range(6):
            await aiosmtplib.send(
                f"Subject: hang {i}\r\n\r\nx\r\n".encode(), sender="a@example.com",
                recipients=["b@example.org"], hostname="127.0.0.1", port=bridge.smtp_port,
            )  # fmt: skip
        t0 = time.monotonic()
        attempts = await bridge.worker.run_once()
        took = time.monotonic() - t0
        entries = await bridge.spool.list()
        t1 = time.monotonic()
        await aiosmtplib.send(
            b"Subject: still open\r\n\r\nx\r\n", sender="a@example.com",
            recipients=["b@example.org"], hostname="127.0.0.1", port=bridge.smtp_port,
        )  # fmt: skip
        accept_time = time.monotonic() - t1
    finally:
        await bridge.stop()
        for w in held:
            w.close()
        server.close()

    assert 6 == attempts
    assert took < 3 * 0.3 + 2.0
    assert {"deferred"} == {e.state.value for e in entries}
    assert all("timed out" in (e.last_error or "") for e in entries)
    assert accept_time < 1.0
