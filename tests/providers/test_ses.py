"""SES v2 SendEmail: raw content, envelope Destination, SigV4, answers, a real moto_server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import botocore.model
import botocore.session
import botocore.validate
import httpx
import pydantic
import pytest
from botocore.credentials import Credentials

from bridge.errors import ProviderSettingsError
from bridge.model import Delivered, Permanent, Retryable
from bridge.providers import get
from bridge.providers.rawmime import SES_UNIQUE_FIELDS, prepare_raw
from bridge.providers.ses import (
    SESProvider,
    SESSettings,
    error_code,
    resolve_credentials,
    sign,
    static_credentials,
)
from tests.providers.rawmime_support import RAW, RCPTS, make_message, response

AKID = "AKIAHARNESS000000001"
SECRET = "harnessSesSecret/0123456789abcdefghijKLMNOP"
NOW = 1796299200.0  # 2026-12-03T12:00:00Z
SPEC = Path(__file__).resolve().parents[2].parent / "shared" / "specs" / "aws-sesv2"


def provider(**overrides: object) -> SESProvider:
    raw = {
        "region": "eu-west-1",
        "access_key_id": AKID,
        "secret_access_key": SECRET,
        **overrides,
    }
    return SESProvider(SESSettings.model_validate(raw))


def signed(message_raw: bytes = RAW, **overrides: object) -> httpx.Request:
    flow = provider(**overrides).flow(make_message(message_raw), NOW)
    request = next(flow)
    flow.close()
    return request


def body_of(request: httpx.Request) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(request.read())
    return doc


def sigv4_ok(request: httpx.Request, secret: str, region: str = "eu-west-1") -> bool:
    """Recompute the SigV4 signature by the AWS spec, independently of botocore."""
    auth = request.headers["authorization"]
    scheme, _, rest = auth.partition(" ")
    parts = dict(item.strip().split("=", 1) for item in rest.split(","))
    date = parts["Credential"].split("/")[1]
    names = parts["SignedHeaders"].split(";")
    canonical_headers = "".join(
        f"{n}:{' '.join(request.headers[n].strip().split())}\n" for n in names
    )
    canonical = "\n".join(
        [
            request.method,
            quote(request.url.path, safe="/~"),
            "",
            canonical_headers,
            parts["SignedHeaders"],
            hashlib.sha256(request.read()).hexdigest(),
        ]
    )
    scope = f"{date}/{region}/ses/aws4_request"
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            request.headers["x-amz-date"],
            scope,
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + secret).encode()
    for piece in (date, region, "ses", "aws4_request"):
        key = hmac.new(key, piece.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return scheme == "AWS4-HMAC-SHA256" and hmac.compare_digest(expected, parts["Signature"])


def test_registry_names_the_adapter() -> None:
    """`type: ses` resolves to SESProvider."""
    assert SESProvider is get("ses")


def test_settings_take_the_checker_keys() -> None:
    """The keys provider_check.py writes (region, access_key_id, secret_access_key) validate."""
    settings = SESProvider.parse_settings(
        {
            "base_url": "https://127.0.0.1:8443",
            "ca_file": "/etc/smtp-bridge/ca.pem",
            "region": "eu-west-1",
            "access_key_id": AKID,
            "secret_access_key": SECRET,
        }
    )

    assert isinstance(settings, SESSettings)
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    "raw",
    [
        {"region": "eu-west-1", "access_key_id": AKID},
        {"region": "eu-west-1", "secret_access_key": SECRET},
        {"region": "eu-west-1", "session_token": "t"},
        {"region": "Frankfurt"},
    ],
)
def test_incomplete_settings_are_refused(raw: dict[str, str]) -> None:
    """A key without its partner, a token without keys, or a made-up region fails."""
    with pytest.raises(pydantic.ValidationError):
        SESSettings.model_validate(raw)


def test_endpoint_by_region_and_base_url() -> None:
    """The default endpoint is email.<region>.amazonaws.com; base_url overrides it."""
    assert "https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails" == provider().url
    assert "https://127.0.0.1:8443/v2/email/outbound-emails" == (
        provider(base_url="https://127.0.0.1:8443/").url
    )


def test_body_is_raw_content_for_the_envelope() -> None:
    """Destination is the envelope; Raw.Data is the SES-prepared MIME in base64, no Bcc."""
    doc = body_of(signed())
    data = base64.b64decode(doc["Content"]["Raw"]["Data"], validate=True)

    assert {"ToAddresses": list(RCPTS)} == doc["Destination"]
    assert "sender@example.com" == doc["FromEmailAddress"]
    assert prepare_raw(RAW, unique_fields=SES_UNIQUE_FIELDS) == data
    assert b"Bcc:" not in data
    assert {"FromEmailAddress", "Destination", "Content"} == set(doc)


def test_body_is_valid_against_the_botocore_model() -> None:
    """The SendEmail input validates against specs/aws-sesv2/service-2.json."""
    path = SPEC / "service-2.json"
    if not path.exists():  # pragma: no cover - the shared specs live beside the repo
        pytest.skip("shared SES model not available")
    model = botocore.model.ServiceModel(json.loads(path.read_text()), "sesv2")
    operation = model.operation_model("SendEmail")
    params = body_of(signed(configuration_set="transactional"))
    params["Content"]["Raw"]["Data"] = base64.b64decode(params["Content"]["Raw"]["Data"])
    report = botocore.validate.ParamValidator().validate(params, operation.input_shape)

    assert "" == report.generate_report()
    assert ("POST", "/v2/email/outbound-emails") == (
        operation.http["method"],
        operation.http["requestUri"],
    )
    assert "ses" == model.signing_name
    assert "transactional" == params["ConfigurationSetName"]


def test_null_sender_falls_back_to_the_header_from() -> None:
    """With MAIL FROM:<> and no From address there is no FromEmailAddress at all."""
    raw = b"Subject: bounce\r\n\r\nreport\r\n"
    flow = provider().flow(make_message(raw, mail_from=""), NOW)
    doc = body_of(next(flow))

    assert "FromEmailAddress" not in doc


def test_idn_domains_become_punycode() -> None:
    """Non-ASCII domains are sent as punycode; SES has no SMTPUTF8."""
    flow = provider().flow(make_message(rcpt_to=("info@bücher.example",)), NOW)
    doc = body_of(next(flow))

    assert ["info@xn--bcher-kva.example"] == doc["Destination"]["ToAddresses"]


def test_unsupported_reports_non_ascii_local_parts() -> None:
    """A non-ASCII local part is reported; ASCII mail is carried whole."""
    utf8 = make_message(rcpt_to=("jürgen@example.org",), smtputf8=True)

    assert ("non-ASCII local part (SES does not support SMTPUTF8)",) == (
        provider().unsupported(utf8)
    )
    assert () == provider().unsupported(make_message())


def test_build_request_is_unsigned_and_flow_signs() -> None:
    """build_request has no Authorization; flow adds a SigV4 signature that verifies."""
    unsigned = provider().build_request(make_message())
    request = signed()

    assert "authorization" not in unsigned.headers
    assert sigv4_ok(request, SECRET)
    assert request.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={AKID}/20261203/eu-west-1/ses/aws4_request, "
    )
    assert "20261203T120000Z" == request.headers["x-amz-date"]


def test_signature_is_a_function_of_now() -> None:
    """Signing twice at the same time gives the same header; a later time another."""
    request = provider().build_request(make_message())
    creds = Credentials(AKID, SECRET)
    first = sign(request, creds, "eu-west-1", NOW)
    again = sign(request, creds, "eu-west-1", NOW)
    later = sign(request, creds, "eu-west-1", NOW + 1)

    assert first.headers["authorization"] == again.headers["authorization"]
    assert first.headers["authorization"] != later.headers["authorization"]
    assert "20261203T120001Z" == later.headers["x-amz-date"]


def test_session_token_is_sent_and_signed() -> None:
    """Temporary credentials add X-Amz-Security-Token, inside the signed headers."""
    request = signed(session_token="FwoGZXIvYXdzEXAMPLETOKEN")

    assert "FwoGZXIvYXdzEXAMPLETOKEN" == request.headers["x-amz-security-token"]
    assert "x-amz-security-token" in request.headers["authorization"]
    assert sigv4_ok(request, SECRET)


def test_no_secret_in_url_or_body() -> None:
    """Neither the secret key nor the token appears in the URL or the body."""
    request = signed(session_token="FwoGZXIvYXdzEXAMPLETOKEN")

    for secret in (SECRET, "FwoGZXIvYXdzEXAMPLETOKEN"):
        assert secret not in str(request.url)
        assert secret.encode() not in request.read()


def test_limits() -> None:
    """Defaults stay under SES's 40 MB (after base64) and allow 50 recipients."""
    ses = provider()

    assert (29_000_000, 50) == (ses.max_message_size, ses.max_recipients)
    assert 40_000_000 > (ses.max_message_size or 0) * 4 // 3 + 10_000


