"""Logging: JSON lines, redaction, and no secret anywhere in a real daemon's log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import aiosmtplib
import pytest
import structlog

from bridge.logs import configure_logging
from bridge.passwords import hash_password
from bridge.receiver import Receiver
from tests.conftest import config_text


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = []


def test_json_lines_with_redaction() -> None:
    """Events are JSON lines; sensitive keys are replaced, wherever they appear."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)

    structlog.get_logger("t").info("event_x", api_key="k-123", authorization="Bearer t", ok=1)
    logging.getLogger("other").warning("stdlib %s", "too")

    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert ("event_x", "[redacted]", "[redacted]", 1) == (
        first["event"], first["api_key"], first["authorization"], first["ok"],
    )  # fmt: skip
    assert ("stdlib too", "warning") == (second["event"], second["level"])


def test_httpx_request_urls_are_not_logged_at_info() -> None:
    """httpx logs every URL at INFO (keys may be in query strings): capped at WARNING."""
    configure_logging("debug", "json", stream=io.StringIO())

    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() >= logging.WARNING


SECRETS = {
    "WEBHOOK_TOKEN": "tok-SECRET-webhook-5f1c",
    "SENDGRID_API_KEY": "SG.SECRET-sendgrid-a9e2",
    "POSTMARK_SERVER_TOKEN": "pm-SECRET-postmark-77aa",
    "AUTH_PASSWORD": "pw-SECRET-smtp-auth-31",
}


async def test_no_secret_in_any_log_line_of_a_real_daemon(tmp_path: Path) -> None:
    """A debug-level daemon that authenticates, delivers and fails never logs a secret."""
    rejecting = Receiver("127.0.0.1", 0, tmp_path / "rx", status=401)
    await rejecting.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        smtp_port = s.getsockname()[1]
    secret_hash = hash_password(SECRETS["AUTH_PASSWORD"], ln=4)
    config = config_text(
        tmp_path,
        url=f"{rejecting.url}/messages?token=${{WEBHOOK_TOKEN}}",
        ca_file=str(rejecting.cert_paths.ca_cert),
        listen={"port": smtp_port},
        logging={"level": "debug", "format": "json"},
        auth={"users": [{"username": "u@example.com", "password_hash": secret_hash}]},
        delivery={"retry": {"first_delay": "100ms", "max_delay": "200ms", "max_attempts": 3}},
    )
    doc = config.replace(
        "providers:\n",
        "providers:\n"
        "  sg:\n    type: sendgrid\n    api_key: ${SENDGRID_API_KEY}\n"
        f"    base_url: {rejecting.url}\n    ca_file: {rejecting.cert_paths.ca_cert}\n"
        "  pm:\n    type: postmark\n    server_token: ${POSTMARK_SERVER_TOKEN}\n"
        f"    base_url: {rejecting.url}\n    ca_file: {rejecting.cert_paths.ca_cert}\n",
    ).replace(
        "routes:\n",
        "routes:\n- match: {recipients: ['*@sg.example']}\n  provider: sg\n"
        "- match: {recipients: ['*@pm.example']}\n  provider: pm\n",
    )
    path = tmp_path / "bridge.yaml"
    path.write_text(doc)
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "serve", "--config", str(path),
            stdout=out, stderr=asyncio.subprocess.STDOUT, env={**os.environ, **SECRETS},
        )  # fmt: skip
    try:
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", smtp_port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, start_tls=False)
        await smtp.connect()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await smtp.login("u@example.com", "wrong-" + SECRETS["AUTH_PASSWORD"])
        await smtp.login("u@example.com", SECRETS["AUTH_PASSWORD"])
        for rcpt in ("a@sg.example", "b@pm.example", "c@hook.example"):
            await smtp.sendmail("u@example.com", [rcpt], b"Subject: s\r\n\r\nbody\r\n")
        await smtp.quit()
        for _ in range(100):
            if log.read_text().count('"delivery_attempt"') >= 9:
                break
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        await rejecting.close()

    text = log.read_text()
    assert text.count('"delivery_attempt"') >= 9
    for name, value in SECRETS.items():
        assert value not in text, f"{name} leaked into the log"
    assert '"smtp_transaction"' in text
