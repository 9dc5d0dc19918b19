"""The `smtp-bridge` command: subcommands, and exceptions turned into exit statuses.

Exit statuses follow sysexits(3) where one fits: 0 success, 1 failure (e.g. not
ready), 2 usage error (argparse), 66 no such input (EX_NOINPUT: config file, spool or
entry), 71 operating-system error (EX_OSERR: e.g. the port is taken), 78 bad
configuration (EX_CONFIG), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from bridge import __version__
from bridge.config import Config, LocalSettings, check_files, load_config_file, load_local_settings
from bridge.errors import ConfigError, SpoolError

__all__ = ["main"]

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2
EX_NOINPUT = 66
EX_OSERR = 71
EX_CONFIG = 78

DEFAULT_CONFIG = "config/bridge.yaml"


def _config_arg(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
    # `nested`: the option is repeated on an action (`queue list --config F`), with no
    # default there, so that the group's own `queue --config F list` keeps working too.
    p.add_argument(
        "--config",
        "-c",
        default=argparse.SUPPRESS
        if nested
        else os.environ.get("SMTP_BRIDGE_CONFIG", DEFAULT_CONFIG),
        metavar="FILE",
        help=f"config file (default: $SMTP_BRIDGE_CONFIG or {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and for --help)."""
    parser = argparse.ArgumentParser(
        prog="smtp-bridge",
        description=(
            "Accept mail over SMTP, store it durably, and deliver it through an email HTTP API "
            "(SendGrid, Mailgun, Postmark, SES, Microsoft Graph, Gmail, Resend, Brevo, Mailjet, "
            "SparkPost, or a JSON webhook)."
        ),
        epilog=(
            "Exit status: 0 ok, 1 failure, 2 usage, 66 missing input (config file, spool, "
            "entry), 71 system error (e.g. port in use), 78 bad configuration, 130 interrupted."
        ),
    )
    parser.add_argument("--version", action="version", version=f"smtp-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the daemon (SMTP listener + delivery worker)")
    _config_arg(p)

    p = sub.add_parser("check-config", help="validate a config file; exit 78 on any problem")
    p.add_argument("file", nargs="?", metavar="FILE", help="config file to check")
    _config_arg(p)

    p = sub.add_parser("queue", help="inspect and requeue spooled mail")
    _config_arg(p)
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    q = qsub.add_parser("list", help="list entries, newest first")
    q.add_argument(
        "--state",
        choices=["queued", "inflight", "deferred", "delivered", "dead"],
        default=None,
        help="only entries in this state (default: all)",
    )
    q.add_argument(
        "--limit", type=_bounded(1, 1_000_000), default=50, help="most entries (default 50)"
    )
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    _config_arg(q, nested=True)
    q = qsub.add_parser("show", help="one entry with its delivery log")
    q.add_argument("id", help="entry id (or a unique prefix of 6+ characters)")
    _config_arg(q, nested=True)
    q = qsub.add_parser("retry", help="make a deferred or dead entry due now")
    q.add_argument("id", help="entry id (or a unique prefix of 6+ characters)")
    _config_arg(q, nested=True)

    p = sub.add_parser(
        "receive",
        help="run a small local HTTPS receiver that stores webhook deliveries (for trying out)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=_bounded(0, 65535), default=8443, help="port to listen on (default 8443)"
    )
    p.add_argument(
        "--dir",
        default="var/receiver",
        help="certificates and messages/ go here (default var/receiver)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("WEBHOOK_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default: $WEBHOOK_TOKEN)",
    )

    p = sub.add_parser("health", help="ask the running daemon's /readyz; exit 0 when ready")
    _config_arg(p)

    p = sub.add_parser(
        "providers", help="talk to the configured provider accounts (needs the network)"
    )
    _config_arg(p)
    psub = p.add_subparsers(dest="providers_command", metavar="ACTION", required=True)
    q = psub.add_parser(
        "test",
        help="send one test message through a route's provider now and print the answer",
    )
    q.add_argument("route", help="route name, or its index in routes[] (0 is the first)")
    q.add_argument("--to", required=True, metavar="ADDR", help="recipient of the test message")
    q.add_argument("--from", dest="sender", metavar="ADDR",
                   help="sender (default: the route's default_sender)")  # fmt: skip
    _config_arg(q, nested=True)

    p = sub.add_parser(
        "passwd",
        help="hash a password for auth.users[].password_hash (prompts, or reads stdin)",
    )

    p = sub.add_parser("config", help="config file helpers")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    csub.add_parser("schema", help="print the JSON Schema of the config file (for editors)")
    return parser


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return value

    return parse


class _NoInput(Exception):
    """A file the command needs is not there (exit 66)."""


def _load(path: str) -> Config:
    _must_exist(path)
    return load_config_file(Path(path), os.environ)


