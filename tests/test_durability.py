"""Durability with the real daemon process: SIGKILL after 250, restart, all delivered."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from bridge.receiver import ReceivedMessage, Receiver
from tests.conftest import config_text

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_daemon(config: Path, log: Path) -> asyncio.subprocess.Process:
    """Run `python -m bridge serve` and wait until its SMTP port answers."""
    env = {**os.environ, "WEBHOOK_TOKEN": "t"}
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "serve", "--config", str(config),
            stdout=out, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
    return proc


async def wait_smtp(port: int, proc: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(20):
        while True:
            assert proc.returncode is None, "daemon exited during start-up"
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


async def test_sigkill_after_250_then_restart_delivers_every_accepted_message(
    tmp_path: Path,
) -> None:
    """Messages acknowledged with 250 survive SIGKILL before delivery and arrive after restart."""
    received: list[ReceivedMessage] = []
    down = Receiver("127.0.0.1", 0, tmp_path / "rx", status=503)
    await down.start()
    smtp_port = free_port()
    config = tmp_path / "bridge.yaml"
    config.write_text(
        config_text(
            tmp_path,
            url=f"{down.url}/messages",
            ca_file=str(down.cert_paths.ca_cert),
            listen={"port": smtp_port},
            delivery={"retry": {"first_delay": "100ms", "max_delay": "500ms"}},
        )
    )
    log = tmp_path / "daemon.log"
    proc = await start_daemon(config, log)
    await wait_smtp(smtp_port, proc)

    accepted = []
    for i in range(20):
        subject = f"durable {i}"
        _, reply = await aiosmtplib.send(
            f"Subject: {subject}\r\n\r\nbody {i}\r\n".encode(), sender="a@example.com",
            recipients=["b@example.org"], hostname="127.0.0.1", port=smtp_port,
        )  # fmt: skip
        assert reply.startswith("2.0.0 Queued as")
        accepted.append(subject)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    port = down.port
    await down.close()

    up = Receiver("127.0.0.1", port, tmp_path / "rx", on_message=received.append)
    await up.start()
    proc = await start_daemon(config, log)
    try:
        await wait_smtp(smtp_port, proc)
        async with asyncio.timeout(30):
            while len({m.document["subject"] for m in received}) < len(accepted):
                await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await proc.wait()
        await up.close()

    assert sorted(accepted) == sorted({m.document["subject"] for m in received})
    assert 0 == code, log.read_text()[-2000:]


async def test_sigterm_stops_cleanly_with_exit_0(tmp_path: Path) -> None:
    """SIGTERM on an idle daemon exits 0 and closes the listener."""
    smtp_port = free_port()
    config = tmp_path / "bridge.yaml"
    config.write_text(config_text(tmp_path, listen={"port": smtp_port}))
    log = tmp_path / "daemon.log"
    proc = await start_daemon(config, log)
    await wait_smtp(smtp_port, proc)

    proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 20)
    refused: Any = None
    try:
        await asyncio.open_connection("127.0.0.1", smtp_port)
    except OSError as exc:
        refused = exc

    assert 0 == code, log.read_text()[-2000:]
    assert refused is not None


async def test_sigterm_does_not_wait_for_a_parse_past_shutdown_grace(tmp_path: Path) -> None:
    """A delivery stuck in a worker thread is cut off at shutdown_grace; the entry survives."""
    smtp_port = free_port()
    config = tmp_path / "bridge.yaml"
    config.write_text(
        config_text(tmp_path, listen={"port": smtp_port}, delivery={"shutdown_grace": "300ms"})
    )
    # The daemon's parser blocks for a minute: a stand-in for a message that takes that long.
    slow = (
        "import sys, time, bridge.delivery as d; "
        "d.parse_message = lambda *a, **k: time.sleep(60); "
        "from bridge.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    with (tmp_path / "daemon.log").open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", slow, "serve", "--config", str(config),
            stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    await wait_smtp(smtp_port, proc)
    await aiosmtplib.send(
        b"Subject: slow\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@example.org"],
        hostname="127.0.0.1", port=smtp_port,
    )  # fmt: skip
    await asyncio.sleep(0.5)  # the attempt is now inside the blocked parse

    started = asyncio.get_running_loop().time()
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 20)
    took = asyncio.get_running_loop().time() - started
    log = (tmp_path / "daemon.log").read_text()

    assert 0 == code
    assert took < 10, f"exit took {took:.1f} s"
    assert '"attempts_cut_off": 1' in log
