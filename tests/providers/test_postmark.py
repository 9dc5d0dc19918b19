"""Postmark Email API: request building against the spec, and response classification."""

from __future__ import annotations

import base64
import json
from email import policy
from typing import Any

import httpx
import pytest

from bridge.model import Address, Delivered, Header, Permanent, Retryable
from bridge.providers import get
from bridge.providers.postmark import PostmarkProvider, PostmarkSettings
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

TOKEN = "pm-server-token-0123-4567"


def provider(**settings: object) -> PostmarkProvider:
    return PostmarkProvider(PostmarkSettings.model_validate({"server_token": TOKEN, **settings}))


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


def addresses(value: str) -> list[tuple[str, str]]:
    """Parse an address-list string the way Postmark (an RFC 5322 parser) would."""
    header = policy.default.header_factory("To", value)
    return [(a.display_name, a.addr_spec) for a in header.addresses]


def test_registry_names_the_adapter():
    """The `postmark` config type resolves to this adapter."""
    assert PostmarkProvider is get("postmark")


def test_request_line_and_token_header():
    """One copy is POSTed to /email with the server token header, not in the URL."""
    request = provider().build_request(make_message())

    assert ("POST", "https://api.postmarkapp.com/email") == (request.method, str(request.url))
    assert TOKEN == request.headers["x-postmark-server-token"]
    assert "authorization" not in request.headers
    assert "application/json" == request.headers["content-type"]
    assert TOKEN not in str(request.url)


def test_plain_message_body_is_valid_and_exact():
    """A plain message maps to From/To/Subject/TextBody, valid against the spec."""
    doc = body(provider().build_request(make_message()))

    assert [] == problems("postmark", doc)
    assert {
        "From": '"Harness Sender" <sender@example.com>',
        "To": '"Alice Example" <alice@example.org>',
        "Subject": "Quarterly report",
        "TextBody": "Hello Alice,\n\nthe report is attached.\n",
    } == doc


def test_to_cc_and_blind_copy():
    """To and Cc keep roles and names; the envelope-only address goes in Bcc."""
    doc = body(provider().build_request(make_message(**THREE)))

    assert [] == problems("postmark", doc)
    assert [("Anna Alpha", "anna@example.org")] == addresses(doc["To"])
    assert [("Ben Beta", "ben@example.org")] == addresses(doc["Cc"])
    assert [("", "carl@example.net")] == addresses(doc["Bcc"])


def test_display_names_with_specials_round_trip():
    """Names with commas, quotes and non-ASCII survive the address-string form."""
    message = make_message(
        rcpt_to=("zoe@example.org",),
        from_=Address("joerg@example.com", 'Jörg "JM" Müller, Köln'),
        to=(Address("zoe@example.org", "Ångström, Zoë"),),
    )

    doc = body(provider().build_request(message))

    assert [('Jörg "JM" Müller, Köln', "joerg@example.com")] == addresses(doc["From"])
    assert [("Ångström, Zoë", "zoe@example.org")] == addresses(doc["To"])


def test_bcc_only_uses_the_batch_endpoint_one_message_each():
    """With nobody in To, each recipient gets a batch item addressed To them alone."""
    request = provider(message_stream="outbound").build_request(make_message(**BCC_ONLY))
    doc = body(request)

    assert "https://api.postmarkapp.com/email/batch" == str(request.url)
    assert [] == problems("postmark.batch", doc)
    assert ["bcc-one@example.net", "bcc-two@example.net"] == [item["To"] for item in doc]
    assert all("Bcc" not in item and "Cc" not in item for item in doc)
    assert {"outbound"} == {item["MessageStream"] for item in doc}


def test_message_stream_setting():
    """`message_stream` becomes MessageStream."""
    doc = body(provider(message_stream="broadcast-2").build_request(make_message()))

    assert "broadcast-2" == doc["MessageStream"]
    assert [] == problems("postmark", doc)


def test_reply_to_text_html_and_headers():
    """Reply-To, both bodies and allowed headers (repeats kept) are carried."""
    message = make_message(
        text="Hi\n",
        html="<p>Hi</p>\n",
        reply_to=(Address("r@example.com", "Replies"), Address("s@example.com")),
        headers=(
            Header("Subject", "Quarterly report"),
            Header("In-Reply-To", "<a@example.com>"),
            Header("X-Tag", "one"),
            Header("X-Tag", "two"),
        ),
    )

    doc = body(provider().build_request(message))

    assert [] == problems("postmark", doc)
    assert [("Replies", "r@example.com"), ("", "s@example.com")] == addresses(doc["ReplyTo"])
    assert ("Hi\n", "<p>Hi</p>\n") == (doc["TextBody"], doc["HtmlBody"])
    assert [
        {"Name": "In-Reply-To", "Value": "<a@example.com>"},
        {"Name": "X-Tag", "Value": "one"},
        {"Name": "X-Tag", "Value": "two"},
    ] == doc["Headers"]