def test_200_is_delivered_with_the_message_id() -> None:
    """200 {MessageId} is delivered, recording SES's id."""
    answer = response(200, {"MessageId": "0102018f-example-000000"})

    assert Delivered(status=200, provider_message_id="0102018f-example-000000") == (
        provider().interpret_response(answer)
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (403, "InvalidSignatureException"),
        (403, "SignatureDoesNotMatch"),
        (403, "UnrecognizedClientException"),
        (403, "InvalidClientTokenId"),
        (403, "AccessDeniedException"),
    ],
)
def test_refused_credentials_are_retryable(status: int, code: str) -> None:
    """Refused keys or signatures are our configuration's fault: the mail waits, no bounce."""
    answer = response(
        status, {"message": "The security token included in the request is invalid."},
        **{"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazonaws.sesv2/"},
    )  # fmt: skip

    assert isinstance(provider().interpret_response(answer), Retryable)


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, "MessageRejected", "Email address is not verified."),
        (400, "MailFromDomainNotVerifiedException", "MAIL FROM domain is not verified"),
        (400, "AccountSuspendedException", "Your account is suspended"),
        (400, "SendingPausedException", "Sending is paused for this account"),
        (404, "NotFoundException", "Configuration set <x> does not exist."),
        (400, "BadRequestException", "Missing final '@domain'"),
        (400, "ValidationException", "1 validation error detected"),
    ],
)
def test_permanent_errors(status: int, code: str, message: str) -> None:
    """Rejections, unverified identities and account states are permanent."""
    answer = response(
        status,
        {"message": message},
        **{"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazonaws.sesv2/"},
    )

    assert Permanent(reason=f"HTTP {status} {code}: {message}", status=status) == (
        provider().interpret_response(answer)
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (429, "TooManyRequestsException"),
        (400, "LimitExceededException"),
        (400, "Throttling"),
        (500, "InternalFailure"),
        (503, "ServiceUnavailable"),
        (403, "ExpiredTokenException"),
        (400, "RequestExpired"),
    ],
)
def test_retryable_errors(status: int, code: str) -> None:
    """Throttling, quota, server-side failures and expired signatures are retried."""
    answer = response(status, {"__type": f"com.amazonaws.sesv2#{code}", "Message": "slow down"})
    outcome = provider().interpret_response(answer)

    assert Retryable(reason=f"HTTP {status} {code}: slow down", status=status) == outcome


