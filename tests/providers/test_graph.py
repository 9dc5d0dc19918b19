"""Microsoft Graph adapter: token grant, the three send paths, and answers."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import jwt
import pydantic
import pytest

from bridge import providers
from bridge.config import load_config
from bridge.model import Attachment, Delivered, Permanent, Retryable
from bridge.providers.graph import (
    MAX_REQUEST_BYTES,
    UPLOAD_CHUNK,
    GraphProvider,
    GraphSettings,
)
from tests.casefiles import load_eml_case, load_smtp_case, smtp_envelope, smtp_message
from tests.providers.oauthflow import (
    drive,
    form,
    jwt_parts,
    message,
    mime,
    rsa_key_and_certificate,
    script,
    token_response,
)

SCHEMA_PATH = Path("/work/shared/specs/msgraph/sendMail.derived.schema.json")
TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
SECRET = "harness~graph~client~secret~0123"
SENDER = "mailer@contoso.example"
TOKEN_URL = f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"
SEND_URL = f"https://graph.microsoft.com/v1.0/users/{SENDER}/sendMail"
USER_URL = f"https://graph.microsoft.com/v1.0/users/{SENDER}"


def provider(**overrides: Any) -> GraphProvider:
    raw: dict[str, Any] = {
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "client_secret": SECRET,
        "sender": SENDER,
    }
    raw.update(overrides)
    return GraphProvider(GraphSettings.model_validate(raw))


def schema() -> dict[str, Any]:
    if not SCHEMA_PATH.exists():  # pragma: no cover - the shared specs are outside the repo
        pytest.skip("Graph schema not available")
    doc: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return doc


def schema_errors(doc: Any, ref: str | None = None) -> list[str]:
    root = schema()
    target = root if ref is None else {"$ref": f"#/$defs/{ref}", "$defs": root["$defs"]}
    validator = jsonschema.Draft202012Validator(target)
    return [e.message for e in validator.iter_errors(doc)]


def simple_message(**kw: Any) -> Any:
    rcpts = kw.pop("rcpt_to", ("anna@example.org",))
    return message(mime(**kw), rcpts)


def graph_json(request: httpx.Request) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(request.content)
    return doc


# --- tokens -------------------------------------------------------------------------------------


def test_token_request_is_the_client_credentials_grant():
    """Without a cached token the flow first POSTs the client-credentials form to Entra ID."""
    run = drive(
        provider().flow(simple_message(), 1000.0), script(token_response(), httpx.Response(202))
    )
    grant = run.requests[0]

    assert "POST" == grant.method
    assert TOKEN_URL == str(grant.url)
    assert "application/x-www-form-urlencoded" == grant.headers["content-type"]
    assert {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "client_secret": SECRET,
        "scope": "https://graph.microsoft.com/.default",
    } == form(grant)
    assert "Bearer AT-1" == run.requests[1].headers["authorization"]
    assert Delivered(status=202) == run.outcome


def test_certificate_assertion_is_signed_ps256_with_sha256_thumbprint():
    """A certificate credential sends a PS256 client assertion that verifies with the key."""
    key, key_pem, cert_pem = rsa_key_and_certificate()
    adapter = provider(client_secret=None, private_key=key_pem, certificate=cert_pem)
    request = adapter.oauth.grant.request(1_700_000_000.5)
    fields = form(request)
    header, _ = jwt_parts(fields["client_assertion"])
    claims = jwt.decode(
        fields["client_assertion"],
        key.public_key(),
        algorithms=["PS256"],
        audience=TOKEN_URL,
        options={"verify_exp": False},
    )
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    digest = x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(hashes.SHA256())

    assert (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" == fields["client_assertion_type"]
    )
    assert "client_secret" not in fields
    assert "PS256" == header["alg"]
    assert base64.urlsafe_b64encode(digest).decode() == header["x5t#S256"]
    assert (CLIENT, CLIENT, 1_700_000_000, 1_700_000_600) == (
        claims["iss"],
        claims["sub"],
        claims["iat"],
        claims["exp"],
    )


def test_thumbprint_only_uses_rs256_and_x5t():
    """With only a SHA-1 thumbprint configured the assertion is RS256 with an x5t header."""
    key, key_pem, _ = rsa_key_and_certificate()
    thumb = "AB" * 20
    adapter = provider(client_secret=None, private_key=key_pem, thumbprint=thumb)
    assertion = form(adapter.oauth.grant.request(1000.0))["client_assertion"]
    header, _ = jwt_parts(assertion)

    assert "RS256" == header["alg"]
    assert base64.urlsafe_b64encode(bytes.fromhex(thumb)).decode() == header["x5t"]
    assert (
        CLIENT
        == jwt.decode(
            assertion,
            key.public_key(),
            algorithms=["RS256"],
            audience=TOKEN_URL,
            options={"verify_exp": False},
        )["iss"]
    )


def test_cached_token_is_reused_until_five_minutes_before_expiry():
    """A token is reused while fresh and replaced once `now` is within 5 minutes of expiry."""
    adapter = provider()
    msg = simple_message()
    first = drive(
        adapter.flow(msg, 1000.0), script(token_response("AT-1", 3600), httpx.Response(202))
    )
    reused = drive(adapter.flow(msg, 1000.0 + 3299), script(httpx.Response(202)))
    renewed = drive(
        adapter.flow(msg, 1000.0 + 3301), script(token_response("AT-2", 3600), httpx.Response(202))
    )

    assert 2 == len(first.requests)
    assert ["Bearer AT-1"] == [r.headers["authorization"] for r in reused.requests]
    assert [TOKEN_URL, SEND_URL] == [str(r.url) for r in renewed.requests]
    assert "Bearer AT-2" == renewed.requests[1].headers["authorization"]


def test_401_drops_the_token_and_retries_once_with_a_new_one():
    """A 401 from sendMail discards the cached token, fetches a new one and resends once."""
    adapter = provider()
    msg = simple_message()
    drive(adapter.flow(msg, 1000.0), script(token_response("AT-1"), httpx.Response(202)))
    expired = httpx.Response(
        401,
        json={
            "error": {
                "code": "InvalidAuthenticationToken",
                "message": "Access token has expired or is not yet valid.",
            }
        },
    )
    run = drive(
        adapter.flow(msg, 1100.0), script(expired, token_response("AT-2"), httpx.Response(202))
    )

    assert [SEND_URL, TOKEN_URL, SEND_URL] == [str(r.url) for r in run.requests]
    assert "Bearer AT-2" == run.requests[2].headers["authorization"]
    assert Delivered(status=202) == run.outcome


def test_second_401_is_retryable():
    """A 401 with a freshly granted token too ends the attempt as retryable."""
    refused = httpx.Response(
        401,
        json={
            "error": {
                "code": "InvalidAuthenticationToken",
                "message": "Access token validation failure.",
            }
        },
    )
    run = drive(
        provider().flow(simple_message(), 1000.0),
        script(token_response("AT-1"), refused, token_response("AT-2"), refused),
    )

    assert isinstance(run.outcome, Retryable)
    assert 401 == run.outcome.status
    assert "InvalidAuthenticationToken" in run.outcome.reason
    assert 4 == len(run.requests)


def test_refused_grant_is_retryable_and_sends_nothing():
    """A token endpoint refusing the secret ends the attempt retryable, naming the OAuth error."""
    refused = httpx.Response(
        401,
        json={
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided.",
            "error_codes": [7000215],
        },
    )
    run = drive(provider().flow(simple_message(), 1000.0), script(refused))

    assert 1 == len(run.requests)
    assert isinstance(run.outcome, Retryable)
    assert "invalid_client: AADSTS7000215" in run.outcome.reason


# --- which request a message becomes ------------------------------------------------------------


def test_default_sends_json_valid_against_the_derived_schema():
    """With save_to_sent_items false the message goes as JSON with saveToSentItems false."""
    msg = message(
        mime(
            cc="Ben Beta <ben@example.org>",
            html="<p>Hello <b>Anna</b></p>",
            headers={"X-Job": "nightly", "In-Reply-To": "<a@b>"},
            attachments=[("report.pdf", "application/pdf", b"%PDF-1.4 tiny")],
        ),
        ("anna@example.org", "ben@example.org", "carl@example.net"),
    )
    request = provider().build_request(msg, "AT")
    doc = graph_json(request)

    assert [] == schema_errors(doc)
    assert "application/json" == request.headers["content-type"]
    assert False is doc["saveToSentItems"]
    assert {"contentType": "html", "content": "<p>Hello <b>Anna</b></p>\n"} == doc["message"][
        "body"
    ]
    assert [{"emailAddress": {"address": "anna@example.org", "name": "Anna Alpha"}}] == doc[
        "message"
    ]["toRecipients"]
    assert [{"emailAddress": {"address": "ben@example.org", "name": "Ben Beta"}}] == doc["message"][
        "ccRecipients"
    ]
    assert [{"emailAddress": {"address": "carl@example.net"}}] == doc["message"]["bccRecipients"]
    assert [{"name": "X-Job", "value": "nightly"}] == doc["message"]["internetMessageHeaders"]
    assert b"%PDF-1.4 tiny" == base64.b64decode(doc["message"]["attachments"][0]["contentBytes"])


def test_mime_path_when_saving_adds_bcc_for_envelope_only_recipients():
    """With save_to_sent_items true base64 MIME is sent, envelope-only recipients in Bcc."""
    msg = message(
        mime(cc="Ben Beta <ben@example.org>"),
        ("anna@example.org", "ben@example.org", "carl@example.net"),
    )
    request = provider(save_to_sent_items=True).build_request(msg, "AT")
    sent = BytesParser(policy=policy.default).parsebytes(
        base64.b64decode(request.content, validate=True)
    )

    assert "text/plain" == request.headers["content-type"]
    assert SEND_URL == str(request.url)
    assert "Anna Alpha <anna@example.org>" == str(sent["To"])
    assert "carl@example.net" == str(sent["Bcc"])
    assert () == provider(save_to_sent_items=True).unsupported(msg)


def test_mime_path_rewrites_a_to_field_graph_might_read_differently():
    """`To: ok; victim` (one address to us) goes with only the envelope address in To."""
    raw = b"From: sender@example.com\r\nTo: anna@example.org; v@evil.example\r\n\r\nhi\r\n"
    msg = message(raw, ("anna@example.org",))
    request = provider(save_to_sent_items=True).build_request(msg, "AT")
    sent = base64.b64decode(request.content, validate=True)

    assert b"v@evil.example" not in sent
    assert b"To: anna@example.org\r\n" in sent


def test_envelope_narrower_than_headers_uses_json_without_outside_addresses():
    """Case 23: header addresses outside the envelope get nothing, even when MIME is preferred."""
    case = load_smtp_case("23-envelope-differs-from-headers.smtp")
    msg = message(smtp_message(case), smtp_envelope(case).rcpt_to, "orders@example.com")
    adapter = provider(save_to_sent_items=True)
    doc = graph_json(adapter.build_request(msg, "AT"))["message"]

    assert [{"emailAddress": {"address": "Dev@Example.org", "name": "Dev Team"}}] == doc[
        "toRecipients"
    ]
    assert "ccRecipients" not in doc
    assert "bccRecipients" not in doc
    assert (
        "To/Cc addresses outside this envelope are not shown: "
        "customer@example.net, boss@example.net",
    ) == adapter.unsupported(msg)[:1]


def test_bcc_only_recipients_become_bcc_recipients():
    """Case 22: with To an empty group, every envelope recipient is a bccRecipient."""
    case = load_smtp_case("22-bcc-only-undisclosed-recipients.smtp")
    msg = message(smtp_message(case), smtp_envelope(case).rcpt_to, "newsletter@example.com")
    doc = graph_json(provider().build_request(msg, "AT"))["message"]

    assert "toRecipients" not in doc
    assert ["alice@example.org", "bob@example.net"] == [
        r["emailAddress"]["address"] for r in doc["bccRecipients"]
    ]


def test_json_path_reports_what_it_cannot_carry():
    """unsupported() names the dropped text alternative and non-X headers of the JSON path."""
    msg = simple_message(html="<p>Hi</p>", headers={"In-Reply-To": "<x@y>", "X-Ok": "1"})

    notes = provider().unsupported(msg)

    assert "text alternative (Graph JSON carries one body: the HTML is sent)" in notes
    assert "header In-Reply-To (Graph JSON takes X- headers only)" in notes
    assert not any("X-Ok" in n for n in notes)


def test_no_sender_at_all_is_permanent():
    """A message without From and with the null reverse-path cannot be sent as anyone."""
    raw = b"To: anna@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    run = drive(provider().flow(message(raw, ("anna@example.org",), ""), 1.0), script())

    assert isinstance(run.outcome, Permanent)
    assert [] == run.requests


# --- large mail: draft, attachments, upload sessions -----------------------------------------


CASE_27_SHA256 = [
    "739930827b73005e746d52d45c4572c0babf640a933f6b430780b74b23d8fe6d",
    "d0096aa766d04fdb2e87f14d1cc39d71afa3c2e2dab6a014b7667ecae9da222f",
    "79cd74b31cd1e6079a73df951ee1c09f485c9ec630c32aa9350c00fecb1df866",
]


def test_27_three_attachments_over_4mb_total():
    """27-three-attachments-over-4mb-total.eml: a draft, each PDF added to it, then send.

    The three 1.25 MB PDFs fit one request each but not one sendMail together (about
    7 MB of JSON). Each is below Graph's upload-session minimum, so each is POSTed to
    the draft's attachments; no request exceeds 4 MB.
    """
    case = load_eml_case("27-three-attachments-over-4mb-total.eml")
    msg = message(case.raw, case.envelope.rcpt_to, case.envelope.mail_from)
    draft = httpx.Response(201, json={"id": "AAMkADraft=", "isDraft": True})
    added = [httpx.Response(201, json={"id": f"att-{n}"}) for n in range(3)]
    run = drive(
        provider().flow(msg, 1000.0),
        script(token_response(), draft, *added, httpx.Response(202)),
    )
    token, create, *attach, send = run.requests
    draft_doc = graph_json(create)
    posted = [graph_json(r) for r in attach]
    message_url = f"{USER_URL}/messages/AAMkADraft%3D"

    assert Delivered(status=202) == run.outcome
    assert TOKEN_URL == str(token.url)
    assert ("POST", f"{USER_URL}/messages") == (create.method, str(create.url))
    assert [] == schema_errors(draft_doc, "message")
    assert "attachments" not in draft_doc
    assert "Scanned from MFP-3F-EAST (3 files)" == draft_doc["subject"]
    assert {"contentType": "text", "content": "3 documents scanned."} == draft_doc["body"]
    assert [{"emailAddress": {"address": "user@example.org"}}] == draft_doc["toRecipients"]
    assert [("POST", f"{message_url}/attachments")] * 3 == [(r.method, str(r.url)) for r in attach]
    assert [[] for _ in posted] == [schema_errors(p, "fileAttachment") for p in posted]
    assert CASE_27_SHA256 == [
        hashlib.sha256(base64.b64decode(p["contentBytes"])).hexdigest() for p in posted
    ]
    assert [f"20240403081944{n}.pdf" for n in (301, 302, 303)] == [p["name"] for p in posted]
    assert {"application/pdf"} == {p["contentType"] for p in posted}
    assert ("POST", f"{message_url}/send", b"") == (send.method, str(send.url), send.content)
    assert all(r.headers["authorization"] == "Bearer AT-1" for r in run.requests[1:])
    assert max(len(r.content) for r in run.requests) <= MAX_REQUEST_BYTES
    assert any("Sent Items" in n for n in provider().unsupported(msg))


def upload_message() -> Any:
    big = bytes(range(256)) * (7 * 4096 + 17)  # 7,344,384 bytes: above the 3 MB simple limit
    raw = mime(
        attachments=[("scan.tif", "image/tiff", big), ("note.txt", "text/plain", b"small\n")]
    )
    return message(raw, ("anna@example.org",)), big


def test_large_attachment_goes_through_an_upload_session_in_contiguous_ranges():
    """An attachment over 3 MB is uploaded in ordered, contiguous ranges covering every byte."""
    msg, big = upload_message()
    session = httpx.Response(
        201,
        json={
            "uploadUrl": "https://outlook.office.com/api/v2.0/Users('x')/Messages('d')/AttachmentSessions('s')?authtoken=eyJ0",
            "expirationDateTime": "2026-12-03T12:15:00Z",
            "nextExpectedRanges": ["0-"],
        },
    )
    chunks = -(-len(big) // UPLOAD_CHUNK)
    progress = [
        httpx.Response(200, json={"nextExpectedRanges": [f"{(n + 1) * UPLOAD_CHUNK}-"]})
        for n in range(chunks - 1)
    ]
    run = drive(
        provider().flow(msg, 1000.0),
        script(
            token_response(),
            httpx.Response(201, json={"id": "D1"}),
            session,
            *progress,
            httpx.Response(
                201,
                headers={
                    "Location": "https://outlook.office.com/api/v2.0/Users('x')/Messages('d')/Attachments('a')"
                },
            ),
            httpx.Response(201, json={"id": "A2"}),
            httpx.Response(202),
        ),
    )
    create_session = run.requests[2]
    puts = [r for r in run.requests if r.method == "PUT"]
    ranges = [r.headers["content-range"] for r in puts]
    spans = [tuple(map(int, h.split(" ")[1].split("/")[0].split("-"))) for h in ranges]

    assert Delivered(status=202) == run.outcome
    assert f"{USER_URL}/messages/D1/attachments/createUploadSession" == str(create_session.url)
    assert {
        "AttachmentItem": {
            "attachmentType": "file",
            "name": "scan.tif",
            "size": len(big),
            "contentType": "image/tiff",
            "isInline": False,
        }
    } == graph_json(create_session)
    assert chunks == len(puts)
    assert 0 == spans[0][0]
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))
    assert len(big) - 1 == spans[-1][1]
    assert {f"/{len(big)}"} == {h[h.index("/") :] for h in ranges}
    assert big == b"".join(r.content for r in puts)
    assert all("authorization" not in r.headers for r in puts)
    assert ("POST", f"{USER_URL}/messages/D1/attachments") == (
        run.requests[-2].method,
        str(run.requests[-2].url),
    )
    assert f"{USER_URL}/messages/D1/send" == str(run.requests[-1].url)


def test_failed_upload_deletes_the_draft():
    """When an attachment cannot be added the draft is deleted and the failure returned."""
    msg, _ = upload_message()
    throttled = httpx.Response(
        429,
        headers={"Retry-After": "17"},
        json={
            "error": {
                "code": "ApplicationThrottled",
                "message": "Application is over its MailboxConcurrency limit.",
            }
        },
    )
    run = drive(
        provider().flow(msg, 1000.0),
        script(
            token_response(), httpx.Response(201, json={"id": "D1"}), throttled, httpx.Response(204)
        ),
    )

    assert ("DELETE", f"{USER_URL}/messages/D1") == (
        run.requests[-1].method,
        str(run.requests[-1].url),
    )
    assert isinstance(run.outcome, Retryable)
    assert 17.0 == run.outcome.retry_after
    assert run.outcome.reason.startswith(
        "attachment 1 of 2 (scan.tif): HTTP 429: ApplicationThrottled"
    )


# --- answers ------------------------------------------------------------------------------------


def error(status: int, code: str, text: str, **headers: str) -> httpx.Response:
    body = {"error": {"code": code, "message": text, "innerError": {"request-id": "5f0b-..."}}}
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(202), Delivered(status=202)),
        (
            error(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
                **{"Retry-After": "30"},
            ),
            Retryable(
                "HTTP 429: ApplicationThrottled: Application is over its MailboxConcurrency limit.",
                429,
                30.0,
            ),
        ),
        (
            error(503, "ServiceUnavailable", "Service Unavailable", **{"Retry-After": "5"}),
            Retryable("HTTP 503: ServiceUnavailable: Service Unavailable", 503, 5.0),
        ),
        (error(504, "UnknownError", ""), Retryable("HTTP 504: UnknownError", 504, None)),
        (
            error(
                400,
                "ErrorInvalidRecipients",
                "At least one recipient isn't valid., "
                "A message can't be sent because it contains no recipients.",
            ),
            Permanent(
                "HTTP 400: ErrorInvalidRecipients: At least one recipient isn't valid., "
                "A message can't be sent because it contains no recipients.",
                400,
            ),
        ),
        (
            error(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            ),
            Permanent(
                "HTTP 400: ErrorMimeContentInvalidBase64String: "
                "Invalid base64 string for MIME content.",
                400,
            ),
        ),
        (
            error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."),
            Permanent(
                "HTTP 403: ErrorAccessDenied: Access is denied. Check credentials and try again.",
                403,
            ),
        ),
        (
            error(404, "ErrorInvalidUser", "The requested user 'x@contoso.example' is invalid."),
            Permanent(
                "HTTP 404: ErrorInvalidUser: The requested user 'x@contoso.example' is invalid.",
                404,
            ),
        ),
        (
            httpx.Response(413, text="Request Entity Too Large"),
            Permanent("HTTP 413: Request Entity Too Large", 413),
        ),
    ],
)
def test_responses_are_classified(response, expected):
    """sendMail answers map to delivered, retryable (with Retry-After) or permanent."""
    assert expected == provider().interpret_response(response)


# --- settings and config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_secret": None},
        {"private_key": "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----"},
        {"max_message_size": 151 * 1024 * 1024},
        {"authority": "http://login.example.com"},
        {"tenant_id": "https://login.microsoftonline.com/x"},
        {"thumbprint": "abc"},
    ],
)
def test_bad_settings_are_refused(overrides):
    """Missing or doubled credentials, a size over 150 MB and clear-text endpoints are refused."""
    with pytest.raises(pydantic.ValidationError):
        provider(**overrides)


def test_checker_config_keys_load(tmp_path):
    """The keys tools/provider_check.py writes for graph load into a working adapter."""
    text = f"""
