"""Config loading: defaults, expansion, every problem reported with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import load_config, parse_duration, parse_size
from bridge.errors import ConfigError
from tests.conftest import dedent

MINIMAL = dedent(
    """
    providers:
      hook: {type: webhook, url: "https://example.net/in"}
    routes:
      - provider: hook
    """
)


def problems(text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(text, env or {})
    return {".".join(str(p) for p in path): message for path, message in info.value.problems}


def test_defaults_are_the_documented_ones() -> None:
    """A minimal file gets the defaults the issue names."""
    config = load_config(MINIMAL, {})

    assert "127.0.0.1" == config.listen.host
    assert 2525 == config.listen.port
    assert 26214400 == config.listen.max_message_size
    assert 1000 == config.listen.max_recipients
    assert "var/spool.sqlite3" == config.spool.path
    assert 7 * 86400 == config.spool.retention
    assert 32 == config.delivery.concurrency
    assert 30 == config.delivery.timeout
    assert (10, 600, 5 * 86400) == (
        config.delivery.retry.first_delay,
        config.delivery.retry.max_delay,
        config.delivery.retry.max_age,
    )
    assert ("*",) == config.routes[0].match.recipients


def test_shipped_default_config_is_valid() -> None:
    """config/bridge.yaml loads once WEBHOOK_TOKEN is set."""
    text = (Path(__file__).parents[1] / "config" / "bridge.yaml").read_text()

    config = load_config(text, {"WEBHOOK_TOKEN": "t0k"})

    assert "webhook" == config.providers["local"].type
    assert {"Authorization": "Bearer t0k"} == config.providers["local"].settings.headers  # type: ignore[attr-defined]


def test_env_reference_unset_names_its_key_path() -> None:
    """An unset ${VAR} is reported at the key that uses it."""
    text = MINIMAL.replace('url: "https://example.net/in"', 'url: "https://${HOOK_HOST}/in"')

    assert {"providers.hook.url": "environment variable HOOK_HOST is not set"} == problems(text)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("SECRET\r", "contains a control character (CR, LF, NUL, ...)"),
        ("SECRET\r\nX-Evil: 1", "contains a control character (CR, LF, NUL, ...)"),
        ("SECRET ", "has leading or trailing whitespace"),
    ],
    ids=["trailing-cr", "injected-header", "trailing-space"],
)
def test_header_value_unusable_in_http_is_refused_without_repeating_it(
    value: str, message: str
) -> None:
    """A token with CR/LF or stray spaces is a config error that does not quote the token."""
    text = MINIMAL.replace(
        'url: "https://example.net/in"',
        'url: "https://example.net/in", headers: {Authorization: "Bearer ${TOKEN}"}',
    )

    found = problems(text, {"TOKEN": value})

    assert {"providers.hook.headers": f"Authorization: {message}"} == found
    assert "SECRET" not in repr(found)


@pytest.mark.parametrize(
    ("key", "message"),
    [("", "is empty"), ("SG.caf\u00e9", "contains non-ASCII characters (sent in an HTTP header)")],
    ids=["empty", "non-ascii"],
)
def test_api_key_that_no_request_could_carry_is_refused(key: str, message: str) -> None:
    """An empty or non-ASCII key fails check-config, not every delivery attempt."""
    text = dedent(
        """
        providers:
          sg: {type: sendgrid, api_key: "${KEY}"}
        routes:
          - provider: sg
        """
    )

    assert {"providers.sg.api_key": message} == problems(text, {"KEY": key})


def test_unset_variable_is_the_only_problem_of_its_value() -> None:
    """An unset token in "Bearer ${TOKEN}" is reported once, not also as whitespace."""
    text = MINIMAL.replace(
        'url: "https://example.net/in"',
        'url: "https://example.net/in", headers: {Authorization: "Bearer ${TOKEN}"}',
    )

    expected = {"providers.hook.headers.Authorization": "environment variable TOKEN is not set"}
    assert expected == problems(text)


def test_pem_key_material_may_span_lines() -> None:
    """PEM and JSON key fields are exempt: they are multi-line and never a header."""
    text = dedent(
        """
        providers:
          g:
            type: gmail
            service_account: "${KEY}"
        routes:
          - provider: g
        """
    )

    found = problems(text, {"KEY": '{\n  "type": "authorized_user"\n}'})

    assert {"providers.g": 'service_account is not a key of "type": "service_account"'} == found


def test_env_reference_default_and_dollar_escape() -> None:
    """${VAR:-default} falls back; $$ is a literal dollar sign."""
    text = dedent(
        """
        providers:
          hook:
            type: webhook
            url: "https://${HOOK_HOST:-example.org}/in"
            headers: {X-Price: "$$5"}
        routes:
          - provider: hook
        """
    )

    config = load_config(text, {})

    assert "https://example.org/in" == config.providers["hook"].settings.url  # type: ignore[attr-defined]
    assert {"X-Price": "$5"} == config.providers["hook"].settings.headers  # type: ignore[attr-defined]


def test_file_key_is_read_at_load_time(tmp_path: Path) -> None:
    """`url_file` fills `url` from the file, trailing newline stripped."""
    secret = tmp_path / "url"
    secret.write_text("https://example.com/from-file\n")
    text = MINIMAL.replace('url: "https://example.net/in"', f"url_file: {secret}")

    config = load_config(text, {})

    assert "https://example.com/from-file" == config.providers["hook"].settings.url  # type: ignore[attr-defined]


def test_file_key_missing_file_is_a_problem(tmp_path: Path) -> None:
    """An unreadable *_file is reported at its own key."""
    text = MINIMAL.replace('url: "https://example.net/in"', f"url_file: {tmp_path}/nope")

    found = problems(text)

    assert ["providers.hook.url_file"] == list(found)
    assert found["providers.hook.url_file"].startswith("cannot read")


def test_ca_file_stays_a_path() -> None:
    """ca_file is a setting of its own, not a file to inline."""
    text = MINIMAL.replace(
        'url: "https://example.net/in"}', 'url: "https://e.net/", ca_file: x.pem}'
    )

    config = load_config(text, {})

    assert "x.pem" == config.providers["hook"].settings.ca_file


def test_every_problem_is_reported_at_once() -> None:
    """Several mistakes in different sections all come back, each with its path."""
    text = dedent(
        """
        listen: {port: 99999, hots: x}
        delivery: {timeout: soon, retry: {first_delay: 1m, max_delay: 10s}}
        providers:
          hook: {type: webhook, url: "ftp://x"}
          other: {type: carrier-pigeon}
        routes:
          - provider: nowhere
        """
    )

    found = problems(text)

    assert {
        "listen.port",
        "listen.hots",
        "delivery.timeout",
        "delivery.retry",
        "providers.hook.url",
        "providers.other.type",
        "routes.0.provider",
    } == set(found)
    assert "unknown key" == found["listen.hots"]
    assert "expected a duration such as 10s, 5m or 7d" == found["delivery.timeout"]


def test_provider_and_route_problems_are_reported_together() -> None:
    """Provider settings, unknown types and dangling route names are all named."""
    text = dedent(
        """
        providers:
          hook: {type: webhook, url: "http://example.net/"}
          other: {type: carrier-pigeon}
          third: {type: webhook}
        routes:
          - provider: nowhere
        """
    )

    found = problems(text)

    assert "plain http:// is only allowed to a loopback address" == found["providers.hook.url"]
    assert found["providers.other.type"].startswith("unknown provider type 'carrier-pigeon'")
    assert "required key is missing" == found["providers.third.url"]
    assert "no provider account named 'nowhere'" == found["routes.0.provider"]


def test_yaml_syntax_error_gives_line_and_column() -> None:
    """Broken YAML is one problem naming where it broke."""
    found = problems("listen: {port: 2525\nroutes: [")

    assert 1 == len(found)
    assert next(iter(found.values())).startswith("line ")


def test_duplicate_key_is_an_error_with_its_line() -> None:
    """A second listen: block does not silently replace the first."""
    text = MINIMAL + "listen: {port: 2526}\nlisten: {port: 1}\n"

    assert {"": "line 6, column 1: duplicate key 'listen'"} == problems(text)


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ("listen: {port: true}", "listen.port", "Input should be a valid integer"),
        ("delivery: {timeout: 0}", "delivery.timeout", "Input should be greater than 0"),
        ("health: {port: 2525}", "health.port", "must differ from listen.port"),
    ],
    ids=["boolean-port", "zero-timeout", "health-on-smtp-port"],
)
def test_values_that_would_misbehave_are_refused(section: str, key: str, message: str) -> None:
    """A port of `true`, a zero timeout, two listeners on one port: each named."""
    assert {key: message} == problems(MINIMAL + section + "\n")


def test_top_level_must_be_a_mapping() -> None:
    """A YAML list is not a config."""
    assert {"": "the config file must be a mapping of sections"} == {
        k.replace("<top level>", ""): v for k, v in problems("- a\n- b\n").items()
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("500ms", 0.5), ("10m", 600.0), ("7d", 604800.0), (3, 3.0), ("1.5h", 5400.0)],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    """Durations take ms, s, m, h, d, w suffixes or bare seconds."""
    assert seconds == parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"), [(4096, 4096), ("25MiB", 26214400), ("10MB", 10_000_000), ("1k", 1000)]
)
def test_parse_size(text: str | int, size: int) -> None:
    """Sizes take bytes or SI/IEC suffixes."""
    assert size == parse_size(text)


@pytest.mark.parametrize("bad", ["soon", True, "-1s", [1]])
def test_parse_duration_rejects(bad: object) -> None:
    """Nonsense durations are errors, not zero."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize("kind", ["mailgun", "sparkpost", "ses", "sendgrid", "graph"])
def test_plain_http_base_url_to_a_remote_host_is_refused_for_every_provider(kind: str) -> None:
    """Keys travel in headers: base_url may be http:// only to loopback, for every API."""
    text = dedent(
        f"""
        providers:
          p: {{type: {kind}, base_url: "http://api.example.net"}}
        routes:
          - provider: p
        """
    )

    assert (
        "plain http:// is only allowed to a loopback address"
        == problems(text)["providers.p.base_url"]
    )
