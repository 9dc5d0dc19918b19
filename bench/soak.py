"""Soak: SIGKILL the real daemon at random moments under concurrent load, restart, verify.

    .venv/bin/python bench/soak.py [--seconds 120] [--kills 10] [--clients 8]

Clients send unique messages for --seconds while the daemon is killed --kills times at
random moments (and restarted on the same spool). Then the queue drains and every
SMTP reply is checked against what reached the HTTPS receiver:

* every message that got 250 was delivered at least once (lost = 0);
* a message delivered twice had a kill between the two deliveries (an attempt in flight
  at the crash is made again: at-least-once), never otherwise;
* no message that got 4xx/5xx was delivered.

`tests/test_soak.py` runs a short version of the same function in `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bridge.receiver import ReceivedMessage, Receiver  # noqa: E402


@dataclass
class SoakReport:
    """What happened, for the caller to print or assert on."""

    kills: int = 0
    sent: int = 0
    accepted: int = 0
    refused: int = 0
    no_reply: int = 0
    delivered_unique: int = 0
    lost: list[str] = field(default_factory=list)
    wrongly_delivered: list[str] = field(default_factory=list)
    duplicates: int = 0
    duplicates_without_kill: list[str] = field(default_factory=list)
    drain_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """The durability promise held."""
        return not (self.lost or self.wrongly_delivered or self.duplicates_without_kill)

    def summary(self) -> str:
        """A few lines for humans."""
        verdict = "PASS" if self.ok else "FAIL"
        return (
            f"{verdict}: {self.kills} kills, {self.sent} sent, {self.accepted} accepted (250), "
            f"{self.refused} refused (4xx/5xx), {self.no_reply} without final reply\n"
            f"  delivered {self.delivered_unique} unique, {self.duplicates} duplicates "
            f"(all across a kill: {not self.duplicates_without_kill}), lost {len(self.lost)}, "
            f"wrongly delivered {len(self.wrongly_delivered)}, "
            f"drained {self.drain_seconds:.1f}s after sending stopped"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start(config: Path, log: Path, port: int) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "serve", "--config", str(config),
            cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT, env=dict(os.environ),
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc
        await asyncio.sleep(0.02)
    raise RuntimeError(f"daemon did not start; see {log}")


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def _client(
    name: str, port: int, stop_at: float, outcome: dict[str, str], counter: list[int]
) -> None:
    """Send messages one per session until stop_at; outcome[token] = '250'|'4xx'|'none'."""
    n = 0
    while time.monotonic() < stop_at:
        token = f"soak-{name}-{n}"
        n += 1
        counter[0] += 1
        outcome[token] = "none"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcome[token] = "refused-connect"
            await asyncio.sleep(0.05)
            continue
        try:
            await _reply(reader)
            writer.write(b"EHLO soak\r\n")
            await _reply(reader)
            writer.write(b"MAIL FROM:<soak@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n")
            replies = [await _reply(reader) for _ in range(3)]
            if not replies[2].startswith(b"354"):
                outcome[token] = "4xx" if replies[2][:1] in (b"4", b"5") else "none"
                continue
            writer.write(f"Subject: {token}\r\n\r\nbody of {token}\r\n.\r\n".encode())
            final = await _reply(reader)
            outcome[token] = "250" if final.startswith(b"250") else "4xx"
        except (OSError, TimeoutError, ConnectionError):
            pass  # no final reply: delivery is optional for this one
        finally:
            writer.close()


async def run_soak(
    *, seconds: float, kills: int, clients: int, workdir: Path | None = None, seed: int = 0
) -> SoakReport:
    """Run one soak and return its report (see the module docstring)."""
    rng = random.Random(seed)
    work = workdir or Path(tempfile.mkdtemp(prefix="smtp-bridge-soak-"))
    deliveries: dict[str, list[float]] = defaultdict(list)

    def on_message(msg: ReceivedMessage) -> None:
        deliveries[str(msg.document.get("subject"))].append(time.monotonic())

    rec = Receiver("127.0.0.1", 0, work / "rx", on_message=on_message)
    await rec.start()
    port = _free_port()
    config = work / "bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "spool": {"path": str(work / "spool.sqlite3")},
                "delivery": {"retry": {"first_delay": "200ms", "max_delay": "1s"}},
                "providers": {
                    "rx": {
                        "type": "webhook",
                        "url": f"{rec.url}/m",
                        "ca_file": str(rec.cert_paths.ca_cert),
                    }
                },
                "routes": [{"provider": "rx"}],
                "logging": {"level": "warning", "format": "json"},
                "health": {"enabled": False},
            }
        )
    )
    log = work / "daemon.log"
    report = SoakReport()
    outcome: dict[str, str] = {}
    counter = [0]
    kill_times: list[float] = []
    proc = await _start(config, log, port)
    stop_at = time.monotonic() + seconds
    senders = [
        asyncio.create_task(_client(f"c{i}", port, stop_at, outcome, counter))
        for i in range(clients)
    ]
    try:
        plan = sorted(rng.uniform(0.1 * seconds, 0.9 * seconds) for _ in range(kills))
        start = time.monotonic()
        for at in plan:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kill_times.append(time.monotonic())
            report.kills += 1
            proc = await _start(config, log, port)
        await asyncio.gather(*senders)
        drain_start = time.monotonic()
        accepted = {t for t, o in outcome.items() if o == "250"}
        deadline = drain_start + 120
        while not accepted <= set(deliveries) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        report.drain_seconds = time.monotonic() - drain_start
    finally:
        for task in senders:
            task.cancel()
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        await rec.close()

    report.sent = counter[0]
    report.accepted = len(accepted)
    report.refused = sum(1 for o in outcome.values() if o == "4xx")
    report.no_reply = sum(1 for o in outcome.values() if o == "none")
    report.delivered_unique = len(deliveries)
    report.lost = sorted(accepted - set(deliveries))
    report.wrongly_delivered = sorted(
        t for t, o in outcome.items() if o == "4xx" and t in deliveries
    )
    for token, times in deliveries.items():
        report.duplicates += len(times) - 1
        for first, second in itertools.pairwise(times):
            if not any(first < k < second for k in kill_times):
                report.duplicates_without_kill.append(token)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    report = asyncio.run(
        run_soak(seconds=args.seconds, kills=args.kills, clients=args.clients, seed=args.seed)
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
