"""SparkPost transmissions with email_rfc822: request shape, recipients, answers."""

from __future__ import annotations

import json

import pytest

from bridge.model import Delivered, Permanent, Retryable
from bridge.providers import get
from bridge.providers.rawmime import prepare_raw
from bridge.providers.sparkpost import QUOTA_DEFER, SparkPostProvider, SparkPostSettings
from tests.casefiles import case_path
from tests.providers.rawmime_support import PARSER, RAW, RCPTS, make_message, response

KEY = "harness-sparkpost-key-0123456789abcdef"


def provider(**overrides: object) -> SparkPostProvider:
    return SparkPostProvider(SparkPostSettings.model_validate({"api_key": KEY, **overrides}))


def body(message_raw: bytes = RAW, **overrides: object) -> dict[str, object]:
    request = provider(**overrides).build_request(make_message(message_raw))
    doc: dict[str, object] = json.loads(request.read())
    return doc


def test_registry_names_the_adapter() -> None:
    """`type: sparkpost` resolves to SparkPostProvider."""
    assert SparkPostProvider is get("sparkpost")


def test_settings_take_the_checker_keys() -> None:
    """The keys provider_check.py writes (base_url, ca_file, api_key) validate."""
    settings = SparkPostProvider.parse_settings(
        {"base_url": "https://127.0.0.1:8443", "ca_file": "/etc/smtp-bridge/ca.pem", "api_key": KEY}
    )

    assert isinstance(settings, SparkPostSettings)
    assert KEY not in repr(settings)


@pytest.mark.parametrize(
    ("overrides", "url"),
    [
        ({}, "https://api.sparkpost.com/api/v1/transmissions"),
        ({"region": "eu"}, "https://api.eu.sparkpost.com/api/v1/transmissions"),
        ({"base_url": "https://127.0.0.1:8443"}, "https://127.0.0.1:8443/api/v1/transmissions"),
    ],
)
def test_endpoint_by_region_and_base_url(overrides: dict[str, str], url: str) -> None:
    """US is the default host, `region: eu` the EU host, and base_url overrides both."""
    request = provider(**overrides).build_request(make_message())

    assert ("POST", url) == (request.method, str(request.url))


def test_auth_is_the_bare_key_in_the_header() -> None:
    """Authorization carries the API key itself; the URL and body do not."""
    request = provider().build_request(make_message())

    assert KEY == request.headers["authorization"]
    assert "application/json" == request.headers["content-type"]
    assert KEY not in str(request.url)
    assert KEY.encode() not in request.read()


def test_body_is_rfc822_content_for_the_envelope() -> None:
    """recipients = the envelope, content = the prepared MIME (no Bcc), tracking off."""
    expected = {
        "options": {
            "open_tracking": False,
            "click_tracking": False,
            "perform_substitutions": False,
        },
        "recipients": [{"address": {"email": rcpt}} for rcpt in RCPTS],
        "content": {"email_rfc822": prepare_raw(RAW).decode()},
    }

    assert expected == body()
    assert "Bcc:" not in prepare_raw(RAW).decode()


def test_optional_settings_reach_the_body() -> None:
    """Tracking, transactional, ip_pool and campaign_id are passed when configured."""
    doc = body(
        open_tracking=True, click_tracking=True, transactional=True, ip_pool="p", campaign_id="c"
    )

    assert {
        "open_tracking": True,
        "click_tracking": True,
        "perform_substitutions": False,
        "transactional": True,
        "ip_pool": "p",
    } == doc["options"]
    assert "c" == doc["campaign_id"]


def test_8bit_non_utf8_body_survives_as_json_string() -> None:
    """12-cp1252-labelled-iso-8859-1.eml is re-encoded; the JSON string decodes the same."""
    raw = case_path("12-cp1252-labelled-iso-8859-1.eml").read_bytes()
    content = body(raw)["content"]
    assert isinstance(content, dict)
    sent = PARSER.parsebytes(content["email_rfc822"].encode())
    original = PARSER.parsebytes(raw)

    assert original.get_payload(decode=True) == sent.get_payload(decode=True)
    assert "\ufffd" not in content["email_rfc822"]


