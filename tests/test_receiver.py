"""The local HTTPS receiver: certificates, storage, answers, and robustness against bad peers."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from bridge.receiver import (
    ReceivedMessage,
    Receiver,
    ReceiverOptions,
    ensure_certificates,
    serve_receiver,
    summarize,
)

DOC = {
    "version": 1,
    "id": "01JTEST",
    "envelope": {"mail_from": "bounce@example.com", "rcpt_to": ["b@example.org", "c@example.net"]},
    "from": {"name": "Anna", "email": "a@example.com"},
    "subject": "Grüße",
    "attachments": [{"filename": "x.txt"}, {"filename": "y.txt"}],
}
BODY = json.dumps(DOC, ensure_ascii=False, indent=1).encode()


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A verifying client context that also insists on RFC 5280 strictness (Python 3.13 default)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start receivers on 127.0.0.1 port 0 with the given options; all are closed afterwards."""
    started: list[Receiver] = []

    async def _start(**options: Any) -> Receiver:
        opts: ReceiverOptions = options  # type: ignore[assignment]
        rec = Receiver("127.0.0.1", 0, tmp_path / "rcv", **opts)
        await rec.start()
        started.append(rec)
        return rec

    yield _start
    for rec in started:
        await rec.close()


def client(rec: Receiver) -> httpx.AsyncClient:
    """An httpx client that verifies the receiver against its generated CA."""
    return httpx.AsyncClient(base_url=rec.url, verify=client_context(rec.cert_paths.ca_cert))


def stored(rec: Receiver) -> list[Path]:
    """The message files the receiver has written, oldest first."""
    return sorted((rec.directory / "messages").glob("*.json"))


class TestCertificates:
    def test_creates_ca_and_server_certificate(self, tmp_path: Path) -> None:
        """First start writes a CA and a server cert for the loopback names, keys 0600."""
        paths = ensure_certificates(tmp_path / "certs")

        ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ["localhost"] == san.get_values_for_type(x509.DNSName)
        assert ["127.0.0.1", "::1"] == [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        cert.verify_directly_issued_by(ca)
        assert 0o600 == paths.ca_key.stat().st_mode & 0o777
        assert 0o600 == paths.key.stat().st_mode & 0o777
        assert 0o644 == paths.ca_cert.stat().st_mode & 0o777
        assert [] == [p.name for p in paths.ca_cert.parent.iterdir() if p.name.startswith(".")]

    def test_reuses_existing_files(self, tmp_path: Path) -> None:
        """A second start keeps the CA and the server certificate byte for byte."""
        first = ensure_certificates(tmp_path)
        before = {p: p.read_bytes() for p in (first.ca_cert, first.ca_key, first.cert, first.key)}

        second = ensure_certificates(tmp_path)

        assert first == second
        assert before == {p: p.read_bytes() for p in before}

    def test_reissues_expiring_server_certificate_but_keeps_ca(self, tmp_path: Path) -> None:
        """A server cert within 30 days of expiry is re-issued by the same CA."""
        paths = ensure_certificates(tmp_path)
        ca_before, cert_before = paths.ca_cert.read_bytes(), paths.cert.read_bytes()

        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=380)
        ensure_certificates(tmp_path, now=later)

        assert ca_before == paths.ca_cert.read_bytes()
        assert cert_before != paths.cert.read_bytes()
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        assert cert.not_valid_after_utc > later + dt.timedelta(days=300)

    def test_reissues_when_a_host_is_missing_or_the_file_is_gone(self, tmp_path: Path) -> None:
        """A new host name, or a deleted cert.pem, gets a new server certificate."""
        paths = ensure_certificates(tmp_path)
        original = paths.cert.read_bytes()

        ensure_certificates(tmp_path, ("127.0.0.1", "receiver.test"))
        with_host = paths.cert.read_bytes()
        paths.cert.unlink()
        ensure_certificates(tmp_path, ("127.0.0.1", "receiver.test"))

        assert original != with_host
        san = x509.load_pem_x509_certificate(with_host).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        assert ["receiver.test"] == san.value.get_values_for_type(x509.DNSName)
        assert paths.cert.exists()

    def test_replaces_a_broken_ca_and_its_server_certificate(self, tmp_path: Path) -> None:
        """An unreadable CA is replaced, and the server cert is re-signed by the new one."""
        paths = ensure_certificates(tmp_path)
        paths.ca_cert.write_text("not a certificate")

        ensure_certificates(tmp_path)

        ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        x509.load_pem_x509_certificate(paths.cert.read_bytes()).verify_directly_issued_by(ca)