def test_attachments_and_inline_image():
    """Attachments are byte-exact; the inline image carries ContentID cid:<id>."""
    message = make_message(html=INLINE_HTML, attachments=(pdf_attachment(), inline_logo()))

    doc = body(provider().build_request(message))

    assert [] == problems("postmark", doc)
    pdf, logo = doc["Attachments"]
    assert ("report.pdf", "application/pdf") == (pdf["Name"], pdf["ContentType"])
    assert PDF == base64.b64decode(pdf["Content"], validate=True)
    assert "ContentID" not in pdf
    assert ("logo.png", "image/png", f"cid:{CID}") == (
        logo["Name"],
        logo["ContentType"],
        logo["ContentID"],
    )
    assert PNG == base64.b64decode(logo["Content"], validate=True)


def test_no_body_sends_a_space():
    """TextBody or HtmlBody is required, so an attachment-only mail gets a space as text."""
    message = make_message(text="", html=None, subject=None, attachments=(pdf_attachment(),))

    doc = body(provider().build_request(message))

    assert " " == doc["TextBody"]
    assert "Subject" not in doc
    assert "no text or HTML body: a single space is sent as text" in provider().unsupported(message)


# --- responses ---------------------------------------------------------------------------

REQ = httpx.Request("POST", "https://api.postmarkapp.com/email")
OK: dict[str, Any] = {
    "To": "alice@example.org",
    "SubmittedAt": "2026-12-03T12:00:00.0000000-05:00",
    "MessageID": "b7bc2f4a-e38e-4336-af7d-e6c392c2f817",
    "ErrorCode": 0,
    "Message": "OK",
}


def test_200_error_code_zero_is_delivered():
    """ErrorCode 0 is delivered and records MessageID."""
    outcome = provider().interpret_response(httpx.Response(200, json=OK, request=REQ))

    assert Delivered(status=200, provider_message_id=OK["MessageID"]) == outcome


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (300, "Invalid email request"),
        (406, "You tried to send to a recipient that has been marked as inactive."),
        (411, "Forbidden attachment type"),
        (400, "Sender signature not found"),
    ],
)
def test_422_codes_are_permanent(code, text):
    """Validation, inactive-recipient and signature errors are permanent."""
    response = httpx.Response(422, json={"ErrorCode": code, "Message": text}, request=REQ)

    assert Permanent(reason=f"HTTP 422: ErrorCode {code}: {text}", status=422) == (
        provider().interpret_response(response)
    )


def test_maintenance_code_is_retryable():
    """ErrorCode 100 (maintenance) is retried even on a 4xx/5xx status."""
    response = httpx.Response(
        503,
        json={"ErrorCode": 100, "Message": "Maintenance"},
        headers={"Retry-After": "60"},
        request=REQ,
    )

    assert Retryable(
        reason="HTTP 503: ErrorCode 100: Maintenance", status=503, retry_after=60.0
    ) == (provider().interpret_response(response))


def test_401_bad_token_is_permanent():
    """A bad server token is permanent (a configuration error)."""
    response = httpx.Response(
        401,
        json={
            "ErrorCode": 10,
            "Message": "The Server Token you provided in the X-Postmark-Server-Token "
            "request header was invalid.",
        },
        request=REQ,
    )

    outcome = provider().interpret_response(response)

    assert isinstance(outcome, Permanent)
    assert 401 == outcome.status


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limit_and_server_errors_are_retryable(status):
    """429 and 5xx without an ErrorCode body are retried."""
    response = httpx.Response(status, text="Too Many Requests", request=REQ)

    assert isinstance(provider().interpret_response(response), Retryable)


def test_batch_all_accepted():
    """A batch where every item has ErrorCode 0 is delivered with all MessageIDs."""
    items = [
        {**OK, "To": "a@x.example", "MessageID": "id-1"},
        {**OK, "To": "b@x.example", "MessageID": "id-2"},
    ]

    outcome = provider().interpret_response(httpx.Response(200, json=items, request=REQ))

    assert Delivered(status=200, provider_message_id="id-1,id-2") == outcome


def test_batch_partial_refusal_is_permanent_and_says_so():
    """A batch item refused for good makes the message permanent, naming that recipient."""
    items = [
        {**OK, "To": "a@x.example", "MessageID": "id-1"},
        {"ErrorCode": 406, "Message": "Inactive recipient", "To": "b@x.example"},
    ]

    outcome = provider().interpret_response(httpx.Response(200, json=items, request=REQ))

    assert (
        Permanent(
            reason="1 of 2 copies accepted; b@x.example: ErrorCode 406: Inactive recipient",
            status=200,
        )
        == outcome
    )


def test_batch_rate_limited_item_is_retryable():
    """A batch item refused with ErrorCode 429 makes the message retryable."""
    items = [{"ErrorCode": 429, "Message": "Rate limit exceeded", "To": "a@x.example"}]

    outcome = provider().interpret_response(httpx.Response(200, json=items, request=REQ))

    assert isinstance(outcome, Retryable)


def test_html_only_message():
    """HTML alone goes as HtmlBody without a TextBody."""
    doc = body(provider().build_request(make_message(text=None, html="<p>Hi</p>")))

    assert "<p>Hi</p>" == doc["HtmlBody"]
    assert "TextBody" not in doc
    assert [] == problems("postmark", doc)


def test_200_without_a_json_body_is_delivered():
    """A 200 whose body cannot be read is still an acceptance."""
    response = httpx.Response(200, text="OK", request=REQ)

    assert Delivered(status=200) == provider().interpret_response(response)
