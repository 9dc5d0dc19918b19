"""`smtp-bridge receive`: a small local HTTPS receiver for trying the bridge out and for tests.

It speaks HTTP/1.1 through h11 (sans-IO) over asyncio TLS streams, with a private CA that
`ensure_certificates` creates on first start, so the bridge verifies TLS for real
(`ca_file: var/receiver/ca.pem`) instead of switching verification off.

Per request, in this order: non-POST → 405; wrong or missing bearer token (when one is
set) → 401; body over ``max_body_size`` → 413 and the connection closes; body that is not
JSON → 400. Anything else gets the next scripted status (``statuses``, then ``status``
for ever). A 2xx answer stores the body verbatim as ``messages/<UTC time>-<key>.json`` and
returns ``{"id": "<file id>"}``; any other answer stores nothing, so a message counts as
received exactly when the bridge was told so. ``retry_after`` adds a ``Retry-After``
header to every scripted non-2xx answer. Each request prints one line to stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import http.client
import inspect
import ipaddress
import itertools
import json
import os
import re
import signal
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import h11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertPaths", "ReceivedMessage", "Receiver", "ReceiverOptions", "ensure_certificates"]
__all__ += ["run_receiver", "serve_receiver", "summarize"]

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_DIRECTORY = Path("var/receiver")
MAX_BODY_SIZE = 64 * 1024 * 1024
_RENEW = dt.timedelta(days=30)
_KEY_RE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where `ensure_certificates` keeps the CA and the server certificate (all PEM)."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One stored request body, as handed to ``on_message``."""

    id: str
    path: Path
    idempotency_key: str | None
    body: bytes
    document: Any


