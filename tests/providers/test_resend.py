"""Resend Emails API: request building against the spec, copies, and responses."""

from __future__ import annotations

import base64
import json
from email import policy
from typing import Any

import httpx
import pytest

from bridge.model import Address, Delivered, Header, Message, Outcome, Permanent, Retryable
from bridge.providers import get
from bridge.providers.resend import ResendProvider, ResendSettings
from tests.providers.specs import (
    BCC_ONLY,
    CID,
    INLINE_HTML,
    PDF,
    PNG,
    THREE,
    inline_logo,
    make_message,
    pdf_attachment,
    problems,
)

KEY = "re_test_0123456789abcdef"


def provider(**settings: object) -> ResendProvider:
    return ResendProvider(ResendSettings.model_validate({"api_key": KEY, **settings}))


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


def addresses(values: list[str]) -> list[tuple[str, str]]:
    """Parse Resend's address strings with an RFC 5322 parser."""
    out = []
    for value in values:
        header = policy.default.header_factory("To", value)
        out += [(a.display_name, a.addr_spec) for a in header.addresses]
    return out


def run_flow(
    p: ResendProvider, message: Message, responses: list[httpx.Response]
) -> tuple[list[httpx.Request], Outcome]:
    """Drive `flow()` like the delivery worker: the requests it sent and its outcome."""
    flow = p.flow(message, now=0.0)
    sent = [next(flow)]
    for response in responses:
        try:
            sent.append(flow.send(response))
        except StopIteration as stop:
            outcome: Outcome = stop.value
            return sent, outcome
    raise AssertionError("flow wanted more responses")


def test_registry_names_the_adapter():
    """The `resend` config type resolves to this adapter."""
    assert ResendProvider is get("resend")


def test_request_line_auth_and_idempotency_key():
    """A message is POSTed to /emails with a Bearer key and the spool id as idempotency key."""
    message = make_message()

    request = provider().build_request(message)

    assert ("POST", "https://api.resend.com/emails") == (request.method, str(request.url))
    assert f"Bearer {KEY}" == request.headers["authorization"]
    assert message.id == request.headers["idempotency-key"]
    assert "application/json" == request.headers["content-type"]
    assert KEY not in str(request.url)


def test_plain_message_body_is_valid_and_exact():
    """A plain message maps to from/to/subject/text, valid against the spec."""
    doc = body(provider().build_request(make_message()))

    assert [] == problems("resend", doc)
    assert {
        "from": '"Harness Sender" <sender@example.com>',
        "to": ['"Alice Example" <alice@example.org>'],
        "subject": "Quarterly report",
        "text": "Hello Alice,\n\nthe report is attached.\n",
    } == doc


def test_to_cc_and_blind_copy():
    """To and Cc keep roles and names; the envelope-only address goes as bcc."""
    doc = body(provider().build_request(make_message(**THREE)))

    assert [] == problems("resend", doc)
    assert [("Anna Alpha", "anna@example.org")] == addresses(doc["to"])
    assert [("Ben Beta", "ben@example.org")] == addresses(doc["cc"])
    assert [("", "carl@example.net")] == addresses(doc["bcc"])


def test_bcc_only_is_one_request_per_recipient_with_own_keys():
    """With nobody in To each recipient gets a request To them alone, keys id-1, id-2."""
    message = make_message(**BCC_ONLY)

    requests = provider().build_requests(message)

    assert [["bcc-one@example.net"], ["bcc-two@example.net"]] == [body(r)["to"] for r in requests]
    assert [f"{message.id}-1", f"{message.id}-2"] == [
        r.headers["idempotency-key"] for r in requests
    ]
    assert all([] == problems("resend", body(r)) for r in requests)
    with pytest.raises(ValueError, match="2 requests"):
        provider().build_request(message)


def test_bcc_only_flow_delivers_every_copy():
    """The flow sends each copy and records every id."""
    ok1 = httpx.Response(200, json={"id": "id-1"})
    ok2 = httpx.Response(200, json={"id": "id-2"})

    sent, outcome = run_flow(provider(), make_message(**BCC_ONLY), [ok1, ok2])

    assert 2 == len(sent)
    assert Delivered(status=200, provider_message_id="id-1,id-2") == outcome


def test_bcc_only_flow_stops_at_the_first_failure():
    """A failed second copy ends the flow with its outcome, saying one was delivered."""
    ok = httpx.Response(200, json={"id": "id-1"})
    limited = httpx.Response(
        429,
        json={"statusCode": 429, "name": "rate_limit_exceeded", "message": "Too many requests."},
        headers={"retry-after": "2"},
    )

    _, outcome = run_flow(provider(), make_message(**BCC_ONLY), [ok, limited])

    assert (
        Retryable(
            reason="copy 2 of 2 (1 delivered): HTTP 429: rate_limit_exceeded: Too many requests.",
            status=429,
            retry_after=2.0,
        )
        == outcome
    )