providers:
  graph:
    type: graph
    base_url: https://127.0.0.1:8443
    tenant_id: {TENANT}
    client_id: {CLIENT}
    client_secret: ${{GRAPH_CLIENT_SECRET}}
    sender: {SENDER}
    authority: https://127.0.0.1:8443
routes:
  - match: {{recipients: ["*"]}}
    provider: graph
"""
    config = load_config(text, {"GRAPH_CLIENT_SECRET": SECRET})
    adapter = providers.get("graph")(config.providers["graph"].settings)
    run = drive(adapter.flow(simple_message(), 5.0), script(token_response(), httpx.Response(202)))

    assert GraphProvider is type(adapter)
    assert f"https://127.0.0.1:8443/{TENANT}/oauth2/v2.0/token" == str(run.requests[0].url)
    assert f"https://127.0.0.1:8443/v1.0/users/{SENDER}/sendMail" == str(run.requests[1].url)
    assert SECRET == form(run.requests[0])["client_secret"]


def test_certificate_files_are_read_by_the_config_loader(tmp_path):
    """certificate_file and private_key_file become the PEM settings at load time."""
    _, key_pem, cert_pem = rsa_key_and_certificate()
    (tmp_path / "key.pem").write_text(key_pem)
    (tmp_path / "cert.pem").write_text(cert_pem)
    text = f"""
