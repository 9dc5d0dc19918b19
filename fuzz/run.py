"""Run a time-bounded fuzz campaign: ``python -m fuzz.run [--seconds N] [smtp] [mime]``.

Each target is run in batches of hypothesis examples, every batch with a fresh random
seed, until its share of the time is used up. The first failure is shrunk, printed with
the seed that reproduces it, and ends the run with status 1. The closing line gives the
figures that the README records: inputs tried per target and the rate.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from fuzz import mime_target, smtp_target

_BATCH = {"smtp": 100, "mime": 500}


def _campaign(
    name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], None], seconds: float
) -> int:
    """Run batches until `seconds` have passed; return the inputs tried."""
    tried = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch_seed = random.getrandbits(64)

        @seed(batch_seed)
        @settings(
            max_examples=_BATCH[name],
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def batch(value: Any) -> None:
            nonlocal tried
            tried += 1
            check(value)

        try:
            batch()
        except Exception:
            print(f"{name}: FAILED after {tried} inputs (reproduce with seed {batch_seed})")
            raise
    return tried


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the campaigns, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__)
    parser.add_argument("targets", nargs="*", metavar="smtp|mime", help="default: both")
    parser.add_argument("--seconds", type=float, default=600.0, help="total time (default 600)")
    args = parser.parse_args(argv)
    targets = args.targets or ["smtp", "mime"]
    unknown = set(targets) - {"smtp", "mime"}
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    share = args.seconds / len(targets)

    # aiosmtpd warns once per connection about AUTH without TLS on the test listener.
    warnings.simplefilter("ignore", UserWarning)
    smtp_target.quiet_logs()
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    figures: list[str] = []
    started = time.monotonic()
    for target in targets:
        t0 = time.monotonic()
        if target == "smtp":
            with smtp_target.SmtpHarness() as harness:
                tried = _campaign("smtp", smtp_target.sessions(), harness.check, share)
        else:
            tried = _campaign("mime", mime_target.inputs(), lambda v: mime_target.check(*v), share)
        elapsed = time.monotonic() - t0
        figures.append(f"{target}: {tried} inputs in {elapsed:.0f} s ({tried / elapsed:.0f}/s)")
    print(f"fuzz: no failure; {'; '.join(figures)}; {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
