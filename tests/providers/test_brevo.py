"""Brevo transactional email: request building against the spec, and responses."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from bridge.model import Address, Attachment, Delivered, Header, Permanent, Retryable
from bridge.providers import get
from bridge.providers.brevo import BrevoProvider, BrevoSettings
from tests.providers.specs import (
    BCC_ONLY,
    INLINE_HTML,
    PDF,
    PNG,
    THREE,
    inline_logo,
    make_message,
    pdf_attachment,
    problems,
)

KEY = "xkeysib-test-0123456789abcdef"


def provider(**settings: object) -> BrevoProvider:
    return BrevoProvider(BrevoSettings.model_validate({"api_key": KEY, **settings}))


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


def test_registry_names_the_adapter():
    """The `brevo` config type resolves to this adapter."""
    assert BrevoProvider is get("brevo")


def test_request_line_and_api_key_header():
    """A message is POSTed to /v3/smtp/email with the key in the api-key header."""
    request = provider(base_url="https://127.0.0.1:9443").build_request(make_message())

    assert ("POST", "https://127.0.0.1:9443/v3/smtp/email") == (request.method, str(request.url))
    assert KEY == request.headers["api-key"]
    assert "authorization" not in request.headers
    assert "application/json" == request.headers["content-type"]
    assert KEY not in str(request.url)


def test_plain_message_body_is_valid_and_exact():
    """A plain message maps to sender/to/subject/textContent plus the idempotency key."""
    message = make_message()

    doc = body(provider().build_request(message))

    assert [] == problems("brevo", doc)
    assert {
        "sender": {"email": "sender@example.com", "name": "Harness Sender"},
        "to": [{"email": "alice@example.org", "name": "Alice Example"}],
        "subject": "Quarterly report",
        "textContent": "Hello Alice,\n\nthe report is attached.\n",
        "headers": {"idempotencyKey": message.id},
    } == doc


def test_to_cc_and_blind_copy():
    """To and Cc keep roles and names; the envelope-only address goes as bcc."""
    doc = body(provider().build_request(make_message(**THREE)))

    assert [] == problems("brevo", doc)
    assert [{"email": "anna@example.org", "name": "Anna Alpha"}] == doc["to"]
    assert [{"email": "ben@example.org", "name": "Ben Beta"}] == doc["cc"]
    assert [{"email": "carl@example.net"}] == doc["bcc"]


def test_bcc_only_is_one_request_per_recipient_with_own_keys():
    """With nobody in To each recipient gets a request To them alone, with its own key."""
    message = make_message(**BCC_ONLY)

    requests = provider().build_requests(message)
    docs = [body(r) for r in requests]

    assert [[{"email": "bcc-one@example.net"}], [{"email": "bcc-two@example.net"}]] == [
        d["to"] for d in docs
    ]
    assert [f"{message.id}-1", f"{message.id}-2"] == [d["headers"]["idempotencyKey"] for d in docs]
    assert all("bcc" not in d and "messageVersions" not in d for d in docs)
    assert all([] == problems("brevo", d) for d in docs)


def test_html_reply_to_and_custom_headers():
    """HTML and text, the first Reply-To and X- headers are carried; extra Reply-To noted."""
    message = make_message(
        text="Hi\n",
        html="<p>Hi</p>\n",
        reply_to=(Address("r@example.com", "Replies"), Address("s@example.com")),
        headers=(Header("X-Mailin-Tag", "invoices"), Header("In-Reply-To", "<a@example.com>")),
    )

    doc = body(provider().build_request(message))

    assert [] == problems("brevo", doc)
    assert ("<p>Hi</p>\n", "Hi\n") == (doc["htmlContent"], doc["textContent"])
    assert {"email": "r@example.com", "name": "Replies"} == doc["replyTo"]
    assert {
        "X-Mailin-Tag": "invoices",
        "In-Reply-To": "<a@example.com>",
        "idempotencyKey": message.id,
    } == doc["headers"]
    assert "Reply-To addresses after the first (the API takes one)" in provider().unsupported(
        message
    )


def test_attachments_are_byte_exact_and_inline_images_are_noted():
    """Attachments go as base64 content + name; a cid image becomes an attachment, noted."""
    message = make_message(html=INLINE_HTML, attachments=(pdf_attachment(), inline_logo()))

    doc = body(provider().build_request(message))
    notes = provider().unsupported(message)

    assert [] == problems("brevo", doc)
    assert [("report.pdf", PDF), ("logo.png", PNG)] == [
        (a["name"], base64.b64decode(a["content"], validate=True)) for a in doc["attachment"]
    ]
    assert "inline image logo.png sent as an attachment (no cid)" in notes


def test_extension_outside_the_allow_list_is_noted():
    """Brevo refuses some extensions; sending one is reported ahead of time."""
    message = make_message(
        attachments=(
            Attachment("setup.exe", "application/octet-stream", "attachment", None, b"MZ"),
        )
    )

    assert "attachment setup.exe: extension not on Brevo's allow-list" in provider().unsupported(
        message
    )


def test_long_names_are_cut_to_70_characters():
    """Names over Brevo's 70-character limit are shortened and noted."""
    message = make_message(from_=Address("sender@example.com", "N" * 90))

    doc = body(provider().build_request(message))

    assert "N" * 70 == doc["sender"]["name"]
    assert any("cut to 70" in n for n in provider().unsupported(message))


