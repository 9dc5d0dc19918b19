"""SendGrid Mail Send: request building against the spec, and response classification."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pydantic
import pytest

from bridge.model import Address, Delivered, Header, Permanent, Retryable
from bridge.providers import get
from bridge.providers.sendgrid import SendGridProvider, SendGridSettings
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

KEY = "SG.testKey.0123456789abcdef"


def provider(**settings: object) -> SendGridProvider:
    return SendGridProvider(SendGridSettings.model_validate({"api_key": KEY, **settings}))


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


def test_registry_names_the_adapter():
    """The `sendgrid` config type resolves to this adapter."""
    assert SendGridProvider is get("sendgrid")


def test_request_line_auth_and_content_type():
    """A message is POSTed to /v3/mail/send with a Bearer key and a JSON body."""
    request = provider().build_request(make_message())

    assert "POST" == request.method
    assert "https://api.sendgrid.com/v3/mail/send" == str(request.url)
    assert f"Bearer {KEY}" == request.headers["authorization"]
    assert "application/json" == request.headers["content-type"]
    assert KEY not in str(request.url)


def test_base_url_and_region():
    """`region: eu` picks the EU host; an explicit base_url (test sink) wins."""
    eu = provider(region="eu").build_request(make_message())
    sink = provider(region="eu", base_url="https://127.0.0.1:8443/").build_request(make_message())

    assert "https://api.eu.sendgrid.com/v3/mail/send" == str(eu.url)
    assert "https://127.0.0.1:8443/v3/mail/send" == str(sink.url)


@pytest.mark.parametrize(
    "base_url", ["http://api.sendgrid.com", "ftp://x", "https://h/?api_key=1", "relative/path"]
)
def test_base_url_must_be_https(base_url):
    """Plain http to a remote host, odd schemes and query strings are refused."""
    with pytest.raises(pydantic.ValidationError):
        SendGridSettings.model_validate({"api_key": KEY, "base_url": base_url})


def test_spec_check_catches_broken_bodies():
    """The spec helper reports a missing `to`, an empty content value and unknown keys."""
    bad = {
        "personalizations": [{"cc": [{"email": "a@example.org"}]}],
        "from": {"email": "s@example.com"},
        "content": [{"type": "text/plain", "value": ""}],
        "bogus": 1,
    }

    found = problems("sendgrid", bad)

    assert 3 == len(found), found
    assert "bogus: not defined in the spec" in found


def test_plain_message_body_is_valid_and_exact():
    """A plain message becomes one personalization, valid against the spec."""
    doc = body(provider().build_request(make_message()))

    assert [] == problems("sendgrid", doc)
    assert {
        "personalizations": [{"to": [{"email": "alice@example.org", "name": "Alice Example"}]}],
        "from": {"email": "sender@example.com", "name": "Harness Sender"},
        "subject": "Quarterly report",
        "content": [{"type": "text/plain", "value": "Hello Alice,\n\nthe report is attached.\n"}],
    } == doc


def test_to_cc_and_blind_copy_in_one_personalization():
    """To and Cc keep their roles and names; the envelope-only address goes as bcc."""
    doc = body(provider().build_request(make_message(**THREE)))

    assert [] == problems("sendgrid", doc)
    assert [
        {
            "to": [{"email": "anna@example.org", "name": "Anna Alpha"}],
            "cc": [{"email": "ben@example.org", "name": "Ben Beta"}],
            "bcc": [{"email": "carl@example.net"}],
        }
    ] == doc["personalizations"]


def test_bcc_only_gets_one_personalization_per_recipient():
    """Without a To recipient each blind copy is its own personalization, To that address."""
    doc = body(provider().build_request(make_message(**BCC_ONLY)))

    assert [] == problems("sendgrid", doc)
    assert [
        {"to": [{"email": "bcc-one@example.net"}]},
        {"to": [{"email": "bcc-two@example.net"}]},
    ] == doc["personalizations"]


def test_header_addresses_outside_the_envelope_are_not_sent():
    """A To address that was never RCPT'd is neither delivered to nor shown, and is noted."""
    message = make_message(
        rcpt_to=("alice@example.org",),
        to=(Address("alice@example.org", "Alice"), Address("zed@example.org", "Zed")),
    )

    doc = body(provider().build_request(message))

    assert [{"to": [{"email": "alice@example.org", "name": "Alice"}]}] == doc["personalizations"]
    assert (
        "To/Cc addresses outside this envelope are not shown: zed@example.org"
        in provider().unsupported(message)
    )


def test_duplicate_and_differently_cased_recipients_appear_once():
    """An address in To and Cc, or RCPT'd twice in other case, is sent exactly once."""
    message = make_message(
        rcpt_to=("Alice@Example.org", "alice@example.org", "ben@example.org"),
        to=(Address("alice@example.org", "Alice"),),
        cc=(Address("ALICE@example.org"), Address("ben@example.org")),
    )

    doc = body(provider().build_request(message))

    assert [
        {
            "to": [{"email": "alice@example.org", "name": "Alice"}],
            "cc": [{"email": "ben@example.org"}],
        }
    ] == doc["personalizations"]


