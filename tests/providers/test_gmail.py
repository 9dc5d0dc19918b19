"""Gmail adapter: refresh-token and service-account grants, raw MIME, answers."""

from __future__ import annotations

import base64
import dataclasses
import json
from email import policy
from email.parser import BytesParser
from typing import Any

import httpx
import jwt
import pydantic
import pytest
from cryptography.hazmat.primitives import serialization

from bridge import providers
from bridge.config import load_config
from bridge.model import Address, Delivered, Permanent, Retryable
from bridge.providers.gmail import (
    MAX_JSON_BYTES,
    GmailProvider,
    GmailSettings,
    restrict_recipient_fields,
)
from tests.casefiles import load_smtp_case, smtp_envelope, smtp_message
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

CLIENT = "1234567890-harness.apps.googleusercontent.com"
SECRET = "GOCSPX-harness-gmail-secret-0123"
REFRESH = "1//harness-gmail-refresh-token-0123"
SENDER = "mailer@example.com"
TOKEN_URL = "https://oauth2.googleapis.com/token"
SEND_URL = f"https://gmail.googleapis.com/gmail/v1/users/{SENDER}/messages/send"
SA_EMAIL = "smtp-bridge@project-1234.iam.gserviceaccount.com"
PARSER = BytesParser(policy=policy.default)


def provider(**overrides: Any) -> GmailProvider:
    raw: dict[str, Any] = {
        "client_id": CLIENT,
        "client_secret": SECRET,
        "refresh_token": REFRESH,
        "sender": SENDER,
    }
    raw.update(overrides)
    return GmailProvider(
        GmailSettings.model_validate({k: v for k, v in raw.items() if v is not None})
    )


def service_account_json(key_pem: str) -> str:
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "project-1234",
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": key_pem,
            "client_email": SA_EMAIL,
            "client_id": "100000000000000000001",
            "token_uri": TOKEN_URL,
        }
    )


def sa_provider(key_pem: str, **overrides: Any) -> GmailProvider:
    return provider(
        client_id=None,
        client_secret=None,
        refresh_token=None,
        service_account=service_account_json(key_pem),
        **overrides,
    )


def sent_mime(request: httpx.Request) -> Any:
    doc = json.loads(request.content)
    return PARSER.parsebytes(base64.urlsafe_b64decode(doc["raw"]))


def gmail_ok(gid: str = "18c2f0a1b2c3d4e5") -> httpx.Response:
    return httpx.Response(200, json={"id": gid, "threadId": gid, "labelIds": ["SENT"]})


def simple_message(**kw: Any) -> Any:
    rcpts = kw.pop("rcpt_to", ("anna@example.org",))
    return message(mime(**kw), rcpts)


# --- tokens -------------------------------------------------------------------------------------


def test_refresh_grant_form_is_what_google_expects():
    """Without a cached token the flow first POSTs the refresh grant with the client secret."""
    run = drive(
        provider().flow(simple_message(), 1000.0), script(token_response("ya29.a"), gmail_ok())
    )
    grant, send = run.requests

    assert ("POST", TOKEN_URL) == (grant.method, str(grant.url))
    assert "application/x-www-form-urlencoded" == grant.headers["content-type"]
    assert {
        "grant_type": "refresh_token",
        "client_id": CLIENT,
        "client_secret": SECRET,
        "refresh_token": REFRESH,
    } == form(grant)
    assert "Bearer ya29.a" == send.headers["authorization"]
    assert Delivered(status=200, provider_message_id="18c2f0a1b2c3d4e5") == run.outcome


def test_service_account_grant_is_a_delegated_rs256_jwt():
    """A service account sends a jwt-bearer grant whose JWT impersonates the subject."""
    key, key_pem, _ = rsa_key_and_certificate()
    adapter = sa_provider(key_pem, subject="boss@example.com")
    fields = form(adapter.oauth.grant.request(1_700_000_000.9))
    header, _ = jwt_parts(fields["assertion"])
    claims = jwt.decode(
        fields["assertion"],
        key.public_key(),
        algorithms=["RS256"],
        audience=TOKEN_URL,
        options={"verify_exp": False},
    )

    assert "urn:ietf:params:oauth:grant-type:jwt-bearer" == fields["grant_type"]
    assert {"grant_type", "assertion"} == set(fields)
    assert ("RS256", "0123456789abcdef0123456789abcdef01234567") == (header["alg"], header["kid"])
    assert {
        "iss": SA_EMAIL,
        "sub": "boss@example.com",
        "scope": "https://www.googleapis.com/auth/gmail.send",
        "aud": TOKEN_URL,
        "iat": 1_700_000_000,
        "exp": 1_700_003_600,
    } == claims


