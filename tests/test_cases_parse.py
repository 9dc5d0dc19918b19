"""The real-world cases of ``shared/cases/LOG.md``, parsed: expected values checked exactly.

Each test parses the message a correct SMTP server stores for the case (dot-unstuffed
DATA for ``.smtp`` files, the exact bytes for ``.eml`` files) and checks the Message and
its message-v1 document. Text is compared the LOG.md way: CRLF→LF, trailing newlines
stripped.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from bridge.mime import parse_message
from bridge.model import Address, Message
from bridge.payload import message_v1
from tests.casefiles import (
    case_path,
    load_eml_case,
    load_smtp_case,
    smtp_envelope,
    smtp_message,
)

RECEIVED = datetime(2024, 4, 8, 12, 0, tzinfo=UTC)
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "bridge" / "schemas" / "message-v1.schema.json"
FORBIDDEN = re.compile("[\ud800-\udfff\x80-\x9f]")


@cache
def _validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _parse(name: str) -> tuple[Message, dict[str, Any]]:
    """Parse a case and return the Message and its schema-checked message-v1 document."""
    if name.endswith(".smtp"):
        case = load_smtp_case(name)
        raw, envelope = smtp_message(case), smtp_envelope(case)
    else:
        eml = load_eml_case(name)
        raw, envelope = eml.raw, eml.envelope
    message = parse_message(raw, envelope, id="case-" + name[:2], received_at=RECEIVED)
    payload = message_v1(message, include_raw=True)
    errors = [e.message for e in _validator().iter_errors(payload)]
    encoded = json.dumps(payload, ensure_ascii=False).encode("utf-8")

    assert [] == errors
    assert None is FORBIDDEN.search(encoded.decode("utf-8"))
    return message, payload


def _norm(text: str | None) -> str | None:
    return None if text is None else text.replace("\r\n", "\n").rstrip("\n")


def _atts(payload: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (
            a["filename"],
            a["content_type"],
            a["size"],
            a["sha256"],
            a["disposition"],
            a["content_id"],
        )
        for a in payload["attachments"]
    ]


def test_03_mail_from_auth_empty_param() -> None:
    """03-mail-from-auth-empty-param.smtp: the vCenter alarm parses with subject and text."""
    message, payload = _parse("03-mail-from-auth-empty-param.smtp")

    assert ["oncall@example.org"] == payload["envelope"]["rcpt_to"]
    assert "[VMware vCenter - Alarm] Host memory usage" == message.subject
    assert "Target: esx03.example.com\nAlarm: Host memory usage changed from Gray to Red" == (
        _norm(payload["text"])
    )


def test_05_null_reverse_path_dsn() -> None:
    """05-null-reverse-path-dsn.smtp: a bounce keeps the null path and a usable From."""
    message, payload = _parse("05-null-reverse-path-dsn.smtp")

    assert "" == message.envelope.mail_from
    assert "" == payload["envelope"]["mail_from"]
    assert Address("MAILER-DAEMON@mx1.example.net", "Mail Delivery System") == message.from_
    assert {"name": "Mail Delivery System", "email": "MAILER-DAEMON@mx1.example.net"} == (
        payload["from"]
    )
    assert "Undelivered Mail Returned to Sender" == payload["subject"]
    assert payload["text"].startswith("This is the mail system at host mx1.example.net.")
    assert ["message/delivery-status", "text/rfc822-headers"] == [
        a["content_type"] for a in payload["attachments"]
    ]
    assert b"Reporting-MTA: dns; mx1.example.net\r\n" == message.attachments[0].content[:37]


def test_06_helo_printer_no_date() -> None:
    """06-helo-printer-no-date.smtp: two scanned PDFs, no Date or Message-ID needed."""
    message, payload = _parse("06-helo-printer-no-date.smtp")

    assert "MFP-3F-EAST" == payload["envelope"]["helo"]
    assert "2 documents scanned." == _norm(message.text)
    assert [
        (
            "20240311093027118.pdf",
            "application/pdf",
            202,
            "51ce84556cdbffc4f1faa1695044002f3cdc100aa4d35afc5e1587108a1de729",
            "attachment",
            None,
        ),
        (
            "20240311093027119.pdf",
            "application/pdf",
            202,
            "f52d91f5e9ea14197c4ad9d9e286db040e018cfd35085032def1fb4080c9cfff",
            "attachment",
            None,
        ),
    ] == _atts(payload)
    assert None is payload["date"]
    assert None is payload["message_id"]


def test_07_bare_lf_line_endings() -> None:
    """07-bare-lf-line-endings.eml: bare-LF mail parses; header-like body lines stay text."""
    message, payload = _parse("07-bare-lf-line-endings.eml")
    text = _norm(message.text)
    assert text is not None

    assert "nas@example.com" == payload["envelope"]["mail_from"]
    assert ["admin@example.org"] == payload["envelope"]["rcpt_to"]
    assert 'Backup job "nightly-photos" finished' == message.subject
    assert {"name": "NAS Monitor", "email": "nas@example.com"} == payload["from"]
    assert [{"name": None, "email": "admin@example.org"}] == payload["to"]
    assert 35 == len(text.split("\n"))
    assert text.startswith(
        "Job: nightly-photos\nStatus: OK\nFiles copied: 1204\n\n"
        "copied /volume1/photos/2024/03/IMG_4001.JPG -> /backup/photos/IMG_4001.JPG"
    )
    assert text.endswith("End of report.")


def test_08_line_longer_than_998() -> None:
    """08-line-longer-than-998.eml: the 3629-character html line comes out unbroken."""
    message, payload = _parse("08-line-longer-than-998.eml")
    html = _norm(payload["html"])
    assert html is not None

    assert 3629 == len(html)
    assert "de27486aa173d9953ae323e13e2907a98c13cb4b6465f380b72878de59096e78" == (
        hashlib.sha256(html.encode("utf-8")).hexdigest()
    )
    assert None is message.text


def test_09_dot_stuffed_lines() -> None:
    """09-dot-stuffed-lines.smtp: each leading dot is removed once, exactly."""
    message, _ = _parse("09-dot-stuffed-lines.smtp")

    assert "Changed files:\n.htaccess\n.env.example\n...\n.\n .\nEnd of list." == (
        _norm(message.text)
    )


def test_11_smtputf8_utf8_addresses() -> None:
    """11-smtputf8-utf8-addresses.smtp: UTF-8 local parts and names come out as Unicode."""
    message, payload = _parse("11-smtputf8-utf8-addresses.smtp")

    assert "jörg@example.org" == payload["envelope"]["mail_from"]
    assert ["jürgen@example.org"] == payload["envelope"]["rcpt_to"]
    assert {"name": "Jörg Weiß", "email": "jörg@example.org"} == payload["from"]
    assert [{"name": "Jürgen Groß", "email": "jürgen@example.org"}] == payload["to"]
    assert "Grüße aus Köln – Rückmeldung" == message.subject
    assert "Hallo Jürgen,\ndie Maße passen. Grüße, Jörg" == _norm(message.text)
    assert () == message.bcc


def test_12_cp1252_labelled_iso_8859_1() -> None:
    """12-cp1252-labelled-iso-8859-1.eml: iso-8859-1 is decoded as windows-1252."""
    message, payload = _parse("12-cp1252-labelled-iso-8859-1.eml")

    assert "Angebot über 1.250 € – „final“" == payload["subject"]
    assert (
        "Sehr geehrte Frau Müller,\n\nanbei unser Angebot „Wartung 2024“ – Gesamtpreis "
        "1.250 €.\n\nMit freundlichen Grüßen"
    ) == _norm(message.text)
    assert "Angebot über 1.250 € – „final“" == message.header("subject")


def test_14_subject_encoded_words_folded() -> None:
    """14-subject-encoded-words-folded.eml: adjacent and split encoded words join cleanly."""
    message, _ = _parse("14-subject-encoded-words-folded.eml")

    assert "Grüße – Rechnung Nr. 4711 😁 fällig am 15.03." == message.subject


def test_15_rfc2231_filename_continuation() -> None:
    """15-rfc2231-filename-continuation.eml: mixed RFC 2231 continuations give one name."""
    message, payload = _parse("15-rfc2231-filename-continuation.eml")

    assert [
        (
            "Übersicht März 2024 – Entwurf (final).pdf",
            "application/pdf",
            206,
            "729d3c44d07ca4008c722183a34240d28f455cbfdb9b1658f6bb09ce481b25a0",
            "attachment",
            None,
        )
    ] == _atts(payload)
    assert "Overview attached." == _norm(message.text)


def test_17_rfc2231_charset_parameter() -> None:
    """17-rfc2231-charset-parameter.eml: ``charset*=us-ascii'en'utf-8`` means UTF-8."""
    message, _ = _parse("17-rfc2231-charset-parameter.eml")

    assert "Lieferschein Nr. 815 – Größe XL" == _norm(message.text)


def test_19_multipart_without_closing_boundary() -> None:
    """19-multipart-without-closing-boundary.eml: the unclosed multipart keeps its text."""
    message, _ = _parse("19-multipart-without-closing-boundary.eml")

    assert "Good morning\nAll 12 jobs succeeded." == _norm(message.text)
    assert "Nightly report" == message.subject
    assert () == message.attachments


def test_20_header_without_space_after_colon() -> None:
    """20-header-without-space-after-colon.eml: ``Name:value`` headers parse normally."""
    message, payload = _parse("20-header-without-space-after-colon.eml")

    assert "Temperature alarm zone 3" == message.subject
    assert "controller@example.com" == payload["from"]["email"]
    assert [{"name": None, "email": "ops@example.org"}] == payload["to"]
    assert "<alarm-zone3-0328@controller.example.com>" == payload["message_id"]
    assert "Zone 3 temperature 41.2 C exceeds limit 40.0 C." == _norm(message.text)


def test_21_missing_header_body_separator() -> None:
    """21-missing-header-body-separator.eml: the body starts at the first non-header line."""
    message, payload = _parse("21-missing-header-body-separator.eml")

    assert "Weekly report" == message.subject
    assert "<weekly-13@example.com>" == payload["message_id"]
    assert "Hello team,\nthis week's numbers are in the portal." == _norm(message.text)


def test_22_bcc_only_undisclosed_recipients() -> None:
    """22-bcc-only-undisclosed-recipients.smtp: envelope-only recipients become Bcc."""
    message, payload = _parse("22-bcc-only-undisclosed-recipients.smtp")

    assert ["alice@example.org", "bob@example.net"] == payload["envelope"]["rcpt_to"]
    assert [] == payload["to"]
    assert [] == payload["cc"]
    assert [
        {"name": None, "email": "alice@example.org"},
        {"name": None, "email": "bob@example.net"},
    ] == payload["bcc"]
    assert (Address("alice@example.org"), Address("bob@example.net")) == message.bcc


def test_23_envelope_differs_from_headers() -> None:
    """23-envelope-differs-from-headers.smtp: a To address in other case is not also Bcc."""
    message, payload = _parse("23-envelope-differs-from-headers.smtp")

    assert ["dev@example.org"] == payload["envelope"]["rcpt_to"]
    assert [] == payload["bcc"]
    assert ["customer@example.net", "Dev@Example.org"] == [a.email for a in message.to]
    assert ["boss@example.net"] == [a.email for a in message.cc]


def test_24_no_from_or_to_header() -> None:
    """24-no-from-or-to-header.smtp: From falls back to the envelope sender."""
    message, payload = _parse("24-no-from-or-to-header.smtp")

    assert {"name": None, "email": "test@example.com"} == payload["from"]
    assert ["helpdesk@example.org"] == payload["envelope"]["rcpt_to"]
    assert [{"name": None, "email": "helpdesk@example.org"}] == payload["bcc"]
    assert [] == payload["to"]
    assert "Relay check" == message.subject
    assert "Typed by hand over telnet." == _norm(message.text)
    assert None is message.date
    assert None is message.message_id


def test_25_duplicate_headers() -> None:
    """25-duplicate-headers.eml: the first of duplicate headers wins; all are listed."""
    message, payload = _parse("25-duplicate-headers.eml")

    assert "Follow-up reminder" == message.subject
    assert "<dup-a1@example.com>" == payload["message_id"]
    assert "Your trial ends in 3 days." == _norm(message.text)
    assert ["<dup-a1@example.com>", "<dup-a2@example.com>"] == [
        h["value"] for h in payload["headers"] if h["name"].lower() == "message-id"
    ]


def test_27_three_attachments_over_4mb_total() -> None:
    """27-three-attachments-over-4mb-total.eml: three 1.25 MiB PDFs decode exactly."""
    raw = case_path("27-three-attachments-over-4mb-total.eml").read_bytes()
    message, payload = _parse("27-three-attachments-over-4mb-total.eml")

    assert "d7f90508d0b2dd05c0eb4a6fc5cc968e1856322210875fb7ca99fa3b45b36b3c" == (
        hashlib.sha256(raw).hexdigest()
    )
    assert [
        (
            "20240403081944301.pdf",
            "application/pdf",
            1310720,
            "739930827b73005e746d52d45c4572c0babf640a933f6b430780b74b23d8fe6d",
            "attachment",
            None,
        ),
        (
            "20240403081944302.pdf",
            "application/pdf",
            1310720,
            "d0096aa766d04fdb2e87f14d1cc39d71afa3c2e2dab6a014b7667ecae9da222f",
            "attachment",
            None,
        ),
        (
            "20240403081944303.pdf",
            "application/pdf",
            1310720,
            "79cd74b31cd1e6079a73df951ee1c09f485c9ec630c32aa9350c00fecb1df866",
            "attachment",
            None,
        ),
    ] == _atts(payload)
    assert raw == message.raw


def test_29_winmail_dat_tnef() -> None:
    """29-winmail-dat-tnef.eml: winmail.dat is kept and the file inside is added."""
    message, payload = _parse("29-winmail-dat-tnef.eml")

    assert "Please find our offer attached." == _norm(message.text)
    assert [
        (
            "winmail.dat",
            "application/ms-tnef",
            183,
            "0342461aa9ac12c1973c163a44db739690318ca86f30cf2321c9c433dd3083b3",
            "attachment",
            None,
        ),
        (
            "Angebot.txt",
            "text/plain",
            49,
            "cff05c95716eb65bb472e37772e8dd2d75b3427eaba5de183a45c08668eda1c2",
            "attachment",
            None,
        ),
    ] == _atts(payload)


def test_31_inline_cid_image() -> None:
    """31-inline-cid-image.eml: the logo in multipart/related is an inline attachment."""
    message, payload = _parse("31-inline-cid-image.eml")

    assert 'src="cid:logo.7f3a@example.com"' in (message.html or "")
    assert "Your invoice is attached." == _norm(message.text)
    assert [
        (
            "logo.png",
            "image/png",
            71,
            "9dbadffb752ecf6e57dcbfd96a0745ebdc7d96dd3e58bfb44b2a1592eda3790b",
            "inline",
            "logo.7f3a@example.com",
        ),
        (
            "invoice-2024-118.pdf",
            "application/pdf",
            212,
            "cb1a8610e732450308ce35cf69f5576766763e4358709cab51b7cc9012c84b3a",
            "attachment",
            None,
        ),
    ] == _atts(payload)
