"""The decomposition rules the five JSON-only adapters share (bridge.providers.jsonmail)."""

from __future__ import annotations

from typing import Any

import httpx
import pydantic
import pytest

from bridge.model import Address, Attachment, Delivered, Header, Permanent, Retryable
from bridge.providers import jsonmail
from bridge.providers.brevo import BrevoProvider, BrevoSettings
from tests.providers.specs import BCC_ONLY, CID, PNG, make_message


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("https://api.example.com/", "https://api.example.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://localhost:8080/", "http://localhost:8080"),
        ("http://[::1]:9", "http://[::1]:9"),
    ],
)
def test_base_url_accepts_https_and_loopback_http(base_url, expected):
    """https anywhere and plain http to loopback are accepted, trailing slash dropped."""
    settings = jsonmail.ApiSettings.model_validate({"base_url": base_url})

    assert expected == settings.base_url


@pytest.mark.parametrize("base_url", ["http://mail.example.com", "https://h#frag", "mailto:x"])
def test_base_url_refuses_remote_http_fragments_and_other_schemes(base_url):
    """Keys must not travel over plain http, and the URL must be a bare origin."""
    with pytest.raises(pydantic.ValidationError):
        jsonmail.ApiSettings.model_validate({"base_url": base_url})


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (Address("a@example.org"), "a@example.org"),
        (Address("a@example.org", ""), "a@example.org"),
        (Address("a@example.org", "Ann"), '"Ann" <a@example.org>'),
        (Address("a@example.org", 'A "Q" \\ B'), '"A \\"Q\\" \\\\ B" <a@example.org>'),
        (Address("a@example.org", "Evil\r\nBcc: x@y"), '"Evil Bcc: x@y" <a@example.org>'),
        (Address("a@example.org", " \t "), "a@example.org"),
    ],
)
def test_format_address(address, expected):
    """Names are always quoted, escaped, and stripped of control characters."""
    assert expected == jsonmail.format_address(address)


def test_split_recipients_leaves_out_header_addresses_outside_the_envelope():
    """Cc addresses never RCPT'd are not delivered, and Bcc names come from the Bcc header."""
    message = make_message(
        rcpt_to=("a@example.org", "hidden@example.org"),
        to=(Address("a@example.org", "A"),),
        cc=(Address("other@example.org", "Other"),),
        bcc=(Address("hidden@example.org", "Hidden"),),
    )

    recipients, left_out = jsonmail.split_recipients(message)

    assert (
        (Address("a@example.org", "A"),),
        (),
        (Address("hidden@example.org", "Hidden"),),
    ) == (recipients.to, recipients.cc, recipients.bcc)
    assert (Address("other@example.org", "Other"),) == left_out


def test_cc_only_message_gets_one_copy_per_recipient_and_a_note():
    """Without a To recipient, Cc and Bcc recipients each get their own copy, noted."""
    message = make_message(
        rcpt_to=("c@example.org", "b@example.net"), to=(), cc=(Address("c@example.org", "C"),)
    )
    recipients, _ = jsonmail.split_recipients(message)

    copies = jsonmail.copies(recipients)

    assert [(Address("c@example.org", "C"),), (Address("b@example.net"),)] == [c.to for c in copies]
    assert "Cc recipients are shown as To on their own copies" in jsonmail.envelope_notes(message)


def test_sender_header_and_message_id_are_noted():
    """A Sender unlike From and an original Message-ID are reported as not carried."""
    message = make_message(sender=Address("agent@example.com"), message_id="<m@example.com>")

    notes = jsonmail.envelope_notes(message)

    assert [
        "Sender header (the API has no field for it)",
        "Message-ID (the provider assigns its own)",
    ] == notes


def test_no_from_and_null_sender_cannot_be_sent():
    """A message with no From and the null reverse-path has no sender at all."""
    message = make_message(from_=None, mail_from="")

    assert None is jsonmail.sender_of(message)
    with pytest.raises(ValueError, match="no From"):
        jsonmail.require_sender(message)


def test_unnamed_inline_image_is_named_after_its_type():
    """An inline part without a filename becomes inline-<n>.<ext>, keeping its Content-ID."""
    html = f'<img src="CID:{CID}">'
    message = make_message(
        html=html,
        attachments=(
            Attachment(None, "image/png", "attachment", f"<{CID}>", PNG),
            Attachment(None, "application/x-unknown", "attachment", None, b"?"),
        ),
    )

    logo, other = jsonmail.parts(message)

    assert ("inline-1.png", True, CID, False) == (
        logo.filename,
        logo.inline,
        logo.content_id,
        logo.named,
    )
    assert ("attachment-2.bin", False, None) == (other.filename, other.inline, other.content_id)