def test_service_account_subject_defaults_to_the_sender():
    """Without subject the service account impersonates the configured sender."""
    _, key_pem, _ = rsa_key_and_certificate()
    _, claims = jwt_parts(form(sa_provider(key_pem).oauth.grant.request(5.0))["assertion"])

    assert SENDER == claims["sub"]


def test_token_is_refreshed_five_minutes_before_expiry():
    """The token is reused while fresh and a new grant is made within 5 minutes of expiry."""
    adapter = provider()
    msg = simple_message()
    drive(adapter.flow(msg, 0.0), script(token_response("ya29.a", 3599), gmail_ok()))
    reused = drive(adapter.flow(msg, 3298.0), script(gmail_ok()))
    renewed = drive(adapter.flow(msg, 3300.0), script(token_response("ya29.b"), gmail_ok()))

    assert [SEND_URL] == [str(r.url) for r in reused.requests]
    assert [TOKEN_URL, SEND_URL] == [str(r.url) for r in renewed.requests]
    assert "Bearer ya29.b" == renewed.requests[1].headers["authorization"]


def test_401_refreshes_the_token_and_resends_once():
    """A 401 drops the cached token; the message is sent again with a newly granted one."""
    adapter = provider()
    msg = simple_message()
    drive(adapter.flow(msg, 0.0), script(token_response("ya29.a"), gmail_ok()))
    unauthorized = httpx.Response(
        401,
        json={
            "error": {
                "code": 401,
                "message": "Request had invalid authentication credentials.",
                "errors": [
                    {"message": "Invalid Credentials", "domain": "global", "reason": "authError"}
                ],
                "status": "UNAUTHENTICATED",
            }
        },
    )
    run = drive(adapter.flow(msg, 60.0), script(unauthorized, token_response("ya29.b"), gmail_ok()))
    twice = drive(
        adapter.flow(msg, 61.0), script(unauthorized, token_response("ya29.c"), unauthorized)
    )

    assert [SEND_URL, TOKEN_URL, SEND_URL] == [str(r.url) for r in run.requests]
    assert Delivered(status=200, provider_message_id="18c2f0a1b2c3d4e5") == run.outcome
    assert isinstance(twice.outcome, Retryable)
    assert 401 == twice.outcome.status