class TestSummary:
    def test_message_v1_line(self) -> None:
        """The line names key, From, envelope recipients, subject, attachments and size."""
        line = summarize(DOC, "key-1", 1234)

        expected = (
            'received key-1 from a@example.com to b@example.org, c@example.net "Grüße"'
            " (2 attachments, 1234 B)"
        )
        assert expected == line

    def test_any_json_shape_and_control_characters(self) -> None:
        """Odd shapes fall back to placeholders and control characters never reach the terminal."""
        odd = {
            "subject": "a\x1b[2Jb\nc",
            "from": None,
            "envelope": {"rcpt_to": "x"},
            "attachments": [1],
        }

        assert 'received - from <> to - "a?[2Jb?c" (1 attachment, 5 B)' == summarize(odd, None, 5)
        assert "received - from <> to - (no subject) (0 attachments, 2 B)" == summarize([], None, 2)


class TestReceiving:
    async def test_post_is_stored_verbatim_and_summarized(
        self, start: Callable[..., Any], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A POST is stored byte for byte, answered with its file id, and printed as one line."""
        rec = await start()
        async with client(rec) as http:
            response = await http.post(
                "/messages", content=BODY, headers={"Idempotency-Key": "01J/x"}
            )

        files = stored(rec)
        assert 200 == response.status_code
        assert [f"{response.json()['id']}.json"] == [f.name for f in files]
        assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-01J_x", response.json()["id"])
        assert BODY == files[0].read_bytes()
        line = capsys.readouterr().out.strip()
        assert re.fullmatch(
            r"\d\d:\d\d:\d\d received 01J/x from a@example.com to b@example.org, c@example.net"
            rf' "Grüße" \(2 attachments, {len(BODY)} B\)',
            line,
        )

    async def test_without_key_a_counter_names_the_file(self, start: Callable[..., Any]) -> None:
        """Requests without Idempotency-Key are numbered per receiver."""
        seen: list[ReceivedMessage] = []
        rec = await start(on_message=seen.append)
        async with client(rec) as http:
            ids = [(await http.post("/", json={"n": n})).json()["id"] for n in (1, 2)]

        assert ["000001", "000002"] == [i.rsplit("-", 1)[1] for i in ids]
        assert [{"n": 1}, {"n": 2}] == [m.document for m in seen]
        assert [None, None] == [m.idempotency_key for m in seen]
        assert [m.path for m in seen] == stored(rec)

    async def test_chunked_body_is_accepted(self, start: Callable[..., Any]) -> None:
        """A body sent with chunked transfer encoding is reassembled and stored."""

        async def chunks() -> AsyncIterator[bytes]:
            for part in (BODY[:10], BODY[10:]):
                yield part

        rec = await start()
        async with client(rec) as http:
            response = await http.post("/messages", content=chunks())

        assert 200 == response.status_code
        assert "chunked" == response.request.headers["transfer-encoding"]
        assert BODY == stored(rec)[0].read_bytes()

    async def test_keep_alive_serves_two_requests_on_one_connection(
        self, start: Callable[..., Any]
    ) -> None:
        """Two requests in a row travel over the same TLS connection."""
        rec = await start()
        async with client(rec) as http:
            first = await http.post("/messages", json={"n": 1})
            second = await http.post("/messages", json={"n": 2})
            ports = [
                r.extensions["network_stream"].get_extra_info("client_addr")[1]
                for r in (first, second)
            ]

        assert [200, 200] == [first.status_code, second.status_code]
        assert ports[0] == ports[1]
        assert 2 == len(stored(rec))


class TestRefusals:
    async def test_wrong_or_missing_token_gets_401(self, start: Callable[..., Any]) -> None:
        """With a token set, only `Authorization: Bearer <token>` is accepted."""
        rec = await start(token="s3cret")
        async with client(rec) as http:
            missing = await http.post("/messages", json=DOC)
            wrong = await http.post("/messages", json=DOC, headers={"Authorization": "Bearer nope"})
            basic = await http.post("/messages", json=DOC, auth=("s3cret", ""))
            stored_before = stored(rec)
            good = await http.post(
                "/messages", json=DOC, headers={"Authorization": "bearer s3cret"}
            )

        assert [401, 401, 401, 200] == [r.status_code for r in (missing, wrong, basic, good)]
        assert "Bearer" == wrong.headers["www-authenticate"]
        assert [] == stored_before

    async def test_non_post_gets_405(self, start: Callable[..., Any]) -> None:
        """GET and PUT are refused with 405 and an Allow header, and the connection stays usable."""
        rec = await start()
        async with client(rec) as http:
            get = await http.get("/messages")
            put = await http.put("/messages", json=DOC)
            post = await http.post("/messages", json=DOC)

        assert [405, 405, 200] == [r.status_code for r in (get, put, post)]
        assert "POST" == get.headers["allow"]
        assert 1 == len(stored(rec))

    @pytest.mark.parametrize("chunked", [False, True])
    async def test_oversized_body_gets_413_and_is_not_stored(
        self, start: Callable[..., Any], chunked: bool
    ) -> None:
        """A body over max_body_size is refused, with or without a Content-Length."""

        async def chunks() -> AsyncIterator[bytes]:
            yield b"[" + b"1," * 600 + b"1]"

        rec = await start(max_body_size=1024)
        content: Any = chunks() if chunked else b"[" + b"1," * 600 + b"1]"
        async with client(rec) as http:
            response = await http.post("/messages", content=content)
            after = await http.post("/messages", json={"small": True})

        assert 413 == response.status_code
        assert "close" == response.headers["connection"]
        assert 200 == after.status_code
        assert 1 == len(stored(rec))

    async def test_non_json_body_gets_400_and_is_not_stored(
        self, start: Callable[..., Any]
    ) -> None:
        """A body that does not parse as JSON is refused and nothing is written."""
        rec = await start()
        async with client(rec) as http:
            response = await http.post("/messages", content=b"{not json")

        assert 400 == response.status_code
        assert [] == stored(rec)

    async def test_malformed_request_gets_400_and_others_are_unaffected(
        self, start: Callable[..., Any]
    ) -> None:
        """A garbled request line is answered 400; a plain-HTTP peer is dropped; serving goes on."""
        rec = await start()
        ctx = client_context(rec.cert_paths.ca_cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", rec.port, ssl=ctx)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        answer = await reader.read()
        writer.close()
        plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", rec.port)
        plain_writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        plain_answer = await plain_reader.read()
        plain_writer.close()
        async with client(rec) as http:
            response = await http.post("/messages", json=DOC)

        assert answer.startswith(b"HTTP/1.1 400 ")
        assert not plain_answer.startswith(b"HTTP")
        assert 200 == response.status_code

    async def test_silent_connection_is_dropped_without_blocking_others(
        self, start: Callable[..., Any]
    ) -> None:
        """A peer that sends half a request and stalls is cut off; others are served meanwhile."""
        rec = await start(idle_timeout=0.3)
        ctx = client_context(rec.cert_paths.ca_cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", rec.port, ssl=ctx)
        writer.write(b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        await writer.drain()
        async with client(rec) as http:
            response = await http.post("/messages", json=DOC)
        leftover = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()

        assert 200 == response.status_code
        assert b"" == leftover
        assert 1 == len(stored(rec))


class TestScripting:
    async def test_scripted_statuses_then_default(
        self, start: Callable[..., Any], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`statuses` answer the first requests in order, with Retry-After, and store nothing."""
        rec = await start(statuses=[500, 429], retry_after=3, status=202)
        async with client(rec) as http:
            answers = [await http.post("/messages", json=DOC) for _ in range(3)]

        assert [500, 429, 202] == [r.status_code for r in answers]
        assert ["3", "3", None] == [r.headers.get("retry-after") for r in answers]
        assert 1 == len(stored(rec))
        lines = capsys.readouterr().out.splitlines()
        assert ["answered 500 to - (not stored)", "answered 429 to - (not stored)"] == [
            line.split(" ", 1)[1] for line in lines[:2]
        ]


class TestLifecycle:
    async def test_close_drops_idle_keep_alive_connections(self, start: Callable[..., Any]) -> None:
        """Closing the receiver ends open connections instead of waiting for the peer."""
        rec = await start()
        ctx = client_context(rec.cert_paths.ca_cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", rec.port, ssl=ctx)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        head = await reader.readuntil(b"\r\n\r\n")

        await asyncio.wait_for(rec.close(), timeout=5)
        rest = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()

        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b'"}\n' == rest[-3:]

    async def test_serve_receiver_sets_ready_and_stops_on_cancel(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """serve_receiver prints where it listens, sets `ready`, and ends when cancelled."""
        ready = asyncio.Event()
        task = asyncio.create_task(serve_receiver("127.0.0.1", 0, tmp_path, ready=ready))
        await asyncio.wait_for(ready.wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert re.search(r"listening on https://127\.0\.0\.1:\d+/messages", capsys.readouterr().out)

    def test_run_receiver_exits_cleanly_on_sigterm(self, tmp_path: Path) -> None:
        """The CLI entry point answers requests and exits 0 on SIGTERM."""
        code = (
            "import sys; from pathlib import Path; from bridge.receiver import run_receiver;"
            "sys.exit(run_receiver('127.0.0.1', 0, Path(sys.argv[1])))"
        )
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root)}
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        port = int(re.findall(r":(\d+)/messages", first)[0])
        response = httpx.post(
            f"https://127.0.0.1:{port}/messages",
            json=DOC,
            verify=client_context(tmp_path / "ca.pem"),
        )
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)

        assert 200 == response.status_code
        assert 0 == proc.returncode
        assert out.rstrip().endswith("receiver stopped")
