"""The SMTP edge over real loopback sockets: replies, parameters, DATA framing, limits."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import sqlite3
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import TLSSetupException
from structlog.testing import capture_logs

from bridge.app import Bridge
from bridge.config import Config
from bridge.smtp import Reply
from tests.smtpwire import Wire, stuff


@pytest.fixture
async def start_bridge() -> AsyncIterator[Callable[..., Any]]:
    """Start a Bridge (no delivery worker) on port 0; stopped after the test."""
    started: list[Bridge] = []

    async def start(config: Config) -> Bridge:
        bridge = await Bridge.start(config, smtp_port=0, run_worker=False)
        started.append(bridge)
        return bridge

    yield start
    for b in started:
        await b.stop()


@pytest.fixture
async def bridge(start_bridge: Callable[..., Any], make_config: Callable[..., Config]) -> Bridge:
    b: Bridge = await start_bridge(make_config(listen={"max_message_size": 4096}))
    return b


@pytest.fixture
async def wire(bridge: Bridge) -> AsyncIterator[Wire]:
    w = await Wire.open(bridge.smtp_port)
    assert 220 == (await w.reply())[0]
    yield w
    await w.close()


def stored(bridge: Bridge) -> list[tuple[Any, ...]]:
    """(mail_from, rcpt_to json, raw) of every stored entry, read as another process would."""
    conn = sqlite3.connect(bridge.spool.path)
    try:
        return conn.execute(
            "SELECT e.mail_from, e.rcpt_to, b.raw FROM entries e JOIN bodies b ON b.id = e.body_id"
            " ORDER BY e.id"
        ).fetchall()
    finally:
        conn.close()


async def transaction(
    w: Wire,
    data: bytes,
    mail: str = "MAIL FROM:<a@example.com>",
    rcpts: tuple[str, ...] = ("RCPT TO:<b@example.org>",),
) -> tuple[int, list[str]]:
    """MAIL, RCPTs, DATA, then the raw (already stuffed) data; returns the final reply."""
    assert 250 == (await w.cmd(mail))[0]
    for r in rcpts:
        assert 250 == (await w.cmd(r))[0]
    assert 354 == (await w.cmd("DATA"))[0]
    await w.send_raw(data)
    return await w.reply()


async def test_ehlo_advertises_extensions(wire: Wire) -> None:
    """EHLO lists PIPELINING, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES and SIZE with our maximum."""
    code, lines = await wire.cmd("EHLO client.example.com")

    assert 250 == code
    assert {"PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "SIZE 4096"} <= set(lines)


async def test_reply_to_data_is_250_with_queue_id_and_message_is_stored(
    bridge: Bridge, wire: Wire
) -> None:
    """A plain message gets 250 naming its spool id, and the exact bytes are on disk."""
    await wire.cmd("EHLO c")
    msg = b"Subject: hi\r\n\r\nhello\r\n"

    code, lines = await transaction(wire, stuff(msg))

    assert 250 == code
    assert lines[0].startswith("2.0.0 Queued as ")
    assert [("a@example.com", '["b@example.org"]', msg)] == stored(bridge)


async def test_helo_without_ehlo_is_accepted(bridge: Bridge, wire: Wire) -> None:
    """Old devices that only say HELO can send mail."""
    assert 250 == (await wire.cmd("HELO MFP-3F-EAST"))[0]

    code, _ = await transaction(wire, stuff(b"Subject: scan\r\n\r\nx\r\n"))

    assert 250 == code
    assert 1 == len(stored(bridge))


async def test_null_reverse_path_is_accepted_and_stored_empty(bridge: Bridge, wire: Wire) -> None:
    """MAIL FROM:<> (a bounce) is valid; the envelope sender is stored as the empty string."""
    await wire.cmd("EHLO c")

    code, _ = await transaction(wire, stuff(b"Subject: bounce\r\n\r\nx\r\n"), mail="MAIL FROM:<>")

    assert 250 == code
    assert "" == stored(bridge)[0][0]


async def test_mail_and_rcpt_parameters_real_clients_send(bridge: Bridge, wire: Wire) -> None:
    """AUTH=<>, SIZE, BODY, RET, ENVID on MAIL and NOTIFY, ORCPT on RCPT are accepted."""
    await wire.cmd("EHLO c")
    mail = "MAIL FROM:<v@example.com> SIZE=412 AUTH=<> BODY=8BITMIME RET=HDRS ENVID=QQ314159"
    rcpt = "RCPT TO: <b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.org"

    code, _ = await transaction(wire, stuff(b"Subject: p\r\n\r\nx\r\n"), mail=mail, rcpts=(rcpt,))

    assert 250 == code
    assert [("v@example.com", '["b@example.org"]')] == [r[:2] for r in stored(bridge)]


async def test_unknown_parameter_is_555(wire: Wire) -> None:
    """A parameter we do not know gets 555, not a crash."""
    await wire.cmd("EHLO c")

    assert 555 == (await wire.cmd("MAIL FROM:<a@example.com> FROBNICATE=1"))[0]
    assert 250 == (await wire.cmd("MAIL FROM:<a@example.com>"))[0]
    assert 555 == (await wire.cmd("RCPT TO:<b@example.org> XYZ"))[0]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("MAIL FROM:<not an address", 553),
        ("MAIL TO:<a@example.com>", 501),
        ("MAIL FROM:<a@example.com> BODY=BINARYMIME", 501),
        ("MAIL FROM:<a@example.com> SIZE=abc", 501),
        ("MAIL FROM:<a@example.com> SIZE=\u0663", 501),
        ("MAIL FROM:a@", 553),
        ('MAIL FROM:"', 553),
        ("MAIL FROM:a@[", 553),
        ("MAIL FROM:a@[ ", 553),
        ("MAIL FROM:<a\x00b@example.com>", 553),
        ("MAIL FROM:<a\x1bb@example.com>", 553),
    ],
    ids=[
        "unclosed",
        "keyword",
        "body",
        "size-letters",
        "size-arabic-digit",
        "parser-indexerror",
        "parser-quote",
        "parser-attributeerror",
        "parser-unbound",
        "nul",
        "esc",
    ],
)
async def test_bad_mail_commands_get_precise_replies(wire: Wire, line: str, code: int) -> None:
    """Malformed MAIL commands get the specific 5xx, and the session continues."""
    await wire.cmd("EHLO c")

    assert code == (await wire.cmd(line))[0]
    assert 250 == (await wire.cmd("NOOP"))[0]


async def test_recipient_the_address_parser_chokes_on_is_553(wire: Wire) -> None:
    """RCPT TO:a@ makes the stdlib parser raise; the client gets 553, not a 451."""
    await wire.cmd("EHLO c")
    await wire.cmd("MAIL FROM:<a@example.com>")

    assert 553 == (await wire.cmd("RCPT TO:a@"))[0]
    assert 553 == (await wire.cmd("RCPT TO:<b\x00@example.org>"))[0]


async def test_unknown_command_is_not_echoed(wire: Wire) -> None:
    """An unknown command gets a fixed 500 that repeats none of the client's bytes."""
    await wire.send_raw(b"X\rINJECTED\x1b[31m\r\n")
    raw = await wire.reader.readline()
    noop = await wire.cmd("NOOP")

    assert b"500 5.5.2 Command not recognized\r\n" == raw
    assert 250 == noop[0]


