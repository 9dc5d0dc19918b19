"""Metrics and health: counters, a pure readiness report, and the loopback endpoint.

`/metrics` (Prometheus text format), `/healthz` (the process answers) and `/readyz`
(listener up, spool answering, queue not stuck) on `health.host:health.port`, default
127.0.0.1:9025. `smtp-bridge health` asks `/readyz` and exits 0 or 1 (Docker HEALTHCHECK).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

__all__ = [
    "DEAD_LETTERS",
    "DELIVERY_ATTEMPTS",
    "QUEUE_ENTRIES",
    "REGISTRY",
    "SMTP_TRANSACTIONS",
    "HealthReport",
    "readiness",
    "serve_health",
]

REGISTRY = CollectorRegistry(auto_describe=True)
SMTP_TRANSACTIONS = Counter(
    "smtp_bridge_smtp_transactions", "SMTP DATA transactions by result", ["result"],
    registry=REGISTRY,
)  # fmt: skip
DELIVERY_ATTEMPTS = Counter(
    "smtp_bridge_delivery_attempts", "Delivery attempts by provider account and outcome",
    ["provider", "outcome"], registry=REGISTRY,
)  # fmt: skip
DEAD_LETTERS = Counter(
    "smtp_bridge_dead_letters", "Entries that went dead, by whether a bounce was queued",
    ["bounced"], registry=REGISTRY,
)  # fmt: skip
QUEUE_ENTRIES = Gauge(
    "smtp_bridge_queue_entries", "Spool entries by state", ["state"], registry=REGISTRY
)


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Whether the bridge is ready, and why not."""

    ready: bool
    problems: tuple[str, ...]


def readiness(
    *, listening: bool, spool_ok: bool, oldest_due_age: float | None, stale_after: float
) -> HealthReport:
    """Pure readiness decision from facts gathered by the caller."""
    problems = []
    if not listening:
        problems.append("smtp listener is not up")
    if not spool_ok:
        problems.append("spool is not answering")
    if oldest_due_age is not None and oldest_due_age > stale_after:
        problems.append(f"oldest due entry has waited {oldest_due_age:.0f}s")
    return HealthReport(ready=not problems, problems=tuple(problems))


async def serve_health(
    host: str, port: int, ready: Callable[[], Awaitable[HealthReport]]
) -> asyncio.Server:
    """Start the tiny HTTP/1.0 endpoint. Only GET of three paths; everything else 404."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 and parts[0] == "GET" else ""
            status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
            elif path == "/healthz":
                status, body = "200 OK", b"ok\n"
            elif path == "/readyz":
                report = await ready()
                status = "200 OK" if report.ready else "503 Service Unavailable"
                body = ("ready\n" if report.ready else "\n".join(report.problems) + "\n").encode()
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError, ValueError):
            pass  # ValueError: a request line over the stream limit; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host=host, port=port)
