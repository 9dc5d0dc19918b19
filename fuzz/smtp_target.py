"""Fuzz target for the SMTP edge: generated sessions against the real listener.

A session is a list of steps; a step is one or more command lines written in one go
(pipelined, possibly cut into several writes) and, when its last line is DATA and the
server answers 354, a message body. The driver checks, for every session:

* every line that ends in LF gets exactly one reply, within `REPLY_TIMEOUT` seconds
  (aiosmtpd reads command lines up to LF, so a bare CR is part of the line);
* every reply line is ``[2-5]xx`` + space or hyphen + printable ASCII, at most 512
  octets with its CRLF, and a multi-line reply keeps one code;
* no reply carries Python exception text or the 451 of an internal error;
* the server closes only after 221, 421 (when `max_errors` 5xx replies were given) or
  aiosmtpd's 502 "goodbye", and after that sends nothing more;
* DATA gets 354 only with recipients, then 250 exactly when the dot-unstuffed content
  (ended at the first CRLF.CRLF) fits the size limit, else 552;
* every 250 "Queued as ID" names a new spool body whose bytes are what a correct server
  stores, with as many recipients as RCPT got 250; nothing else is stored;
* after the session, a fresh connection still gets 220 and EHLO 250.

`SmtpHarness` owns one event loop and three bridges (configuration variants) in it;
`SmtpHarness.check` runs one session and raises AssertionError on the first violation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import re
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml
from hypothesis import assume
from hypothesis import strategies as st

from bridge.app import Bridge
from bridge.config import load_config
from bridge.passwords import hash_password
from bridge.smtp import Reply

__all__ = [
    "REPLY_TIMEOUT",
    "Session",
    "SmtpHarness",
    "Step",
    "data_oracle",
    "sessions",
]

#: Seconds any single reply may take before the server counts as hung.
REPLY_TIMEOUT = 5.0
USERNAME = "fuzz"
PASSWORD = "fuzz-pass"  # noqa: S105 - a test account on a loopback test listener

_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][\t\x20-\x7e]*\r\n")
_EXCEPTION_TEXT = re.compile(
    rb"Traceback|object has no attribute|Error: \(|\b[A-Z][A-Za-z]*(?:Error|Exception)\b"
    rb"|\bFile \"|line [0-9]+, in "
)
#: aiosmtpd's BOGUS_LIMIT: the fifth unknown command ends the session.
_UNKNOWN_BUDGET = 5
_QUEUED = re.compile(rb"250 2\.0\.0 Queued as (\S+)\r\n")


# --------------------------------------------------------------------------- the oracle


def data_oracle(stream: bytes) -> tuple[bytes, bytes] | None:
    """What a correct server stores for a DATA stream: (content, bytes after the end).

    Lines end in CRLF; the first line that is exactly ``.`` ends DATA; any other line that
    starts with a dot loses that one dot (RFC 5321 §4.5.2). None when there is no end.
    """
    out = bytearray()
    pos = 0
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return None
        line = stream[pos : end + 2]
        pos = end + 2
        if line == b".\r\n":
            return bytes(out), stream[pos:]
        out += line[1:] if line.startswith(b".") else line


def command_word(line: bytes) -> bytes:
    """The command word aiosmtpd dispatches on for a received line, upper-cased."""
    return line.rstrip(b"\r\n").partition(b" ")[0].upper()


def split_lines(data: bytes) -> list[bytes]:
    """`data` cut after every LF (the last piece may lack one)."""
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Step:
    """Lines (each ending in LF) written together, cut at `cuts`; `body` follows a 354."""

    lines: tuple[bytes, ...]
    body: bytes | None = None
    cuts: tuple[int, ...] = ()
    body_cuts: tuple[float, ...] = ()


@dataclass(frozen=True)
class Session:
    """Which bridge variant to talk to, and what to say."""

    variant: int
    steps: tuple[Step, ...]


def _line(content: bytes, ending: bytes = b"\r\n") -> bytes:
    return content.replace(b"\n", b" ") + ending


_ENDINGS = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r\r\n", b" \r\n"])

_DOMAINS = [
    "example.org",
    "example.com",
    "sub.example.net",
    "bücher.example",
    "[127.0.0.1]",
    "[IPv6:::1]",
    "localhost",
    "",
    "x" * 250 + ".example",
]
_LOCALS = ["a", "b.c", "postmaster", "jörg", '"a b"', '"a\\"b"', "a+tag", "", "x" * 70]
_ODD_ADDRESSES = [
    "<>",
    "<a@example.com",
    "a@example.com",
    "<<a@example.com>>",
    "<a@@example.com>",
    "<@relay.example:a@example.com>",
    "<postmaster>",
    "< a@example.com >",
    "<a@example.com> <b@example.com>",
    "<a\x00b@example.com>",
    "<a\rb@example.com>",
    "<" + "y" * 600 + "@example.org>",
    ":",
    "",
    "<\udcff@example.org>",
]


def _addresses() -> st.SearchStrategy[bytes]:
    normal = st.builds(
        lambda local, domain: f"<{local}@{domain}>".encode(),
        st.sampled_from(_LOCALS),
        st.sampled_from(_DOMAINS),
    )
    odd = st.sampled_from(_ODD_ADDRESSES).map(lambda s: s.encode("utf-8", "surrogateescape"))
    raw = st.binary(max_size=40).map(lambda b: b"<" + b + b"@example.org>")
    return st.one_of(normal, normal, odd, raw)


_MAIL_PARAMS = [
    b"SIZE=100",
    b"SIZE=0",
    b"SIZE=999999999999999999999999",
    b"SIZE=-1",
    b"SIZE=",
    b"SIZE",
    b"BODY=7BIT",
    b"BODY=8BITMIME",
    b"body=8bitmime",
    b"BODY=BINARYMIME",
    b"BODY=",
    b"AUTH=<>",
    b"AUTH=<a@example.com>",
    b"SMTPUTF8",
    b"smtputf8",
    b"SMTPUTF8=yes",
    b"RET=FULL",
    b"RET=HDRS",
    b"ENVID=QQ314159",
    b"ENVID=\xc3\xa4",
    b"X-FOO=1",
    b"=",
    b"==",
    b"A=B=C",
    b"\x00",
]
_RCPT_PARAMS = [
    b"NOTIFY=SUCCESS,FAILURE",
    b"NOTIFY=NEVER",
    b"NOTIFY=",
    b"ORCPT=rfc822;b@example.org",
    b"ORCPT=rfc822;b+2Bx@example.org",
    b"ORCPT",
    b"SIZE=1",
    b"X=1",
]


def _params(choices: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    token = st.one_of(
        st.sampled_from(list(choices)),
        st.binary(min_size=1, max_size=12).filter(lambda b: b" " not in b),
    )
    return st.lists(token, max_size=4).map(lambda ps: b"".join(b" " + p for p in ps))


def _verb(name: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from([name, name.lower(), name.capitalize()]).map(str.encode)


@st.composite
def _mail(draw: st.DrawFn) -> bytes:
    verb = draw(_verb("MAIL"))
    keyword = draw(st.sampled_from([b" FROM:", b" from:", b" FROM: ", b" FROM :", b" TO:", b" "]))
    return _line(verb + keyword + draw(_addresses()) + draw(_params(_MAIL_PARAMS)), draw(_ENDINGS))


@st.composite
def _rcpt(draw: st.DrawFn) -> bytes:
    verb = draw(_verb("RCPT"))
    keyword = draw(st.sampled_from([b" TO:", b" to:", b" TO: ", b" FROM:", b" "]))
    return _line(verb + keyword + draw(_addresses()) + draw(_params(_RCPT_PARAMS)), draw(_ENDINGS))


_HELO_ARGS = st.one_of(
    st.sampled_from([b" client.example", b"", b" ", b" [192.0.2.1]", b" b\xc3\xbccher.example"]),
    st.binary(max_size=30).map(lambda b: b" " + b),
)


@st.composite
def _simple(draw: st.DrawFn) -> bytes:
    """A command other than MAIL/RCPT/DATA/AUTH, with random arguments."""
    verb = draw(
        st.sampled_from(
            ["EHLO", "HELO", "RSET", "NOOP", "QUIT", "STARTTLS", "VRFY", "HELP", "EXPN", "BDAT"]
        )
    )
    if verb in ("EHLO", "HELO"):
        args = draw(_HELO_ARGS)
    else:
        args = draw(
            st.one_of(
                st.just(b""),
                st.sampled_from([b" MAIL", b" <a@example.com>", b" postmaster", b" 0 LAST"]),
                st.binary(max_size=20).map(lambda b: b" " + b),
            )
        )
    return _line(draw(_verb(verb)) + args, draw(_ENDINGS))


def _b64(text: bytes) -> bytes:
    return base64.b64encode(text)


_AUTH_RESPONSES = st.one_of(
    st.sampled_from(
        [
            _b64(USERNAME.encode()),
            _b64(PASSWORD.encode()),
            _b64(b"\0" + USERNAME.encode() + b"\0" + PASSWORD.encode()),
            _b64(b"\0nobody\0wrong"),
            _b64(b"no-nul-here"),
            _b64(USERNAME.encode()).rstrip(b"="),
            b"*",
            b"",
            b"=",
            b"!!!!",
            b"A" * 1200,
        ]
    ),
    st.binary(max_size=40).map(_b64),
    st.binary(max_size=20),
)


@st.composite
def _auth(draw: st.DrawFn) -> tuple[bytes, ...]:
    """An AUTH command and zero to two challenge responses."""
    mech = draw(st.sampled_from([b"PLAIN", b"LOGIN", b"plain", b"CRAM-MD5", b"", b"XOAUTH2"]))
    initial = draw(st.one_of(st.just(b""), _AUTH_RESPONSES.map(lambda r: b" " + r)))
    first = _line(draw(_verb("AUTH")) + (b" " + mech if mech else b"") + initial, b"\r\n")
    responses = draw(st.lists(_AUTH_RESPONSES, max_size=2))
    return (first, *(_line(r, draw(_ENDINGS)) for r in responses))


_JUNK = st.one_of(
    st.binary(max_size=60).map(lambda b: _line(b, b"\r\n")),
    st.sampled_from(
        [b".", b"..", b"", b" ", b"\t", b"\x00", b"\r", b"\r\r", b"NOOP\rNOOP", b"\xff\xfe"]
    ).map(lambda b: _line(b, b"\r\n")),
    st.sampled_from([500, 510, 512, 513, 1000, 1001, 1002, 3000]).map(
        lambda n: _line(b"NOOP " + b"x" * n, b"\r\n")
    ),
    st.sampled_from([520, 540, 560, 1200]).map(
        lambda n: _line(b"MAIL FROM:<" + b"m" * n + b"@example.com>", b"\r\n")
    ),
    st.text(max_size=20).map(lambda t: _line(t.encode("utf-8", "surrogatepass"), b"\r\n")),
)

_DATA_LINE = st.sampled_from(
    [b"DATA\r\n"] * 6 + [b"data\r\n", b"DATA\n", b"DATA \r\n", b"DATA x\r\n", b"DATA\r\r\n"]
)

_BODY_PIECES = st.one_of(
    st.binary(max_size=80),
    st.sampled_from(
        [
            b"\r\n",
            b"\n",
            b"\r",
            b".",
            b"..",
            b"\r\n.",
            b"\r\n..\r\n",
            b"\n.\n",
            b"\r.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r\n.\r",
            b".\r\n",
            b"\r\n.\r\n",
            b"Subject: fuzz\r\n\r\n",
            b"\x00",
            b"\xc3\xa4\xff",
        ]
    ),
    st.sampled_from([997, 998, 999, 1000, 1001, 1002, 1003, 2001, 2002, 5000]).map(
        lambda n: b"x" * n
    ),
)
# What a client may send after an early end of data: commands, but no DATA (whose reply
# count would depend on the server's answer).
_AFTER_END = st.lists(
    st.sampled_from(
        [
            b"NOOP\r\n",
            b"RSET\r\n",
            b"MAIL FROM:<evil@example.com>\r\n",
            b"RCPT TO:<b@example.org>\r\n",
        ]
    ),
    max_size=3,
).map(b"".join)


@st.composite
def _body(draw: st.DrawFn) -> bytes:
    body = b"".join(draw(st.lists(_BODY_PIECES, max_size=12)))
    if draw(st.booleans()):
        body += b"\r\n.\r\n" + draw(_AFTER_END)
    return body


_BODY_CUTS = st.lists(st.floats(0, 1, exclude_max=True), max_size=3).map(tuple)


def _cuts(total: int) -> st.SearchStrategy[tuple[int, ...]]:
    if total < 2:
        return st.just(())
    return st.lists(st.integers(1, total - 1), max_size=3, unique=True).map(
        lambda cs: tuple(sorted(cs))
    )


@st.composite
def _transaction(draw: st.DrawFn) -> Step:
    """MAIL, RCPTs, DATA pipelined, then a body: the path most sessions should reach."""
    mail = draw(st.one_of(st.just(b"MAIL FROM:<a@example.com>\r\n"), _mail()))
    rcpts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(
                    [b"RCPT TO:<b@example.org>\r\n", b"RCPT TO:<c@sub.example.net>\r\n"]
                ),
                _rcpt(),
            ),
            min_size=1,
            max_size=4,
        )
    )
    lines = (mail, *rcpts, draw(_DATA_LINE))
    return Step(lines, draw(_body()), draw(_cuts(sum(map(len, lines)))), draw(_BODY_CUTS))


@st.composite
def _step(draw: st.DrawFn) -> Step:
    kind = draw(st.sampled_from(["one", "one", "burst", "tx", "tx", "auth", "junk"]))
    if kind == "tx":
        return draw(_transaction())
    if kind == "auth":
        lines: tuple[bytes, ...] = draw(_auth())
    elif kind == "junk":
        lines = (draw(_JUNK),)
    elif kind == "one":
        lines = (draw(st.one_of(_simple(), _mail(), _rcpt(), _DATA_LINE)),)
    else:
        lines = tuple(
            draw(st.lists(st.one_of(_simple(), _mail(), _rcpt()), min_size=2, max_size=6))
        )
        words = [command_word(line) for line in lines]
        if b"QUIT" in words:
            # RFC 2920 §3.1: QUIT ends a pipelined group. Bytes sent after it arrive at a
            # closed socket, whose RST can destroy the replies still unread on our side.
            lines = lines[: words.index(b"QUIT") + 1]
        elif draw(st.booleans()):
            lines += (draw(_DATA_LINE),)
    body = draw(_body()) if command_word(lines[-1]) == b"DATA" else None
    return Step(lines, body, draw(_cuts(sum(map(len, lines)))), draw(_BODY_CUTS))


@st.composite
def sessions(draw: st.DrawFn, variants: int = 3) -> Session:
    """A random session for one of `variants` bridges."""
    steps: list[Step] = []
    if draw(st.integers(0, 9)) > 0:
        greet = draw(st.sampled_from([b"EHLO client.example\r\n", b"HELO printer\r\n"]))
        steps.append(Step((greet,)))
    steps.extend(draw(st.lists(_step(), max_size=10)))
    return Session(draw(st.integers(0, variants - 1)), tuple(steps))


# --------------------------------------------------------------------------- the bridges


@dataclass(frozen=True)
class Variant:
    """One bridge configuration the sessions are run against."""

    name: str
    size_limit: int
    max_errors: int
    sections: dict[str, Any]


def variants(user_hash: str) -> list[Variant]:
    """Plain; AUTH required with tight limits; AUTH optional with two routes."""
    user = {"username": USERNAME, "password_hash": user_hash}
    return [
        Variant("plain", 4096, 20, {"listen": {"max_message_size": 4096}}),
        Variant(
            "auth-required",
            2048,
            4,
            {
                "listen": {"max_message_size": 2048, "max_errors": 4, "max_recipients": 3},
                "auth": {
                    "users": [{**user, "allowed_senders": ["example.com", "<>"]}],
                    "required": True,
                },
            },
        ),
        Variant(
            "auth-optional-two-routes",
            131072,
            20,
            {
                "listen": {"max_message_size": 131072},
                "auth": {"users": [user], "required": False},
                "providers": {
                    "hook": {"type": "webhook", "url": "https://127.0.0.1:9/a"},
                    "other": {"type": "webhook", "url": "https://127.0.0.1:9/b"},
                },
                "routes": [
                    {"match": {"recipients": ["example.org", "*.example.org"]}, "provider": "hook"},
                    {
                        "match": {"recipients": ["*.example.net", "bücher.example"]},
                        "provider": "other",
                    },
                ],
            },
        ),
    ]


def _config_text(workdir: Path, variant: Variant) -> str:
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "spool": {"path": str(workdir / f"{variant.name}.sqlite3"), "min_free_space": 0},
        "providers": {"hook": {"type": "webhook", "url": "https://127.0.0.1:9/messages"}},
        "routes": [{"match": {"recipients": ["*"]}, "provider": "hook"}],
        "health": {"enabled": False},
    }
    for key, value in variant.sections.items():
        doc[key] = {**doc[key], **value} if key == "listen" else value
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def quiet_logs() -> None:
    """Silence structlog and aiosmtpd's own logger (thousands of sessions otherwise)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)