def test_revoked_refresh_token_is_retryable():
    """invalid_grant from Google keeps the mail queued with the OAuth error as the reason."""
    revoked = httpx.Response(
        400,
        json={"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
    )
    run = drive(provider().flow(simple_message(), 0.0), script(revoked))

    assert (
        Retryable(
            "Google token endpoint refused the grant "
            "(HTTP 400, invalid_grant: Token has been expired or revoked.)",
            400,
            None,
        )
        == run.outcome
    )


# --- the message --------------------------------------------------------------------------------


def test_small_message_is_sent_as_raw_json_with_bcc_for_envelope_only_recipients():
    """The raw base64url MIME goes to messages.send; an envelope-only recipient is in Bcc."""
    msg = message(
        mime(from_="Mailer <mailer@example.com>", cc="Ben Beta <ben@example.org>"),
        ("anna@example.org", "ben@example.org", "carl@example.net"),
    )
    request = provider().build_request(msg, "ya29.a")
    sent = sent_mime(request)

    assert ("POST", SEND_URL) == (request.method, str(request.url))
    assert "application/json" == request.headers["content-type"]
    assert ["raw"] == list(json.loads(request.content))
    assert "Anna Alpha <anna@example.org>" == str(sent["To"])
    assert "Ben Beta <ben@example.org>" == str(sent["Cc"])
    assert "carl@example.net" == str(sent["Bcc"])
    assert "Quarterly report" == str(sent["Subject"])
    assert () == provider().unsupported(msg)


def test_user_id_is_me_without_a_sender():
    """Without sender the path names the token's own mailbox, ``me``."""
    request = provider(sender=None).build_request(simple_message(), "t")

    assert "https://gmail.googleapis.com/gmail/v1/users/me/messages/send" == str(request.url)


def test_envelope_narrower_than_headers_rewrites_to_and_cc():
    """Case 23: To/Cc keep only envelope addresses, names kept; nobody else is mailed."""
    case = load_smtp_case("23-envelope-differs-from-headers.smtp")
    msg = message(smtp_message(case), smtp_envelope(case).rcpt_to, "orders@example.com")
    adapter = provider()
    sent = sent_mime(adapter.build_request(msg, "t"))

    assert [("Dev Team", "Dev@Example.org")] == [
        (a.display_name, a.addr_spec) for a in sent["To"].addresses
    ]
    assert None is sent["Cc"]
    assert None is sent["Bcc"]
    assert "Thank you for your order." == sent.get_content().rstrip()
    assert (
        "To/Cc addresses outside this envelope are not shown: "
        "customer@example.net, boss@example.net",
    ) == adapter.unsupported(msg)[:1]


def test_bcc_only_message_carries_all_recipients_in_bcc():
    """Case 22: with To an empty group, both envelope recipients are in the one Bcc header."""
    case = load_smtp_case("22-bcc-only-undisclosed-recipients.smtp")
    msg = message(smtp_message(case), smtp_envelope(case).rcpt_to, "newsletter@example.com")
    sent = sent_mime(provider().build_request(msg, "t"))

    assert ["alice@example.org", "bob@example.net"] == [a.addr_spec for a in sent["Bcc"].addresses]
    assert "undisclosed-recipients:;" == str(sent["To"])


@pytest.mark.parametrize(
    "to",
    [
        b"ok@x.org; victim@evil.org",
        b"ok@x.org victim@evil.org",
        b"<ok@x.org> victim@evil.org",
        b"ok@x.org, [victim@evil.org]",
        b'"' + b"N" * 4100 + b'" <ok@x.org>, "a, <victim@evil.org>',
    ],
    ids=["semicolon", "space", "angle-then-bare", "brackets", "over-4k"],
)
def test_to_is_rewritten_from_the_envelope_whatever_its_syntax(to: bytes) -> None:
    """Gmail mails what it parses in To: only envelope recipients may be in the field sent."""
    raw = b"From: sender@example.com\r\nTo: " + to + b"\r\nSubject: x\r\n\r\nhi\r\n"
    sent = sent_mime(provider().build_request(message(raw, ("ok@x.org",)), "t"))

    shown = [
        a.addr_spec for name in ("To", "Cc", "Bcc") for a in getattr(sent[name], "addresses", ())
    ]
    assert ["ok@x.org"] == shown
    assert (
        b"victim"
        not in base64.urlsafe_b64decode(
            json.loads(provider().build_request(message(raw, ("ok@x.org",)), "t").content)["raw"]
        ).split(b"\r\n\r\n")[0]
    )


def test_large_message_is_a_media_upload():
    """A message whose JSON would exceed 1 MB goes as a message/rfc822 media upload."""
    big = bytes(range(256)) * 4096
    msg = simple_message(attachments=[("scan.pdf", "application/pdf", big)])
    request = provider().build_request(msg, "ya29.a")
    sent = PARSER.parsebytes(request.content)

    assert (
        f"https://gmail.googleapis.com/upload/gmail/v1/users/{SENDER}/messages/send?uploadType=media"
        == str(request.url)
    )
    assert "message/rfc822" == request.headers["content-type"]
    assert big == next(sent.iter_attachments()).get_content()
    assert len(request.content) > MAX_JSON_BYTES * 3 // 4


def test_rewritten_fields_encode_non_ascii_names():
    """A non-ASCII display name in a rewritten To field is RFC 2047 encoded and reads back."""
    prepared = b"From: a@x\r\nTo: old@x, other@y\r\nSubject: s\r\n\r\nbody\r\n"
    out = restrict_recipient_fields(prepared, [Address("zoe@example.org", "Zoë Ångström")], [])
    sent = PARSER.parsebytes(out)

    assert [("Zoë Ångström", "zoe@example.org")] == [
        (a.display_name, a.addr_spec) for a in sent["To"].addresses
    ]
    assert out.endswith(b"Subject: s\r\n\r\nbody\r\n")
    assert out.isascii()


def test_from_other_than_the_mailbox_is_reported():
    """unsupported() warns that Gmail may replace a From that is not the mailbox."""
    notes = provider().unsupported(simple_message())

    assert (
        "From sender@example.com (Gmail sends as mailer@example.com unless it is an alias)",
    ) == notes


def test_oversized_message_is_permanent_without_a_request():
    """A message over 35 MiB is refused without contacting Google."""
    head = b"From: sender@example.com\r\nTo: anna@example.org\r\nSubject: big\r\n\r\n"
    raw = head + (b"y" * 76 + b"\r\n") * (36_700_160 // 78 + 1)
    msg = dataclasses.replace(simple_message(), raw=raw)
    run = drive(provider().flow(msg, 0.0), script())

    assert isinstance(run.outcome, Permanent)
    assert [] == run.requests


# --- answers ------------------------------------------------------------------------------------


def google_error(status: int, reason: str, text: str, state: str, **headers: str) -> httpx.Response:
    body = {
        "error": {
            "code": status,
            "message": text,
            "errors": [
                {
                    "message": text,
                    "domain": "global" if status != 403 else "usageLimits",
                    "reason": reason,
                }
            ],
            "status": state,
        }
    }
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (gmail_ok("18c"), Delivered(status=200, provider_message_id="18c")),
        (
            google_error(400, "invalidArgument", "Invalid To header", "INVALID_ARGUMENT"),
            Permanent("HTTP 400: INVALID_ARGUMENT: Invalid To header", 400),
        ),
        (
            google_error(
                400, "failedPrecondition", "Precondition check failed.", "FAILED_PRECONDITION"
            ),
            Permanent("HTTP 400: FAILED_PRECONDITION: Precondition check failed.", 400),
        ),
        (
            google_error(
                403, "userRateLimitExceeded", "User-rate limit exceeded.", "PERMISSION_DENIED"
            ),
            Retryable("HTTP 403: PERMISSION_DENIED: User-rate limit exceeded.", 403, None),
        ),
        (
            google_error(403, "dailyLimitExceeded", "Daily Limit Exceeded", "PERMISSION_DENIED"),
            Retryable("HTTP 403: PERMISSION_DENIED: Daily Limit Exceeded", 403, 3600.0),
        ),
        (
            google_error(
                403,
                "domainPolicy",
                "The domain administrators have disabled Gmail apps.",
                "PERMISSION_DENIED",
            ),
            Permanent(
                "HTTP 403: PERMISSION_DENIED: The domain administrators have disabled Gmail apps.",
                403,
            ),
        ),
        (
            google_error(
                429,
                "rateLimitExceeded",
                "Too many concurrent requests for user",
                "RESOURCE_EXHAUSTED",
                **{"Retry-After": "12"},
            ),
            Retryable(
                "HTTP 429: RESOURCE_EXHAUSTED: Too many concurrent requests for user", 429, 12.0
            ),
        ),
        (
            google_error(500, "backendError", "Backend Error", "INTERNAL"),
            Retryable("HTTP 500: INTERNAL: Backend Error", 500, None),
        ),
        (
            google_error(404, "notFound", "Requested entity was not found.", "NOT_FOUND"),
            Permanent("HTTP 404: NOT_FOUND: Requested entity was not found.", 404),
        ),
    ],
)
def test_responses_are_classified(response, expected):
    """messages.send answers map to delivered, retryable or permanent as Gmail documents."""
    assert expected == provider().interpret_response(response)