def test_content_id_part_not_referenced_and_not_inline_is_an_attachment():
    """A Content-ID alone does not make a part inline unless marked so or referenced."""
    message = make_message(
        html="<p>no images</p>",
        attachments=(Attachment("a.png", "image/png", "attachment", CID, PNG),),
    )

    (part,) = jsonmail.parts(message)

    assert (False, None) == (part.inline, part.content_id)


def test_object_header_fields_keep_the_first_of_repeated_headers():
    """APIs with a header object get one value per name; the repeat is noted."""
    message = make_message(headers=(Header("X-Tag", "one"), Header("x-tag", "two")))

    headers, notes = jsonmail.custom_headers(message)

    assert [("X-Tag", "one")] == headers
    assert ["repeated header x-tag (one value per name)"] == notes


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", None),
        (b"  \n", None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (b'{"a":1}', {"a": 1}),
    ],
)
def test_json_document(content, expected):
    """Empty, non-JSON and undecodable bodies read as None."""
    assert expected == jsonmail.json_document(httpx.Response(200, content=content))


def test_json_document_of_an_unread_stream_is_none():
    """A streamed response that was not read yields None instead of raising."""

    def chunks() -> Any:
        yield b"{}"

    response = httpx.Response(200, content=chunks())

    assert None is jsonmail.json_document(response)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-reset": "1796299230"}, None),  # epoch without a Date: cannot be measured
        ({"x-reset": "soon", "date": "Thu, 03 Dec 2026 12:00:00 GMT"}, None),
        ({"x-reset": "-5"}, None),
        ({"x-reset": "1796299230", "date": "not a date"}, None),
        ({"x-reset": "1796299100", "date": "Thu, 03 Dec 2026 12:00:00 GMT"}, 0.0),
    ],
)
def test_epoch_reset_needs_a_date_and_a_number(headers, expected):
    """An epoch reset header is only usable with a number and a parseable Date."""
    response = httpx.Response(429, headers=headers)

    assert expected == jsonmail.rate_limit_delay(
        response, reset_header="x-reset", reset_is_epoch=True
    )


def test_combine_items_takes_the_longest_delay():
    """Several retryable copies wait for the longest delay any of them asked for."""
    outcome = jsonmail.combine_items(
        [Retryable("a", 429, 5.0), Retryable("b", 429, None), Retryable("a", 429, 9.0)], 200
    )

    assert Retryable(reason="a; b", status=200, retry_after=9.0) == outcome


def test_combine_items_all_delivered_joins_ids():
    """All copies accepted: one Delivered with every provider id."""
    outcome = jsonmail.combine_items(
        [Delivered(200, "x"), Delivered(200, None), Delivered(200, "y")], 200
    )

    assert Delivered(status=200, provider_message_id="x,y") == outcome


def run(provider: BrevoProvider, message: Any, responses: list[httpx.Response]) -> Any:
    flow = provider.flow(message, now=0.0)
    next(flow)
    for response in responses:
        try:
            flow.send(response)
        except StopIteration as stop:
            return stop.value
    raise AssertionError("flow wanted more responses")


def test_single_request_failure_is_passed_through_unchanged():
    """With one copy, the flow's outcome is the provider's reading of the response."""
    provider = BrevoProvider(BrevoSettings.model_validate({"api_key": "k"}))
    refused = httpx.Response(400, json={"code": "invalid_parameter", "message": "bad"})

    outcome = run(provider, make_message(), [refused])

    assert Permanent(reason="HTTP 400: invalid_parameter: bad", status=400) == outcome


def test_second_copy_refused_for_good_says_how_many_were_sent():
    """A permanent failure on a later copy names its position and the delivered count."""
    provider = BrevoProvider(BrevoSettings.model_validate({"api_key": "k"}))
    ok = httpx.Response(201, json={"messageId": "<1@relay>"})
    refused = httpx.Response(400, json={"code": "invalid_parameter", "message": "bad"})

    outcome = run(provider, make_message(**BCC_ONLY), [ok, refused])

    assert (
        Permanent(reason="copy 2 of 2 (1 delivered): HTTP 400: invalid_parameter: bad", status=400)
        == outcome
    )


def test_base_url_may_be_left_to_the_adapter():
    """An explicit null base_url means the provider's production host."""
    assert None is jsonmail.ApiSettings.model_validate({"base_url": None}).base_url