providers:
  graph:
    type: graph
    tenant_id: {TENANT}
    client_id: {CLIENT}
    certificate_file: {tmp_path / "cert.pem"}
    private_key_file: {tmp_path / "key.pem"}
    sender: {SENDER}
routes:
  - match: {{recipients: ["*"]}}
    provider: graph
"""
    settings = load_config(text, {}).providers["graph"].settings
    adapter = providers.get("graph")(settings)
    assert isinstance(adapter, GraphProvider)
    fields = form(adapter.oauth.grant.request(10.0))

    assert "PS256" == jwt_parts(fields["client_assertion"])[0]["alg"]


# --- remaining branches -------------------------------------------------------------------------


def test_more_bad_credentials_are_refused():
    """A key without certificate or thumbprint, a stray thumbprint, or unreadable PEM is refused."""
    _, key_pem, _ = rsa_key_and_certificate()
    bad: list[dict[str, Any]] = [
        {"client_secret": None, "private_key": key_pem},
        {"thumbprint": "ab" * 20},
        {"client_secret": None, "private_key": "not a key", "thumbprint": "ab" * 20},
        {"client_secret": None, "private_key": key_pem, "certificate": "not a certificate"},
    ]
    for overrides in bad:
        with pytest.raises(pydantic.ValidationError):
            provider(**overrides)


def test_inline_image_reply_to_and_sender_in_json():
    """JSON carries inline images with their Content-ID, Reply-To, and notes the Sender header."""
    raw = mime(
        html='<p><img src="cid:logo@x"></p>',
        headers={"Reply-To": "Help <help@example.com>", "Sender": "bot@example.com"},
    )
    msg = message(raw, ("anna@example.org",))
    logo = Attachment("logo.png", "image/png", "inline", "<logo@x>", b"\x89PNG")
    msg = dataclasses.replace(msg, attachments=(logo,))
    adapter = provider()
    doc = graph_json(adapter.build_request(msg))["message"]

    assert [{"emailAddress": {"address": "help@example.com", "name": "Help"}}] == doc["replyTo"]
    assert {"isInline": True, "contentId": "logo@x", "name": "logo.png"}.items() <= doc[
        "attachments"
    ][0].items()
    assert "Sender header (Graph sets it from the mailbox)" in adapter.unsupported(msg)


def test_build_request_refuses_draft_sized_mail():
    """build_request() cannot express the draft path and says so."""
    msg = dataclasses.replace(
        simple_message(),
        attachments=(
            Attachment("a.bin", "application/octet-stream", "attachment", None, b"x" * 3_500_000),
        ),
    )
    with pytest.raises(ValueError, match="use flow"):
        provider().build_request(msg)


def test_token_with_refresh_in_is_renewed_at_refresh_on():
    """msal's refresh_in from Entra ID makes the cache renew the token early."""
    adapter = provider()
    msg = simple_message()
    early = httpx.Response(
        200,
        json={
            "token_type": "Bearer",
            "expires_in": 86399,
            "refresh_in": 43199,
            "access_token": "AT-1",
        },
    )
    drive(adapter.flow(msg, 0.0), script(early, httpx.Response(202)))
    before = drive(adapter.flow(msg, 43198.0), script(httpx.Response(202)))
    after = drive(adapter.flow(msg, 43200.0), script(token_response("AT-2"), httpx.Response(202)))

    assert 1 == len(before.requests)
    assert TOKEN_URL == str(after.requests[0].url)


