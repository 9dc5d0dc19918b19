"""The SMTP edge: aiosmtpd, adjusted for real clients, and the handler that spools.

The handler turns the SMTP dialogue into calls and reply lines, nothing more: RCPT asks
`routing` where a recipient goes, DATA hands the bytes to the spool and answers 250 only
after the spool's commit has returned. Delivery happens later, in `delivery.py`.

Every aiosmtpd override lives in `BridgeSMTP`, each with the client behaviour it serves.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import itertools
import re
import ssl
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, AnyStr

import structlog
from aiosmtpd.smtp import MISSING as _MISSING  # the "no hook answered" sentinel
from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    Session,
    TLSSetupException,
    _Missing,
    syntax,
)

from bridge import health
from bridge.config import AuthUser, Config, Route
from bridge.errors import SpoolError
from bridge.model import Envelope as BridgeEnvelope
from bridge.passwords import verify_password
from bridge.providers.base import Provider, ProviderSettings
from bridge.routing import matches, resolve, split_by_route
from bridge.spool import NewEntry, Spool

__all__ = ["BridgeHandler", "BridgeSMTP", "Reply", "create_smtp_server"]

log = structlog.get_logger("bridge.smtp")


class Reply:
    """Every reply line the bridge chooses itself, named (RFC 5321 §4.2, RFC 3463 codes)."""

    OK = "250 2.0.0 OK"
    SENDER_OK = "250 2.1.0 Sender OK"
    RECIPIENT_OK = "250 2.1.5 Recipient OK"
    QUEUED = "250 2.0.0 Queued as {id}"
    SYNTAX_MAIL = "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"
    SYNTAX_RCPT = "501 5.5.4 Syntax: RCPT TO:<address> [parameters]"
    BAD_ADDRESS = "553 5.1.3 Malformed address"
    BAD_PARAM = "555 5.5.4 MAIL/RCPT parameter not recognized"
    BAD_BODY = "501 5.5.4 BODY must be 7BIT or 8BITMIME"
    NESTED_MAIL = "503 5.5.1 Sender already given"
    NEED_MAIL = "503 5.5.1 Need MAIL command first"
    NEED_RCPT = "503 5.5.1 Need RCPT command first"
    SYNTAX_DATA = "501 5.5.4 Syntax: DATA"
    START_DATA = "354 End data with <CR><LF>.<CR><LF>"
    TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
    TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
    NO_ROUTE = "550 5.1.1 Recipient not accepted here"
    TEMPFAIL = "451 4.3.0 Temporary failure, please try again later"
    ACCESS_DENIED = "554 5.7.1 Access denied"
    TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
    TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
    DATA_TIMEOUT = "421 4.4.2 DATA took too long, closing connection"
    SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
    SENDER_NOT_ALLOWED = "550 5.7.1 Sender address not allowed for this user"
    FROM_NOT_ALLOWED = "550 5.7.1 From header address not allowed for this user"
    AUTH_OK = "235 2.7.0 Authentication successful"
    AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
    AUTH_ABORTED = "501 5.7.0 Authentication aborted"
    AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
    AUTH_BAD_PLAIN = "501 5.5.2 Cannot split PLAIN credentials"
    AUTH_UNAVAILABLE = "502 5.5.1 AUTH not available"
    AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
    UNKNOWN_COMMAND = "500 5.5.2 Command not recognized"
    SYNTAX_VRFY = "501 5.5.4 Syntax: VRFY <address>"
    CANNOT_VRFY = "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"


# No mailbox contains a control character (RFC 5321 §4.1.2); NUL or ESC in a path is an
# attack or a broken client, and would travel on into every JSON payload.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Parameters RFC 5321 clients send on MAIL/RCPT that we accept. We advertise SIZE,
# 8BITMIME and SMTPUTF8; AUTH= (RFC 4954 §5, sent as AUTH=<> by Office 365 and vCenter),
# and the DSN parameters (RFC 3461: RET, ENVID, NOTIFY, ORCPT) are accepted and ignored,
# because refusing them (aiosmtpd answers 555) loses the mail of clients that always send
# them, while ignoring them only means no DSN options are honoured.
#: What `_read_data` searches for: the end of data is CRLF "." CRLF, so a match is the
#: end only when a CR comes before it.
_DATA_END = b"\n.\r\n"

_MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "AUTH", "RET", "ENVID"}
_RCPT_PARAMS = {"NOTIFY", "ORCPT"}


class _Envelope(Envelope):
    """aiosmtpd's envelope plus a flag: the null sender ``<>`` is a given MAIL FROM."""

    def __init__(self) -> None:
        super().__init__()
        self.mail_given = False


