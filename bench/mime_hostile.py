"""Parse time of hostile mail: inputs that make the email package's parsers slow.

    .venv/bin/python bench/mime_hostile.py [--scale 1]

Each input is parsed once by `bridge.mime.parse_message` and prepared once by
`bridge.providers.rawmime.prepare_raw`; the table gives the seconds of each. Parsing
runs in a worker thread of the daemon, so a slow input delays only its own delivery,
but it holds a CPU (and the GIL) while it lasts: these are the inputs to watch.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bridge.mime import parse_message  # noqa: E402
from bridge.model import Envelope  # noqa: E402
from bridge.providers.rawmime import prepare_raw  # noqa: E402

ENVELOPE = Envelope(mail_from="a@example.com", rcpt_to=("b@example.org",))


def inputs(scale: int) -> dict[str, bytes]:
    """Name → message bytes; `scale` multiplies every repeat count."""
    params = "".join(f"; p{i}*{i % 3}*=x" for i in range(16000 * scale))
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(20000 * scale))
    names = ", ".join(
        f'"=?utf-8?q?N=C3=A4me_{i}?=" <u{i}@example.org>' for i in range(1000 * scale)
    )
    return {
        "Content-Type with 16k RFC 2231 sections": (
            f"Content-Type: text/plain{params}\r\n\r\nhi\r\n".encode()
        ),
        "To of 30k double quotes": b"To: " + b'"' * (30000 * scale) + b"<r@b.org>\r\n\r\nhi\r\n",
        "To of 1000 encoded display names": f"To: {names}\r\n\r\nhi\r\n".encode(),
        "multipart with 20k parts": (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"
        ),
        "64 nested multiparts": (
            b"".join(
                b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                for i in range(64 * scale)
            )
            + b"Content-Type: text/plain\r\n\r\ndeep\r\n"
        ),
        "25 MB body line": b"Subject: long\r\n\r\n" + b"x" * (25 * 1024 * 1024) + b"\r\n",
    }


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1)
    args = parser.parse_args()
    now = datetime.now(UTC)
    print(f"{'input':42} {'octets':>10} {'parse s':>8} {'raw s':>8}")
    for name, raw in inputs(args.scale).items():
        parse = timed(partial(parse_message, raw, ENVELOPE, id="b", received_at=now))
        prepare = timed(partial(prepare_raw, raw))
        print(f"{name:42} {len(raw):>10} {parse:>8.2f} {prepare:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
