"""Test helpers for the OAuth adapters (Graph, Gmail): drive a flow against a script."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any
from urllib.parse import parse_qsl

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from bridge.mime import parse_message
from bridge.model import Envelope, Message, Outcome
from bridge.providers.base import Flow

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class Run:
    """What one flow sent, and what it returned."""

    requests: list[httpx.Request] = field(default_factory=list)
    outcome: Outcome | None = None


def drive(flow: Flow, handler: Handler, *, limit: int = 100) -> Run:
    """Run `flow`, answering each request with `handler(request)`; record everything."""
    run = Run()
    try:
        request = next(flow)
        for _ in range(limit):
            run.requests.append(request)
            request = flow.send(handler(request))
        raise AssertionError(f"flow sent more than {limit} requests")
    except StopIteration as stop:
        run.outcome = stop.value
    return run


def script(*responses: httpx.Response) -> Handler:
    """A handler that answers with `responses` in order."""
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        assert queue, f"unexpected request {request.method} {request.url}"
        return queue.pop(0)

    return handler


def token_response(token: str = "AT-1", expires_in: int = 3599) -> httpx.Response:  # noqa: S107
    """A token endpoint's success answer."""
    return httpx.Response(
        200, json={"token_type": "Bearer", "expires_in": expires_in, "access_token": token}
    )


def form(request: httpx.Request) -> dict[str, str]:
    """The form fields of a form-encoded request."""
    return dict(parse_qsl(request.content.decode("ascii"), keep_blank_values=True))


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a compact JWT, unverified."""
    head, body, _ = token.split(".")

    def part(text: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return doc

    return part(head), part(body)


def rsa_key_and_certificate() -> tuple[rsa.RSAPrivateKey, str, str]:
    """A fresh RSA key, its unencrypted PEM, and a self-signed certificate PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtp-bridge test")])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return key, key_pem, cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def mime(
    *,
    from_: str = "Harness Sender <sender@example.com>",
    to: str | None = "Anna Alpha <anna@example.org>",
    cc: str | None = None,
    subject: str = "Quarterly report",
    text: str = "Hello Anna,\n\nthe report is attached.\n",
    html: str | None = None,
    headers: dict[str, str] | None = None,
    attachments: Sequence[tuple[str, str, bytes]] = (),
) -> bytes:
    """A message as an SMTP client would send it."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = from_
    if to is not None:
        msg["To"] = to
    if cc is not None:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Message-ID"] = "<report-1@example.com>"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def message(raw: bytes, rcpt_to: tuple[str, ...], mail_from: str = "sender@example.com") -> Message:
    """`raw` parsed with `envelope`, as the delivery worker would."""
    return parse_message(
        raw,
        Envelope(mail_from=mail_from, rcpt_to=rcpt_to),
        id="01JF7Z6Q9R3M2N8K4H5G6F7D8C",
        received_at=dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC),
    )
