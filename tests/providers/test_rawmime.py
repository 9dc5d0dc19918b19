"""prepare_raw: the few changes raw-MIME APIs need, and nothing else."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.providers.rawmime import (
    MAX_LINE_OCTETS,
    SES_UNIQUE_FIELDS,
    UNIQUE_FIELDS,
    prepare_raw,
)
from tests.casefiles import case_path

PARSER = BytesParser(policy=policy.default)


def case(name: str) -> bytes:
    return case_path(name).read_bytes()


def parse(data: bytes) -> Any:
    """The stdlib's reading of `data` (typed loosely: the email stubs are too narrow here)."""
    return PARSER.parsebytes(data)


def top_fields(data: bytes) -> list[str]:
    """Lower-case names of the top-level header fields, in order."""
    head = data.split(b"\r\n\r\n", 1)[0]
    return [
        line.split(b":", 1)[0].strip().lower().decode()
        for line in head.split(b"\r\n")
        if line and line[:1] not in (b" ", b"\t")
    ]


def longest_line(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))


def has_bare_line_end(data: bytes) -> bool:
    return re.search(rb"\r(?!\n)|(?<!\r)\n", data) is not None


def leaf_payloads(data: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded bytes with LF line ends) of every leaf part."""
    out = []
    for part in parse(data).walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        out.append((part.get_content_type(), payload.replace(b"\r\n", b"\n")))
    return out


def test_25_duplicate_headers() -> None:
    """25-duplicate-headers.eml keeps one MIME-Version, Message-ID, Content-Type: the first."""
    out = prepare_raw(case("25-duplicate-headers.eml"))
    names = top_fields(out)
    msg = parse(out)

    assert 1 == names.count("mime-version")
    assert 1 == names.count("message-id")
    assert 1 == names.count("content-type")
    assert ["<dup-a1@example.com>"] == msg.get_all("Message-ID")
    assert "Your trial ends in 3 days.\r\n" == msg.get_content()


def test_25_duplicates_are_removed_and_nothing_else_changes() -> None:
    """25-duplicate-headers.eml is the original minus the later duplicates, byte for byte."""
    raw = case("25-duplicate-headers.eml")
    expected = raw.replace(b"MIME-Version: 1.0\r\nMessage-Id: <dup-a2@example.com>\r\n", b"")
    expected = expected.replace(b"Content-Type: text/plain; charset=UTF-8\r\n", b"", 1)

    assert expected == prepare_raw(raw)


def test_08_line_longer_than_998() -> None:
    """08-line-longer-than-998.eml fits in 998-octet lines; its html decodes to the same text."""
    out = prepare_raw(case("08-line-longer-than-998.eml"))
    msg = parse(out)
    html = msg.get_body(preferencelist=("html",)).get_content()
    normalised = html.replace("\r\n", "\n").rstrip("\n")

    assert MAX_LINE_OCTETS >= longest_line(out)
    assert "quoted-printable" == msg["Content-Transfer-Encoding"]
    assert (
        "de27486aa173d9953ae323e13e2907a98c13cb4b6465f380b72878de59096e78"
        == hashlib.sha256(normalised.encode()).hexdigest()
    )


def test_07_bare_lf_line_endings() -> None:
    """07-bare-lf-line-endings.eml is the same bytes with every LF turned into CRLF."""
    raw = case("07-bare-lf-line-endings.eml")
    out = prepare_raw(raw)

    assert raw.replace(b"\n", b"\r\n") == out
    assert not has_bare_line_end(out)


def test_bare_cr_becomes_crlf() -> None:
    """A lone CR ends a line like CRLF does, and is written as CRLF."""
    raw = b"Subject: x\r\n\r\none\rtwo\r\nthree\n"

    assert b"Subject: x\r\n\r\none\r\ntwo\r\nthree\r\n" == prepare_raw(raw)


def test_clean_message_is_byte_identical() -> None:
    """A CRLF message without duplicates, Bcc or long lines comes back unchanged."""
    raw = (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n"
        b"Received: from x\r\nReceived: from y\r\n"
        b"Subject-Extra:  odd   spacing\r\n\tfolded\r\n\r\nbody\r\n.line\r\n"
    )

    assert raw == prepare_raw(raw)


def test_21_missing_separator_gets_blank_line() -> None:
    """21-missing-header-body-separator.eml gets a blank line where the body starts."""
    raw = case("21-missing-header-body-separator.eml")
    out = prepare_raw(raw)

    assert raw.replace(b">\r\nHello team,", b">\r\n\r\nHello team,") == out


def test_headers_only_message_is_terminated() -> None:
    """A message that ends inside its header section gets the empty line after it."""
    assert b"Subject: x\r\n\r\n" == prepare_raw(b"Subject: x")


def test_bcc_is_removed_by_default() -> None:
    """Every top-level Bcc field, folded or not, is dropped when no Bcc header is asked for."""
    raw = (
        b"To: a@example.org\r\nBcc: x@example.net,\r\n y@example.net\r\n"
        b"bcc: z@example.net\r\n\r\nhi\r\n"
    )

    assert b"To: a@example.org\r\n\r\nhi\r\n" == prepare_raw(raw)


def test_bcc_header_replaces_existing_ones() -> None:
    """With bcc_header there is exactly one Bcc field, listing exactly those addresses."""
    raw = b"To: a@example.org\r\nBcc: old@example.net\r\n\r\nhi\r\n"
    out = prepare_raw(raw, bcc_header=["x@example.net", "jürgen@example.org"])
    msg = parse(out)

    assert ["x@example.net, jürgen@example.org"] == [str(v) for v in msg.get_all("Bcc")]
    assert b"hi\r\n" == out.split(b"\r\n\r\n", 1)[1]


def test_long_bcc_list_is_folded() -> None:
    """A Bcc field with many addresses is folded into lines under 80 octets."""
    addresses = [f"recipient-{n:03d}@example.net" for n in range(40)]
    out = prepare_raw(b"To: a@example.org\r\n\r\nhi\r\n", bcc_header=addresses)
    msg = parse(out)

    assert addresses == [a.addr_spec for a in msg["Bcc"].addresses]
    assert 80 > longest_line(out)


def test_empty_bcc_header_adds_nothing() -> None:
    """An empty bcc_header sequence means no Bcc field at all."""
    raw = b"To: a@example.org\r\n\r\nhi\r\n"

    assert raw == prepare_raw(raw, bcc_header=[])


@pytest.mark.parametrize("bad", ["", "a@example.org\r\nX-Injected: 1", "b@example.org\n"])
def test_bcc_address_with_line_break_is_refused(bad: str) -> None:
    """A Bcc address that is empty or would inject a header line raises ValueError."""
    with pytest.raises(ValueError, match="Bcc"):
        prepare_raw(b"Subject: x\r\n\r\n", bcc_header=[bad])


def test_unique_fields_first_wins_case_insensitively() -> None:
    """Of each unique field the first occurrence stays, whatever the case of later names."""
    raw = (
        b"Subject: first\r\nSUBJECT: second\r\nX-Tag: 1\r\nx-tag: 2\r\n"
        b"from: a@example.com\r\nFrom: b@example.com\r\n\r\nbody\r\n"
    )

    assert b"Subject: first\r\nX-Tag: 1\r\nx-tag: 2\r\nfrom: a@example.com\r\n\r\nbody\r\n" == (
        prepare_raw(raw)
    )


def test_ses_fields_are_unique_only_when_asked() -> None:
    """A second DKIM-Signature stays by default and is dropped with SES_UNIQUE_FIELDS."""
    raw = b"DKIM-Signature: a\r\nDKIM-Signature: b\r\nSubject: x\r\n\r\nhi\r\n"

    assert raw == prepare_raw(raw)
    assert b"DKIM-Signature: a\r\nSubject: x\r\n\r\nhi\r\n" == prepare_raw(
        raw, unique_fields=SES_UNIQUE_FIELDS
    )
    assert UNIQUE_FIELDS < SES_UNIQUE_FIELDS


def test_long_header_line_is_folded_at_whitespace() -> None:
    """A header line over 998 octets is folded, and unfolding gives the original value."""
    refs = " ".join(f"<ref-{n:04d}@example.com>" for n in range(80))
    raw = f"References: {refs}\r\nSubject: x\r\n\r\nhi\r\n".encode()
    out = prepare_raw(raw)
    head = out.split(b"\r\n\r\n", 1)[0]

    assert MAX_LINE_OCTETS >= longest_line(out)
    assert raw.split(b"\r\n\r\n", 1)[0] == head.replace(b"\r\n ", b" ")


def test_unbreakable_header_line_is_left_alone() -> None:
    """A header line over 998 octets without any whitespace cannot be folded and stays."""
    raw = b"X-Token: " + b"a" * 1200 + b"\r\n\r\nhi\r\n"

    assert raw == prepare_raw(raw)


def test_long_base64_lines_are_rewrapped() -> None:
    """A base64 body on one long line is wrapped to 76 columns and decodes the same."""
    data = bytes(range(256)) * 20
    raw = (
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(data)
        + b"\r\n"
    )
    out = prepare_raw(raw)
    body = out.split(b"\r\n\r\n", 1)[1]

    assert 76 == longest_line(out)
    assert data == base64.b64decode(body)
    assert raw.split(b"\r\n\r\n", 1)[0] == out.split(b"\r\n\r\n", 1)[0]


def test_long_quoted_printable_line_gets_soft_breaks() -> None:
    """A long quoted-printable line is split with soft breaks, never inside an =XX escape."""
    line = b"a=3Db=C3=A4" * 200
    raw = (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
        b"\r\n\r\n" + line + b"\r\nsecond line\r\n"
    )
    out = prepare_raw(raw)
    body = out.split(b"\r\n\r\n", 1)[1]

    assert 76 >= longest_line(body)
    assert binascii.a2b_qp(raw.split(b"\r\n\r\n", 1)[1]) == binascii.a2b_qp(body)


def test_8bit_text_is_reencoded_exactly() -> None:
    """A long 8bit text line becomes quoted-printable that decodes to exactly the same bytes."""
    text = "Grüße – " * 200 + "trailing space \r\nnext\ttab\t\r\n= sign\r\n"
    raw = (
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text.encode()
    )
    out = prepare_raw(raw)
    head, body = out.split(b"\r\n\r\n", 1)

    assert text.encode() == binascii.a2b_qp(body)
    assert 1 == head.count(b"Content-Transfer-Encoding")
    assert b"Content-Transfer-Encoding: quoted-printable" in head
    assert MAX_LINE_OCTETS >= longest_line(out)


def test_reencoding_adds_mime_version_when_missing() -> None:
    """A non-MIME message whose body is re-encoded gains MIME-Version so the encoding counts."""
    out = prepare_raw(b"Subject: x\r\n\r\n" + b"y" * 1500 + b"\r\n")
    msg = parse(out)

    assert "1.0" == msg["MIME-Version"]
    assert "y" * 1500 + "\r\n" == msg.get_content()


def test_only_the_offending_part_of_a_multipart_changes() -> None:
    """In a multipart only the part with a long line is re-encoded; the other bytes stay."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "a@example.com"
    msg["Subject"] = "parts"
    msg.set_content("short text\n")
    blob = b"\x00\x01" + b"x" * 3000 + b"\r\n\xff"
    msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename="b.bin")
    raw = msg.as_bytes()
    # Turn the attachment into 8bit with a very long line, as some senders do.
    encoded = base64.b64encode(blob)
    wrapped = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    raw = raw.replace(b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: 8bit")
    raw = raw.replace(wrapped, blob)
    out = prepare_raw(raw)

    assert MAX_LINE_OCTETS >= longest_line(out)
    assert leaf_payloads(raw) == leaf_payloads(out)
    # The blank line before the delimiter makes a final CRLF part of the content.
    assert blob + b"\r\n" == parse(out).get_payload()[1].get_payload(decode=True)
    marker = b"Content-Type: application/octet-stream"
    assert raw.split(marker)[0] == out.split(marker)[0]


def test_message_rfc822_is_entered_not_encoded() -> None:
    """An attached message/rfc822 keeps its 7bit encoding; its own long leaf is re-encoded."""
    inner = b"Subject: inner\r\nContent-Type: text/plain\r\n\r\n" + b"z" * 2000 + b"\r\n"
    raw = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
        b"preamble "
        + b"p" * 1200
        + b"\r\n--B\r\nContent-Type: message/rfc822\r\n\r\n"
        + inner
        + b"--B--\r\nepilogue\r\n"
    )
    out = prepare_raw(raw)
    attached = parse(out).get_payload()[0]
    inner_leaf = attached.get_payload()[0]

    assert MAX_LINE_OCTETS >= longest_line(out)
    assert attached["Content-Transfer-Encoding"] is None
    assert "z" * 2000 == inner_leaf.get_content()
    assert out.endswith(b"--B--\r\nepilogue\r\n")


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Transfer-Encoding: x-uuencode\r\n",
        b"Content-Type: multipart/mixed\r\n",
        b"Content-Type: message/partial; id=x; number=1\r\n",
    ],
    ids=["unknown-encoding", "multipart-without-boundary", "message-partial"],
)
def test_body_that_cannot_be_reencoded_has_its_long_lines_cut(head: bytes) -> None:
    """Last resort: a body we cannot re-encode keeps its bytes but not its 1200-octet line."""
    raw = head + b"\r\n" + b"q" * 1200 + b"\r\nend\r\n"
    out = prepare_raw(raw)

    assert head + b"\r\n" + b"q" * 998 + b"\r\n" + b"q" * 202 + b"\r\nend\r\n" == out
    assert out == prepare_raw(out)


