"""SMTP AUTH, TLS, client allowlist and session limits, over real loopback sockets."""

from __future__ import annotations

import asyncio
import base64
import ssl
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from bridge.app import Bridge
from bridge.config import Config
from bridge.errors import ConfigError
from bridge.passwords import hash_password, verify_password
from tests.casefiles import load_smtp_case
from tests.smtpwire import Wire

PASSWORD = "Scan-2-Mail!"
HASH = hash_password(PASSWORD, ln=4)  # cheap parameters keep the tests fast


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
async def start_bridge() -> AsyncIterator[Callable[..., Any]]:
    started: list[Bridge] = []

    async def start(config: Config) -> Bridge:
        bridge = await Bridge.start(config, smtp_port=0, run_worker=False)
        started.append(bridge)
        return bridge

    yield start
    for b in started:
        await b.stop()


def users(**extra: Any) -> dict[str, Any]:
    return {
        "users": [
            {"username": "scanner@example.com", "password_hash": HASH, **extra},
        ]
    }


async def opened(bridge: Bridge) -> Wire:
    wire = await Wire.open(bridge.smtp_port)
    assert 220 == (await wire.reply())[0]
    return wire


async def greeted(bridge: Bridge) -> Wire:
    """A connection that has had its 220 and said EHLO."""
    wire = await opened(bridge)
    await wire.cmd("EHLO c")
    return wire


def test_password_hash_round_trip() -> None:
    """A hash verifies its password and nothing else."""
    assert verify_password(PASSWORD.encode(), HASH)
    assert not verify_password(b"wrong", HASH)
    assert not verify_password(PASSWORD.encode(), "$scrypt$broken")


