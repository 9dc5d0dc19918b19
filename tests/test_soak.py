"""A short soak in `make test`: random SIGKILLs under concurrent load (`make soak` runs longer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.slow


async def test_random_sigkills_under_concurrent_load_lose_nothing(tmp_path: Path) -> None:
    """Every 250 is delivered; duplicates only across a kill; nothing refused is delivered."""
    report = await run_soak(seconds=6, kills=3, clients=6, workdir=tmp_path, seed=7)

    assert 3 == report.kills
    assert report.accepted > 50, report.summary()
    assert [] == report.lost
    assert [] == report.wrongly_delivered
    assert [] == report.duplicates_without_kill