def test_retry_after_is_honoured() -> None:
    """A Retry-After on a throttling answer becomes the retry delay."""
    answer = response(429, {"message": "Too many"}, **{"Retry-After": "5"})
    outcome = provider().interpret_response(answer)

    assert isinstance(outcome, Retryable)
    assert 5.0 == outcome.retry_after


def test_bare_5xx_and_unknown_4xx() -> None:
    """Without an error code, 502 is retried and 400 is permanent."""
    assert isinstance(provider().interpret_response(response(502, "<html/>")), Retryable)
    assert isinstance(provider().interpret_response(response(400, "")), Permanent)


@pytest.mark.parametrize(
    ("header", "body", "code"),
    [
        ("MessageRejected:http://internal.amazon.com/x", {}, "MessageRejected"),
        (None, {"__type": "com.amazonaws.sesv2#NotFoundException"}, "NotFoundException"),
        (None, {"code": "Throttling"}, "Throttling"),
        (None, {}, None),
    ],
)
def test_error_code_sources(header: str | None, body: dict[str, str], code: str | None) -> None:
    """The code comes from x-amzn-ErrorType, else the JSON __type or code."""
    headers = {"x-amzn-ErrorType": header} if header else {}
    answer = response(400, body or None, **headers)

    assert code == error_code(answer, body)