async def test_01_auth_login_username_challenge(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """Case 01-auth-login-username-challenge.smtp: challenges are exactly Username:/Password:."""
    bridge = await start_bridge(make_config(auth=users()))
    case = load_smtp_case("01-auth-login-username-challenge.smtp")
    wire = await opened(bridge)
    replies: list[tuple[int, list[str]]] = []
    lines = list(case.lines)
    while lines:
        line = lines.pop(0)
        if line == b"DATA":
            replies.append(await wire.cmd(line))
            body = []
            while lines[0] != b".":
                body.append(lines.pop(0))
            lines.pop(0)
            await wire.send_raw(b"\r\n".join(body) + b"\r\n.\r\n")
            replies.append(await wire.reply())
            continue
        replies.append(await wire.cmd(line))
    await wire.close()

    assert (334, ["VXNlcm5hbWU6"]) == replies[1]
    assert (334, ["UGFzc3dvcmQ6"]) == replies[2]
    assert 235 == replies[3][0]
    assert [250, 250, 354, 250, 221] == [code for code, _ in replies[4:]]
    (entry,) = await bridge.spool.list()
    assert ("scanner@example.com", ("accounts@example.org",)) == (
        entry.envelope.mail_from,
        entry.envelope.rcpt_to,
    )
    assert "scanner@example.com" == entry.envelope.auth_user


async def test_auth_plain_initial_response_and_unpadded_base64(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """AUTH PLAIN with the credentials inline works, also without base64 padding."""
    bridge = await start_bridge(make_config(auth=users()))
    wire = await greeted(bridge)
    blob = b64(f"\0scanner@example.com\0{PASSWORD}").rstrip("=")

    reply = await wire.cmd(f"AUTH PLAIN {blob}")
    await wire.close()

    assert (235, ["2.7.0 Authentication successful"]) == reply


async def test_auth_plain_with_challenge(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """AUTH PLAIN without an initial response gets an empty 334 challenge."""
    bridge = await start_bridge(make_config(auth=users()))
    wire = await greeted(bridge)

    challenge = await wire.cmd("AUTH PLAIN")
    reply = await wire.cmd(b64(f"\0scanner@example.com\0{PASSWORD}"))
    await wire.close()

    assert (334, [""]) == challenge
    assert 235 == reply[0]


async def test_wrong_password_is_535_and_mail_needs_auth(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """Bad credentials get 535; MAIL without AUTH gets 530 5.7.0."""
    bridge = await start_bridge(make_config(auth=users()))
    wire = await greeted(bridge)

    bad = await wire.cmd(f"AUTH PLAIN {b64(chr(0) + 'scanner@example.com' + chr(0) + 'nope')}")
    unknown = await wire.cmd(f"AUTH PLAIN {b64(chr(0) + 'who@example.com' + chr(0) + 'x')}")
    mail = await wire.cmd("MAIL FROM:<scanner@example.com>")
    await wire.close()

    assert (535, ["5.7.8 Authentication credentials invalid"]) == bad
    assert 535 == unknown[0]
    assert (530, "5.7.0") == (mail[0], mail[1][0][:5])


async def test_login_abort_with_star(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """A client may abort AUTH LOGIN with '*' (RFC 4954)."""
    bridge = await start_bridge(make_config(auth=users()))
    wire = await greeted(bridge)

    await wire.cmd("AUTH LOGIN")
    aborted = await wire.cmd("*")
    await wire.close()

    assert 501 == aborted[0]


@pytest.mark.parametrize("pieces", [1, 3], ids=["one-write", "three-writes"])
async def test_over_long_auth_response_gets_one_500_and_nothing_is_read_as_a_command(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config], pieces: int
) -> None:
    """An AUTH response longer than the line limit is answered once with 500 5.5.6."""
    bridge = await start_bridge(make_config(auth=users()))
    wire = await greeted(bridge)
    assert 334 == (await wire.cmd("AUTH LOGIN"))[0]
    # The tail would be a command of its own if the line were cut at the stream limit.
    line = b"A" * 1100 + b" NOOP" + b"B" * 900 + b"\r\n"
    step = -(-len(line) // pieces)
    for start in range(0, len(line), step):
        await wire.send_raw(line[start : start + step])
        await asyncio.sleep(0.01)

    too_long = await wire.reply()
    after = await wire.cmd("NOOP")
    await wire.close()

    assert (500, ["5.5.6 Authentication exchange line is too long"]) == too_long
    assert (250, ["OK"]) == after


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_non_utf8_initial_response_is_501_not_an_internal_error(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config], mechanism: str
) -> None:
    """An initial response with 8-bit bytes is bad base64 (501), not a 451 internal error."""
    bridge = await start_bridge(make_config(auth=users()))
    wire = await greeted(bridge)

    reply = await wire.cmd(b"AUTH " + mechanism.encode() + b" \x80\xff")
    await wire.close()

    assert (501, ["5.5.2 Cannot decode base64"]) == reply


async def test_plain_with_another_authorization_identity_is_refused(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """AUTH PLAIN acting as someone else (authzid differs) fails even with the right password."""
    bridge = await start_bridge(make_config(auth=users()))
    wire = await greeted(bridge)

    other = await wire.cmd("AUTH PLAIN " + b64(f"admin\0scanner@example.com\0{PASSWORD}"))
    same = await wire.cmd(
        "AUTH PLAIN " + b64(f"scanner@example.com\0scanner@example.com\0{PASSWORD}")
    )
    await wire.close()

    assert 535 == other[0]
    assert 235 == same[0]


async def test_auth_without_configured_users_is_502(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """With no users, AUTH is neither advertised nor run."""
    bridge = await start_bridge(make_config())
    wire = await greeted(bridge)

    plain = await wire.cmd("AUTH PLAIN " + b64("\0scanner@example.com\0x"))
    login = await wire.cmd("AUTH LOGIN")
    await wire.close()

    assert (502, ["5.5.1 AUTH not available"]) == plain
    assert (502, ["5.5.1 AUTH not available"]) == login


async def test_user_may_not_send_as_others(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """With allowed_senders, other envelope senders get 550 5.7.1."""
    bridge = await start_bridge(make_config(auth=users(allowed_senders=["@example.com"])))
    wire = await greeted(bridge)
    await wire.cmd(f"AUTH PLAIN {b64(chr(0) + 'scanner@example.com' + chr(0) + PASSWORD)}")

    other = await wire.cmd("MAIL FROM:<ceo@example.net>")
    null = await wire.cmd("MAIL FROM:<>")
    own = await wire.cmd("MAIL FROM:<copier@example.com>")
    await wire.close()

    assert (550, ["5.7.1 Sender address not allowed for this user"]) == other
    assert 550 == null[0]
    assert 250 == own[0]


async def test_user_may_not_put_another_address_in_the_from_header(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """The APIs send as the From header, so allowed_senders applies to From and Sender too."""
    bridge = await start_bridge(make_config(auth=users(allowed_senders=["@example.com"])))
    wire = await greeted(bridge)
    await wire.cmd(f"AUTH PLAIN {b64(chr(0) + 'scanner@example.com' + chr(0) + PASSWORD)}")

    async def send(head: str) -> tuple[int, list[str]]:
        await wire.cmd("MAIL FROM:<copier@example.com>")
        await wire.cmd("RCPT TO:<b@example.org>")
        await wire.cmd("DATA")
        return await wire.cmd(f"{head}\r\nSubject: x\r\n\r\nhi\r\n.")

    spoofed = await send("From: CEO <ceo@example.net>")
    padded = await send("X-Pad: " + "a" * 70000 + "\r\nFrom: ceo@example.net")
    sender = await send("From: copier@example.com\r\nSender: ceo@example.net")
    own = await send("From: Copier <copier@example.com>")
    await wire.close()

    assert (550, ["5.7.1 From header address not allowed for this user"]) == spoofed
    assert 550 == padded[0]
    assert 550 == sender[0]
    assert 250 == own[0]


async def test_auth_without_tls_on_loopback_logs_no_python_warning(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """Plain AUTH on loopback is our decision; aiosmtpd's per-connection warning is muted."""
    bridge = await start_bridge(make_config(auth={**users(), "required": True}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wire = await greeted(bridge)
        await wire.close()

    assert [] == [str(w.message) for w in caught if "AUTH" in str(w.message)]


async def test_no_auth_line_without_users(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """Without configured users, EHLO offers no AUTH mechanisms."""
    bridge = await start_bridge(make_config())
    wire = await opened(bridge)

    _, lines = await wire.cmd("EHLO c")
    await wire.close()

    assert [] == [line for line in lines if line.startswith("AUTH")]


def test_non_loopback_without_auth_or_allowlist_is_refused() -> None:
    """Binding 0.0.0.0 with neither users nor an allowlist is a config error (no open relay)."""
    from bridge.config import load_config
    from tests.conftest import config_text

    text = config_text(Path("spool-dir"), listen={"host": "0.0.0.0"})

    with pytest.raises(ConfigError) as info:
        load_config(text, {})

    assert [("listen", "host")] == [p for p, _ in info.value.problems]


async def test_client_outside_allowlist_is_refused(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """A client outside listen.allow_networks gets 554 5.7.1 and nothing else."""
    bridge = await start_bridge(make_config(listen={"allow_networks": ["10.0.0.0/8"]}))
    wire = await Wire.open(bridge.smtp_port)

    greeting = await wire.reply()
    await wire.close()

    assert (554, ["5.7.1 Access denied"]) == greeting


async def test_per_ip_connection_limit(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """Beyond max_connections_per_ip a new session gets 421; a slot frees on close."""
    bridge = await start_bridge(make_config(listen={"max_connections_per_ip": 2}))
    first, second = await opened(bridge), await opened(bridge)
    third = await Wire.open(bridge.smtp_port)

    refused = await third.reply()
    await first.close()
    await asyncio.sleep(0.05)
    fourth = await opened(bridge)
    for w in (second, third, fourth):
        await w.close()

    assert (421, "4.7.0") == (refused[0], refused[1][0][:5])


async def test_too_many_errors_closes_the_session(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """After max_errors 5xx replies the session is closed with 421."""
    bridge = await start_bridge(make_config(listen={"max_errors": 3}))
    wire = await opened(bridge)

    codes = [(await wire.cmd("RCPT TO:<x@example.org>"))[0] for _ in range(2)]
    await wire.send_raw(b"BOGUS\r\n")
    last = [await wire.reply(), await wire.reply()]
    closed = await wire.reader.read()
    await wire.close()

    assert [503, 503] == codes
    assert [500, 421] == [code for code, _ in last]
    assert b"" == closed


async def test_idle_client_is_cut_without_stalling_others(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """A silent client is disconnected after listen.timeout; another keeps being served."""
    bridge = await start_bridge(make_config(listen={"timeout": "300ms"}))
    idle = await opened(bridge)
    busy = await opened(bridge)

    for _ in range(3):
        assert 250 == (await busy.cmd("NOOP"))[0]
        await asyncio.sleep(0.15)
    closed = await asyncio.wait_for(idle.reader.read(), 5)
    await idle.close()
    await busy.close()

    assert b"" == closed


async def test_trickling_data_is_cut_at_the_data_deadline(
    start_bridge: Callable[..., Any], make_config: Callable[..., Config]
) -> None:
    """A client sending DATA a line at a time past data_timeout is cut with 421, nothing stored."""
    bridge = await start_bridge(make_config(listen={"data_timeout": "300ms"}))
    wire = await greeted(bridge)
    await wire.cmd("MAIL FROM:<a@example.com>")
    await wire.cmd("RCPT TO:<b@example.org>")
    await wire.cmd("DATA")

    reply = None
    for i in range(20):
        try:
            await wire.send_raw(b"line %d\r\n" % i)
        except ConnectionError:
            break
        await asyncio.sleep(0.05)
        if wire.reader.at_eof() or len(wire.reader._buffer):  # type: ignore[attr-defined]
            reply = await wire.reply()
            break
    await wire.close()

    assert reply is not None
    assert (421, "4.4.2") == (reply[0], reply[1][0][:5])
    assert [] == await bridge.spool.list()


@pytest.fixture
def certs(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return ca, cert_file, key_file


async def test_starttls_then_auth(
    start_bridge: Callable[..., Any],
    make_config: Callable[..., Config],
    certs: tuple[trustme.CA, Path, Path],
) -> None:
    """STARTTLS upgrades the session (verified against our CA) and AUTH works over it."""
    ca, cert_file, key_file = certs
    config = make_config(
        listen={"tls": {"cert_file": str(cert_file), "key_file": str(key_file)}},
        auth=users(),
    )
    bridge = await start_bridge(config)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=bridge.smtp_port, tls_context=client_ctx, start_tls=True
    )
    await client.connect()
    await client.login("scanner@example.com", PASSWORD)
    await client.sendmail("scanner@example.com", ["b@example.org"], b"Subject: tls\r\n\r\nx\r\n")
    await client.quit()

    (entry,) = await bridge.spool.list()
    assert "scanner@example.com" == entry.envelope.auth_user


async def test_implicit_tls(
    start_bridge: Callable[..., Any],
    make_config: Callable[..., Config],
    certs: tuple[trustme.CA, Path, Path],
) -> None:
    """With tls.implicit the session is TLS from the first byte (port 465 style)."""
    ca, cert_file, key_file = certs
    config = make_config(
        listen={"tls": {"cert_file": str(cert_file), "key_file": str(key_file), "implicit": True}}
    )
    bridge = await start_bridge(config)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    errors, _ = await aiosmtplib.send(
        b"Subject: implicit\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@example.org"],
        hostname="127.0.0.1", port=bridge.smtp_port, use_tls=True, tls_context=client_ctx,
    )  # fmt: skip

    assert {} == errors
    assert 1 == len(await bridge.spool.list())


async def test_auth_requires_tls_when_plaintext_is_not_allowed(
    start_bridge: Callable[..., Any],
    make_config: Callable[..., Config],
    certs: tuple[trustme.CA, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a non-loopback listener AUTH is refused before STARTTLS (538 5.7.11)."""
    _, cert_file, key_file = certs
    config = make_config(
        listen={"tls": {"cert_file": str(cert_file), "key_file": str(key_file)}}, auth=users()
    )
    # Pretend the listener binds a public address; the socket itself stays on loopback.
    monkeypatch.setattr(type(config.listen), "is_loopback", lambda self: False)
    bridge = await start_bridge(config)
    wire = await opened(bridge)

    _, lines = await wire.cmd("EHLO c")
    reply = await wire.cmd(f"AUTH PLAIN {b64(chr(0) + 'scanner@example.com' + chr(0) + PASSWORD)}")
    await wire.close()

    assert "STARTTLS" in lines
    assert not any(line.startswith("AUTH") for line in lines)
    assert 538 == reply[0]


async def test_sighup_reload_picks_up_a_new_certificate(
    start_bridge: Callable[..., Any],
    make_config: Callable[..., Config],
    certs: tuple[trustme.CA, Path, Path],
) -> None:
    """reload() re-reads cert files: sessions after it are served with the new certificate."""
    _, cert_file, key_file = certs
    config = make_config(
        listen={"tls": {"cert_file": str(cert_file), "key_file": str(key_file), "implicit": True}}
    )
    bridge = await start_bridge(config)
    new_ca = trustme.CA()
    new = new_ca.issue_cert("127.0.0.1")
    new.cert_chain_pems[0].write_to_path(str(cert_file))
    new.private_key_pem.write_to_path(str(key_file))

    bridge.reload()
    ctx = ssl.create_default_context()
    new_ca.configure_trust(ctx)
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.smtp_port, ssl=ctx)
    greeting = await reader.readline()
    writer.close()

    assert greeting.startswith(b"220 ")
