"""Full disk, for real: the daemon's spool on a 2 MiB tmpfs in a private mount namespace.

The disk is filled with ballast and mail is sent until the bridge refuses it (452). The
ballast then stays: the queue must still drain (delivery bookkeeping needs space too,
STYLE.md §2d: a WAL that eats the last byte wedges every later write), and once it has,
the space its bodies took is reused for new mail.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path

import aiosmtplib
import pytest

from bridge.receiver import ReceivedMessage, Receiver
from tests.conftest import config_text

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="needs root and unshare(1) to mount a private tmpfs",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def send(port: int, i: int) -> str:
    """One 16 KiB message; returns the reply code class ('250', '452', ...)."""
    body = f"Subject: full {i}\r\n\r\n".encode() + (b"z" * 78 + b"\r\n") * 200
    try:
        await aiosmtplib.send(
            body, sender="a@example.com", recipients=["b@example.org"],
            hostname="127.0.0.1", port=port, timeout=20,
        )  # fmt: skip
    except aiosmtplib.SMTPResponseException as exc:
        return str(exc.code)
    return "250"


async def test_queue_drains_while_the_disk_stays_full(tmp_path: Path) -> None:
    """Refusals are 452 only; every 250 is delivered without freeing space; then mail flows."""
    received: list[ReceivedMessage] = []
    rec = Receiver("127.0.0.1", 0, tmp_path / "rx", status=503, on_message=received.append)
    await rec.start()
    spool_dir = tmp_path / "tmpfs"
    spool_dir.mkdir()
    smtp_port = free_port()
    config = tmp_path / "bridge.yaml"
    config.write_text(
        config_text(
            tmp_path,
            url=f"{rec.url}/messages",
            ca_file=str(rec.cert_paths.ca_cert),
            listen={"port": smtp_port},
            spool={"path": str(spool_dir / "spool.sqlite3"), "min_free_space": "256KiB"},
            delivery={"retry": {"first_delay": "200ms", "max_delay": "500ms"}},
        )
    )
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {shlex.quote(str(spool_dir))} && "
        f"dd if=/dev/zero of={shlex.quote(str(spool_dir / 'ballast'))} bs=1k count=1200 "
        "status=none && "
        f"exec {shlex.quote(sys.executable)} -m bridge serve --config {shlex.quote(str(config))}"
    )
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            "unshare", "-m", "--propagation", "private", "sh", "-c", script,
            stdout=out, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "WEBHOOK_TOKEN": "t"},
        )  # fmt: skip
    try:
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", smtp_port)
                w.close()
                break
            except OSError:
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.05)
        codes: list[str] = []
        while codes[-3:] != ["452"] * 3 and len(codes) < 200:
            codes.append(await send(smtp_port, len(codes)))
        accepted = {f"full {i}" for i, c in enumerate(codes) if c == "250"}

        rec.status = 200  # the API recovers; the ballast stays where it is
        async with asyncio.timeout(60):
            while not accepted <= {m.document["subject"] for m in received}:
                await asyncio.sleep(0.1)
        after = [await send(smtp_port, 1000 + i) for i in range(5)]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await proc.wait()
        await rec.close()

    assert set(codes) <= {"250", "452"}
    assert ["452"] * 3 == codes[-3:]
    assert len(accepted) >= 5, codes
    assert ["250"] * 5 == after
    assert 0 == code, log.read_text()[-3000:]