_Pair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
OnMessage = Callable[[ReceivedMessage], Awaitable[None] | None]


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a temp file next to `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load(cert_path: Path, key_path: Path) -> _Pair | None:
    """The certificate and its key; None if either is missing or unreadable, or they differ."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == cert.public_key():
        return cert, key
    return None


def _save(pair: _Pair, cert_path: Path, key_path: Path) -> None:
    pem = serialization.Encoding.PEM
    key = pair[1].private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(key_path, key, 0o600)
    _write_atomic(cert_path, pair[0].public_bytes(pem), 0o644)


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _fits(
    cert: x509.Certificate, ca: x509.Certificate, hosts: Sequence[str], now: dt.datetime
) -> bool:
    """Signed by `ca`, names every host, and more than the renewal window from expiry."""
    try:
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return set(_san(hosts)) <= set(names) and now + _RENEW < cert.not_valid_after_utc


def _issue(
    cn: str,
    signer: _Pair | None,
    now: dt.datetime,
    days: int,
    *exts: tuple[x509.ExtensionType, bool],
) -> _Pair:
    """A new P-256 key and its certificate, signed by `signer` (self-signed when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = signer or (None, key)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate a little clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        # Python 3.13's default VERIFY_X509_STRICT wants the AKI on issued certificates.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    for ext, critical in exts:
        builder = builder.add_extension(ext, critical)
    return builder.sign(issuer_key, hashes.SHA256()), key


def ensure_certificates(
    directory: Path = DEFAULT_DIRECTORY,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    now: dt.datetime | None = None,
) -> CertPaths:
    """Create, or reuse, a private CA and a server certificate signed by it.

    The CA (10 years) is reused while it is valid and matches its key; a new CA means a new
    server certificate. The server certificate (397 days) is re-issued when it is missing,
    unreadable, not signed by the CA, within 30 days of expiry, or does not name every
    host. Keys are written 0600, every file atomically.

    Args:
        directory: Where ``ca.pem``, ``ca-key.pem``, ``cert.pem`` and ``key.pem`` live.
        hosts: Host names and IP addresses the server certificate must be valid for.
        now: The current time (aware); the clock is read when omitted.

    Returns:
        The paths of the four files.
    """
    now = now or dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(*(directory / n for n in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem")))
    ca = _load(paths.ca_cert, paths.ca_key)
    if ca is None or ca[0].not_valid_after_utc <= now + _RENEW:
        ca_usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        ca_basic = x509.BasicConstraints(ca=True, path_length=0)
        ca = _issue("smtp-bridge receiver CA", None, now, 3650, (ca_basic, True), (ca_usage, True))
        _save(ca, paths.ca_cert, paths.ca_key)
    server = _load(paths.cert, paths.key)
    if server is None or not _fits(server[0], ca[0], hosts, now):
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        basic = x509.BasicConstraints(ca=False, path_length=None)
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
        san = x509.SubjectAlternativeName(_san(hosts))
        exts = ((basic, True), (usage, True), (eku, False), (san, False))
        _save(_issue("smtp-bridge receiver", ca, now, 397, *exts), paths.cert, paths.key)
    return paths


def _address(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("email")
    return value if isinstance(value, str) and value else None


def _clean(text: str, limit: int) -> str:
    """Make untrusted text safe for one terminal line: no control characters, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(document: Any, key: str | None, size: int) -> str:
    """The console line for a stored message-v1 document; tolerant of any JSON shape.

    Args:
        document: The parsed body.
        key: The request's idempotency key, if it sent one.
        size: The body length in bytes.

    Returns:
        ``received <key> from <sender> to <rcpts> "<subject>" (<n> attachments, <size> B)``.
    """
    doc: dict[str, Any] = document if isinstance(document, dict) else {}
    env = doc.get("envelope") if isinstance(doc.get("envelope"), dict) else {}
    assert isinstance(env, dict)
    sender = _address(doc.get("from")) or _address(env.get("mail_from")) or "<>"
    rcpts = env.get("rcpt_to")
    to = ", ".join(r for r in rcpts if isinstance(r, str)) if isinstance(rcpts, list) else ""
    subject = doc.get("subject")
    subj = f'"{_clean(subject, 80)}"' if isinstance(subject, str) else "(no subject)"
    atts = doc.get("attachments")
    n = len(atts) if isinstance(atts, list) else 0
    label = _clean(key or _address(doc.get("id")) or "-", 80)
    return (
        f"received {label} from {_clean(sender, 80)} to {_clean(to or '-', 200)} {subj}"
        f" ({n} attachment{'' if n == 1 else 's'}, {size} B)"
    )


def _say(line: str) -> None:
    print(f"{dt.datetime.now().astimezone():%H:%M:%S} {line}", flush=True)


class ReceiverOptions(TypedDict, total=False):
    """How a `Receiver` answers; every key is optional.

    Attributes:
        status: The answer once ``statuses`` is used up (default 200).
        statuses: Answers for the first valid requests, in order (e.g. ``[503, 200]``).
        retry_after: ``Retry-After`` value sent with every scripted non-2xx answer.
        token: When set, requests must carry ``Authorization: Bearer <token>``.
        on_message: Called (and awaited if it returns an awaitable) after each store.
        max_body_size: Larger bodies get 413 and the connection is closed (default 64 MiB).
        idle_timeout: Seconds a connection may stay silent before it is dropped (default 60).
    """

    status: int
    statuses: Sequence[int]
    retry_after: str | int | None
    token: str | None
    on_message: OnMessage | None
    max_body_size: int
    idle_timeout: float


class Receiver:
    """The HTTPS receiver; `start` binds, `port` and `url` say where, `close` stops it.

    Args:
        host: Address to bind.
        port: Port to bind; 0 picks a free one (read it back from `port`).
        directory: Holds the certificates and ``messages/``.
        **options: See `ReceiverOptions`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8443,
        directory: Path = DEFAULT_DIRECTORY,
        **options: Unpack[ReceiverOptions],
    ) -> None:
        self.host, self.directory, self._port = host, Path(directory), port
        self.status = options.get("status", 200)
        self._script = iter(list(options.get("statuses", ())))
        retry_after = options.get("retry_after")
        self.retry_after = None if retry_after is None else str(retry_after)
        self.token, self.on_message = options.get("token"), options.get("on_message")
        self.max_body_size = options.get("max_body_size", MAX_BODY_SIZE)
        self.idle_timeout = options.get("idle_timeout", 60.0)
        self.cert_paths = CertPaths(*(self.directory / "-",) * 4)  # the real ones after start()
        self._counter = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The bound port (after `start`), or the requested one."""
        return self._port

    @property
    def url(self) -> str:
        """``https://host:port``, IPv6 literals bracketed."""
        return f"https://{f'[{self.host}]' if ':' in self.host else self.host}:{self._port}"

    async def start(self) -> None:
        """Create or reuse the certificates, then start listening.

        Raises:
            OSError: The address cannot be bound.
        """
        hosts: tuple[str, ...] = DEFAULT_HOSTS
        if self.host not in ("", "0.0.0.0", "::", *DEFAULT_HOSTS):  # noqa: S104 (a comparison)
            hosts = (*DEFAULT_HOSTS, self.host)
        self.cert_paths = await asyncio.to_thread(ensure_certificates, self.directory, hosts)
        (self.directory / "messages").mkdir(exist_ok=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_paths.cert, self.cert_paths.key)
        self._server = await asyncio.start_server(
            self._connection, self.host, self._port, ssl=ctx, ssl_handshake_timeout=10.0
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Start, print where, set `ready`, and serve until cancelled; then close."""
        await self.start()
        try:
            _say(f"listening on {self.url}/messages, CA {self.cert_paths.ca_cert}")
            if ready is not None:
                ready.set()
            await asyncio.get_running_loop().create_future()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while await self._cycle(conn, reader, writer):
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            _say(f"rejected {exc.error_status_hint}: {_clean(str(exc), 120)}")
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(OSError, h11.LocalProtocolError):
                    await _send(conn, writer, exc.error_status_hint, {"error": str(exc)})
        except OSError:  # resets, TLS errors and idle timeouts: the peer is gone
            pass
        except asyncio.CancelledError:
            pass  # close() cancels us: 3.11's start_server logs a handler that ends cancelled
        except Exception as exc:  # one broken connection must never stop the others
            print(f"receiver: connection failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(5.0):
                    await writer.wait_closed()
            self._tasks.discard(task)

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        while (event := conn.next_event()) is h11.NEED_DATA:
            async with asyncio.timeout(self.idle_timeout):
                conn.receive_data(await reader.read(65536))
        return event

    async def _cycle(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; True when the connection stays open for another."""
        request = await self._next(conn, reader)
        if not isinstance(request, h11.Request):
            return False
        headers = dict(request.headers)  # h11 lower-cases names and rejects duplicate lengths
        declared = headers.get(b"content-length")
        too_big = declared is not None and int(declared) > self.max_body_size
        if not too_big and conn.they_are_waiting_for_100_continue:
            writer.write(
                conn.send(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
                or b""
            )
        body = bytearray()
        while not too_big and not isinstance(
            event := await self._next(conn, reader), h11.EndOfMessage
        ):
            if not isinstance(event, h11.Data):
                return False
            body += event.data
            too_big = len(body) > self.max_body_size
        status, doc, extra = await self._answer(request, headers, bytes(body), too_big)
        await _send(conn, writer, status, doc, extra)
        if conn.their_state is not h11.DONE:  # answered early: read on so no RST eats the answer
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    while await reader.read(65536):
                        pass
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _answer(
        self, request: h11.Request, headers: dict[bytes, bytes], body: bytes, too_big: bool
    ) -> tuple[int, dict[str, str], list[tuple[str, str]]]:
        """Status, JSON answer and extra headers for one complete (or oversized) request."""
        where = f"{request.method.decode()} {_clean(request.target.decode(), 80)}"
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        authorized = self.token is None or (
            scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token.encode())
        )
        refusal: tuple[int, str, list[tuple[str, str]]] | None = None
        if request.method != b"POST":
            refusal = (405, "only POST is accepted", [("Allow", "POST")])
        elif not authorized:
            refusal = (401, "missing or wrong bearer token", [("WWW-Authenticate", "Bearer")])
        elif too_big:
            refusal = (413, f"body larger than {self.max_body_size} bytes", [])
        if refusal is None:
            try:
                document = json.loads(body)
            except (ValueError, RecursionError):
                refusal = (400, f"body is not JSON ({len(body)} B)", [])
        if refusal is not None:
            _say(f"rejected {refusal[0]} {where}: {refusal[1]}")
            return refusal[0], {"error": refusal[1]}, refusal[2]
        raw_key = headers.get(b"idempotency-key")
        key = raw_key.decode("utf-8", "replace") if raw_key else None
        status = next(self._script, self.status)
        if not 200 <= status < 300:
            _say(f"answered {status} to {_clean(key or '-', 80)} (not stored)")
            extra = [("Retry-After", self.retry_after)] if self.retry_after else []
            return status, {"error": f"scripted status {status}"}, extra
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        file_id = f"{stamp}-{_KEY_RE.sub('_', key)[:100] if key else f'{next(self._counter):06d}'}"
        path = self.directory / "messages" / f"{file_id}.json"
        await asyncio.to_thread(_write_atomic, path, body, 0o644)
        _say(summarize(document, key, len(body)))
        if self.on_message is not None:
            result = self.on_message(ReceivedMessage(file_id, path, key, body, document))
            if inspect.isawaitable(result):
                await result
        return status, {"id": file_id}, []


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    doc: dict[str, str],
    extra: Sequence[tuple[str, str]] = (),
) -> None:
    """Write one JSON response; ask to close when the request body was not read to its end."""
    payload = b"" if status in (204, 304) else json.dumps(doc).encode() + b"\n"
    headers = [("Server", "smtp-bridge-receiver"), *extra]
    if payload:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    if conn.their_state is not h11.DONE:
        headers.append(("Connection", "close"))
    for event in (
        h11.Response(
            status_code=status,
            headers=headers,
            reason=http.client.responses.get(status, "").encode(),
        ),
        h11.Data(data=payload),
    ):
        writer.write(conn.send(event) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


async def serve_receiver(
    host: str = "127.0.0.1",
    port: int = 8443,
    directory: Path = DEFAULT_DIRECTORY,
    *,
    ready: asyncio.Event | None = None,
    **options: Unpack[ReceiverOptions],
) -> None:
    """Run a `Receiver` until cancelled (see `Receiver` and `ReceiverOptions`).

    Args:
        host: Address to bind.
        port: Port to bind.
        directory: Holds the certificates and ``messages/``.
        ready: Set once the socket is bound and the startup line is printed.
        **options: See `ReceiverOptions`.
    """
    await Receiver(host, port, directory, **options).serve(ready)


def run_receiver(
    host: str = "127.0.0.1",
    port: int = 8443,
    directory: Path = DEFAULT_DIRECTORY,
    **options: Unpack[ReceiverOptions],
) -> int:
    """`smtp-bridge receive`: serve until SIGINT or SIGTERM, then stop cleanly.

    Args:
        host: Address to bind.
        port: Port to bind.
        directory: Holds the certificates and ``messages/``.
        **options: See `ReceiverOptions`.

    Returns:
        The exit status, 0.

    Raises:
        OSError: The address cannot be bound.
    """

    async def main() -> None:
        serving = asyncio.create_task(serve_receiver(host, port, directory, **options))
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, serving.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        _say("receiver stopped")

    asyncio.run(main())
    return 0
