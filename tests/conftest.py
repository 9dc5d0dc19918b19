"""Shared fixtures: config factory, a real HTTPS receiver on loopback, a running bridge."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import Config, load_config

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"


def config_text(
    tmp_path: Path,
    *,
    url: str = "https://127.0.0.1:9/messages",
    ca_file: str | None = None,
    **sections: Any,
) -> str:
    """A complete YAML config with a webhook provider; `sections` override top-level keys."""
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "spool": {"path": str(tmp_path / "spool.sqlite3"), "min_free_space": 0},
        "delivery": {"retry": {"first_delay": "1s", "max_delay": "10s"}},
        "providers": {"hook": {"type": "webhook", "url": url}},
        "routes": [{"match": {"recipients": ["*"]}, "provider": "hook"}],
        "health": {"enabled": False},
    }
    if ca_file is not None:
        doc["providers"]["hook"]["ca_file"] = ca_file
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict) and key != "providers":
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a validated Config from overrides (see `config_text`)."""

    def make(**kw: Any) -> Config:
        return load_config(config_text(tmp_path, **kw), {})

    return make


def dedent(text: str) -> str:
    """textwrap.dedent for YAML written inline in tests."""
    return textwrap.dedent(text).lstrip("\n")


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Any]:
    """A real HTTPS receiver (bridge.receiver) on 127.0.0.1, port 0, with its own CA."""
    from bridge.receiver import Receiver

    rec = Receiver("127.0.0.1", 0, tmp_path / "receiver")
    await rec.start()
    try:
        yield rec
    finally:
        await rec.close()