def test_utf8_names_reply_to_and_headers():
    """UTF-8 names, several Reply-To addresses and X- headers are carried."""
    message = make_message(
        rcpt_to=("zoe@example.org",),
        from_=Address("joerg@example.com", "Jörg Müller-Lüdenscheidt"),
        to=(Address("zoe@example.org", "Zoë Ångström"),),
        reply_to=(Address("r@example.com", "Rë"), Address("s@example.com")),
        headers=(Header("X-Entity-Ref-ID", "42"), Header("References", "<a@example.com>")),
        subject="Grüße ✓",
    )

    doc = body(provider().build_request(message))

    assert [] == problems("resend", doc)
    assert [("Jörg Müller-Lüdenscheidt", "joerg@example.com")] == addresses([doc["from"]])
    assert [("Zoë Ångström", "zoe@example.org")] == addresses(doc["to"])
    assert [("Rë", "r@example.com"), ("", "s@example.com")] == addresses(doc["reply_to"])
    assert {"X-Entity-Ref-ID": "42", "References": "<a@example.com>"} == doc["headers"]
    assert "Grüße ✓" == doc["subject"]


def test_attachments_and_inline_image():
    """Attachments are base64 byte-exact; the inline image carries content_id."""
    message = make_message(html=INLINE_HTML, attachments=(pdf_attachment(), inline_logo()))

    doc = body(provider().build_request(message))

    assert [] == problems("resend", doc)
    pdf, logo = doc["attachments"]
    assert PDF == base64.b64decode(pdf["content"], validate=True)
    assert ("report.pdf", "application/pdf") == (pdf["filename"], pdf["content_type"])
    assert "content_id" not in pdf
    assert PNG == base64.b64decode(logo["content"], validate=True)
    assert (CID, "image/png") == (logo["content_id"], logo["content_type"])
    assert INLINE_HTML == doc["html"]


def test_missing_subject_and_body_become_spaces():
    """Resend requires a subject; a body-less message gets a space as text."""
    message = make_message(subject=None, text=None)

    doc = body(provider().build_request(message))

    assert (" ", " ") == (doc["subject"], doc["text"])
    assert [] == problems("resend", doc)


# --- responses ---------------------------------------------------------------------------

REQ = httpx.Request("POST", "https://api.resend.com/emails")


def error(status: int, name: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        json={"statusCode": status, "name": name, "message": message},
        headers=headers,
        request=REQ,
    )


def test_200_is_delivered_with_the_id():
    """200 is delivered and records the email id."""
    response = httpx.Response(200, json={"id": "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"}, request=REQ)

    assert Delivered(status=200, provider_message_id="49a3999c-0ce1-4ea6-ab68-afcd6dc2e794") == (
        provider().interpret_response(response)
    )


@pytest.mark.parametrize(
    ("status", "name", "text"),
    [
        (400, "validation_error", "Invalid `to` field."),
        (401, "missing_api_key", "Missing API key in the authorization header."),
        (403, "validation_error", "The example.com domain is not verified."),
        (409, "invalid_idempotent_request", "Same idempotency key used with a different payload."),
        (422, "invalid_attachment", "Attachment must have either a `content` or `path`."),
    ],
)
def test_client_errors_are_permanent(status, name, text):
    """Validation, key, domain and idempotency-misuse errors are permanent."""
    assert Permanent(reason=f"HTTP {status}: {name}: {text}", status=status) == (
        provider().interpret_response(error(status, name, text))
    )


def test_concurrent_idempotent_request_is_retryable():
    """409 concurrent_idempotent_requests means the first attempt is still running: retry."""
    outcome = provider().interpret_response(
        error(409, "concurrent_idempotent_requests", "Same idempotency key is being processed.")
    )

    assert isinstance(outcome, Retryable)


def test_quota_429_waits_for_ratelimit_reset():
    """429 without Retry-After waits for ratelimit-reset seconds."""
    outcome = provider().interpret_response(
        error(
            429,
            "daily_quota_exceeded",
            "You have reached your daily quota.",
            **{"ratelimit-reset": "3600"},
        )
    )

    assert (
        Retryable(
            reason="HTTP 429: daily_quota_exceeded: You have reached your daily quota.",
            status=429,
            retry_after=3600.0,
        )
        == outcome
    )


def test_500_is_retryable():
    """application_error 500 is retried."""
    outcome = provider().interpret_response(error(500, "application_error", "Unexpected error."))

    assert Retryable(reason="HTTP 500: application_error: Unexpected error.", status=500) == outcome


def test_html_only_message_and_no_losses():
    """HTML alone is sent without text; a plain message reports nothing lost."""
    message = make_message(text=None, html="<p>Hi</p>")

    doc = body(provider().build_request(message))

    assert "<p>Hi</p>" == doc["html"]
    assert "text" not in doc
    assert () == provider().unsupported(message)


def test_error_body_without_a_name_uses_the_message():
    """An error body with only a message still explains the refusal."""
    response = httpx.Response(403, json={"message": "Domain not verified"}, request=REQ)

    assert Permanent(reason="HTTP 403: Domain not verified", status=403) == (
        provider().interpret_response(response)
    )


def test_gateway_error_without_json_is_retryable():
    """A 502 with an HTML body is retried, quoting the body."""
    response = httpx.Response(502, text="<html>Bad Gateway</html>", request=REQ)

    assert Retryable(reason="HTTP 502: <html>Bad Gateway</html>", status=502) == (
        provider().interpret_response(response)
    )