def _parse_params(words: Sequence[str]) -> dict[str, str | bool] | None:
    out: dict[str, str | bool] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not key.isalnum() or (eq and not value):
            return None
        out[key.upper()] = value if eq else True
    return out


class BridgeSMTP(SMTP):
    """aiosmtpd's protocol with the changes real clients need.

    * MAIL FROM:<> (bounces, DSNs) is a valid reverse-path; aiosmtpd answers 501.
    * MAIL/RCPT parameters AUTH=<>, RET=, ENVID=, NOTIFY=, ORCPT= are accepted, and
      parameters are accepted after HELO too (printers send SIZE= regardless).
    * DATA is read by our own loop: body lines longer than 998 octets (QQ/WeChat,
      Proofpoint) and bare-LF messages (NAS boxes, cron) are accepted; only CRLF.CRLF
      ends DATA, so LF.LF and friends cannot smuggle a second message; an over-size
      message is read to its end and answered with exactly one 552.
    * The AUTH LOGIN challenges are ``Username:`` / ``Password:`` (draft-murchison-sasl-
      login), which Xerox MFPs, Go's net/smtp and curl require.
    * An unknown command gets a fixed reply: aiosmtpd echoes the command word, control
      characters included, which lets a scanner put a bare CR into our reply stream.
    * VRFY always answers 252 (RFC 5321 §3.5.3): aiosmtpd parses the argument as an
      address, raises on some inputs (``VRFY <``) and echoes others in its 502.
    * An AUTH response longer than a line gets one ``500 5.5.6`` (RFC 4954 §4); aiosmtpd's
      ``readline`` raises there (answered as an internal error) and then reads the rest of
      the line as a command.
    """

    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def _create_envelope(self) -> _Envelope:
        return _Envelope()

    # -- admission and session limits -------------------------------------------------

    async def _handle_client(self) -> None:
        handler: BridgeHandler = self.event_handler
        peer = _peer_ip(self.session.peer if self.session else None)
        refusal = handler.admit(peer)
        if refusal is not None:
            log.info("smtp_refused", peer=peer, reply=refusal)
            await self.push(refusal)
            if self.transport is not None:
                self.transport.close()
            return
        self._admitted: str | None = peer
        self._errors = 0
        await super()._handle_client()

    def shut_down(self) -> None:
        """Close the session for a shutdown, saying so with 421 (RFC 5321 §3.8).

        The client keeps its mail, also when it is in the middle of DATA: nothing of
        that transaction was stored.
        """
        transport = self.transport
        if transport is None:
            return
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(Reply.SHUTTING_DOWN.encode() + b"\r\n")
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        peer: str | None = getattr(self, "_admitted", None)
        if peer is not None:
            self._admitted = None
            self.event_handler.release(peer)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and status.startswith('500 Error: command "'):
            # The only reply aiosmtpd builds from client bytes (see the class docstring).
            await super().push(Reply.UNKNOWN_COMMAND)
        else:
            await super().push(status)
        if status[:1] not in ("5", b"5"):
            return
        self._errors = getattr(self, "_errors", 0) + 1
        handler: BridgeHandler = self.event_handler
        if self._errors >= handler.config.listen.max_errors and self.transport is not None:
            # Scanners and brute-force clients get cut off instead of trying forever.
            await super().push(Reply.TOO_MANY_ERRORS)
            self.transport.close()

    # -- AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) -------

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> _Missing | bytes:
        """Like aiosmtpd's, but tolerant of unpadded base64 (some embedded clients), and
        with one 500 for a response longer than a line.
        """
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        line = await self._read_auth_line()
        if line is None:
            await self.push(Reply.AUTH_LINE_TOO_LONG)
            return _MISSING
        if line == b"*":
            await self.push(Reply.AUTH_ABORTED)
            return _MISSING
        decoded = _b64decode(line)
        if decoded is None:
            await self.push(Reply.AUTH_BAD_BASE64)
            return _MISSING
        return decoded

    async def _read_auth_line(self) -> bytes | None:
        """One client line of an AUTH exchange, stripped; None (line consumed) if too long."""
        reader: asyncio.StreamReader = self._reader
        try:
            return (await reader.readuntil(b"\n")).strip()
        except asyncio.IncompleteReadError as exc:
            return exc.partial.strip()  # the client hung up mid-line
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
        # Discard the rest of the over-long line, however it arrives, so that none of it
        # is taken as a command.
        while True:
            try:
                await reader.readuntil(b"\n")
                return None
            except asyncio.IncompleteReadError:
                return None
            except asyncio.LimitOverrunError as exc:
                await reader.readexactly(exc.consumed)

    async def _auth_unavailable(self) -> bool:
        """With no users configured AUTH is not offered, and not run (scrypt costs CPU)."""
        handler: BridgeHandler = self.event_handler
        if handler.config.auth.users:
            return False
        await self.push(Reply.AUTH_UNAVAILABLE)
        return True

    async def auth_PLAIN(self, _: object, args: list[str]) -> AuthResult:
        if await self._auth_unavailable():
            return AuthResult(success=False, handled=True)
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            decoded = _b64decode(args[1].encode("utf-8", "surrogateescape"))
            if decoded is None:
                await self.push(Reply.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
            blob = decoded
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push(Reply.AUTH_BAD_PLAIN)
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # RFC 4616 §2: acting as another identity needs a right we never grant.
            return AuthResult(success=False, handled=False, message=Reply.AUTH_FAILED)
        return await self._check_login(login, password)

    async def auth_LOGIN(self, _: object, args: list[str]) -> AuthResult:
        if await self._auth_unavailable():
            return AuthResult(success=False, handled=True)
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            decoded = _b64decode(args[1].encode("utf-8", "surrogateescape"))
            if decoded is None:
                await self.push(Reply.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
            login = decoded
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check_login(login, password)

    async def _check_login(self, login: bytes, password: bytes) -> AuthResult:
        handler: BridgeHandler = self.event_handler
        user = await handler.authenticate(login, password)
        if user is None:
            log.info("smtp_auth_failed", peer=_peer_ip(self.session.peer if self.session else None))
            return AuthResult(success=False, handled=False, message=Reply.AUTH_FAILED)
        return AuthResult(success=True, auth_data=user, message=Reply.AUTH_OK)

    def _env_(self) -> _Envelope:
        # A method, not a property: aiosmtpd's __init__ runs inspect.getmembers(self),
        # which would evaluate a property before any envelope exists.
        envelope = self.envelope
        assert isinstance(envelope, _Envelope)
        return envelope

    def _reset_envelope(self) -> None:
        self.envelope = self._create_envelope()

    def _address(self, arg: str) -> tuple[str | None, str]:
        """(address, rest); address None when malformed, "" for the null path."""
        stripped = arg.lstrip()
        if stripped.startswith("<>"):
            return "", stripped[2:]
        if stripped.startswith("<") and ">" not in stripped:
            # email's get_angle_addr repairs an unclosed bracket; a mail path must not.
            return None, ""
        try:
            address, rest = self._getaddr(stripped)
        except Exception:
            # email's header parser raises IndexError, AttributeError or
            # UnboundLocalError on some malformed paths ("a@", "a@[", '"'); aiosmtpd
            # only catches HeaderParseError. Bad input is a 553, not our 451.
            return None, ""
        if address is None or _CONTROL.search(address):
            return None, ""
        try:
            # SMTPUTF8 arguments arrive as UTF-8 with surrogateescape; refuse invalid UTF-8
            # here rather than carry surrogates into the spool and the JSON payloads.
            address.encode("utf-8")
        except UnicodeEncodeError:
            return None, ""
        return address, rest or ""

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        keyword_rest = self._strip_command_keyword("FROM:", arg or "")
        if keyword_rest is None:
            await self.push(Reply.SYNTAX_MAIL)
            return
        if self._env_().mail_given:
            await self.push(Reply.NESTED_MAIL)
            return
        address, rest = self._address(keyword_rest)
        if address is None:
            await self.push(Reply.BAD_ADDRESS)
            return
        params = _parse_params(rest.split())
        if params is None:
            await self.push(Reply.SYNTAX_MAIL)
            return
        unknown = set(params) - _MAIL_PARAMS
        if unknown:
            await self.push(Reply.BAD_PARAM)
            return
        body = params.get("BODY", "7BIT")
        if not isinstance(body, str) or body.upper() not in ("7BIT", "8BITMIME"):
            await self.push(Reply.BAD_BODY)
            return
        size = params.get("SIZE")
        if size is not None:
            if not isinstance(size, str) or not (size.isascii() and size.isdigit()):
                await self.push(Reply.SYNTAX_MAIL)
                return
            if self.data_size_limit and int(size) > self.data_size_limit:
                await self.push(Reply.TOO_BIG)
                return
        handler: BridgeHandler = self.event_handler
        if not handler.sender_allowed(self.session, address):
            await self.push(Reply.SENDER_NOT_ALLOWED)
            return
        status = await self._call_handler_hook("MAIL", address, rest.split())
        if status is None or status is _MISSING or str(status).startswith("250"):
            self._env_().mail_from = address
            self._env_().mail_given = True
            self._env_().smtp_utf8 = params.get("SMTPUTF8") is True
            self._env_().mail_options.extend(rest.split())
            status = Reply.SENDER_OK if status in (None, _MISSING) else status
        await self.push(status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        if not self._env_().mail_given:
            await self.push(Reply.NEED_MAIL)
            return
        keyword_rest = self._strip_command_keyword("TO:", arg or "")
        if keyword_rest is None:
            await self.push(Reply.SYNTAX_RCPT)
            return
        address, rest = self._address(keyword_rest)
        if not address:
            await self.push(Reply.BAD_ADDRESS if address is None else Reply.SYNTAX_RCPT)
            return
        params = _parse_params(rest.split())
        if params is None:
            await self.push(Reply.SYNTAX_RCPT)
            return
        if set(params) - _RCPT_PARAMS:
            await self.push(Reply.BAD_PARAM)
            return
        status = await self._call_handler_hook("RCPT", address, rest.split())
        if status is _MISSING:
            status = Reply.RECIPIENT_OK
        if str(status).startswith("250"):
            self._env_().rcpt_tos.append(address)
            self._env_().rcpt_options.extend(rest.split())
        await self.push(status)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        if await self.check_auth_needed("VRFY"):
            return
        await self.push(Reply.CANNOT_VRFY if arg else Reply.SYNTAX_VRFY)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self._env_().rcpt_tos:
            await self.push(Reply.NEED_RCPT)
            return
        if arg:
            await self.push(Reply.SYNTAX_DATA)
            return
        await self.push(Reply.START_DATA)
        started = time.monotonic()
        data, size, too_big, aborted = await self._read_data()
        if aborted:
            self._reset_envelope()
            return
        if too_big:
            handler: BridgeHandler = self.event_handler
            handler.log_transaction(
                "rejected", self._env_(), size, started,
                reply=Reply.TOO_BIG, peer=_peer_ip(self.session.peer if self.session else None),
            )  # fmt: skip
            self._reset_envelope()
            await self.push(Reply.TOO_BIG)
            return
        self._env_().content = data
        self._env_().original_content = data
        status = await self._call_handler_hook("DATA")
        self._reset_envelope()
        await self.push(Reply.OK if status is _MISSING else status)

    async def _read_data(self) -> tuple[bytes, int, bool, bool]:
        """Read DATA up to CRLF.CRLF: (dot-unstuffed bytes, size, over the limit, aborted).

        A "line" is what ends in CRLF; bare LF is ordinary data (RFC 5321 §4.1.1.4:
        the end of data is CRLF.CRLF and nothing else). A client still sending after
        `listen.data_timeout` (slowloris) gets 421 and is disconnected.

        Strategy: the stream is read in large pieces, not line by line (a body of 2.4
        million empty lines took 19 s of event-loop time that way). `readuntil` looks for
        ``LF "." CRLF``; a match is the end only if a CR comes before it. A match can only
        be missed when its LF was consumed already, which happens at the start of the
        data and right after a match that was not the end: there `_at_line_start` reads
        the next one to three bytes and checks for a lone ``.`` line itself. Over-long
        stretches come back through LimitOverrunError, which never consumes the last
        three bytes, so a match cannot be split there. Dot-unstuffing is one
        ``CRLF "." -> CRLF`` replace over the whole message, with a CRLF put in front.
        """
        handler: BridgeHandler = self.event_handler
        try:
            async with asyncio.timeout(handler.config.listen.data_timeout):
                return await self._read_data_pieces()
        except TimeoutError:
            await self.push(Reply.DATA_TIMEOUT)
            if self.transport is not None:
                self.transport.close()
            return b"", 0, False, True

    async def _read_data_pieces(self) -> tuple[bytes, int, bool, bool]:
        reader: asyncio.StreamReader = self._reader
        limit = self.data_size_limit
        parts: list[bytes] = []
        size = 0
        too_big = False
        tail = b"\r\n"  # the last two raw bytes so far; data starts at a line start
        at_line_start = True
        for pieces in itertools.count(1):
            if pieces % 64 == 0:
                # A read from a filled buffer does not yield, and crafted data (LF "." CRLF
                # without CR, every 5 bytes) makes pieces tiny: let other sessions run.
                await asyncio.sleep(0)
            if at_line_start:
                piece, ended = await self._at_line_start(reader)
                at_line_start = False
            else:
                try:
                    piece = await reader.readuntil(_DATA_END)
                    before = piece[-5:-4] if len(piece) >= 5 else tail[-1:]
                    ended = before == b"\r"
                    if ended:
                        piece = piece[:-3]  # keep the CRLF that ends the last line
                    else:
                        at_line_start = True  # the match ended a line: check the next
                except asyncio.LimitOverrunError as exc:
                    piece, ended = await reader.readexactly(exc.consumed), False
            self._reset_timeout()
            # Every CRLF "." ends inside `tail + piece` (it is longer than the tail).
            size += len(piece) - (tail + piece).count(b"\r\n.")
            tail = (tail + piece)[-2:]
            if not too_big and limit and size > limit:
                # Keep reading to the end so the rest is not taken as commands
                # (aio-libs/aiosmtpd#29), but keep nothing.
                too_big = True
                parts.clear()
            if not too_big:
                parts.append(piece)
            if ended:
                break
        if too_big:
            return b"", size, True, False
        return (b"\r\n" + b"".join(parts)).replace(b"\r\n.", b"\r\n")[2:], size, False, False

    async def _at_line_start(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        """At a line start whose CRLF is consumed: (raw bytes read, is it the end line)."""
        first = await reader.readexactly(1)
        if first != b".":
            return first, False
        rest = await reader.readexactly(2)
        if rest == b"\r\n":
            return b"", True
        return first + rest, False


class BridgeHandler:
    """aiosmtpd handler hooks: route at RCPT, spool at DATA, 451 on our own faults.

    Args:
        config: The validated configuration.
        spool: Where accepted mail goes.
        accounts: The provider adapter of every account, by account name.
        on_queued: Called after every successful spool write (wakes the worker).
        clock: Unix time source.
    """

    def __init__(
        self,
        config: Config,
        spool: Spool,
        accounts: Mapping[str, Provider[ProviderSettings]],
        *,
        on_queued: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.routes: Sequence[Route] = config.routes
        self.spool = spool
        self.accounts = accounts
        self.on_queued = on_queued
        self.clock = clock
        self.limits = [route_limits(config, route, accounts) for route in config.routes]
        self._users = {u.username: u for u in config.auth.users}
        self._networks = [
            ipaddress.ip_network(n, strict=False) for n in config.listen.allow_networks
        ]
        self._connections = 0
        self._per_ip: dict[str, int] = {}
        #: DATA commands between end-of-data and their reply (shutdown waits for them).
        self.busy = 0
        self.idle = asyncio.Event()
        self.idle.set()

    # -- admission ----------------------------------------------------------------------

    def admit(self, peer: str) -> str | None:
        """None to let a new connection in, or the reply that refuses it."""
        listen = self.config.listen
        if self._networks and not _in_networks(peer, self._networks):
            return Reply.ACCESS_DENIED
        if self._connections >= listen.max_connections:
            return Reply.TOO_MANY_CONNECTIONS
        if self._per_ip.get(peer, 0) >= listen.max_connections_per_ip:
            return Reply.TOO_MANY_CONNECTIONS
        self._connections += 1
        self._per_ip[peer] = self._per_ip.get(peer, 0) + 1
        return None

    def release(self, peer: str) -> None:
        """A connection that `admit` let in has ended."""
        self._connections -= 1
        left = self._per_ip.get(peer, 1) - 1
        if left <= 0:
            self._per_ip.pop(peer, None)
        else:
            self._per_ip[peer] = left

    # -- authentication ---------------------------------------------------------------

    async def authenticate(self, login: bytes, password: bytes) -> AuthUser | None:
        """The user whose password matches, or None. scrypt runs off the event loop."""
        name = login.decode("utf-8", "replace")
        user = self._users.get(name)
        if user is None:
            # Spend the same time as a real check so usernames cannot be probed by timing.
            await asyncio.to_thread(verify_password, password, _DUMMY_HASH)
            return None
        ok = await asyncio.to_thread(verify_password, password, user.password_hash)
        return user if ok else None

    def sender_allowed(self, session: Session | None, address: str) -> bool:
        """May this session use `address` as its envelope sender?"""
        allowed = _allowed_senders(session)
        if allowed is None:
            return True
        if address == "":
            return "<>" in allowed
        return matches(address, [p for p in allowed if p != "<>"])

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Add PIPELINING and ENHANCEDSTATUSCODES, which aiosmtpd supports but omits.

        The AUTH line is dropped when no users are configured (aiosmtpd would offer
        mechanisms that can never succeed).
        """
        session.host_name = hostname
        body = [r for r in responses[:-1] if self._users or not r.startswith("250-AUTH")]
        return [*body, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Refuse recipients no route takes, and recipients beyond a limit (452: try later)."""
        index = resolve(address, envelope.mail_from or "", self.routes)
        if index is None:
            return Reply.NO_ROUTE
        if len(envelope.rcpt_tos) >= self.config.listen.max_recipients:
            return Reply.TOO_MANY_RCPTS
        max_rcpts = self.limits[index][1]
        if max_rcpts is not None:
            same_route = sum(
                1
                for r in envelope.rcpt_tos
                if resolve(r, envelope.mail_from or "", self.routes) == index
            )
            if same_route >= max_rcpts:
                return Reply.TOO_MANY_RCPTS
        return Reply.RECIPIENT_OK

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Spool the message (one entry per route) and answer 250 only once it is durable."""
        self.busy += 1
        self.idle.clear()
        try:
            return await self._data(session, envelope)
        finally:
            self.busy -= 1
            if self.busy == 0:
                self.idle.set()

    async def from_header_allowed(self, session: Session | None, raw: bytes) -> bool:
        """Does every From/Sender address of `raw` pass the user's `allowed_senders`?

        The APIs send as the From header, not as MAIL FROM, so a user limited to
        scanner@corp.example must not get ``From: ceo@corp.example`` through either.
        The header parse runs in a thread, and only for such users.
        """
        allowed = _allowed_senders(session)
        if allowed is None:
            return True
        patterns = [p for p in allowed if p != "<>"]
        # The whole header section, however long: delivery reads all of it, so a From
        # behind 64 KiB of padding must be seen here too.
        head = await asyncio.to_thread(_HEADER_PARSER.parsebytes, raw)
        values = [str(v) for name in ("from", "sender") for v in head.get_all(name, [])]
        return all(matches(addr, patterns) for _, addr in getaddresses(values) if addr)

    async def _data(self, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        raw = envelope.original_content or b""
        mail_from: str = envelope.mail_from or ""
        peer = _peer_ip(session.peer)
        if not await self.from_header_allowed(session, raw):
            self.log_transaction(
                "rejected", envelope, len(raw), started, reply=Reply.FROM_NOT_ALLOWED, peer=peer
            )
            return Reply.FROM_NOT_ALLOWED
        groups = split_by_route(envelope.rcpt_tos, mail_from, self.routes)
        entries: list[NewEntry] = []
        for index, rcpts in groups.items():
            route = self.routes[index]
            max_size = self.limits[index][0]
            if max_size is not None and len(raw) > max_size:
                self.log_transaction(
                    "rejected", envelope, len(raw), started, reply=Reply.TOO_BIG, peer=peer
                )
                return Reply.TOO_BIG
            entries.append(
                NewEntry(
                    route=index,
                    provider=route.provider,
                    envelope=BridgeEnvelope(
                        mail_from=mail_from,
                        rcpt_to=tuple(rcpts),
                        helo=_valid_text(session.host_name),
                        client_address=peer,
                        auth_user=_auth_user(session),
                        smtputf8=bool(envelope.smtp_utf8),
                    ),
                )
            )
        try:
            ids = await self.spool.put(raw, entries, message_id=_message_id(raw))
        except SpoolError as exc:
            log.warning("spool_put_failed", error=str(exc), reply=exc.smtp_reply)
            self.log_transaction(
                "tempfail", envelope, len(raw), started, reply=exc.smtp_reply, peer=peer
            )
            return exc.smtp_reply
        self.on_queued()
        self.log_transaction(
            "queued", envelope, len(raw), started, reply="250", peer=peer, spool_ids=ids,
            message_id=_message_id(raw),
        )  # fmt: skip
        return Reply.QUEUED.format(id=ids[0])

    async def handle_exception(self, error: Exception) -> str:
        """Our own fault: log it, answer 451 so the client keeps the mail, leak nothing.

        A failed TLS handshake or a reset connection is the client's doing, not ours:
        one info line without a traceback, so that garbage after STARTTLS cannot fill
        the error log.
        """
        if isinstance(error, ssl.SSLError | ConnectionError | TLSSetupException):
            log.info("smtp_connection_failed", error=type(error).__name__)
            return Reply.TEMPFAIL
        log.error("smtp_internal_error", exc_info=error)
        return Reply.TEMPFAIL

    def log_transaction(
        self, result: str, envelope: Envelope, size: int, started: float, **kw: Any
    ) -> None:
        """One canonical log line and one metric count per DATA transaction."""
        health.SMTP_TRANSACTIONS.labels(result=result).inc()
        log.info(
            "smtp_transaction",
            result=result,
            mail_from=envelope.mail_from or "",
            recipients=len(envelope.rcpt_tos),
            size=size,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            **kw,
        )


# A valid hash of a random password, checked when the username is unknown.
_DUMMY_HASH = (
    "$scrypt$ln=14,r=8,p=1$c210cC1icmlkZ2UtZHVtbXk$Wm9mV3l1c2VsZXNzLWtleS1mb3ItdGltaW5nLW9ubHk"
)


def _b64decode(data: bytes) -> bytes | None:
    """Strict base64 alphabet, but missing padding tolerated."""
    data = data.strip()
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _valid_text(value: str | None) -> str | None:
    """`value` with undecodable bytes and control characters replaced by U+FFFD.

    A HELO name is only logged and reported, so a printer's stray 8-bit byte there is
    kept visible instead of failing the spool's UTF-8 encoding (a 451 for every mail),
    and a bare CR in it cannot start a new line in whatever shows it later.
    """
    if value is None:
        return None
    text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _CONTROL.sub("\ufffd", text)


def _allowed_senders(session: Session | None) -> tuple[str, ...] | None:
    """The logged-in user's `allowed_senders`, or None when the session may use any."""
    user = getattr(session, "auth_data", None)
    if not isinstance(user, AuthUser) or not user.allowed_senders:
        return None
    return user.allowed_senders


def _peer_ip(peer: object) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def _in_networks(
    peer: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def route_limits(
    config: Config, route: Route, accounts: Mapping[str, Provider[ProviderSettings]]
) -> tuple[int | None, int | None]:
    """(max message size, max recipients) a route can promise at SMTP time.

    A message may fail over to any account in the route's chain, so it must fit the
    smallest limit among them; refusing at SMTP time (552/452) beats a 250 followed by
    a bounce.
    """
    sizes = [s for n in config.chain(route) if (s := accounts[n].max_message_size) is not None]
    rcpts = [r for n in config.chain(route) if (r := accounts[n].max_recipients) is not None]
    return (min(sizes) if sizes else None, min(rcpts) if rcpts else None)


def _auth_user(session: Session) -> str | None:
    data = getattr(session, "auth_data", None)
    if isinstance(data, AuthUser):
        return data.username
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    if isinstance(data, str):
        return data
    login = getattr(data, "login", None)
    if isinstance(login, bytes):
        return login.decode("utf-8", "replace")
    return None


_HEADER_PARSER = BytesHeaderParser(policy=compat32)


def _header_end(raw: bytes) -> int:
    """Where the header block ends (at most 64 KiB in: the rest is body anyway)."""
    end = raw.find(b"\r\n\r\n", 0, 65536)
    if end < 0:
        end = raw.find(b"\n\n", 0, 65536)
    return end if end >= 0 else 65536


def _message_id(raw: bytes) -> str | None:
    """The Message-ID header, found cheaply in the header block (for the queue listing)."""
    head = raw[: _header_end(raw)]
    for line in head.splitlines():
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().decode("utf-8", "replace") or None
    return None


def _new_session(
    handler: BridgeHandler,
    config: Config,
    tls_context: ssl.SSLContext | None,
    loop: asyncio.AbstractEventLoop,
) -> BridgeSMTP:
    """One protocol instance: the listener's settings as aiosmtpd arguments."""
    listen = config.listen
    implicit = listen.tls is not None and listen.tls.implicit
    # AUTH in clear text only on loopback, with TLS, or when the operator says so.
    auth_require_tls = not (listen.is_loopback() or config.auth.allow_plaintext or implicit)
    return BridgeSMTP(
        handler,
        data_size_limit=listen.max_message_size,
        enable_SMTPUTF8=True,
        decode_data=False,
        hostname=listen.hostname,
        ident="smtp-bridge ESMTP",
        timeout=listen.timeout,
        tls_context=None if implicit else tls_context,
        require_starttls=bool(listen.tls and listen.tls.require_starttls and not implicit),
        auth_required=bool(config.auth.users) and config.auth.required,
        auth_require_tls=auth_require_tls,
        loop=loop,
    )


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server TLS context from `listen.tls`, or None. `reload_tls` re-reads it."""
    if config.listen.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    reload_tls(ctx, config)
    return ctx


def reload_tls(ctx: ssl.SSLContext, config: Config) -> None:
    """Load the certificate files again into `ctx` (SIGHUP); new sessions use them."""
    tls = config.listen.tls
    assert tls is not None
    ctx.load_cert_chain(config.resolve_path(tls.cert_file), config.resolve_path(tls.key_file))


async def create_smtp_server(
    handler: BridgeHandler,
    config: Config,
    *,
    port: int | None = None,
    sessions: weakref.WeakSet[BridgeSMTP] | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Start listening in the running loop (port 0 picks a free port; read it back).

    Args:
        handler: The hooks.
        config: Listener settings come from `config.listen`.
        port: Overrides `config.listen.port` (tests pass 0).
        sessions: If given, every session's protocol is added (for shutdown).
        tls_context: Server context for STARTTLS or implicit TLS (see `tls_context`).
    """
    loop = asyncio.get_running_loop()
    listen = config.listen

    implicit = listen.tls is not None and listen.tls.implicit

    def factory() -> BridgeSMTP:
        with warnings.catch_warnings():
            # aiosmtpd warns on every connection when AUTH may go without TLS; that is
            # our decision (see `_new_session`), and the warning would be a non-JSON line
            # in the daemon's log.
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            proto = _new_session(handler, config, tls_context, loop)
        if sessions is not None:
            sessions.add(proto)
        return proto

    return await loop.create_server(
        factory,
        host=listen.host,
        port=listen.port if port is None else port,
        ssl=tls_context if implicit else None,
    )