# --- settings and config ------------------------------------------------------------------------


def test_bad_settings_are_refused():
    """Incomplete user credentials, mixed credential kinds and an unusable key are refused."""
    _, key_pem, _ = rsa_key_and_certificate()
    bad: list[dict[str, Any]] = [
        {"refresh_token": None},
        {"service_account": service_account_json(key_pem)},
        {"client_id": None, "client_secret": None, "refresh_token": None, "service_account": "{}"},
        {
            "client_id": None,
            "client_secret": None,
            "refresh_token": None,
            "sender": None,
            "service_account": service_account_json(key_pem),
        },
        {"token_url": "http://oauth2.example.com/token"},
        {"max_message_size": 36_700_161},
    ]
    for overrides in bad:
        with pytest.raises(pydantic.ValidationError):
            provider(**overrides)


def test_checker_config_keys_load():
    """The keys tools/provider_check.py writes for gmail load into a working adapter."""
    text = f"""
providers:
  gmail:
    type: gmail
    base_url: https://127.0.0.1:8443
    client_id: {CLIENT}
    client_secret: ${{GMAIL_CLIENT_SECRET}}
    refresh_token: ${{GMAIL_REFRESH_TOKEN}}
    sender: {SENDER}
    token_url: https://127.0.0.1:8443/token
routes:
  - match: {{recipients: ["*"]}}
    provider: gmail
"""
    config = load_config(text, {"GMAIL_CLIENT_SECRET": SECRET, "GMAIL_REFRESH_TOKEN": REFRESH})
    adapter = providers.get("gmail")(config.providers["gmail"].settings)
    run = drive(adapter.flow(simple_message(), 5.0), script(token_response(), gmail_ok()))

    assert GmailProvider is type(adapter)
    assert [
        "https://127.0.0.1:8443/token",
        f"https://127.0.0.1:8443/gmail/v1/users/{SENDER}/messages/send",
    ] == [str(r.url) for r in run.requests]
    assert REFRESH == form(run.requests[0])["refresh_token"]