def test_empty_boundary_is_split_as_python_splits_it() -> None:
    """boundary="" is invalid, but the parser splits at "--" lines, so the parts are fixed."""
    raw = (
        b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\n'
        b"Content-Type: text/plain\r\n\r\n" + b"x" * 1200 + b"\r\n----\r\n"
    )
    out = prepare_raw(raw)

    assert MAX_LINE_OCTETS >= longest_line(out)
    assert leaf_payloads(raw) == leaf_payloads(out)


def test_missing_close_delimiter_is_tolerated() -> None:
    """A multipart whose close delimiter never comes still gets its last part fixed."""
    raw = (
        b"Content-Type: multipart/alternative; boundary=sep\r\n\r\n--sep\r\n"
        b"Content-Type: text/plain\r\n\r\n" + b"w" * 1100 + b"\r\n"
    )
    out = prepare_raw(raw)

    assert MAX_LINE_OCTETS >= longest_line(out)
    assert leaf_payloads(raw) == leaf_payloads(out)


def test_utf8_option_reencodes_12_cp1252_body() -> None:
    """12-cp1252-labelled-iso-8859-1.eml with utf8=True is valid UTF-8 and decodes the same."""
    raw = case("12-cp1252-labelled-iso-8859-1.eml")
    out = prepare_raw(raw, utf8=True)

    assert out.decode("utf-8")
    assert leaf_payloads(raw) == leaf_payloads(out)
    assert raw == prepare_raw(raw)