async def test_8bit_helo_name_is_stored_with_replacement_characters(bridge: Bridge) -> None:
    """A HELO name with a stray 8-bit byte or a CR does not stop the mail (U+FFFD instead)."""
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    assert 250 == (await wire.cmd(b"HELO printer\x80\rX"))[0]

    code, _ = await transaction(wire, b"Subject: x\r\n\r\nhi\r\n.\r\n")
    await wire.close()
    entry = (await bridge.spool.list())[0]

    assert 250 == code
    assert "printer\ufffd\ufffdX" == entry.envelope.helo


@pytest.mark.parametrize("arg", ["<", "<b@example.org>", "postmaster", "\x1b[31m<x"])
async def test_vrfy_verifies_nothing_and_echoes_nothing(wire: Wire, arg: str) -> None:
    """VRFY gets 252 whatever the argument (RFC 5321 §3.5.3), and 501 without one."""
    reply = await wire.cmd("VRFY " + arg)
    bare = await wire.cmd("VRFY")

    assert (252, ["2.5.0 Cannot VRFY user, but will accept message and attempt delivery"]) == reply
    assert (501, ["5.5.4 Syntax: VRFY <address>"]) == bare


async def test_sequence_errors(wire: Wire) -> None:
    """RCPT before MAIL, DATA before RCPT and a nested MAIL are 503."""
    await wire.cmd("EHLO c")

    assert 503 == (await wire.cmd("RCPT TO:<b@example.org>"))[0]
    assert 250 == (await wire.cmd("MAIL FROM:<>"))[0]
    assert 503 == (await wire.cmd("MAIL FROM:<a@example.com>"))[0]
    assert 503 == (await wire.cmd("DATA"))[0]


