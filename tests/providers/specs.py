"""Validate request bodies against the providers' published specs, and build test Messages.

The specs live in ``/work/shared/specs`` (provenance in its SOURCES.md). The request-body
schema is found the way a client generator would: from the operation (path + method) to
its ``requestBody`` (OpenAPI 3) or ``in: body`` parameter (Swagger 2), following
``$ref``s, and wrapped with the document's ``components`` / ``definitions`` so the
remaining references resolve. Besides schema errors, `problems()` reports keys the
schema does not define: real APIs ignore or refuse them, and a typo would otherwise
pass silently.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import openapi_schema_validator as osv
import pytest
import yaml

from bridge.model import Address, Attachment, Envelope, Header, Message

SPECS = Path("/work/shared/specs")


@cache
def load_spec(rel: str) -> dict[str, Any]:
    """A spec document from the shared folder (JSON or YAML); skips if it is absent."""
    path = SPECS / rel
    if not path.exists():  # pragma: no cover - the shared specs are outside the repo
        pytest.skip(f"spec {rel} not available")
    text = path.read_text(encoding="utf-8")
    doc: dict[str, Any] = (
        yaml.safe_load(text) if path.suffix in (".yml", ".yaml") else json.loads(text)
    )
    return doc


def resolve(node: Any, root: dict[str, Any]) -> Any:
    """Follow local ``$ref``s until a node without one."""
    for _ in range(64):
        if not (isinstance(node, dict) and "$ref" in node):
            return node
        target: Any = root
        for key in node["$ref"].removeprefix("#/").split("/"):
            target = target[key.replace("~1", "/").replace("~0", "~")]
        node = target
    raise ValueError("$ref chain too long")


def request_body_schema(rel: str, path: str, method: str = "post") -> dict[str, Any]:
    """The JSON request-body schema of one operation, ready for a validator."""
    spec = load_spec(rel)
    operation = spec["paths"][path][method]
    if "requestBody" in operation:  # OpenAPI 3.x
        body = resolve(operation["requestBody"], spec)
        schema = resolve(body["content"]["application/json"]["schema"], spec)
        return {**schema, "components": spec.get("components", {})}
    for param in operation.get("parameters", []):  # Swagger 2.0
        param = resolve(param, spec)
        if param.get("in") == "body":
            schema = resolve(param["schema"], spec)
            return {**schema, "definitions": spec.get("definitions", {})}
    raise KeyError(f"{method.upper()} {path} has no JSON request body")


def _branches(schema: Any, root: dict[str, Any]) -> list[dict[str, Any]]:
    schema = resolve(schema, root)
    if not isinstance(schema, dict):
        return []
    out = [schema]
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            out += _branches(sub, root)
    return out


def undefined_keys(doc: Any, schema: Any, root: dict[str, Any], where: str = "") -> list[str]:
    """Object keys in `doc` that no branch of `schema` lists, where the schema is closed
    (lists properties and does not allow additional ones)."""
    out: list[str] = []
    branches = _branches(schema, root)
    if isinstance(doc, dict):
        props: dict[str, list[Any]] = {}
        closed = False
        for b in branches:
            if "properties" in b:
                closed = True
                for k, v in b["properties"].items():
                    props.setdefault(k, []).append(v)
        if any(b.get("additionalProperties") not in (None, False) for b in branches):
            closed = False
        if closed:
            out += [f"{where}.{k}".lstrip(".") for k in doc if k not in props]
        for k, v in doc.items():
            for sub in props.get(k, []):
                out += undefined_keys(v, sub, root, f"{where}.{k}")
    elif isinstance(doc, list):
        for b in branches:
            if isinstance(b.get("items"), dict):
                for i, v in enumerate(doc):
                    out += undefined_keys(v, b["items"], root, f"{where}[{i}]")
    return sorted(set(out))


# Mailjet publishes no machine-readable spec. This schema is written from the message
# properties table of mailjet/api-documentation guides/_send-api.md (PROVIDERS.md §9):
# only the properties our adapter may send, all closed, with the documented limits.
_MJ_CONTACT = {
    "type": "object",
    "required": ["Email"],
    "additionalProperties": False,
    "properties": {"Email": {"type": "string", "minLength": 3}, "Name": {"type": "string"}},
}
_MJ_FILE = {
    "type": "object",
    "required": ["ContentType", "Filename", "Base64Content"],
    "additionalProperties": False,
    "properties": {
        "ContentType": {"type": "string", "minLength": 1},
        "Filename": {"type": "string", "minLength": 1},
        "Base64Content": {"type": "string", "contentEncoding": "base64"},
    },
}
MAILJET_SEND_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["Messages"],
    "additionalProperties": False,
    "properties": {
        "SandboxMode": {"type": "boolean"},
        "Messages": {
            "type": "array",
            "minItems": 1,
            "maxItems": 50,
            "items": {
                "type": "object",
                "required": ["From", "To"],
                "anyOf": [{"required": ["TextPart"]}, {"required": ["HTMLPart"]}],
                "additionalProperties": False,
                "properties": {
                    "From": _MJ_CONTACT,
                    "To": {"type": "array", "minItems": 1, "maxItems": 50, "items": _MJ_CONTACT},
                    "Cc": {"type": "array", "maxItems": 50, "items": _MJ_CONTACT},
                    "Bcc": {"type": "array", "maxItems": 50, "items": _MJ_CONTACT},
                    "ReplyTo": _MJ_CONTACT,
                    "Subject": {"type": "string", "maxLength": 255},
                    "TextPart": {"type": "string"},
                    "HTMLPart": {"type": "string"},
                    "Attachments": {"type": "array", "items": _MJ_FILE},
                    "InlinedAttachments": {
                        "type": "array",
                        "items": {
                            **_MJ_FILE,
                            "required": ["ContentType", "Filename", "Base64Content", "ContentID"],
                            "properties": {
                                **_MJ_FILE["properties"],  # type: ignore[dict-item]
                                "ContentID": {"type": "string", "minLength": 1},
                            },
                        },
                    },
                    "Headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "CustomID": {"type": "string"},
                },
            },
        },
    },
}

_OPERATIONS: dict[str, tuple[str, str, str]] = {
    # provider: (spec file, path, dialect)
    "sendgrid": ("sendgrid/tsg_mail_v3.json", "/v3/mail/send", "oas31"),
    "resend": ("resend/resend.json", "/emails", "oas31"),
    "brevo": ("brevo/swagger_definition_v3.yml", "/smtp/email", "oas30"),
    "postmark": ("postmark/postmark-server-swagger2.yml", "/email", "oas30"),
    "postmark.batch": ("postmark/postmark-server-swagger2.yml", "/email/batch", "oas30"),
}


def _postmark_current(schema: dict[str, Any]) -> dict[str, Any]:
    """The swagger file predates MessageStream (docs: postmarkapp.com email API)."""
    patched = json.loads(json.dumps(schema))
    stream = {"type": "string"}
    patched["definitions"]["SendEmailRequest"]["properties"]["MessageStream"] = stream
    if "properties" in patched:  # /email: the request schema itself, already resolved
        patched["properties"]["MessageStream"] = stream
    return patched  # type: ignore[no-any-return]


def problems(provider: str, doc: Any) -> list[str]:
    """Every way `doc` breaks the provider's request-body spec; empty means valid."""
    if provider == "mailjet":
        validator: Any = jsonschema.Draft202012Validator(
            MAILJET_SEND_SCHEMA, format_checker=jsonschema.FormatChecker()
        )
        schema: dict[str, Any] = MAILJET_SEND_SCHEMA
    else:
        rel, path, dialect = _OPERATIONS[provider]
        schema = request_body_schema(rel, path)
        if provider.startswith("postmark"):
            schema = _postmark_current(schema)
        if dialect == "oas31":
            validator = osv.OAS31Validator(schema, format_checker=osv.oas31_format_checker)
        else:
            validator = osv.OAS30Validator(schema, format_checker=osv.oas30_format_checker)
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]
    return errors + [f"{k}: not defined in the spec" for k in undefined_keys(doc, schema, schema)]


