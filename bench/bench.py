"""Throughput and latency benchmark: real daemon process, real SMTP, real HTTPS receiver.

    .venv/bin/python bench/bench.py [--messages 3000] [--clients 16] [--size 4096]

Starts `smtp-bridge receive`-style HTTPS receiver in this process, the daemon as a
subprocess on a fresh spool, then has --clients connections send --messages messages in
total (each connection reuses its session: MAIL, RCPT, DATA, repeat). Prints acceptance
rate and the latency from MAIL FROM to the 250 after DATA (the fsync is inside it), then
the delivery rate until the receiver has every message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bridge.receiver import Receiver  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def client(port: int, count: int, body: bytes, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reply(reader)
    writer.write(b"EHLO bench.example.com\r\n")
    await reply(reader)
    for _ in range(count):
        t0 = time.perf_counter()
        writer.write(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n")
        for _ in range(3):
            await reply(reader)
        writer.write(body + b".\r\n")
        line = await reply(reader)
        if not line.startswith(b"250"):
            raise RuntimeError(line.decode())
        latencies.append(time.perf_counter() - t0)
    writer.write(b"QUIT\r\n")
    await reply(reader)
    writer.close()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", type=int, default=4096, help="approximate message bytes")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="smtp-bridge-bench-"))
    done = asyncio.Event()
    received = 0

    def on_message(_: object) -> None:
        nonlocal received
        received += 1
        if received >= args.messages:
            done.set()

    rec = Receiver("127.0.0.1", 0, work / "rx", on_message=on_message)
    await rec.start()
    smtp_port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": smtp_port},
        "spool": {"path": str(work / "spool.sqlite3")},
        "providers": {"rx": {"type": "webhook", "url": f"{rec.url}/m",
                             "ca_file": str(rec.cert_paths.ca_cert)}},
        "routes": [{"provider": "rx"}],
        "logging": {"level": "warning"},
        "health": {"enabled": False},
    }  # fmt: skip
    (work / "bridge.yaml").write_text(yaml.safe_dump(config))
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--config", str(work / "bridge.yaml"),
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", smtp_port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.05)

    line = b"x" * 70 + b"\r\n"
    body = b"Subject: bench\r\nFrom: bench@example.com\r\n\r\n" + line * max(1, args.size // 72)
    latencies: list[float] = []
    per_client = [args.messages // args.clients] * args.clients
    per_client[0] += args.messages - sum(per_client)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(smtp_port, n, body, latencies) for n in per_client))
    accept_s = time.perf_counter() - t0
    await asyncio.wait_for(done.wait(), 600)
    total_s = time.perf_counter() - t0
    daemon.terminate()
    await daemon.wait()
    await rec.close()

    ms = [v * 1000 for v in latencies]
    print(f"messages {args.messages}, clients {args.clients}, size ~{len(body)} B")
    print(f"accepted   {args.messages / accept_s:8.1f} msgs/s   ({accept_s:.2f} s)")
    print(
        f"latency    p50 {pct(ms, 50):.1f} ms   p90 {pct(ms, 90):.1f} ms   "
        f"p99 {pct(ms, 99):.1f} ms   max {max(ms):.1f} ms   mean {statistics.mean(ms):.1f} ms"
    )
    print(f"delivered  {args.messages / total_s:8.1f} msgs/s end to end ({total_s:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