def test_static_credentials_come_from_settings() -> None:
    """Keys in the settings are used as they are, without the AWS chain."""
    settings = SESSettings.model_validate(
        {"region": "eu-west-1", "access_key_id": AKID, "secret_access_key": SECRET}
    )
    creds = resolve_credentials(settings)

    assert (AKID, SECRET, None) == (creds.access_key, creds.secret_key, creds.token)
    assert static_credentials(SESSettings(region="eu-west-1")) is None


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """An AWS environment with no files, no profile and no instance metadata lookups."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def test_chain_credentials_from_environment(aws_env: pytest.MonkeyPatch) -> None:
    """Without keys in the settings, the standard chain finds AWS_* variables."""
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENV000000001")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    ses = SESProvider.with_resolved_credentials(SESSettings(region="eu-west-1"))

    assert "AKIAFROMENV000000001" == ses.credentials.access_key
    flow = ses.flow(make_message(), NOW)
    assert sigv4_ok(next(flow), "from-env-secret")


def test_no_credentials_anywhere_is_a_settings_error(aws_env: pytest.MonkeyPatch) -> None:
    """With no keys and nothing in the chain, start-up fails with ProviderSettingsError."""
    settings = SESSettings(region="eu-west-1")

    with pytest.raises(ProviderSettingsError, match="no AWS credentials"):
        resolve_credentials(settings)
    with pytest.raises(ProviderSettingsError, match="no credentials"):
        SESProvider(settings)


# --- against a real moto_server on loopback ---------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def moto_url() -> Iterator[str]:
    """A moto_server started for this test on 127.0.0.1 and a free port."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():  # pragma: no cover - moto[server] is a pinned test dependency
        pytest.skip("moto_server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto_server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_moto_accepts_the_signed_request(moto_url: str) -> None:
    """moto_server answers 200 with a MessageId and records the envelope and the raw bytes."""
    # moto checks senders against the identities of its SES (v1) backend; an identity
    # made with sesv2 CreateEmailIdentity does not count there.
    client = botocore.session.get_session().create_client(
        "ses",
        region_name="eu-west-1",
        endpoint_url=moto_url,
        aws_access_key_id=AKID,
        aws_secret_access_key=SECRET,
    )
    client.verify_domain_identity(Domain="example.com")
    client.close()
    ses = provider(base_url=moto_url)
    flow = ses.flow(make_message(), time.time())
    with httpx.Client() as http:
        answer = http.send(next(flow))
        sent = http.get(f"{moto_url}/moto-api/data.json").json()
    try:
        flow.send(answer)
    except StopIteration as stop:
        outcome = stop.value
    raw_messages = sent["ses"]["RawMessage"]

    assert 200 == answer.status_code
    assert isinstance(outcome, Delivered)
    assert answer.json()["MessageId"] == outcome.provider_message_id
    assert 1 == len(raw_messages)
    assert set(RCPTS) <= set(raw_messages[0]["destinations"])
    assert (
        prepare_raw(RAW, unique_fields=SES_UNIQUE_FIELDS).decode() == (raw_messages[0]["raw_data"])
    )


def test_moto_rejects_an_unverified_sender(moto_url: str) -> None:
    """Without a verified identity moto says MessageRejected, which is permanent."""
    ses = provider(base_url=moto_url)
    flow = ses.flow(make_message(), time.time())
    with httpx.Client() as http:
        answer = http.send(next(flow))
    outcome = ses.interpret_response(answer)

    assert isinstance(outcome, Permanent)
    assert "MessageRejected" in outcome.reason


def test_unsupported_without_from_and_unencodable_domain() -> None:
    """A message without From is checked on the envelope; an invalid IDN is sent unchanged."""
    bad_domain = "x@" + "ü" * 70 + ".example"
    message = make_message(b"Subject: s\r\n\r\nhi\r\n", rcpt_to=(bad_domain,))
    doc = body_of(next(provider().flow(message, NOW)))

    assert () == provider().unsupported(message)
    assert [bad_domain] == doc["Destination"]["ToAddresses"]
