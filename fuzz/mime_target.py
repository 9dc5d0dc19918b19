"""Fuzz target for the MIME side: parser, message-v1 payload, raw-MIME preparation, adapters.

Everything here runs after a 250, so a crash or a hang is lost or stuck mail. For every
input (raw bytes + an envelope) `check` asserts:

* `parse_message` returns a `Message` within `MAX_SECONDS`, never raises;
* the envelope comes through unchanged, and every ``bcc`` address is an envelope
  recipient that is not in To/Cc (the envelope is the delivery authority);
* `message_v1` gives a document valid against ``message-v1.schema.json`` that encodes as
  strict UTF-8 JSON (no lone surrogates from 8-bit headers);
* `prepare_raw` returns CRLF-only bytes with no line over 998 octets, and is a fixed
  point: preparing its own output changes nothing;
* every API adapter that needs no token grant builds its first request from the message,
  and every recipient address in that request is an envelope recipient. The one refusal
  allowed is a permanent failure for a message with no sender at all (no From header,
  null MAIL FROM, no default_sender).

Inputs are the shipped test mails (``tests/fixtures/mail``) and, where present, the
shared case corpus, mutated at the byte level and with MIME-aware splices, plus
generated multipart trees with hostile headers.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from email.utils import getaddresses
from functools import cache
from pathlib import Path
from typing import Any

import httpx
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from bridge.mime import parse_message
from bridge.model import Envelope, Message, Permanent
from bridge.payload import message_v1
from bridge.providers import get
from bridge.providers.base import Provider, ProviderSettings
from bridge.providers.rawmime import MAX_LINE_OCTETS, prepare_raw

__all__ = ["MAX_SECONDS", "check", "inputs"]

#: Seconds one input may take through parser, payload and adapters (a hang otherwise).
MAX_SECONDS = 5.0
#: Seeds larger than this are skipped (case 27 alone is 5 MB and would only slow things).
_MAX_SEED = 256 * 1024

_ROOT = Path(__file__).resolve().parents[1]
_SCHEMA = _ROOT / "bridge" / "schemas" / "message-v1.schema.json"
_SEED_DIRS = (_ROOT / "tests" / "fixtures" / "mail", _ROOT.parent / "shared" / "cases")
_RECEIVED = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)

# Settings for each adapter whose first request needs no token grant.
_ACCOUNTS: dict[str, dict[str, Any]] = {
    "webhook": {"url": "https://hooks.example/messages", "include_raw": True},
    "sendgrid": {"api_key": "SG.fuzz"},
    "mailgun": {"api_key": "key-fuzz", "domain": "mg.example.com"},
    "postmark": {"server_token": "pm-fuzz"},
    "resend": {"api_key": "re_fuzz"},
    "brevo": {"api_key": "xkeysib-fuzz"},
    "mailjet": {"api_key": "mj-fuzz", "secret_key": "mj-secret"},
    "sparkpost": {"api_key": "sp-fuzz"},
    "ses": {"region": "eu-west-1", "access_key_id": "AKIDFUZZ", "secret_access_key": "s"},
}


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(json.loads(_SCHEMA.read_text("utf-8")))


@cache
def _providers() -> dict[str, Provider[ProviderSettings]]:
    out: dict[str, Provider[ProviderSettings]] = {}
    for name, settings in _ACCOUNTS.items():
        kind = get(name)
        out[name] = kind.create(kind.parse_settings(settings))
    return out


@cache
def seeds() -> tuple[bytes, ...]:
    """The seed corpus: every shipped test mail and shared case small enough to mutate."""
    found: list[bytes] = []
    for folder in _SEED_DIRS:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in (".eml", ".smtp") and path.stat().st_size <= _MAX_SEED:
                found.append(path.read_bytes())
    return tuple(found)


# --------------------------------------------------------------------------- inputs

_SNIPPETS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"--",
    b"\r\n--b\r\n",
    b"\r\n--b--\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b'Content-Type: multipart/alternative; boundary="b"\r\n',
    b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/plain; charset=x-unknown\r\n",
    b'Content-Type: text/html; charset="utf-7"\r\n',
    b"Content-Type: text/plain; charset*=utf-8''%E2%82%AC\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''%FF%FE; filename*1=\"../x\"\r\n",
    b"Content-ID: <img@x>\r\n",
    b"Subject: =?utf-8?B?w6TDtsO8?= =?iso-8859-1?Q?=E4?= =?bogus?X?zz?=\r\n",
    b"From: =?utf-8?q?J=C3=B6rg?= <j\xc3\xb6rg@b\xc3\xbccher.example>\r\n",
    b"To: undisclosed-recipients:;\r\n",
    b'To: "a, b" <a@example.org>, (comment) b@example.org, <>, @\r\n',
    b"Cc: =?utf-8?b?!!!?= <c@example.net>\r\n",
    b"Bcc: hidden@example.org\r\n",
    b"Date: Mon, 32 Foo 99999 25:61:61 +9999\r\n",
    b"Message-ID: <a@b>\r\nMessage-ID: <c@d>\r\n",
    b"=?utf-8?q?",
    b"=\r\n",
    b"=XY",
    b"\xff\xfe\x00",
    b"\x80\x9f\xe4",
    b"\t folded\r\n",
    b"x" * 1200,
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" * 40,
]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "snippet", "delete", "dup", "cut"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "snippet":
            data[pos:pos] = draw(st.sampled_from(_SNIPPETS))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif kind == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
        elif kind == "cut":
            del data[pos:]
    return bytes(data)


_TEXT = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["Grüße", "日本語", "=?utf-8?B?w6Q=?=", "a\x00b", "\u2028", ""]),
)


@st.composite
def _header(draw: st.DrawFn) -> bytes:
    name = draw(
        st.sampled_from(
            ["Subject", "From", "To", "Cc", "Reply-To", "Date", "Message-ID", "X-Custom"]
        )
    )
    value = draw(st.one_of(_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
                           st.sampled_from(_SNIPPETS)))  # fmt: skip
    return name.encode() + b":" + draw(st.sampled_from([b" ", b""])) + value + b"\r\n"


@st.composite
def _entity(draw: st.DrawFn, depth: int) -> bytes:
    """One MIME entity (headers + body); multiparts recurse up to `depth`."""
    if depth > 0 and draw(st.integers(0, 2)) == 0:
        boundary = draw(st.sampled_from([b"b", b"=_x", b"b" * 70, b"", b"b b"]))
        sub = draw(st.sampled_from([b"mixed", b"alternative", b"related", b"digest"]))
        parts = draw(st.lists(_entity(depth - 1), max_size=4))
        body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n"
        head = b"Content-Type: multipart/" + sub + b'; boundary="' + boundary + b'"\r\n'
        return head + b"\r\n" + body
    ctype = draw(
        st.sampled_from(
            [
                b"text/plain",
                b"text/html",
                b"image/png",
                b"application/octet-stream",
                b"message/rfc822",
                b"application/ms-tnef",
                b"text/calendar",
            ]
        )
    )
    charset = draw(st.sampled_from([b"", b"; charset=utf-8", b"; charset=iso-8859-1",
                                    b"; charset=x-bogus", b"; charset=utf-16"]))  # fmt: skip
    cte = draw(st.sampled_from([b"", b"base64", b"quoted-printable", b"8bit", b"binary", b"x"]))
    head = b"Content-Type: " + ctype + charset + b"\r\n"
    if cte:
        head += b"Content-Transfer-Encoding: " + cte + b"\r\n"
    if draw(st.booleans()):
        disposition = draw(st.sampled_from([b"attachment", b"inline", b"bogus"]))
        filename = draw(_TEXT).encode("utf-8", "surrogatepass").replace(b'"', b"")
        head += b"Content-Disposition: " + disposition + b'; filename="' + filename + b'"\r\n'
    if draw(st.booleans()):
        head += b"Content-ID: <" + draw(st.binary(max_size=12)).replace(b">", b"") + b">\r\n"
    return head + b"\r\n" + draw(st.one_of(st.binary(max_size=200), st.sampled_from(_SNIPPETS)))


@st.composite
def _generated(draw: st.DrawFn) -> bytes:
    headers = b"".join(draw(st.lists(_header(), max_size=8)))
    return headers + b"MIME-Version: 1.0\r\n" + draw(_entity(3))


_RECIPIENTS = ["b@example.org", "c@example.net", "Anna@Example.org", "jörg@bücher.example", "x@y"]


@st.composite
def _envelope(draw: st.DrawFn) -> Envelope:
    rcpts = draw(st.lists(st.sampled_from(_RECIPIENTS), min_size=1, max_size=4, unique=True))
    return Envelope(
        mail_from=draw(st.sampled_from(["", "a@example.com", "jörg@bücher.example"])),
        rcpt_to=tuple(rcpts),
        smtputf8=draw(st.booleans()),
    )


@st.composite
def inputs(draw: st.DrawFn) -> tuple[bytes, Envelope]:
    """A message (mutated seed or generated tree) and the envelope it arrived with."""
    raw = draw(st.one_of(_mutated(), _generated())) if seeds() else draw(_generated())
    return raw, draw(_envelope())


# --------------------------------------------------------------------------- the checks


def check(raw: bytes, envelope: Envelope) -> None:
    """Run one input through every pure stage after the 250; AssertionError on a fault."""
    started = time.monotonic()
    message = parse_message(raw, envelope, id="fuzz-1", received_at=_RECEIVED)
    assert isinstance(message, Message)
    assert envelope == message.envelope, "the envelope changed in parsing"
    visible = {a.email.lower() for a in (*message.to, *message.cc)}
    envelope_set = {r.lower() for r in envelope.rcpt_to}
    for address in message.bcc:
        key = address.email.lower()
        assert key in envelope_set, f"bcc {address.email!r} is not an envelope recipient"
        assert key not in visible, f"bcc {address.email!r} is also in To/Cc"

    document = message_v1(message, include_raw=True)
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.path))
    assert not errors, f"message-v1 invalid at {list(errors[0].path)}: {errors[0].message}"
    json.dumps(document, ensure_ascii=False).encode("utf-8")  # no lone surrogates

    prepared = prepare_raw(raw)
    _assert_wire_ready(prepared)
    assert prepared == prepare_raw(prepared), "prepare_raw is not a fixed point"

    for name, provider in _providers().items():
        _check_adapter(name, provider, message)
    elapsed = time.monotonic() - started
    assert elapsed < MAX_SECONDS, f"{elapsed:.1f} s for {len(raw)} octets (hang)"


# A header field (or continuation) with no whitespace to fold at may stay long: folding
# elsewhere would change its value (bridge/providers/rawmime.py, change 4).
_UNFOLDABLE = re.compile(rb"[\x21-\x39\x3b-\x7e]+:[ \t]?[^ \t]*|[ \t][^ \t]*")


def _assert_wire_ready(data: bytes) -> None:
    lines = data.split(b"\r\n")
    for number, line in enumerate(lines):
        assert b"\n" not in line, f"bare CR/LF in line {number}"
        assert b"\r" not in line, f"bare CR/LF in line {number}"
        if len(line) > MAX_LINE_OCTETS:
            assert _UNFOLDABLE.fullmatch(line), f"line {number} has {len(line)} octets"


def _check_adapter(name: str, provider: Provider[ProviderSettings], message: Message) -> None:
    flow = provider.flow(message, _RECEIVED.timestamp())
    try:
        request = next(flow)
    except StopIteration as stop:
        outcome = stop.value
    else:
        outcome = None
    finally:
        flow.close()
    if outcome is not None:
        # Decided without a request: only a message with no sender at all (no From, null
        # MAIL FROM, no default_sender) may end here, as a permanent failure.
        assert isinstance(outcome, Permanent), f"{name}: {outcome!r} without a request"
        assert message.from_ is None, f"{name}: {outcome!r} for a message with a sender"
        return
    assert isinstance(request, httpx.Request), f"{name}: {request!r}"
    # The webhook reports the header addresses as they are; its recipients are `envelope`.
    if name != "webhook" and request.headers.get("content-type", "").startswith("application/json"):
        sent = _json_recipients(json.loads(request.content))
        allowed = {r.lower() for r in message.envelope.rcpt_to}
        stray = {a for a in sent if a.lower() not in allowed}
        assert not stray, f"{name}: sends to {sorted(stray)} outside the envelope"


_RECIPIENT_KEYS = {"to", "cc", "bcc", "To", "Cc", "Bcc", "recipients"}


def _json_recipients(doc: Any) -> set[str]:
    """Every address under a recipient key of a JSON request body."""
    found: set[str] = set()

    def addresses(value: Any) -> None:
        if isinstance(value, str):
            found.update(addr for _, addr in getaddresses([value]) if addr)
        elif isinstance(value, list):
            for item in value:
                addresses(item)
        elif isinstance(value, dict):
            for key in ("email", "Email", "address", "Address"):
                if isinstance(value.get(key), str):
                    found.add(value[key])
                    return
                if isinstance(value.get(key), dict):
                    addresses(value[key])
                    return

    def walk(value: Any, key: str | None) -> None:
        if key in _RECIPIENT_KEYS:
            addresses(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if k not in ("message", "envelope", "headers", "Headers", "content"):
                    walk(v, k)
        elif isinstance(value, list):
            for item in value:
                walk(item, key)

    walk(doc, None)
    return found