def test_utf8_is_sent_unescaped():
    """Non-ASCII subject and names are UTF-8 in the body."""
    message = make_message(
        rcpt_to=("zoe@example.org",),
        to=(Address("zoe@example.org", "Zoë Ångström"),),
        subject="Grüße aus Köln – ✓",
    )

    request = provider().build_request(message)

    assert "Grüße aus Köln – ✓".encode() in request.content
    assert "Zoë Ångström" == body(request)["to"][0]["name"]


# --- responses ---------------------------------------------------------------------------

REQ = httpx.Request("POST", "https://api.brevo.com/v3/smtp/email")


def test_201_is_delivered_with_message_id():
    """201 is delivered and records messageId."""
    response = httpx.Response(
        201, json={"messageId": "<201798300811.5787683@relay.domain.com>"}, request=REQ
    )

    assert Delivered(status=201, provider_message_id="<201798300811.5787683@relay.domain.com>") == (
        provider().interpret_response(response)
    )


@pytest.mark.parametrize(
    ("status", "code", "text"),
    [
        (400, "invalid_parameter", "email is not valid in to"),
        (400, "missing_parameter", "Either of htmlContent or textContent is required"),
        (401, "unauthorized", "Key not found"),
        (402, "not_enough_credits", "Not enough credits"),
        (403, "permission_denied", "Unable to send email. Your SMTP account is not yet activated."),
    ],
)
def test_client_errors_are_permanent(status, code, text):
    """Brevo's 4xx errors are permanent, the reason quoting code and message."""
    response = httpx.Response(status, json={"code": code, "message": text}, request=REQ)

    assert Permanent(reason=f"HTTP {status}: {code}: {text}", status=status) == (
        provider().interpret_response(response)
    )


def test_429_waits_for_the_sib_reset_header():
    """429 waits for x-sib-ratelimit-reset seconds."""
    response = httpx.Response(
        429,
        json={"code": "too_many_requests", "message": "Too many requests"},
        headers={"x-sib-ratelimit-limit": "1000", "x-sib-ratelimit-reset": "12"},
        request=REQ,
    )

    assert Retryable(
        reason="HTTP 429: too_many_requests: Too many requests", status=429, retry_after=12.0
    ) == provider().interpret_response(response)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retryable(status):
    """5xx is retried."""
    response = httpx.Response(status, text="upstream error", request=REQ)

    assert Retryable(reason=f"HTTP {status}: upstream error", status=status) == (
        provider().interpret_response(response)
    )


def test_html_only_single_reply_to_and_no_subject():
    """HTML alone is sent without textContent; no subject becomes a space, noted."""
    message = make_message(
        subject=None, text=None, html="<p>Hi</p>", reply_to=(Address("r@example.com"),)
    )

    doc = body(provider().build_request(message))
    notes = provider().unsupported(message)

    assert [] == problems("brevo", doc)
    assert ("<p>Hi</p>", " ", {"email": "r@example.com"}) == (
        doc["htmlContent"],
        doc["subject"],
        doc["replyTo"],
    )
    assert "textContent" not in doc
    assert "empty subject sent as a single space (the API requires one)" in notes
    assert not any("Reply-To" in n for n in notes)


def test_attachment_only_message_gets_a_space_as_text():
    """With neither text nor HTML, textContent is a single space."""
    message = make_message(text=None, attachments=(pdf_attachment(),))

    doc = body(provider().build_request(message))

    assert " " == doc["textContent"]
    assert [] == problems("brevo", doc)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"messageIds": ["<1@relay>", "<2@relay>", 3]}, "<1@relay>,<2@relay>"),
        ({}, None),
        (None, None),
    ],
)
def test_accepted_answers_without_a_single_message_id(payload, expected):
    """messageIds lists are joined; an empty or missing body is still delivered."""
    response = httpx.Response(202, json=payload, request=REQ)

    assert Delivered(status=202, provider_message_id=expected) == (
        provider().interpret_response(response)
    )