def test_limits_and_unsupported() -> None:
    """Defaults are 20 MB and no recipient cap; clean mail loses nothing."""
    sparkpost = provider()

    assert (20_000_000, None) == (sparkpost.max_message_size, sparkpost.max_recipients)
    assert () == sparkpost.unsupported(make_message())


def test_unsupported_names_what_sparkpost_would_alter() -> None:
    """Raw non-UTF-8 header bytes and '{{' in a header are reported."""
    raw = b"From: a@example.com\r\nSubject: caf\xe9 {{name}}\r\n\r\nhi\r\n"

    assert (
        "header bytes that are not UTF-8 (sent as U+FFFD)",
        "'{{' in a header (SparkPost substitutes headers)",
    ) == provider().unsupported(make_message(raw))


def test_200_is_delivered_with_the_transmission_id() -> None:
    """200 with results.id is delivered, recording the transmission id."""
    answer = response(
        200,
        {
            "results": {
                "total_rejected_recipients": 0,
                "total_accepted_recipients": 3,
                "id": "11668787484950529",
            }
        },
    )

    assert Delivered(status=200, provider_message_id="11668787484950529") == (
        provider().interpret_response(answer)
    )


def test_200_with_no_accepted_recipient_is_permanent() -> None:
    """A 200 that accepted none of the recipients sent nothing, so it is permanent."""
    answer = response(
        200,
        {"results": {"total_rejected_recipients": 3, "total_accepted_recipients": 0, "id": "1"}},
    )
    outcome = provider().interpret_response(answer)

    assert isinstance(outcome, Permanent)
    assert "no recipient accepted" in outcome.reason


def test_420_is_deferred_for_an_hour() -> None:
    """420 (sending limit) is retried, after an hour when no Retry-After is given."""
    answer = response(
        420,
        {
            "errors": [
                {
                    "message": "Exceed Sending Limit (daily)",
                    "description": "Try again tomorrow",
                    "code": "2102",
                }
            ]
        },
    )
    outcome = provider().interpret_response(answer)

    assert isinstance(outcome, Retryable)
    assert (420, QUOTA_DEFER) == (outcome.status, outcome.retry_after)


def test_420_honours_retry_after() -> None:
    """420 with Retry-After waits that long instead."""
    outcome = provider().interpret_response(response(420, "", **{"Retry-After": "60"}))

    assert isinstance(outcome, Retryable)
    assert 60.0 == outcome.retry_after


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, "1300", "invalid data format/type"),
        (401, "", "Unauthorized."),
        (403, "1100", "permission denied"),
        (413, "", "Request Entity Too Large"),
        (422, "1400", "required field is missing"),
    ],
)
def test_client_errors_are_permanent(status: int, code: str, message: str) -> None:
    """400, 401, 403, 413 and 422 are permanent."""
    answer = response(status, {"errors": [{"message": message, "code": code}]})
    outcome = provider().interpret_response(answer)

    assert isinstance(outcome, Permanent)
    assert status == outcome.status
    assert message in outcome.reason


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limit_and_server_errors_are_retried(status: int) -> None:
    """429 and 5xx are retried, honouring Retry-After."""
    outcome = provider().interpret_response(
        response(status, {"errors": [{"message": "busy"}]}, **{"Retry-After": "3"})
    )

    assert (
        Retryable(
            reason=f'HTTP {status}: {{"errors":[{{"message":"busy"}}]}}',
            status=status,
            retry_after=3.0,
        )
        == outcome
    )


def test_200_without_json_is_delivered_without_id() -> None:
    """A 2xx whose body is not JSON counts as delivered, without an id."""
    assert Delivered(status=200) == provider().interpret_response(response(200, "OK"))
