"""Mailgun messages.mime: request shape, envelope recipients, raw MIME, answers."""

from __future__ import annotations

import base64

import pydantic
import pytest

from bridge.model import Delivered, Permanent, Retryable
from bridge.providers import get
from bridge.providers.mailgun import MailgunProvider, MailgunSettings
from bridge.providers.rawmime import prepare_raw
from tests.providers.rawmime_support import RAW, RCPTS, make_message, parse_form, response

KEY = "key-harness-mailgun-0123456789abcdef"


def provider(**overrides: object) -> MailgunProvider:
    raw = {"type": "mailgun", "api_key": KEY, "domain": "mg.example.com", **overrides}
    raw.pop("type")
    return MailgunProvider(MailgunSettings.model_validate(raw))


def test_registry_names_the_adapter() -> None:
    """`type: mailgun` resolves to MailgunProvider."""
    assert MailgunProvider is get("mailgun")


def test_settings_take_the_checker_keys() -> None:
    """The keys provider_check.py writes (base_url, ca_file, api_key, domain) validate."""
    settings = MailgunProvider.parse_settings(
        {
            "base_url": "https://127.0.0.1:8443",
            "ca_file": "/etc/smtp-bridge/ca.pem",
            "api_key": KEY,
            "domain": "mg.example.com",
        }
    )

    assert isinstance(settings, MailgunSettings)
    assert KEY == settings.api_key.get_secret_value()
    assert KEY not in repr(settings)


@pytest.mark.parametrize("domain", ["", "mg.example.com/../x", "two words"])
def test_bad_domain_is_refused(domain: str) -> None:
    """A domain that is empty or could change the URL path fails validation."""
    with pytest.raises(pydantic.ValidationError):
        MailgunSettings.model_validate({"api_key": KEY, "domain": domain})


@pytest.mark.parametrize(
    ("overrides", "url"),
    [
        ({}, "https://api.mailgun.net/v3/mg.example.com/messages.mime"),
        ({"region": "eu"}, "https://api.eu.mailgun.net/v3/mg.example.com/messages.mime"),
        (
            {"base_url": "https://127.0.0.1:8443/", "region": "eu"},
            "https://127.0.0.1:8443/v3/mg.example.com/messages.mime",
        ),
    ],
)
def test_endpoint_by_region_and_base_url(overrides: dict[str, str], url: str) -> None:
    """US is the default host, `region: eu` the EU host, and base_url overrides both."""
    request = provider(**overrides).build_request(make_message())

    assert ("POST", url) == (request.method, str(request.url))


def test_basic_auth_with_user_api_and_no_secret_in_url() -> None:
    """Auth is Basic api:<key>, and the key appears nowhere in the URL."""
    request = provider().build_request(make_message())

    expected = "Basic " + base64.b64encode(f"api:{KEY}".encode()).decode()
    assert expected == request.headers["authorization"]
    assert KEY not in str(request.url)


def test_form_carries_envelope_recipients_and_the_prepared_mime() -> None:
    """One `to` per envelope recipient, one `message` file part with the MIME minus Bcc."""
    request = provider().build_request(make_message())
    fields = parse_form(request)
    messages = [f for f in fields if f[0] == "message"]

    assert "multipart/form-data" == request.headers["content-type"].split(";")[0]
    assert list(RCPTS) == [data.decode() for name, _, _, data in fields if name == "to"]
    assert [("message", "message.eml", "message/rfc822", prepare_raw(RAW))] == messages
    assert b"Bcc:" not in messages[0][3]
    assert b"carl@example.net" not in messages[0][3]


def test_envelope_is_the_authority() -> None:
    """Recipients come from the envelope alone, not from the To/Cc headers."""
    request = provider().build_request(make_message(rcpt_to=("dev@example.org",)))
    to = [data for name, _, _, data in parse_form(request) if name == "to"]

    assert [b"dev@example.org"] == to


def test_tracking_is_off_unless_enabled() -> None:
    """Tracking options say no by default and are not sent when tracking is allowed."""
    default = {n: d for n, _, _, d in parse_form(provider().build_request(make_message()))}
    allowed = parse_form(provider(tracking=True).build_request(make_message()))

    assert {"o:tracking": b"no", "o:tracking-clicks": b"no", "o:tracking-opens": b"no"} == {
        n: d for n, d in default.items() if n.startswith("o:")
    }
    assert [] == [n for n, *_ in allowed if n.startswith("o:")]


def test_request_is_a_pure_function_of_the_message() -> None:
    """Two builds of the same message give identical bytes (no random boundary)."""
    first = provider().build_request(make_message())
    second = provider().build_request(make_message())

    assert first.read() == second.read()
    assert first.headers["content-type"] == second.headers["content-type"]


def test_limits_and_unsupported() -> None:
    """Defaults are Mailgun's 25 MB and 1000 recipients; raw MIME carries everything."""
    mailgun = provider()

    assert (25_000_000, 1000) == (mailgun.max_message_size, mailgun.max_recipients)
    assert () == mailgun.unsupported(make_message())
    assert 10 == provider(max_recipients=10).max_recipients


def test_200_is_delivered_with_the_mailgun_id() -> None:
    """200 {id, message} is delivered, recording the id."""
    answer = response(
        200, {"id": "<20261203120001.1.ABC@mg.example.com>", "message": "Queued. Thank you."}
    )

    assert Delivered(status=200, provider_message_id="<20261203120001.1.ABC@mg.example.com>") == (
        provider().interpret_response(answer)
    )


def test_200_without_json_is_still_delivered() -> None:
    """A 2xx whose body is not JSON counts as delivered, without an id."""
    assert Delivered(status=200) == provider().interpret_response(response(200, "Queued"))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"message": "to parameter is not a valid address. please check documentation"}),
        (401, "Forbidden"),
        (403, {"message": "Domain mg.example.com is not allowed to send: Free accounts ..."}),
        (413, {"message": "Message size exceeds 25MB"}),
    ],
)
def test_client_errors_are_permanent(status: int, body: object) -> None:
    """400, 401, 403 and 413 are permanent, with the reason from the body."""
    outcome = provider().interpret_response(response(status, body))

    assert isinstance(outcome, Permanent)
    assert status == outcome.status
    assert outcome.reason.startswith(f"HTTP {status}")


def test_404_is_retried() -> None:
    """404 (a domain not yet visible, eventually consistent) is retried."""
    outcome = provider().interpret_response(
        response(404, {"message": "Domain not found: mg.example.com"})
    )

    assert (
        Retryable(reason='HTTP 404: {"message":"Domain not found: mg.example.com"}', status=404)
        == outcome
    )


def test_429_honours_retry_after() -> None:
    """429 is retried after the Retry-After seconds."""
    outcome = provider().interpret_response(
        response(429, {"message": "Too many requests"}, **{"Retry-After": "17"})
    )

    assert isinstance(outcome, Retryable)
    assert 17.0 == outcome.retry_after


@pytest.mark.parametrize("status", [408, 500, 502, 503])
def test_server_errors_are_retried(status: int) -> None:
    """408 and 5xx are retried."""
    outcome = provider().interpret_response(response(status, "<html>Bad Gateway</html>"))

    assert isinstance(outcome, Retryable)
    assert status == outcome.status
