"""Load the real-world cases in ``shared/cases`` (see ``shared/cases/LOG.md``, "Conventions").

Two kinds of file:

* ``NN-name.smtp``: a block of ``#`` comment lines (the header), then one client line per
  file line, each sent with CRLF. Lines inside DATA are already dot-stuffed.
* ``NN-name.eml``: the exact message bytes. Their default envelope is ``EHLO
  tester.example.com``, ``MAIL FROM:<From addr-spec>`` and one ``RCPT TO`` per To and
  Cc addr-spec.

The helpers never copy a case into the repository: case 27 alone is 5 MB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest

from bridge.model import Envelope

__all__ = [
    "CASES_DIR",
    "DEFAULT_EHLO",
    "EmlCase",
    "SmtpCase",
    "case_path",
    "dot_stuff",
    "load_eml_case",
    "load_smtp_case",
    "smtp_data_messages",
    "smtp_envelope",
    "smtp_message",
]

CASES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "cases"
"""``shared/cases`` beside the repository (``/work/shared/cases`` for ``/work/main``)."""

DEFAULT_EHLO = "tester.example.com"
"""The EHLO name of the default ``.eml`` envelope."""

_PATH_ARG = re.compile(r"<([^>]*)>(.*)$")


@dataclass(frozen=True, slots=True)
class SmtpCase:
    """A parsed ``.smtp`` case.

    Attributes:
        name: The file name, e.g. ``"05-null-reverse-path-dsn.smtp"``.
        header: The leading comment block with the ``#`` markers kept, lines joined by LF.
        lines: Every client line in order, without its line ending (send each + CRLF).
    """

    name: str
    header: str
    lines: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class EmlCase:
    """A ``.eml`` case: the exact bytes and the default envelope LOG.md prescribes."""

    name: str
    raw: bytes
    envelope: Envelope


def case_path(name: str) -> Path:
    """The path of a case file, skipping the calling test when ``shared/cases`` is missing.

    Args:
        name: The file name, e.g. ``"07-bare-lf-line-endings.eml"``.

    Returns:
        The absolute path of the file.
    """
    if not CASES_DIR.is_dir():
        pytest.skip(f"the shared case directory {CASES_DIR} is not present")
    return CASES_DIR / name


def load_smtp_case(name: str) -> SmtpCase:
    """Read a ``.smtp`` case into its comment header and its client lines.

    Args:
        name: The file name inside ``shared/cases``.

    Returns:
        The case; `SmtpCase.lines` are bytes because some cases are UTF-8 (case 11).
    """
    data = case_path(name).read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    header: list[str] = []
    index = 0
    while index < len(lines) and lines[index].startswith(b"#"):
        header.append(lines[index].decode("utf-8"))
        index += 1
    return SmtpCase(name=name, header="\n".join(header), lines=tuple(lines[index:]))


def smtp_data_messages(case: SmtpCase) -> list[bytes]:
    """The message of every DATA section, as a correct server stores it.

    Each line is dot-unstuffed (one leading ``.`` removed) and ends with CRLF; the
    terminating ``.`` line is not part of the message.

    Args:
        case: A loaded ``.smtp`` case.

    Returns:
        One bytes object per DATA command, in order.
    """
    messages: list[bytes] = []
    current: list[bytes] | None = None
    for line in case.lines:
        if current is None:
            if line.strip().upper() == b"DATA":
                current = []
            continue
        if line == b".":
            messages.append(b"".join(current))
            current = None
            continue
        current.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
    return messages


def smtp_message(case: SmtpCase) -> bytes:
    """The message of the case's first DATA section (see `smtp_data_messages`)."""
    return smtp_data_messages(case)[0]


def smtp_envelope(case: SmtpCase) -> Envelope:
    """The envelope of the first transaction that reaches DATA.

    HELO/EHLO give `Envelope.helo`, MAIL FROM gives `mail_from` (``""`` for ``<>``) and
    `smtputf8`, each RCPT TO one entry of `rcpt_to`. RSET starts over.

    Args:
        case: A loaded ``.smtp`` case.

    Returns:
        The envelope a correct server records for the first message.
    """
    helo: str | None = None
    mail_from: str | None = None
    smtputf8 = False
    rcpt: list[str] = []
    for raw in case.lines:
        line = raw.decode("utf-8")
        verb = line[:4].upper()
        if verb in ("HELO", "EHLO"):
            helo = line[5:].strip()
        elif verb == "RSET":
            mail_from, smtputf8, rcpt = None, False, []
        elif line.upper().startswith("MAIL FROM:"):
            address, params = _path_argument(line[len("MAIL FROM:") :])
            mail_from = address
            smtputf8 = "SMTPUTF8" in params.upper().split()
        elif line.upper().startswith("RCPT TO:"):
            rcpt.append(_path_argument(line[len("RCPT TO:") :])[0])
        elif verb == "DATA" and mail_from is not None and rcpt:
            return Envelope(mail_from=mail_from, rcpt_to=tuple(rcpt), helo=helo, smtputf8=smtputf8)
    raise ValueError(f"{case.name}: no transaction reaches DATA")


def _path_argument(text: str) -> tuple[str, str]:
    match = _PATH_ARG.match(text.strip())
    if match is None:
        raise ValueError(f"not a <path>: {text!r}")
    return match.group(1), match.group(2)


def load_eml_case(name: str) -> EmlCase:
    """Read a ``.eml`` case and build its default envelope.

    Args:
        name: The file name inside ``shared/cases``.

    Returns:
        The exact bytes (bare LF kept for case 07) and the LOG.md default envelope.
    """
    raw = case_path(name).read_bytes()
    headers = BytesHeaderParser(policy=policy.default).parsebytes(raw)

    def specs(header: str) -> list[str]:
        value = headers.get(header)
        return [a.addr_spec for a in value.addresses] if value is not None else []

    senders = specs("From")
    envelope = Envelope(
        mail_from=senders[0] if senders else "",
        rcpt_to=tuple(specs("To") + specs("Cc")),
        helo=DEFAULT_EHLO,
    )
    return EmlCase(name=name, raw=raw, envelope=envelope)


def dot_stuff(raw: bytes) -> bytes:
    """The DATA payload for sending `raw` verbatim: leading dots doubled, then ``.CRLF``.

    Line endings are left exactly as they are (bare LF stays bare LF, as case 07 needs);
    a CRLF is added before the terminator when `raw` does not end with one.

    Args:
        raw: The exact message bytes.

    Returns:
        The bytes to write after the 354 reply, terminator included.
    """
    stuffed = re.sub(rb"(^|\n)\.", rb"\1..", raw)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"