async def test_line_longer_than_998_is_kept_exactly(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """A 5000-octet body line is accepted and stored with no inserted line break."""
    bridge = await start_bridge(make_config())
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    await wire.cmd("EHLO c")
    msg = b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n"

    code, _ = await transaction(wire, stuff(msg))
    await wire.close()

    assert 250 == code
    assert msg == stored(bridge)[0][2]


async def test_bare_lf_message_is_accepted_and_lf_dot_lf_does_not_end_data(
    bridge: Bridge, wire: Wire
) -> None:
    """Bare-LF content is data; only CRLF.CRLF ends DATA."""
    await wire.cmd("EHLO c")
    msg = b"Subject: lf\nFrom: a@example.com\n\nline1\n.\nline2\n"

    code, _ = await transaction(wire, msg + b"\r\n.\r\n")

    assert 250 == code
    assert msg + b"\r\n" == stored(bridge)[0][2]


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"])
async def test_no_smuggling_with_non_crlf_dot_sequences(
    bridge: Bridge, wire: Wire, fake_end: bytes
) -> None:
    """A smuggled second message after a fake end-of-data stays inside the first message.

    Only the transparency rule applies to it: a dot that starts a CRLF line is removed.
    """
    await wire.cmd("EHLO c")
    smuggled = (
        b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: evil\r\n"
    )
    msg = b"Subject: one\r\n\r\nbody" + fake_end + smuggled

    code, _ = await transaction(wire, msg + b"\r\n.\r\n")
    await wire.cmd("NOOP")

    rows = stored(bridge)
    assert 250 == code
    assert 1 == len(rows)
    assert (msg + b"\r\n").replace(b"\r\n.", b"\r\n") == rows[0][2]


@pytest.mark.parametrize(
    ("stream", "content"),
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"a\n.\r\n.\r\n", b"a\n.\r\n"),
        (b"\n.\r\n.\r\n", b"\n.\r\n"),
        (b"a\r\r\n.\r\n", b"a\r\r\n"),
        (b".\r.\r\n.\r\n", b"\r.\r\n"),
        (b"x\r\n..\r\n...\r\n.\r\n", b"x\r\n.\r\n..\r\n"),
        (b"a\n.\r\n..\r\n.\r\n", b"a\n.\r\n.\r\n"),
        (b"y" * 2000 + b"\n.\r\n" + b"z" * 1500 + b"\r\n.\r\n", None),
    ],
    ids=[
        "empty", "one-empty-line", "stuffed-only", "bare-lf-dot-line-then-end", "leading-lf",
        "cr-cr-lf", "stuffed-with-bare-cr", "stuffing-runs", "bare-lf-then-stuffed",
        "long-lines-around-a-bare-lf-dot",
    ],
)  # fmt: skip
async def test_end_of_data_and_unstuffing_edge_cases(
    bridge: Bridge, wire: Wire, stream: bytes, content: bytes | None
) -> None:
    """Only CRLF.CRLF ends DATA (even right after LF.CRLF), and one dot is unstuffed per line."""
    await wire.cmd("EHLO c")
    code, _ = await transaction(wire, stream)
    noop = await wire.cmd("NOOP")

    assert (250, 250) == (code, noop[0])
    expected = stream[:-3] if content is None else content
    assert [expected] == [row[2] for row in stored(bridge)]


async def test_dot_stuffing_is_removed_once(bridge: Bridge, wire: Wire) -> None:
    """Leading dots lose exactly one dot; '..' becomes '.', which does not end DATA."""
    await wire.cmd("EHLO c")
    msg = b"Subject: dots\r\n\r\n.htaccess\r\n.\r\n..\r\n end\r\n"

    code, _ = await transaction(wire, stuff(msg))

    assert 250 == code
    assert msg == stored(bridge)[0][2]


async def test_size_parameter_over_limit_is_552(bridge: Bridge, wire: Wire) -> None:
    """MAIL with SIZE over the maximum gets 552 and RSET recovers."""
    await wire.cmd("EHLO c")

    assert 552 == (await wire.cmd("MAIL FROM:<a@example.com> SIZE=209715200"))[0]
    assert 250 == (await wire.cmd("RSET"))[0]


