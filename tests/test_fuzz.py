"""Bounded fuzz campaigns for the SMTP edge and the MIME side (``make fuzz`` runs long ones).

The campaigns are derandomized so that a red CI run is reproducible; `make fuzz` draws
fresh seeds every batch. Bugs they found are pinned as ordinary tests next to the code
they concern (test_smtp.py, test_auth.py, providers/test_rawmime.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from bridge.model import Envelope
from fuzz import mime_target, smtp_target

_SETTINGS = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def harness() -> Iterator[smtp_target.SmtpHarness]:
    """Three running bridges (plain, AUTH required, two routes) for the whole module."""
    smtp_target.quiet_logs()
    with smtp_target.SmtpHarness() as h:
        yield h


@settings(_SETTINGS, max_examples=100)
@given(session=smtp_target.sessions())
def test_smtp_sessions_get_valid_replies_and_every_250_is_stored(
    harness: smtp_target.SmtpHarness, session: smtp_target.Session
) -> None:
    """Random sessions: one valid reply per line, no hang, 250 exactly for stored mail."""
    harness.check(session)


@settings(_SETTINGS, max_examples=300)
@given(case=mime_target.inputs())
def test_mime_inputs_parse_validate_and_build_requests(case: tuple[bytes, Envelope]) -> None:
    """Random and mutated mail: parsed, schema-valid, wire-ready and sendable, never raising."""
    mime_target.check(*case)


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"a\r\n.\r\n", (b"a\r\n", b"")),
        (b"a\n.\nb\r\n.\r\nNOOP\r\n", (b"a\n.\nb\r\n", b"NOOP\r\n")),
        (b"..x\r\n.\r\n", (b".x\r\n", b"")),
        (b"a\r.\r\n", None),
        (b"a\r\n.\n", None),
    ],
    ids=["plain", "lf-dot-lf-is-data", "dot-stuffed", "cr-dot-crlf-no-end", "crlf-dot-lf-no-end"],
)
def test_data_oracle_ends_only_at_crlf_dot_crlf(
    stream: bytes, expected: tuple[bytes, bytes] | None
) -> None:
    """The SMTP oracle ends DATA at CRLF.CRLF only and removes one stuffed dot."""
    assert expected == smtp_target.data_oracle(stream)


def test_mime_check_catches_a_stage_that_breaks_its_promise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The MIME checks fail when raw-MIME preparation leaves a bare LF in place."""
    monkeypatch.setattr(mime_target, "prepare_raw", lambda raw: raw)
    envelope = Envelope(mail_from="a@example.com", rcpt_to=("b@example.org",))

    with pytest.raises(AssertionError, match="bare CR/LF"):
        mime_target.check(b"Subject: x\n\nbody\n", envelope)