def test_service_account_file_is_read_by_the_config_loader(tmp_path):
    """service_account_file becomes the key at load time, and the grant is a JWT."""
    key, key_pem, _ = rsa_key_and_certificate()
    (tmp_path / "sa.json").write_text(service_account_json(key_pem))
    text = f"""
providers:
  gmail:
    type: gmail
    service_account_file: {tmp_path / "sa.json"}
    sender: {SENDER}
routes:
  - match: {{recipients: ["*"]}}
    provider: gmail
"""
    adapter = providers.get("gmail")(load_config(text, {}).providers["gmail"].settings)
    assert isinstance(adapter, GmailProvider)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assertion = form(adapter.oauth.grant.request(10.0))["assertion"]

    assert (
        SENDER
        == jwt.decode(
            assertion, pem, algorithms=["RS256"], audience=TOKEN_URL, options={"verify_exp": False}
        )["sub"]
    )


# --- remaining branches -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["not json", '{"type": "authorized_user"}', '{"type": "service_account"}']
)
def test_unusable_service_account_keys_are_refused(key):
    """A key that is not JSON, not a service account, or lacks fields is refused at load."""
    with pytest.raises(pydantic.ValidationError):
        provider(client_id=None, client_secret=None, refresh_token=None, service_account=key)


def test_restrict_adds_missing_fields_and_keeps_folded_ones_apart():
    """Folded headers survive the rewrite; a Cc that did not exist is added."""
    prepared = b"From: a@x\r\nTo: old@x,\r\n other@y\r\nX-Long: one\r\n two\r\n\r\nbody\r\n"
    out = restrict_recipient_fields(
        prepared, [Address("anna@example.org")], [Address("ben@example.org", "Ben")]
    )
    sent = PARSER.parsebytes(out)

    assert "anna@example.org" == str(sent["To"])
    assert [("Ben", "ben@example.org")] == [
        (a.display_name, a.addr_spec) for a in sent["Cc"].addresses
    ]
    assert "one two" == str(sent["X-Long"])


def test_message_over_the_limit_after_adding_bcc_is_permanent():
    """A message pushed over 35 MiB by its Bcc header is refused before sending."""
    head = b"From: sender@example.com\r\nTo: anna@example.org\r\nSubject: big\r\n\r\n"
    raw = head + b"y" * (36_700_160 - len(head) - 2) + b"\r\n"
    msg = dataclasses.replace(
        message(mime(), ("anna@example.org", "someone-else@example.net")), raw=raw
    )
    run = drive(provider().flow(msg, 0.0), script())

    assert isinstance(run.outcome, Permanent)


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (
            httpx.Response(200, json={"access_token": "x", "token_type": "mac"}),
            "Google token endpoint: HTTP 200 without a bearer access_token",
        ),
        (
            httpx.Response(502, text="<html>Bad Gateway</html>"),
            "Google token endpoint: HTTP 502: <html>Bad Gateway</html>",
        ),
        (
            httpx.Response(400, json={"error": "unauthorized_client"}),
            "Google token endpoint refused the grant (HTTP 400, unauthorized_client)",
        ),
    ],
)
def test_unusable_token_answers_are_retryable(response, reason):
    """A token answer without a bearer token, an HTML error or a bare OAuth error is retryable."""
    run = drive(provider().flow(simple_message(), 0.0), script(response))

    assert isinstance(run.outcome, Retryable)
    assert reason == run.outcome.reason


def test_non_json_error_body_is_classified_by_status():
    """An HTML error page from Google's front end is classified by its status alone."""
    outcome = provider().interpret_response(httpx.Response(503, text="Service Unavailable"))

    assert Retryable("HTTP 503: Service Unavailable", 503, None) == outcome


def test_token_lifetime_defaults_and_repr_hides_the_value():
    """A token answer without expires_in lives an hour; the token's repr does not show it."""
    store = provider().oauth.store
    token = store.save({"access_token": "ya29.secret", "expires_in": "soon"}, 0.0)

    assert 3300.0 == token.refresh_at
    assert "ya29.secret" not in repr(token)