async def test_oversize_data_gets_exactly_one_552_and_nothing_is_stored(
    bridge: Bridge, wire: Wire
) -> None:
    """Over-size DATA is read to its end, answered once with 552; the session goes on."""
    await wire.cmd("EHLO c")
    body = b"".join(b"MAIL FROM:<x@example.com> line %d\r\n" % i for i in range(400))

    with capture_logs() as logs:
        code, lines = await transaction(wire, stuff(b"Subject: big\r\n\r\n" + body))
    after = await wire.cmd("NOOP")
    (logged,) = [e for e in logs if e["event"] == "smtp_transaction"]

    assert (552, "5.3.4") == (code, lines[0][:5])
    assert 250 == after[0]
    assert [] == stored(bridge)
    assert ("rejected", 16 + len(body)) == (logged["result"], logged["size"])


async def test_unroutable_recipient_is_550(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """A recipient no route matches is refused at RCPT; others are still accepted."""
    bridge = await start_bridge(
        make_config(routes=[{"match": {"recipients": ["example.org"]}, "provider": "hook"}])
    )
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    await wire.cmd("EHLO c")
    await wire.cmd("MAIL FROM:<a@example.com>")

    refused = await wire.cmd("RCPT TO:<x@elsewhere.net>")
    accepted = await wire.cmd("RCPT TO:<y@example.org>")
    await wire.close()

    assert (550, "5.1.1") == (refused[0], refused[1][0][:5])
    assert 250 == accepted[0]


async def test_recipients_beyond_the_limit_get_452(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """Beyond max_recipients, RCPT answers 452 4.5.3 so the client sends the rest later."""
    bridge = await start_bridge(make_config(listen={"max_recipients": 2}))
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    await wire.cmd("EHLO c")
    await wire.cmd("MAIL FROM:<a@example.com>")

    codes = [(await wire.cmd(f"RCPT TO:<r{i}@example.org>"))[0] for i in range(3)]
    reply = await wire.cmd("RCPT TO:<r9@example.org>")
    await wire.close()

    assert [250, 250, 452] == codes
    assert "4.5.3 Too many recipients" == reply[1][0]


async def test_spool_out_of_space_is_452_and_nothing_is_stored(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """No room in the spool: 452 4.3.1, so the client keeps the mail."""
    bridge = await start_bridge(make_config(spool={"min_free_space": "1000000GiB"}))
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    await wire.cmd("EHLO c")

    code, lines = await transaction(wire, stuff(b"Subject: x\r\n\r\ny\r\n"))
    await wire.close()

    assert (452, "4.3.1") == (code, lines[0][:5])
    assert [] == stored(bridge)


async def test_internal_error_is_451_without_exception_text(
    bridge: Bridge, wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while spooling answers 451 4.3.0 and never echoes the exception."""

    async def broken(*args: object, **kw: object) -> list[str]:
        raise RuntimeError("internal detail /etc/secret")

    monkeypatch.setattr(bridge.spool, "put", broken)
    await wire.cmd("EHLO c")

    code, lines = await transaction(wire, stuff(b"Subject: x\r\n\r\ny\r\n"))

    assert 451 == code
    assert "4.3.0 Temporary failure, please try again later" == lines[0]
    assert 250 == (await wire.cmd("NOOP"))[0]


async def test_pipelined_commands_are_answered_in_order(bridge: Bridge, wire: Wire) -> None:
    """MAIL, RCPT, RCPT and DATA sent in one write get four replies in order."""
    await wire.cmd("EHLO c")
    await wire.send_raw(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
        b"RCPT TO:<c@example.org>\r\nDATA\r\n"
    )

    codes = [(await wire.reply())[0] for _ in range(4)]
    await wire.send_raw(stuff(b"Subject: p\r\n\r\nx\r\n") + b"QUIT\r\n")
    final = [(await wire.reply())[0] for _ in range(2)]

    assert [250, 250, 250, 354] == codes
    assert [250, 221] == final
    assert '["b@example.org", "c@example.org"]' == stored(bridge)[0][1]


async def test_shutdown_tells_open_sessions_421_even_mid_data(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """SIGTERM's stop() answers a session inside DATA with 421, and stores nothing."""
    bridge = await start_bridge(make_config())
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    await wire.cmd("EHLO c")
    await wire.cmd("MAIL FROM:<a@example.com>")
    await wire.cmd("RCPT TO:<b@example.org>")
    assert 354 == (await wire.cmd("DATA"))[0]
    await wire.send_raw(b"Subject: half\r\n\r\nhalf a body")

    await bridge.stop()
    reply = await wire.reply()
    await wire.close()

    assert (421, ["4.3.2 Service shutting down, try again later"]) == reply
    assert [] == stored(bridge)


@pytest.mark.parametrize(
    "error",
    [ssl.SSLError(1, "WRONG_VERSION_NUMBER"), ConnectionResetError(), TLSSetupException()],
    ids=["ssl", "reset", "tls-setup"],
)
async def test_a_clients_broken_connection_is_no_internal_error(
    bridge: Bridge, error: Exception
) -> None:
    """Garbage after STARTTLS or a reset is logged as info without a traceback."""
    with capture_logs() as logs:
        reply = await bridge.handler.handle_exception(error)

    assert Reply.TEMPFAIL == reply
    assert [("smtp_connection_failed", "info")] == [(e["event"], e["log_level"]) for e in logs]


async def test_an_internal_error_is_logged_as_one(bridge: Bridge) -> None:
    """A fault of ours keeps its error line with the exception."""
    with capture_logs() as logs:
        await bridge.handler.handle_exception(KeyError("x"))

    assert [("smtp_internal_error", "error")] == [(e["event"], e["log_level"]) for e in logs]


async def test_smtplib_client(bridge: Bridge) -> None:
    """The stdlib client delivers a UTF-8 message with SMTPUTF8."""
    port = bridge.smtp_port

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail(
                "jörg@example.org", ["jürgen@example.org"],
                "Subject: Grüße\r\n\r\nHallo\r\n".encode(), mail_options=["SMTPUTF8"],
            )  # fmt: skip

    await asyncio.to_thread(send)

    ((mail_from, rcpts, raw),) = stored(bridge)
    assert "jörg@example.org" == mail_from
    assert '["jürgen@example.org"]' == rcpts
    assert "Subject: Grüße\r\n\r\nHallo\r\n".encode() == raw


async def test_aiosmtplib_client(bridge: Bridge) -> None:
    """aiosmtplib delivers to several recipients in one transaction."""
    msg = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: a\r\n\r\nbody\r\n"

    errors, _ = await aiosmtplib.send(
        msg, sender="a@example.com", recipients=["b@example.org", "c@example.org"],
        hostname="127.0.0.1", port=bridge.smtp_port, start_tls=False,
    )  # fmt: skip

    assert {} == errors
    assert [("a@example.com", '["b@example.org", "c@example.org"]', msg)] == stored(bridge)


@pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks not installed (.ci/run installs it)"
)
async def test_swaks_client(bridge: Bridge) -> None:
    """swaks, the operator's SMTP test tool, gets 250 and its message is stored."""
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"127.0.0.1:{bridge.smtp_port}", "--from", "ops@example.com",
        "--to", "b@example.org", "--header", "Subject: swaks test", "--body", "from swaks",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()

    assert 0 == proc.returncode, out.decode()
    ((mail_from, _, raw),) = stored(bridge)
    assert "ops@example.com" == mail_from
    assert b"Subject: swaks test" in raw


async def test_route_provider_size_limit_is_552_at_end_of_data(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """A message over the route's provider limit gets 552 5.3.4 instead of 250-then-bounce."""
    config = make_config(
        providers={
            "small": {"type": "webhook", "url": "https://s.example.net/", "max_message_size": 100},
            "big": {"type": "webhook", "url": "https://b.example.net/"},
        },
        routes=[
            {"match": {"recipients": ["small.example"]}, "provider": "small"},
            {"provider": "big"},
        ],
    )
    bridge = await start_bridge(config)
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    await wire.cmd("EHLO c")
    big = stuff(b"Subject: x\r\n\r\n" + b"y" * 200 + b"\r\n")

    to_big = await transaction(wire, big)
    to_small = await transaction(wire, big, rcpts=("RCPT TO:<a@small.example>",))
    await wire.close()

    assert 250 == to_big[0]
    assert (552, "5.3.4") == (to_small[0], to_small[1][0][:5])
    assert 1 == len(stored(bridge))


async def test_failover_chain_limit_is_the_smallest_in_the_chain(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """A route that may fail over promises only what every account in its chain takes."""
    config = make_config(
        providers={
            "a": {"type": "webhook", "url": "https://a.example.net/", "max_recipients": 5},
            "b": {"type": "webhook", "url": "https://b.example.net/", "max_recipients": 2},
        },
        routes=[{"provider": "a", "failover": ["b"]}],
    )
    bridge = await start_bridge(config)
    wire = await Wire.open(bridge.smtp_port)
    await wire.reply()
    await wire.cmd("EHLO c")
    await wire.cmd("MAIL FROM:<a@example.com>")

    codes = [(await wire.cmd(f"RCPT TO:<r{i}@example.org>"))[0] for i in range(3)]
    await wire.close()

    assert [250, 250, 452] == codes
