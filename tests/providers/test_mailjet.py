"""Mailjet Send API v3.1: request building against the documented schema, and responses."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from bridge.model import Address, Delivered, Header, Permanent, Retryable
from bridge.providers import get
from bridge.providers.mailjet import MailjetProvider, MailjetSettings
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

PUBLIC = "mj-public-0123456789"
SECRET = "mj-private-abcdef0123"


def provider(**settings: object) -> MailjetProvider:
    return MailjetProvider(
        MailjetSettings.model_validate({"api_key": PUBLIC, "secret_key": SECRET, **settings})
    )


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


def test_registry_names_the_adapter():
    """The `mailjet` config type resolves to this adapter."""
    assert MailjetProvider is get("mailjet")


def test_request_line_and_basic_auth():
    """A message is POSTed to /v3.1/send with Basic public:secret, no secret in the URL."""
    request = provider().build_request(make_message())
    expected = "Basic " + base64.b64encode(f"{PUBLIC}:{SECRET}".encode()).decode()

    assert ("POST", "https://api.mailjet.com/v3.1/send") == (request.method, str(request.url))
    assert expected == request.headers["authorization"]
    assert "application/json" == request.headers["content-type"]
    assert SECRET not in str(request.url)
    assert SECRET.encode() not in request.content


def test_plain_message_body_is_valid_and_exact():
    """A plain message becomes one entry of Messages, valid against the documented schema."""
    message = make_message()

    doc = body(provider().build_request(message))

    assert [] == problems("mailjet", doc)
    assert {
        "Messages": [
            {
                "From": {"Email": "sender@example.com", "Name": "Harness Sender"},
                "To": [{"Email": "alice@example.org", "Name": "Alice Example"}],
                "Subject": "Quarterly report",
                "TextPart": "Hello Alice,\n\nthe report is attached.\n",
                "CustomID": message.id,
            }
        ]
    } == doc


def test_to_cc_and_blind_copy():
    """To and Cc keep roles and names; the envelope-only address goes as Bcc."""
    entry = body(provider().build_request(make_message(**THREE)))["Messages"][0]

    assert [{"Email": "anna@example.org", "Name": "Anna Alpha"}] == entry["To"]
    assert [{"Email": "ben@example.org", "Name": "Ben Beta"}] == entry["Cc"]
    assert [{"Email": "carl@example.net"}] == entry["Bcc"]


def test_bcc_only_is_one_message_per_recipient_in_one_call():
    """With nobody in To each recipient is its own entry of Messages, To them alone."""
    doc = body(provider().build_request(make_message(**BCC_ONLY)))

    assert [] == problems("mailjet", doc)
    assert [[{"Email": "bcc-one@example.net"}], [{"Email": "bcc-two@example.net"}]] == [
        m["To"] for m in doc["Messages"]
    ]
    assert all("Bcc" not in m for m in doc["Messages"])


def test_attachments_and_inlined_images():
    """Attachments and cid images go to their own arrays, byte-exact, with ContentID."""
    message = make_message(html=INLINE_HTML, attachments=(pdf_attachment(), inline_logo()))

    entry = body(provider().build_request(message))["Messages"][0]

    (pdf,) = entry["Attachments"]
    (logo,) = entry["InlinedAttachments"]
    assert ("application/pdf", "report.pdf") == (pdf["ContentType"], pdf["Filename"])
    assert PDF == base64.b64decode(pdf["Base64Content"], validate=True)
    assert ("image/png", "logo.png", CID) == (
        logo["ContentType"],
        logo["Filename"],
        logo["ContentID"],
    )
    assert PNG == base64.b64decode(logo["Base64Content"], validate=True)
    assert INLINE_HTML == entry["HTMLPart"]


def test_forbidden_headers_are_kept_out_and_noted():
    """Headers Mailjet refuses (send-0011) are not sent; allowed ones are."""
    message = make_message(
        headers=(
            Header("X-Mailer", "Thunderbird"),
            Header("X-MJ-CustomID", "spoof"),
            Header("List-Id", "<news.example.com>"),
            Header("List-Unsubscribe", "<mailto:u@example.com>"),
            Header("X-Ticket", "T-42"),
        )
    )

    entry = body(provider().build_request(message))["Messages"][0]
    notes = provider().unsupported(message)

    assert {"List-Unsubscribe": "<mailto:u@example.com>", "X-Ticket": "T-42"} == entry["Headers"]
    assert {
        "header X-Mailer (the API forbids it)",
        "header X-MJ-CustomID (the API forbids it)",
        "header List-Id (the API forbids it)",
    } <= set(notes)


def test_reply_to_long_subject_and_sandbox():
    """The first Reply-To is sent, the subject is cut to 255, SandboxMode is set."""
    message = make_message(
        subject="S" * 300, reply_to=(Address("r@example.com", "R"), Address("s@example.com"))
    )

    doc = body(provider(sandbox_mode=True).build_request(message))
    notes = provider().unsupported(message)

    assert [] == problems("mailjet", doc)
    assert True is doc["SandboxMode"]
    assert {"Email": "r@example.com", "Name": "R"} == doc["Messages"][0]["ReplyTo"]
    assert 255 == len(doc["Messages"][0]["Subject"])
    assert "subject cut to 255 characters" in notes
    assert "Reply-To addresses after the first (the API takes one)" in notes


# --- responses ---------------------------------------------------------------------------

REQ = httpx.Request("POST", "https://api.mailjet.com/v3.1/send")


def success(email: str, message_id: int) -> dict[str, Any]:
    return {
        "Status": "success",
        "CustomID": "",
        "To": [
            {
                "Email": email,
                "MessageUUID": "1ab23cd4-e567-8901-2345-6789f0gh1i2j",
                "MessageID": message_id,
                "MessageHref": f"https://api.mailjet.com/v3/REST/message/{message_id}",
            }
        ],
        "Cc": [],
        "Bcc": [],
    }


def test_200_all_success_is_delivered_with_message_ids():
    """Every message successful: delivered, recording each recipient's MessageID."""
    response = httpx.Response(
        200,
        json={"Messages": [success("a@x.example", 288230376151711744), success("b@x.example", 7)]},
        request=REQ,
    )

    assert Delivered(status=200, provider_message_id="288230376151711744,7") == (
        provider().interpret_response(response)
    )