# --- test messages ------------------------------------------------------------------------

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\x00\x05\x00\x01\xff\x89\x99"
    b"=\x1d\x00\x00\x00\x00IEND\xaeB`\x82"
)
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
CID = "logo.7f3a@example.com"
SENDER = Address("sender@example.com", "Harness Sender")
ALICE = Address("alice@example.org", "Alice Example")


def make_message(
    *,
    rcpt_to: tuple[str, ...] = ("alice@example.org",),
    from_: Address | None = SENDER,
    to: tuple[Address, ...] = (ALICE,),
    cc: tuple[Address, ...] = (),
    bcc: tuple[Address, ...] = (),
    reply_to: tuple[Address, ...] = (),
    subject: str | None = "Quarterly report",
    text: str | None = "Hello Alice,\n\nthe report is attached.\n",
    html: str | None = None,
    headers: tuple[Header, ...] = (),
    attachments: tuple[Attachment, ...] = (),
    message_id: str | None = None,
    date: datetime | None = None,
    mail_from: str = "sender@example.com",
    sender: Address | None = None,
) -> Message:
    """A parsed message as `bridge.mime` would produce it, built directly."""
    return Message(
        id="01JF7Z6Q9R3M2N8K4H5G6F7D8C",
        received_at=datetime(2026, 12, 3, 12, 0, tzinfo=UTC),
        envelope=Envelope(mail_from=mail_from, rcpt_to=rcpt_to),
        from_=from_,
        sender=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to,
        subject=subject,
        text=text,
        html=html,
        message_id=message_id,
        in_reply_to=None,
        references=(),
        date=date,
        headers=headers,
        attachments=attachments,
        raw=b"",
    )


def pdf_attachment(filename: str | None = "report.pdf") -> Attachment:
    """A PDF attachment with every byte value in it."""
    return Attachment(filename, "application/pdf", "attachment", None, PDF)


def inline_logo(disposition: str = "inline") -> Attachment:
    """A PNG referenced from the HTML as ``cid:`` + `CID`."""
    return Attachment("logo.png", "image/png", disposition, CID, PNG)  # type: ignore[arg-type]


INLINE_HTML = f'<html><body><p>Our logo:</p><img src="cid:{CID}" alt="logo"></body></html>\n'

THREE: dict[str, Any] = {
    "rcpt_to": ("anna@example.org", "ben@example.org", "carl@example.net"),
    "to": (Address("anna@example.org", "Anna Alpha"),),
    "cc": (Address("ben@example.org", "Ben Beta"),),
}
"""To Anna, Cc Ben, and Carl only in the envelope (a blind copy)."""

BCC_ONLY: dict[str, Any] = {
    "rcpt_to": ("bcc-one@example.net", "bcc-two@example.net"),
    "to": (),
    "cc": (),
}
"""Nobody in To or Cc: two blind copies."""
