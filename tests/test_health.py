"""Health and metrics: the pure readiness report and the loopback HTTP endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from bridge.app import Bridge
from bridge.cli import main
from bridge.config import Config
from bridge.health import readiness
from tests.conftest import config_text


def test_readiness_lists_every_problem() -> None:
    """Not listening, spool down and a stale queue are each named."""
    report = readiness(listening=False, spool_ok=False, oldest_due_age=7200, stale_after=3600)

    assert not report.ready
    assert (
        "smtp listener is not up",
        "spool is not answering",
        "oldest due entry has waited 7200s",
    ) == report.problems


def test_ready_when_all_is_well() -> None:
    """Listening, spool fine and nothing overdue is ready."""
    assert readiness(listening=True, spool_ok=True, oldest_due_age=5, stale_after=3600).ready


async def test_endpoints_and_metrics(make_config: Callable[..., Config]) -> None:
    """/healthz and /readyz answer 200; /metrics counts SMTP transactions; others 404."""
    config = make_config(health={"enabled": True, "port": 0})
    bridge = await Bridge.start(config, smtp_port=0, health_port=0, run_worker=False)
    assert bridge.health_server is not None
    port = bridge.health_server.sockets[0].getsockname()[1]
    await aiosmtplib.send(
        b"Subject: m\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@example.org"],
        hostname="127.0.0.1", port=bridge.smtp_port,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            healthz = await client.get("/healthz")
            readyz = await client.get("/readyz")
            metrics = await client.get("/metrics")
            missing = await client.get("/nope")
    finally:
        await bridge.stop()

    assert (200, 200, 200, 404) == (
        healthz.status_code, readyz.status_code, metrics.status_code, missing.status_code,
    )  # fmt: skip
    assert 'smtp_bridge_smtp_transactions_total{result="queued"}' in metrics.text
    assert 'smtp_bridge_queue_entries{state="queued"} 1.0' in metrics.text


async def test_health_command_against_a_running_bridge(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    """`smtp-bridge health` exits 0 while the daemon is ready."""
    import asyncio
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = make_config(health={"enabled": True, "port": port})
    path = tmp_path / "h.yaml"
    path.write_text(config_text(tmp_path, health={"enabled": True, "port": port}))
    bridge = await Bridge.start(config, smtp_port=0, run_worker=False)
    try:
        code = await asyncio.to_thread(main, ["health", "--config", str(path)])
    finally:
        await bridge.stop()

    assert 0 == code


async def test_over_long_request_line_is_dropped_quietly(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    """A 70 KB request line closes the connection; asyncio logs no unhandled exception."""
    config = make_config(health={"enabled": True, "port": 0})
    bridge = await Bridge.start(config, smtp_port=0, health_port=0, run_worker=False)
    assert bridge.health_server is not None
    port = bridge.health_server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /" + b"A" * 70000 + b" HTTP/1.0\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        healthz = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/healthz")
    finally:
        await bridge.stop()

    assert b"" == answer
    assert 200 == healthz.status_code
    assert [] == [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"]