def test_message_error_is_permanent():
    """A message refused with a 400-class error (send-0008 unauthorised From) is permanent."""
    response = httpx.Response(
        400,
        json={
            "Messages": [
                {
                    "Status": "error",
                    "Errors": [
                        {
                            "ErrorIdentifier": "88b5ca9f-5f1f-42e7-a45e-9ecbad0c285e",
                            "ErrorCode": "send-0008",
                            "StatusCode": 403,
                            "ErrorMessage": '"sender@example.com" is not an authorized sender.',
                            "ErrorRelatedTo": ["From"],
                        }
                    ],
                }
            ]
        },
        request=REQ,
    )

    assert Permanent(
        reason='send-0008: "sender@example.com" is not an authorized sender. (From)', status=400
    ) == provider().interpret_response(response)


def test_partial_success_is_permanent_and_counts_what_was_accepted():
    """One copy accepted and one refused: permanent, saying one of two was accepted."""
    refused = {
        "Status": "error",
        "Errors": [
            {
                "ErrorCode": "mj-0013",
                "StatusCode": 400,
                "ErrorMessage": '"b@x" is an invalid email address.',
                "ErrorRelatedTo": ["To[0].Email"],
            }
        ],
    }
    response = httpx.Response(
        400, json={"Messages": [success("a@x.example", 1), refused]}, request=REQ
    )

    outcome = provider().interpret_response(response)

    assert (
        Permanent(
            reason="1 of 2 copies accepted; "
            'mj-0013: "b@x" is an invalid email address. (To[0].Email)',
            status=400,
        )
        == outcome
    )


def test_message_level_server_error_is_retryable():
    """A message error with StatusCode 500 is retried."""
    response = httpx.Response(
        500,
        json={
            "Messages": [
                {
                    "Status": "error",
                    "Errors": [
                        {
                            "ErrorCode": "",
                            "StatusCode": 500,
                            "ErrorMessage": "Internal Server Error",
                        }
                    ],
                }
            ]
        },
        request=REQ,
    )

    assert isinstance(provider().interpret_response(response), Retryable)


def test_global_401_is_permanent():
    """A bad key pair (no Messages in the body) is permanent."""
    response = httpx.Response(
        401,
        json={
            "ErrorIdentifier": "3a3b6a80-7e3a-4e52-9d2f-1d0d0a7b9c11",
            "ErrorCode": "mj-0015",
            "StatusCode": 401,
            "ErrorMessage": "API key authentication/authorization failure. You may be "
            "unauthorized to access the API or your API key may be expired.",
        },
        request=REQ,
    )

    outcome = provider().interpret_response(response)

    assert isinstance(outcome, Permanent)
    assert outcome.reason.startswith("HTTP 401: mj-0015: API key authentication")


@pytest.mark.parametrize(
    ("status", "text"), [(429, "Too Many Requests"), (502, "<html><h1>Bad Gateway</h1></html>")]
)
def test_plain_429_and_5xx_are_retryable(status, text):
    """429 and 5xx with plain-text or HTML bodies are retried."""
    response = httpx.Response(status, text=text, request=REQ)

    assert Retryable(reason=f"HTTP {status}: {text}", status=status) == (
        provider().interpret_response(response)
    )


def test_html_only_single_reply_to_no_subject():
    """HTML alone goes as HTMLPart, one Reply-To without a note, no Subject key."""
    message = make_message(
        subject=None, text=None, html="<p>Hi</p>", reply_to=(Address("r@x.example"),)
    )

    entry = body(provider().build_request(message))["Messages"][0]

    assert ("<p>Hi</p>", {"Email": "r@x.example"}) == (entry["HTMLPart"], entry["ReplyTo"])
    assert "TextPart" not in entry
    assert "Subject" not in entry
    assert not any("Reply-To" in n for n in provider().unsupported(message))


def test_attachment_only_message_gets_a_space_as_text():
    """With neither text nor HTML, TextPart is a single space (one of them is required)."""
    message = make_message(text=None, attachments=(pdf_attachment(),))

    doc = body(provider().build_request(message))

    assert " " == doc["Messages"][0]["TextPart"]
    assert [] == problems("mailjet", doc)


def test_2xx_without_messages_is_delivered_and_garbled_entries_are_permanent():
    """A 200 with no Messages is taken as accepted; an unreadable entry is refused."""
    empty = provider().interpret_response(httpx.Response(200, request=REQ))
    garbled = provider().interpret_response(
        httpx.Response(200, json={"Messages": ["?"]}, request=REQ)
    )

    assert Delivered(status=200) == empty
    assert Permanent(reason="unreadable message result", status=200) == garbled