def _load_local(path: str) -> LocalSettings:
    """Only `spool` and `health`: operator commands run without the service's secrets."""
    _must_exist(path)
    return load_local_settings(Path(path), os.environ)


def _must_exist(path: str) -> None:
    if not Path(path).exists():
        raise _NoInput(f"no config file {path}")


def _print_config_error(path: str, exc: ConfigError) -> None:
    print(f"smtp-bridge: {path}: invalid configuration:", file=sys.stderr)
    for line in exc.render().splitlines():
        print(f"  {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        _print_config_error(str(getattr(args, "file", None) or getattr(args, "config", "?")), exc)
        return EX_CONFIG
    except _NoInput as exc:
        print(f"smtp-bridge: {exc}", file=sys.stderr)
        return EX_NOINPUT
    except SpoolError as exc:
        print(f"smtp-bridge: spool: {exc}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `smtp-bridge queue list | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_FAIL
    except OSError as exc:
        # Ports in use, unwritable directories: the OS's own words, without a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"smtp-bridge: {where}{exc.strerror or exc}", file=sys.stderr)
        return EX_OSERR


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "queue":
        return asyncio.run(_queue(args))
    if args.command == "receive":
        return _receive(args)
    if args.command == "health":
        return _health(args)
    if args.command == "config":
        return _config_schema()
    if args.command == "passwd":
        return _passwd()
    if args.command == "providers":
        return asyncio.run(_providers_test(args))
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


def _serve(args: argparse.Namespace) -> int:
    from bridge.app import serve
    from bridge.logs import configure_logging

    config = _load(args.config)
    check_files(config)
    configure_logging(config.logging.level, config.logging.format)
    status = asyncio.run(serve(config))
    first = threading.main_thread()
    if any(t is not first and t.is_alive() and not t.daemon for t in threading.enumerate()):
        # serve() left attempts cut off at shutdown_grace running in worker threads;
        # the interpreter would join them at exit. Everything is on disk already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _check_config(args: argparse.Namespace) -> int:
    path = args.file or args.config
    config = _load(path)
    check_files(config)
    print(
        f"{path}: OK ({len(config.providers)} provider account(s), {len(config.routes)} route(s), "
        f"listening on {config.listen.host}:{config.listen.port})"
    )
    return EX_OK


async def _queue(args: argparse.Namespace) -> int:
    from bridge.spool import Spool, State

    config = _load_local(args.config)
    path = config.resolve_path(config.spool.path)
    if not path.exists():
        print(f"smtp-bridge: no spool at {path} (has the daemon run yet?)", file=sys.stderr)
        return EX_NOINPUT
    spool = Spool(path, retention=config.spool.retention)
    await spool.open()
    try:
        if args.queue_command == "list":
            state = State(args.state) if args.state else None
            entries = await spool.list(state=state, limit=args.limit)
            if not args.json:
                print(
                    f"{'ID':26}  {'STATE':9}  {'TRIES':>5}  {'ACCEPTED':19}  "
                    "RECIPIENTS / LAST ERROR"
                )
            for e in entries:
                if args.json:
                    print(json.dumps(_entry_doc(e), ensure_ascii=False))
                    continue
                rcpts = ", ".join(e.envelope.rcpt_to)
                line = f"{e.id:26}  {e.state.value:9}  {e.attempts:5}  {_ts(e.created_at)}  {rcpts}"
                if e.last_error:
                    line += f"  [{e.last_error[:80]}]"
                print(_printable(line))
            return EX_OK
        entry = await spool.get(args.id) if args.id.isascii() else None
        if entry is None:
            shown = ascii(args.id)[1:-1]
            print(f"smtp-bridge: no entry {shown} (give the full id, or a prefix of 6+ "
                  "characters that matches one entry)", file=sys.stderr)  # fmt: skip
            return EX_NOINPUT
        if args.queue_command == "retry":
            if await spool.retry_now(entry.id):
                print(f"{entry.id}: due now (the running daemon picks it up)")
                return EX_OK
            print(f"smtp-bridge: {entry.id} is {entry.state.value}; only deferred or dead "
                  "entries with a stored body can be retried", file=sys.stderr)  # fmt: skip
            return EX_FAIL
        doc = _entry_doc(entry)
        for key, value in doc.items():
            print(_printable(f"{key:20} {'' if value is None else value}"))
        print("attempts:")
        for a in await spool.attempts(entry.id):
            status = a.status if a.status is not None else "-"
            took = (a.ended_at - a.started_at) * 1000
            line = (
                f"  #{a.attempt} {_ts(a.started_at)} {a.provider} {a.outcome} {status} {took:.0f}ms"
            )
            print(_printable(f"{line} {a.detail or ''}".rstrip()))
        return EX_OK
    finally:
        await spool.close()


def _printable(text: str) -> str:
    """`text` for a terminal: control characters (a Message-ID or an API's error body can
    carry ESC sequences) shown as escapes instead of acted upon."""
    return _CONTROL_CHARS.sub(lambda m: ascii(m.group())[1:-1], text)


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _entry_doc(e: object) -> dict[str, object]:
    from bridge.spool import Entry

    assert isinstance(e, Entry)
    return {
        "id": e.id,
        "state": e.state.value,
        "attempts": e.attempts,
        "provider": e.provider,
        "route": e.route,
        "mail_from": e.envelope.mail_from or "<>",
        "rcpt_to": ", ".join(e.envelope.rcpt_to),
        "message_id": e.message_id,
        "size": e.size,
        "accepted_at": _ts(e.created_at),
        "next_attempt_at": _ts(e.next_at) if e.state.value in ("queued", "deferred") else None,
        "updated_at": _ts(e.updated_at),
        "last_status": e.last_status,
        "last_error": e.last_error,
        "provider_message_id": e.provider_message_id,
        "bounce_id": e.bounce_id,
    }


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _receive(args: argparse.Namespace) -> int:
    from bridge.receiver import run_receiver

    return run_receiver(host=args.host, port=args.port, directory=Path(args.dir), token=args.token)


def _health(args: argparse.Namespace) -> int:
    import httpx

    config = _load_local(args.config)
    url = f"http://{config.health.host}:{config.health.port}/readyz"
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError as exc:
        print(f"not ready: cannot reach {url}: {exc}", file=sys.stderr)
        return EX_FAIL
    text = response.text.strip()
    if response.status_code == 200:
        print(text)
        return EX_OK
    print(f"not ready: {text}", file=sys.stderr)
    return EX_FAIL


async def _providers_test(args: argparse.Namespace) -> int:
    """Send one message through each account of a route's chain, print each answer."""
    import uuid

    from bridge.app import build_accounts
    from bridge.delivery import build_clients, send_flow
    from bridge.mime import parse_message
    from bridge.model import Delivered, Envelope
    from bridge.retry import effective

    config = _load(args.config)
    index = _route_index(config, args.route)
    if index is None:
        names = ", ".join(r.name or str(i) for i, r in enumerate(config.routes))
        print(f"smtp-bridge: no route {args.route!r} (routes: {names})", file=sys.stderr)
        return EX_NOINPUT
    route = config.routes[index]
    sender = args.sender or route.default_sender
    if not sender:
        print("smtp-bridge: give --from (the route has no default_sender)", file=sys.stderr)
        return EX_USAGE
    now = datetime.now(UTC)
    raw = (
        f"From: {sender}\r\nTo: {args.to}\r\nSubject: smtp-bridge test message\r\n"
        f"Date: {now.strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\n"
        f"Message-ID: <test.{uuid.uuid4().hex}@{config.listen.hostname}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"This is a test message sent by `smtp-bridge providers test` at {now.isoformat()}.\r\n"
    ).encode()
    accounts = build_accounts(config)
    clients = build_clients(config, accounts)
    message = parse_message(
        raw,
        Envelope(mail_from=sender, rcpt_to=(args.to,)),
        id=f"test-{uuid.uuid4().hex}",
        received_at=now,
    )
    ok = True
    try:
        for name in config.chain(route):
            # As the daemon reads it: a refused key (401) keeps mail waiting.
            outcome = accounts[name].redact(
                effective(await send_flow(accounts[name], message, clients[name], time.time()))
            )
            verdict = type(outcome).__name__.lower()
            detail = getattr(outcome, "reason", None) or getattr(outcome, "provider_message_id", "")
            status = getattr(outcome, "status", None)
            print(
                f"{name} ({config.providers[name].type}): {verdict} {status or ''} {detail or ''}"
            )
            ok = ok and isinstance(outcome, Delivered)
    finally:
        for client in {id(c): c for c in clients.values()}.values():
            await client.aclose()
    return EX_OK if ok else EX_FAIL


def _route_index(config: Config, key: str) -> int | None:
    for i, route in enumerate(config.routes):
        if route.name == key:
            return i
    if key.isdigit() and int(key) < len(config.routes):
        return int(key)
    return None


def _passwd() -> int:
    import getpass

    from bridge.passwords import hash_password

    if sys.stdin is None:
        print("smtp-bridge: no standard input to read the password from", file=sys.stderr)
        return EX_FAIL
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            print("smtp-bridge: the passwords differ", file=sys.stderr)
            return EX_FAIL
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if not first:
        print("smtp-bridge: empty password", file=sys.stderr)
        return EX_FAIL
    print(hash_password(first))
    return EX_OK


def _config_schema() -> int:
    from bridge.config import _Document

    print(json.dumps(_Document.model_json_schema(), indent=2))
    return EX_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
