"""Logging setup: structlog events, stdlib loggers routed through the same pipeline.

One place configures logging; everyone else calls `structlog.get_logger()`. Output is JSON
lines when stderr is not a terminal (journald, Docker) and a console rendering otherwise.

Two rules keep secrets out of logs:
* httpx and httpcore are capped at WARNING: httpx logs every request URL at INFO, and some
  APIs take keys in the query string.
* `redact` drops or masks keys that may hold credentials or message bodies, wherever they
  appear in an event.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["SENSITIVE_KEYS", "configure_logging", "redact"]

#: Event keys whose values are never written.
SENSITIVE_KEYS = frozenset(
    {
        "authorization", "api_key", "apikey", "api-key", "password", "secret", "token",
        "access_token", "refresh_token", "client_secret", "secret_access_key", "server_token",
        "secret_key", "body", "raw", "content", "headers",
    }
)  # fmt: skip


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace sensitive values with ``[redacted]``."""
    for key in list(event_dict):
        if key.lower() in SENSITIVE_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger once, at start-up.

    Args:
        level: debug, info, warning or error.
        fmt: json, console, or auto (json unless the stream is a terminal).
        stream: Where log lines go (default stderr).
    """
    out = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # aiosmtpd logs every command line (addresses, AUTH exchanges) at INFO as "mail.log";
    # our own smtp_transaction line says what operators need. It also warns on every
    # connection about AUTH without TLS on loopback, which is our deliberate default.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