def test_utf8_display_names_and_subject_survive():
    """Non-ASCII names and subjects go out as UTF-8 JSON, not escaped or encoded."""
    message = make_message(
        rcpt_to=("zoe@example.org",),
        from_=Address("joerg@example.com", "Jörg Müller-Lüdenscheidt"),
        to=(Address("zoe@example.org", "Zoë Ångström"),),
        subject="Grüße aus Köln – Prüfung ✓ 日本語のテスト",
    )

    request = provider().build_request(message)
    doc = body(request)

    assert [] == problems("sendgrid", doc)
    assert "Jörg Müller-Lüdenscheidt" == doc["from"]["name"]
    assert "Zoë Ångström" == doc["personalizations"][0]["to"][0]["name"]
    assert "Grüße aus Köln – Prüfung ✓ 日本語のテスト" == doc["subject"]
    assert "Grüße".encode() in request.content


def test_commas_in_recipient_names_are_removed_and_noted():
    """SendGrid refuses ',' and ';' in recipient names, so they become spaces."""
    message = make_message(to=(Address("alice@example.org", "Example, Alice; PhD"),))

    doc = body(provider().build_request(message))

    assert "Example Alice PhD" == doc["personalizations"][0]["to"][0]["name"]
    assert any("',' and ';'" in n for n in provider().unsupported(message))


def test_text_before_html():
    """Both bodies are sent, text/plain first as Mail Send requires."""
    message = make_message(text="Hi\n", html="<p>Hi</p>\n")

    doc = body(provider().build_request(message))

    assert [
        {"type": "text/plain", "value": "Hi\n"},
        {"type": "text/html", "value": "<p>Hi</p>\n"},
    ] == doc["content"]


def test_empty_body_and_subject_become_a_single_space():
    """With no body and no subject a single space is sent for each, and both are noted."""
    message = make_message(subject=None, text=None, html=None, attachments=(pdf_attachment(),))

    doc = body(provider().build_request(message))
    notes = provider().unsupported(message)

    assert [] == problems("sendgrid", doc)
    assert " " == doc["subject"]
    assert [{"type": "text/plain", "value": " "}] == doc["content"]
    assert "no text or HTML body: a single space is sent as text" in notes


def test_attachments_and_inline_images_are_byte_exact():
    """Attachments and cid images go base64 with filename, type, disposition, content_id."""
    message = make_message(
        text="See logo.\n",
        html=INLINE_HTML,
        attachments=(pdf_attachment(), inline_logo()),
    )

    doc = body(provider().build_request(message))

    assert [] == problems("sendgrid", doc)
    pdf, logo = doc["attachments"]
    assert PDF == base64.b64decode(pdf["content"], validate=True)
    assert {"filename": "report.pdf", "type": "application/pdf", "disposition": "attachment"} == {
        k: pdf[k] for k in ("filename", "type", "disposition")
    }
    assert "content_id" not in pdf
    assert PNG == base64.b64decode(logo["content"], validate=True)
    assert ("inline", CID, "logo.png") == (
        logo["disposition"],
        logo["content_id"],
        logo["filename"],
    )
    assert f"cid:{CID}" in doc["content"][1]["value"]


def test_related_part_referenced_from_html_is_inline():
    """A Content-ID part the HTML references is sent inline even without a disposition."""
    message = make_message(html=INLINE_HTML, attachments=(inline_logo("attachment"),))

    doc = body(provider().build_request(message))

    assert ("inline", CID) == (
        doc["attachments"][0]["disposition"],
        doc["attachments"][0]["content_id"],
    )


def test_unnamed_attachment_gets_a_filename():
    """The spec requires a filename, so an unnamed part gets one from its type, noted."""
    message = make_message(attachments=(pdf_attachment(filename=None),))

    doc = body(provider().build_request(message))

    assert [] == problems("sendgrid", doc)
    assert "attachment-1.pdf" == doc["attachments"][0]["filename"]
    assert "unnamed part sent as attachment-1.pdf" in provider().unsupported(message)


def test_reply_to_single_and_list():
    """One Reply-To uses reply_to; several use reply_to_list."""
    one = body(provider().build_request(make_message(reply_to=(Address("r@example.com", "R"),))))
    two = body(
        provider().build_request(
            make_message(reply_to=(Address("r@example.com"), Address("s@example.com", "S")))
        )
    )

    assert {"email": "r@example.com", "name": "R"} == one["reply_to"]
    assert [{"email": "r@example.com"}, {"email": "s@example.com", "name": "S"}] == two[
        "reply_to_list"
    ]
    assert [] == problems("sendgrid", two)