def test_utf8_option_leaves_utf8_bodies_alone() -> None:
    """utf8=True does not touch an 8bit body that already is UTF-8."""
    raw = "Content-Type: text/plain; charset=utf-8\r\n\r\nGrüße\r\n".encode()

    assert raw == prepare_raw(raw, utf8=True)


LINE = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"Content-Type: multipart/mixed; boundary=b",
            b"Content-Type: message/rfc822",
            b"Content-Transfer-Encoding: base64",
            b"Content-Transfer-Encoding: quoted-printable",
            b"--b",
            b"--b--",
            b"Bcc: x@example.net",
            b"Subject: s",
            b" folded",
            b"",
            b"=4",
            b"A" * 1100,
            b"a b " * 300,
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(LINE, max_size=30), st.sampled_from([b"\r\n", b"\n", b"\r"]), st.booleans())
def test_never_raises_and_is_idempotent(lines: list[bytes], end: bytes, utf8: bool) -> None:
    """On any input prepare_raw returns CRLF-only bytes, and a second pass changes nothing."""
    raw = end.join(lines)
    once = prepare_raw(raw, utf8=utf8)

    assert not has_bare_line_end(once)
    assert once == prepare_raw(once, utf8=utf8)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=4),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=2500),
)
def test_decoded_content_is_preserved(blobs: list[bytes], text: str) -> None:
    """For well-formed mail with long lines, every decoded part is unchanged and lines fit."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["Subject"] = "generated"
    msg.set_content(text.replace("\r", ""), cte="8bit")
    for n, blob in enumerate(blobs):
        msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename=f"{n}")
    raw = msg.as_bytes()
    out = prepare_raw(raw)

    assert leaf_payloads(raw) == leaf_payloads(out)
    assert MAX_LINE_OCTETS >= longest_line(out)


def test_header_token_longer_than_998_is_folded_after_it() -> None:
    """A header whose first 998 octets hold no whitespace is folded at the next one."""
    raw = b"X-Long: " + b"a" * 1200 + b" tail\r\n\r\nhi\r\n"

    assert b"X-Long: " + b"a" * 1200 + b"\r\n tail\r\n\r\nhi\r\n" == prepare_raw(raw)


def test_empty_parts_and_unterminated_close_delimiter_stay_exact() -> None:
    """Adjacent delimiters and a close delimiter without CRLF survive byte for byte."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\n" + b"x" * 1000 + b"\r\n--b--"
    )
    out = prepare_raw(raw)

    assert out.startswith(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b\r\n")
    assert out.endswith(b"\r\n--b--")
    assert leaf_payloads(raw) == leaf_payloads(out)


def test_reencoded_part_keeps_a_single_transfer_encoding() -> None:
    """A leaf with two Content-Transfer-Encoding fields gets exactly one after re-encoding."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n" + b"\x01" * 1500 + b"\r\n--b--\r\n"
    )
    part = prepare_raw(raw).split(b"--b\r\n")[1].split(b"\r\n--b--")[0]

    assert 1 == part.count(b"Content-Transfer-Encoding")
    assert b"\x01" * 1500 == base64.b64decode(part.split(b"\r\n\r\n", 1)[1])


def test_plain_quoted_printable_line_is_split_anywhere() -> None:
    """A long quoted-printable line without escapes is split at 75 characters plus '='."""
    raw = b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + b"0123456789" * 120 + b"\r\n"
    out = prepare_raw(raw)
    body = out.split(b"\r\n\r\n", 1)[1]

    assert b"0123456789" * 120 + b"\r\n" == binascii.a2b_qp(body)
    assert {76} == {len(line) for line in body.split(b"\r\n")[:-2]}