# --------------------------------------------------------------------------- the driver


class _Closed(Exception):
    """The server closed the connection (EOF or reset)."""


@dataclass
class _State:
    max_errors: int
    size_limit: int
    errors: int = 0
    unknown: int = 0
    last_code: int = 0
    mail: bool = False
    rcpts: int = 0
    closed: bool = False
    queued: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes, cuts: Sequence[int] = ()) -> None:
        """Write `data`, pausing at each cut so the server sees the pieces separately."""
        bounds = [0, *cuts, len(data)]
        try:
            for start, end in itertools.pairwise(bounds):
                self.writer.write(data[start:end])
                await self.writer.drain()
                if end != len(data):
                    await asyncio.sleep(0.002)
        except ConnectionError:
            pass  # the server hung up; the replies already sent say whether it may

    async def line(self) -> bytes:
        try:
            raw = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
        except ConnectionError as exc:
            raise _Closed from exc
        except TimeoutError:
            raise AssertionError(f"no reply within {REPLY_TIMEOUT} s (hang)") from None
        if not raw:
            raise _Closed
        return raw

    async def reply(self) -> tuple[int, list[bytes]]:
        """One reply, every line checked for syntax, length and leaked exception text."""
        lines: list[bytes] = []
        while True:
            try:
                raw = await self.line()
            except _Closed:
                if lines:
                    raise AssertionError(f"connection closed inside a reply: {lines!r}") from None
                raise
            assert _REPLY_LINE.fullmatch(raw), f"malformed reply line {raw!r}"
            assert len(raw) <= 512, f"reply line over 512 octets: {raw[:80]!r}..."
            assert not _EXCEPTION_TEXT.search(raw), f"exception text in reply {raw!r}"
            assert Reply.TEMPFAIL.encode() + b"\r\n" != raw, "internal error (451 4.3.0)"
            if lines:
                assert raw[:3] == lines[0][:3], f"code changed inside a reply: {[*lines, raw]!r}"
            lines.append(raw)
            if raw[3:4] == b" ":
                return int(raw[:3]), lines

    async def expect_eof(self) -> None:
        try:
            raw = await self.line()
        except _Closed:
            return
        raise AssertionError(f"data after the closing reply: {raw!r}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def _answer(conn: _Conn, state: _State, line: bytes) -> int:
    """Read the reply to `line`, check the session rules, return its code (0: closed)."""
    state.log.append(f"{line[:60]!r} -> ...")
    try:
        code, lines = await conn.reply()
    except _Closed:
        raise AssertionError(f"connection closed without a reply to {line[:60]!r}") from None
    state.log.pop()
    state.log.append(f"{line[:60]!r} -> {lines[0][:60]!r}")
    state.last_code = code
    if code >= 500:
        state.errors += 1
    if lines[0] == Reply.UNKNOWN_COMMAND.encode() + b"\r\n":
        state.unknown += 1
    if code == 421:
        assert Reply.TOO_MANY_ERRORS.encode() + b"\r\n" == lines[0], f"unexpected {lines[0]!r}"
        assert state.errors >= state.max_errors, f"421 after only {state.errors} errors"
    ends = code in (221, 421) or (code == 502 and b"goodbye" in lines[0])
    if code != 421 and state.errors >= state.max_errors:
        # The max_errors-th 5xx reply is followed by 421 and the end of the session.
        try:
            extra, extra_lines = await conn.reply()
        except _Closed:
            raise AssertionError(f"closed without 421 after {state.errors} errors") from None
        assert (421, Reply.TOO_MANY_ERRORS.encode() + b"\r\n") == (extra, extra_lines[0])
        ends = True
    if ends:
        await conn.expect_eof()
        state.closed = True
        return 0
    _track(state, command_word(line), code)
    return code


def _track(state: _State, word: bytes, code: int) -> None:
    if code == 250 and word in (b"EHLO", b"HELO", b"RSET"):
        state.mail, state.rcpts = False, 0
    elif code == 250 and word == b"MAIL":
        assert not state.mail, "a second MAIL accepted in one transaction"
        state.mail, state.rcpts = True, 0
    elif code == 250 and word == b"RCPT":
        assert state.mail, "RCPT accepted without MAIL"
        state.rcpts += 1
    elif code == 354:
        assert word == b"DATA", "354 to a line that is not DATA"
        assert state.rcpts > 0, "DATA accepted without recipients"


async def _data(conn: _Conn, state: _State, body: bytes, cuts: Sequence[float]) -> None:
    """After 354: send `body` (ended if it has no end), check the reply and what follows."""
    found = data_oracle(body)
    if found is None:
        body += b"\r\n.\r\n"
        found = data_oracle(body)
        assert found is not None
    content, rest = found
    head = body[: len(body) - len(rest)]
    after = [x if x.endswith(b"\n") else x + b"\r\n" for x in split_lines(rest)]
    if _at_risk(state, len(after) + 1):
        after = []  # the replies could end the session (see `_at_risk`)
    assume(all(command_word(x) != b"DATA" for x in after))
    data = head + b"".join(after)
    await conn.send(data, sorted({int(c * len(data)) for c in cuts} - {0}))
    try:
        code, lines = await conn.reply()
    except _Closed:
        raise AssertionError("connection closed without a reply to the end of data") from None
    state.log.append(f"<DATA content of {len(content)} octets> -> {lines[0][:60]!r}")
    state.last_code = code
    rcpts = state.rcpts
    state.mail, state.rcpts = False, 0
    if len(content) > state.size_limit:
        assert [b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"] == lines
        state.errors += 1
    else:
        match = _QUEUED.fullmatch(lines[0])
        assert match is not None, f"DATA of {len(content)} octets answered {lines!r}"
        state.queued[match.group(1).decode()] = (content, rcpts)
    if state.errors >= state.max_errors:
        extra, extra_lines = await conn.reply()
        assert (421, Reply.TOO_MANY_ERRORS.encode() + b"\r\n") == (extra, extra_lines[0])
        await conn.expect_eof()
        state.closed = True
        return
    for line in after:
        await _answer(conn, state, line)
        if state.closed:
            return


def _groups(lines: Sequence[bytes]) -> list[list[bytes]]:
    """Cut a step's lines after each DATA line (its reply decides what follows)."""
    groups: list[list[bytes]] = []
    group: list[bytes] = []
    for line in lines:
        group.append(line)
        if command_word(line) == b"DATA":
            groups.append(group)
            group = []
    if group:
        groups.append(group)
    return groups


def _bodies(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every stored body by id: (raw, total recipients over its entries)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT b.id, b.raw, e.rcpt_to FROM bodies b LEFT JOIN entries e ON e.body_id = b.id"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, tuple[bytes, int]] = {}
    for body_id, raw, rcpts in rows:
        count = len(json.loads(rcpts)) if rcpts is not None else 0
        prev = out.get(body_id, (raw, 0))[1]
        out[body_id] = (bytes(raw), prev + count)
    return out


class SmtpHarness:
    """Three running bridges in a private event loop; `check` runs one session."""

    def __init__(self, workdir: Path | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-smtp-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.loop = asyncio.new_event_loop()
        self.variants = variants(hash_password(PASSWORD, ln=4, r=8, p=1))
        self.bridges: list[Bridge] = []
        self.sessions = 0

    def __enter__(self) -> SmtpHarness:
        try:
            for variant in self.variants:
                config = load_config(_config_text(self.workdir, variant), {})
                bridge = self.loop.run_until_complete(
                    Bridge.start(config, smtp_port=0, run_worker=False)
                )
                self.bridges.append(bridge)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the bridges, let their tasks end, close the loop and the executor."""
        loop = self.loop
        try:
            for bridge in self.bridges:
                loop.run_until_complete(bridge.stop())
            self.bridges.clear()
            loop.run_until_complete(asyncio.sleep(0.05))
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
            if self._tmp is not None:
                self._tmp.cleanup()

    def check(self, session: Session) -> None:
        """Run `session`; AssertionError (with the exchange so far) on a violation."""
        self.sessions += 1
        self.loop.run_until_complete(self._check(session))

    async def _check(self, session: Session) -> None:
        variant = self.variants[session.variant % len(self.variants)]
        bridge = self.bridges[session.variant % len(self.bridges)]
        before = _bodies(bridge.spool.path)
        state = _State(max_errors=variant.max_errors, size_limit=variant.size_limit)
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.smtp_port, limit=2**20)
        conn = _Conn(reader, writer)
        try:
            try:
                assert 220 == (await conn.reply())[0]
                await _run_steps(conn, state, session.steps)
                if not state.closed and state.last_code == 334:
                    await _abort_auth(conn, state)
                if not state.closed:
                    await conn.send(b"QUIT\r\n")
                    await _answer(conn, state, b"QUIT\r\n")
                    assert state.closed, "QUIT did not end the session"
            except AssertionError as exc:
                exchange = "\n  ".join(state.log[-12:])
                raise AssertionError(
                    f"{exc}\n[{variant.name}] last exchanges:\n  {exchange}"
                ) from None
        finally:
            await conn.close()
        await _fresh_connection_works(bridge.smtp_port)
        after = _bodies(bridge.spool.path)
        new = {k: v for k, v in after.items() if k not in before}
        assert state.queued == new, (
            f"[{variant.name}] spool differs from the 250 replies: "
            f"expected {_summary(state.queued)}, stored {_summary(new)}"
        )


def _summary(bodies: dict[str, tuple[bytes, int]]) -> str:
    return repr({k: (v[0][:40], len(v[0]), v[1]) for k, v in bodies.items()})


async def _abort_auth(conn: _Conn, state: _State) -> None:
    """Answer a pending AUTH challenge with ``*`` (RFC 4954 §4: cancel the exchange)."""
    await conn.send(b"*\r\n")
    await _answer(conn, state, b"*\r\n")


def _at_risk(state: _State, lines: int) -> bool:
    """True when `lines` more replies could make the server end the session.

    It does so at the `max_errors`-th 5xx reply (421) and at aiosmtpd's fifth unknown
    command (502 "goodbye"). Lines pipelined past that point reach a closed socket, and
    the TCP RST it answers with can destroy the replies not yet read here, so a group
    that could cross the line is sent one line at a time.
    """
    return state.errors + lines >= state.max_errors or state.unknown + lines >= _UNKNOWN_BUDGET


async def _run_steps(conn: _Conn, state: _State, steps: Sequence[Step]) -> None:
    for step in steps:
        groups = _groups(step.lines)
        for index, group in enumerate(groups):
            one_by_one = _at_risk(state, len(group))
            if not one_by_one:
                await conn.send(b"".join(group), step.cuts if len(groups) == 1 else ())
            for line in group:
                if one_by_one:
                    await conn.send(line)
                code = await _answer(conn, state, line)
                if state.closed:
                    return
                if code == 354:  # DATA ends its group, so this is the group's last line
                    last = index == len(groups) - 1 and step.body is not None
                    body = step.body if last and step.body is not None else b"x\r\n"
                    await _data(conn, state, body, step.body_cuts)
                    if state.closed:
                        return


async def _fresh_connection_works(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = _Conn(reader, writer)
    try:
        assert 220 == (await conn.reply())[0], "no 220 on a fresh connection"
        await conn.send(b"EHLO after.example\r\n")
        assert 250 == (await conn.reply())[0], "no EHLO 250 on a fresh connection"
        await conn.send(b"QUIT\r\n")
        assert 221 == (await conn.reply())[0]
    finally:
        await conn.close()