def test_custom_headers_pass_and_forbidden_ones_are_noted():
    """Threading and X- headers pass; SendGrid's reserved and transport headers do not."""
    message = make_message(
        headers=(
            Header("From", "Harness Sender <sender@example.com>"),
            Header("In-Reply-To", "<a@example.com>"),
            Header("References", "<a@example.com> <b@example.com>"),
            Header("X-Campaign", "winter\r\n sale"),
            Header("X-SG-EID", "spoofed"),
            Header("Resent-From", "x@example.com"),
            Header("Received", "from a by b"),
        ),
        message_id="<m1@example.com>",
        date=datetime(2026, 12, 3, 12, 0, tzinfo=UTC),
    )

    doc = body(provider().build_request(message))
    notes = provider().unsupported(message)

    assert {
        "In-Reply-To": "<a@example.com>",
        "References": "<a@example.com> <b@example.com>",
        "X-Campaign": "winter sale",
    } == doc["headers"]
    assert "header X-SG-EID (the API forbids it)" in notes
    assert "header Resent-From" in notes
    assert "Message-ID (the provider assigns its own)" in notes
    assert not any("Received" in n for n in notes)


def test_sandbox_mode():
    """`sandbox_mode: true` asks SendGrid to validate without delivering."""
    doc = body(provider(sandbox_mode=True).build_request(make_message()))

    assert {"sandbox_mode": {"enable": True}} == doc["mail_settings"]
    assert [] == problems("sendgrid", doc)


def test_envelope_sender_is_the_fallback_from():
    """Without a From header the envelope sender is used; with neither, flow is permanent."""
    fallback = body(provider().build_request(make_message(from_=None)))
    flow = provider().flow(make_message(from_=None, mail_from=""), now=0.0)

    with pytest.raises(StopIteration) as stop:
        next(flow)

    assert {"email": "sender@example.com"} == fallback["from"]
    assert isinstance(stop.value.value, Permanent)


def test_body_is_deterministic():
    """The same message gives the same bytes twice (a retry resends identical JSON)."""
    message = make_message(**THREE, attachments=(pdf_attachment(),))

    assert provider().build_request(message).content == provider().build_request(message).content


# --- responses ---------------------------------------------------------------------------

REQ = httpx.Request("POST", "https://api.sendgrid.com/v3/mail/send")


def test_202_is_delivered_with_x_message_id():
    """202 with X-Message-Id is delivered and records that id."""
    response = httpx.Response(202, headers={"X-Message-Id": "W9Kc3yV2Qm2h"}, request=REQ)

    assert Delivered(status=202, provider_message_id="W9Kc3yV2Qm2h") == (
        provider().interpret_response(response)
    )


def test_400_is_permanent_with_the_error_text():
    """A validation error is permanent and its reason quotes field and message."""
    response = httpx.Response(
        400,
        json={
            "errors": [
                {
                    "message": "The from email does not contain a valid address.",
                    "field": "from.email",
                    "help": "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message.from",
                }
            ]
        },
        request=REQ,
    )

    outcome = provider().interpret_response(response)

    assert (
        Permanent(
            reason="HTTP 400: from.email: The from email does not contain a valid address.",
            status=400,
        )
        == outcome
    )


@pytest.mark.parametrize("status", [401, 403, 413])
def test_key_and_size_errors_are_permanent(status):
    """Bad keys and oversized mail are permanent: retrying cannot fix them."""
    response = httpx.Response(
        status,
        json={
            "errors": [{"message": "The provided authorization grant is invalid.", "field": None}]
        },
        request=REQ,
    )

    outcome = provider().interpret_response(response)

    assert isinstance(outcome, Permanent)
    assert status == outcome.status


def test_429_waits_for_the_rate_limit_reset():
    """429 is retried after X-RateLimit-Reset, measured against the response's Date."""
    response = httpx.Response(
        429,
        json={"errors": [{"field": None, "message": "too many requests"}]},
        headers={"X-RateLimit-Reset": "1796299230", "Date": "Thu, 03 Dec 2026 12:00:00 GMT"},
        request=REQ,
    )

    outcome = provider().interpret_response(response)

    assert Retryable(reason="HTTP 429: too many requests", status=429, retry_after=30.0) == outcome


def test_retry_after_wins_over_reset():
    """A Retry-After header is honoured first."""
    response = httpx.Response(
        429, headers={"Retry-After": "7", "X-RateLimit-Reset": "1"}, request=REQ
    )

    assert 7.0 == provider().interpret_response(response).retry_after  # type: ignore[union-attr]


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_server_errors_are_retryable(status):
    """408 and 5xx are retried with no provider-given delay."""
    response = httpx.Response(status, text="<html>Bad Gateway</html>", request=REQ)

    outcome = provider().interpret_response(response)

    assert Retryable(reason=f"HTTP {status}: <html>Bad Gateway</html>", status=status) == outcome


def test_html_only_message():
    """HTML alone is the only content block."""
    doc = body(provider().build_request(make_message(text=None, html="<p>Hi</p>")))

    assert [{"type": "text/html", "value": "<p>Hi</p>"}] == doc["content"]


def test_error_items_without_a_field_or_message():
    """Errors without a field quote the message alone; malformed items are skipped."""
    response = httpx.Response(
        400, json={"errors": [{"message": "Bad Request"}, "junk", {"field": "x"}]}, request=REQ
    )

    assert Permanent(reason="HTTP 400: Bad Request", status=400) == (
        provider().interpret_response(response)
    )
