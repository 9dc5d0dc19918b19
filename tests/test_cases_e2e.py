"""The real-world cases of ``shared/cases/LOG.md`` end to end, through the webhook provider.

Each test plays its case against the real listener (the ``.smtp`` lines as written; an
``.eml`` dot-stuffed with the LOG.md default envelope), runs the delivery worker to a real
HTTPS receiver, and proves three links of the chain:

1. the SMTP replies are the ones LOG.md expects (250 after DATA, 552 for case 10, ...);
2. the spool holds exactly the bytes a correct server stores for the case — the same
   bytes `test_cases_parse.py` checks against every expected value of LOG.md;
3. the receiver gets exactly the message-v1 document of those bytes, once, carrying the
   case's envelope (so nothing is lost or changed between parser and API).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.mime import parse_message
from bridge.payload import message_v1
from bridge.receiver import ReceivedMessage, Receiver
from bridge.spool import State
from tests.casefiles import (
    dot_stuff,
    load_eml_case,
    load_smtp_case,
    smtp_envelope,
    smtp_message,
)
from tests.smtpwire import Wire


@pytest.fixture
async def pipeline(
    tmp_path: Path, make_config: Callable[..., Config]
) -> AsyncIterator[Callable[..., Any]]:
    """(bridge, received list) with a real HTTPS receiver behind a webhook provider."""
    received: list[ReceivedMessage] = []
    rec = Receiver("127.0.0.1", 0, tmp_path / "rx", on_message=received.append)
    await rec.start()
    bridges: list[Bridge] = []

    async def start(**overrides: Any) -> tuple[Bridge, list[ReceivedMessage]]:
        config = make_config(
            url=f"{rec.url}/messages", ca_file=str(rec.cert_paths.ca_cert), **overrides
        )
        bridge = await Bridge.start(config, smtp_port=0, run_worker=False)
        bridges.append(bridge)
        return bridge, received

    yield start
    for b in bridges:
        await b.stop()
    await rec.close()


async def play_smtp(wire: Wire, lines: tuple[bytes, ...]) -> list[tuple[bytes, int]]:
    """Send a .smtp case: wait after each command, and inside DATA only after the '.'."""
    replies: list[tuple[bytes, int]] = []
    in_data = False
    chunk: list[bytes] = []
    for line in lines:
        if in_data:
            chunk.append(line + b"\r\n")
            if line == b".":
                await wire.send_raw(b"".join(chunk))
                replies.append((b"<end of data>", (await wire.reply())[0]))
                in_data, chunk = False, []
            continue
        code, _ = await wire.cmd(line)
        replies.append((line, code))
        in_data = line.strip().upper() == b"DATA" and code == 354
    return replies


async def run_smtp_case(start: Callable[..., Any], name: str, **overrides: Any) -> Any:
    bridge, received = await start(**overrides)
    case = load_smtp_case(name)
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    replies = await play_smtp(wire, case.lines)
    await wire.close()
    return bridge, received, replies, smtp_message(case), smtp_envelope(case)


async def run_eml_case(start: Callable[..., Any], name: str) -> Any:
    bridge, received = await start()
    eml = load_eml_case(name)
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    replies = [(b"EHLO", (await wire.cmd("EHLO tester.example.com"))[0])]
    replies.append((b"MAIL", (await wire.cmd(f"MAIL FROM:<{eml.envelope.mail_from}>"))[0]))
    for rcpt in eml.envelope.rcpt_to:
        replies.append((b"RCPT", (await wire.cmd(f"RCPT TO:<{rcpt}>"))[0]))
    replies.append((b"DATA", (await wire.cmd("DATA"))[0]))
    await wire.send_raw(dot_stuff(eml.raw))
    replies.append((b"<end of data>", (await wire.reply())[0]))
    await wire.cmd("QUIT")
    await wire.close()
    # The CRLF before the final '.' ends the last line and so belongs to the data: a file
    # that ends without one (case 07 ends in a bare LF) is stored with it.
    stored = eml.raw if eml.raw.endswith(b"\r\n") else eml.raw + b"\r\n"
    return bridge, received, replies, stored, eml.envelope


async def delivered_once(bridge: Bridge, received: list[ReceivedMessage], raw: bytes,
                         envelope: Any) -> dict[str, Any]:  # fmt: skip
    """Check links 2 and 3 of the chain and return the document the receiver got."""
    (entry,) = await bridge.spool.list()
    conn = sqlite3.connect(bridge.spool.path)
    try:
        ((body,),) = conn.execute("SELECT raw FROM bodies").fetchall()
    finally:
        conn.close()
    assert raw == body
    claims_before = len(received)
    await bridge.worker.run_once()
    (doc,) = [m.document for m in received[claims_before:]]
    stored = parse_message(
        raw, entry.envelope, id=entry.id,
        received_at=datetime.fromtimestamp(entry.created_at, UTC),
    )  # fmt: skip
    expected = json.loads(json.dumps(message_v1(stored), ensure_ascii=False))
    done = await bridge.spool.get(entry.id)

    assert done is not None
    assert State.DELIVERED == done.state
    assert envelope.mail_from == entry.envelope.mail_from
    assert envelope.rcpt_to == entry.envelope.rcpt_to
    assert expected == doc
    result: dict[str, Any] = doc
    return result


def final_codes(replies: list[tuple[bytes, int]]) -> list[int]:
    return [code for line, code in replies if line == b"<end of data>"]


# ------------------------------------------------------------------------- .smtp cases


async def smtp_case_ok(pipeline: Callable[..., Any], name: str) -> tuple[Any, Any]:
    """Play a case that must go through: no 4xx/5xx anywhere, 250 after DATA, delivered."""
    bridge, received, replies, raw, env = await run_smtp_case(pipeline, name)

    assert [] == [(line, code) for line, code in replies if code >= 400]
    assert [250] == final_codes(replies)
    return replies, await delivered_once(bridge, received, raw, env)


async def test_03_mail_from_auth_empty_param(pipeline: Callable[..., Any]) -> None:
    """03-mail-from-auth-empty-param.smtp: MAIL with SIZE= and AUTH=<> gets 250."""
    replies, doc = await smtp_case_ok(pipeline, "03-mail-from-auth-empty-param.smtp")

    mail = [code for line, code in replies if line.startswith(b"MAIL FROM:")]
    assert [250] == mail
    assert ["oncall@example.org"] == doc["envelope"]["rcpt_to"]


async def test_05_null_reverse_path_dsn(pipeline: Callable[..., Any]) -> None:
    """05-null-reverse-path-dsn.smtp: the null path is "" and the sender is never '<>'."""
    _, doc = await smtp_case_ok(pipeline, "05-null-reverse-path-dsn.smtp")

    assert "" == doc["envelope"]["mail_from"]
    assert "MAILER-DAEMON@mx1.example.net" == doc["from"]["email"]


async def test_06_helo_printer_no_date(pipeline: Callable[..., Any]) -> None:
    """06-helo-printer-no-date.smtp: HELO (not EHLO) gets 250 and the scan is delivered."""
    replies, doc = await smtp_case_ok(pipeline, "06-helo-printer-no-date.smtp")

    assert (b"HELO MFP-3F-EAST", 250) == replies[0]
    assert 2 == len(doc["attachments"])


async def test_10_size_limit(pipeline: Callable[..., Any]) -> None:
    """10-size-limit.smtp: 552 for SIZE=, RSET 250, exactly one 552 after DATA, nothing sent."""
    bridge, received, replies, _, _ = await run_smtp_case(
        pipeline, "10-size-limit.smtp", listen={"max_message_size": 4096}
    )
    await bridge.worker.run_once()

    codes = [code for _, code in replies]
    assert 552 == replies[1][1]
    assert (b"RSET", 250) == replies[2]
    assert [552] == final_codes(replies)
    assert [250, 221] == codes[-2:]
    assert 1 == sum(1 for line, _ in replies if line == b"<end of data>")
    assert [] == await bridge.spool.list()
    assert [] == received


async def test_09_dot_stuffed_lines(pipeline: Callable[..., Any]) -> None:
    """09-dot-stuffed-lines.smtp: stored unstuffed once; the '..' line does not end DATA."""
    _, doc = await smtp_case_ok(pipeline, "09-dot-stuffed-lines.smtp")

    assert doc["text"].replace("\r\n", "\n").rstrip("\n").endswith("...\n.\n .\nEnd of list.")


async def test_11_smtputf8_utf8_addresses(pipeline: Callable[..., Any]) -> None:
    """11-smtputf8-utf8-addresses.smtp: EHLO offers SMTPUTF8/8BITMIME; UTF-8 envelope kept."""
    replies, doc = await smtp_case_ok(pipeline, "11-smtputf8-utf8-addresses.smtp")

    assert 250 == replies[0][1]
    assert "jörg@example.org" == doc["envelope"]["mail_from"]
    assert ["jürgen@example.org"] == doc["envelope"]["rcpt_to"]


async def test_22_bcc_only_undisclosed_recipients(pipeline: Callable[..., Any]) -> None:
    """22-bcc-only-undisclosed-recipients.smtp: both envelope recipients delivered as Bcc."""
    _, doc = await smtp_case_ok(pipeline, "22-bcc-only-undisclosed-recipients.smtp")

    assert {"alice@example.org", "bob@example.net"} == set(doc["envelope"]["rcpt_to"])
    assert [] == doc["to"]
    assert {"alice@example.org", "bob@example.net"} == {a["email"] for a in doc["bcc"]}


async def test_23_envelope_differs_from_headers(pipeline: Callable[..., Any]) -> None:
    """23-envelope-differs-from-headers.smtp: only the envelope recipient, once."""
    _, doc = await smtp_case_ok(pipeline, "23-envelope-differs-from-headers.smtp")

    assert ["dev@example.org"] == doc["envelope"]["rcpt_to"]
    assert [] == doc["bcc"]


async def test_24_no_from_or_to_header(pipeline: Callable[..., Any]) -> None:
    """24-no-from-or-to-header.smtp: From falls back to the envelope sender."""
    _, doc = await smtp_case_ok(pipeline, "24-no-from-or-to-header.smtp")

    assert "test@example.com" == doc["from"]["email"]
    assert ["helpdesk@example.org"] == doc["envelope"]["rcpt_to"]


# ------------------------------------------------------------------------- .eml cases


EML_CASES = [
    "07-bare-lf-line-endings.eml",
    "08-line-longer-than-998.eml",
    "12-cp1252-labelled-iso-8859-1.eml",
    "14-subject-encoded-words-folded.eml",
    "15-rfc2231-filename-continuation.eml",
    "17-rfc2231-charset-parameter.eml",
    "19-multipart-without-closing-boundary.eml",
    "20-header-without-space-after-colon.eml",
    "21-missing-header-body-separator.eml",
    "25-duplicate-headers.eml",
    "27-three-attachments-over-4mb-total.eml",
    "29-winmail-dat-tnef.eml",
    "31-inline-cid-image.eml",
]


def _eml_test(name: str) -> Callable[..., Any]:
    async def test(pipeline: Callable[..., Any]) -> None:
        bridge, received, replies, raw, env = await run_eml_case(pipeline, name)

        assert [] == [(line, code) for line, code in replies if code >= 400]
        assert [250] == final_codes(replies)
        await delivered_once(bridge, received, raw, env)

    test.__doc__ = f"{name}: gets 250, is stored byte for byte, and arrives exactly once."
    return test


# One named test per case file (test_07_bare_lf_line_endings, ...), as the case log asks.
for _name in EML_CASES:
    _test_name = "test_" + _name.removesuffix(".eml").replace("-", "_")
    globals()[_test_name] = _eml_test(_name)