def test_dropping_another_token_keeps_the_cached_one():
    """A 401 for a token already replaced does not evict the newer token."""
    store = provider().oauth.store
    store.save({"access_token": "AT-new", "expires_in": 3600}, 0.0)
    store.drop("AT-old")

    assert "AT-new" == getattr(store.load(10.0), "value", None)


def big_attachment_message() -> Any:
    big = Attachment("scan.tif", "image/tiff", "attachment", None, b"z" * 3_500_000)
    return dataclasses.replace(simple_message(), attachments=(big,))


SESSION = httpx.Response(
    201,
    json={"uploadUrl": "https://outlook.office.com/up?authtoken=x", "nextExpectedRanges": ["0-"]},
)


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (
            [error(403, "ErrorAccessDenied", "Access is denied.")],
            Permanent("creating the draft: HTTP 403: ErrorAccessDenied: Access is denied.", 403),
        ),
        (
            [httpx.Response(201, json={})],
            Retryable("creating the draft: the answer has no message id"),
        ),
        (
            [
                httpx.Response(201, json={"id": "D"}),
                httpx.Response(201, json={"uploadUrl": "http://evil.example/up"}),
                httpx.Response(204),
            ],
            Retryable(
                "attachment 1 of 1 (scan.tif): "
                "createUploadSession answered without a usable uploadUrl"
            ),
        ),
        (
            [
                httpx.Response(201, json={"id": "D"}),
                SESSION,
                error(500, "UnknownError", "boom"),
                httpx.Response(204),
            ],
            Retryable("attachment 1 of 1 (scan.tif): HTTP 500: UnknownError: boom", 500),
        ),
        (
            [
                httpx.Response(201, json={"id": "D"}),
                SESSION,
                httpx.Response(200, json={"nextExpectedRanges": ["0-"]}),
                httpx.Response(204),
            ],
            Retryable("attachment 1 of 1 (scan.tif): upload session made no progress at byte 0"),
        ),
        (
            [
                httpx.Response(201, json={"id": "D"}),
                SESSION,
                httpx.Response(200, json={}),
                httpx.Response(200, json={}),
                httpx.Response(204),
            ],
            Retryable(
                "attachment 1 of 1 (scan.tif): upload session did not confirm the last range"
            ),
        ),
        (
            [
                httpx.Response(201, json={"id": "D"}),
                SESSION,
                httpx.Response(200),
                httpx.Response(201),
                error(400, "ErrorInvalidRecipients", "bad"),
            ],
            Permanent("sending the draft: HTTP 400: ErrorInvalidRecipients: bad", 400),
        ),
    ],
)
def test_draft_path_failures(answers, expected):
    """Each step of the draft path reports its own failure, naming the step."""
    run = drive(provider().flow(big_attachment_message(), 0.0), script(token_response(), *answers))

    assert expected == run.outcome
