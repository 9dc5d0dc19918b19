"""The smtp-bridge command: exit statuses and output, run in-process through main()."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import EX_CONFIG, EX_NOINPUT, EX_OK, EX_OSERR, main
from bridge.model import Envelope
from bridge.passwords import verify_password
from bridge.spool import NewEntry, Spool, State
from tests.conftest import config_text


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(config_text(tmp_path))
    return path


def test_check_config_ok(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file prints a one-line summary and exits 0."""
    code = main(["check-config", str(config_file)])

    assert EX_OK == code
    assert "OK (1 provider account(s), 1 route(s)" in capsys.readouterr().out


def test_serve_on_a_taken_port_exits_71_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port in use is an operating-system error (71) in one line, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "bridge.yaml"
        path.write_text(config_text(tmp_path, listen={"port": port}))

        code = main(["serve", "--config", str(path)])

    err = capsys.readouterr().err
    assert EX_OSERR == code
    assert f"listen.host/listen.port 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err


def test_check_config_bad_exits_78_naming_key_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every problem is printed with its key path; the exit status is 78 (EX_CONFIG)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {port: -1}\nproviders: {p: {type: webhook}}\nroutes: [{provider: q}]\n")

    code = main(["check-config", str(bad)])

    err = capsys.readouterr().err
    assert EX_CONFIG == code
    assert "listen.port:" in err
    assert "providers.p.url: required key is missing" in err
    assert "routes[0].provider: no provider account named 'q'" in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing config file is "no such input" (66), not a traceback."""
    code = main(["check-config", str(tmp_path / "nope.yaml")])

    assert EX_NOINPUT == code
    assert "no config file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "key", "found"),
    [
        ("missing-ca.pem", "providers.hook.ca_file", "cannot read"),
        ("garbage.pem", "providers.hook.ca_file", "not a usable PEM"),
    ],
    ids=["missing", "garbage"],
)
def test_check_config_names_an_unusable_ca_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, key: str, found: str
) -> None:
    """serve would fail on the file, so check-config does too, naming the key path."""
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "providers:\n"
        f'  hook: {{type: webhook, url: "https://example.net/in", ca_file: "{tmp_path / extra}"}}\n'
        "routes:\n  - provider: hook\n"
    )

    code = main(["check-config", str(path)])
    err = capsys.readouterr().err

    assert EX_CONFIG == code
    assert f"{key}: " in err
    assert found in err


def test_check_config_names_the_missing_tls_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the certificate present and the key missing, key_file is the key path named."""
    import trustme

    cert = tmp_path / "cert.pem"
    trustme.CA().issue_cert("localhost").cert_chain_pems[0].write_to_path(str(cert))
    path = tmp_path / "bridge.yaml"
    tls = {"cert_file": str(cert), "key_file": str(tmp_path / "nope.pem")}
    path.write_text(config_text(tmp_path, listen={"tls": tls}))

    code = main(["check-config", str(path)])

    assert EX_CONFIG == code
    assert f"listen.tls.key_file: cannot read {tmp_path / 'nope.pem'}" in capsys.readouterr().err


def test_check_config_on_a_binary_file_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not UTF-8 text is reported, not a UnicodeDecodeError traceback."""
    path = tmp_path / "bridge.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")

    assert EX_CONFIG == main(["check-config", str(path)])
    assert "not UTF-8 text" in capsys.readouterr().err


def test_shipped_examples_all_pass_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    """Every file in config/ and config/examples/ validates (with placeholder secrets)."""
    import os

    root = Path(__file__).parents[1] / "config"
    files = sorted([root / "bridge.yaml", *(root / "examples").glob("*.yaml")])
    env = {name: "placeholder" for name in _env_names(files)}
    old = dict(os.environ)
    os.environ.update(env)
    try:
        codes = {f.name: main(["check-config", str(f)]) for f in files}
    finally:
        os.environ.clear()
        os.environ.update(old)
    problems = [
        line.strip() for line in capsys.readouterr().err.splitlines() if line.startswith("  ")
    ]

    # The examples name certificate files of the operator's machine; nothing else may fail.
    assert {f.name: EX_OK for f in files} == {
        name: EX_OK if code == EX_CONFIG else code for name, code in codes.items()
    }
    assert [] == [
        p for p in problems if not re.match(r"\S+\.(ca_file|cert_file|key_file): cannot read", p)
    ]


def _env_names(files: list[Path]) -> set[str]:
    import re

    names: set[str] = set()
    for f in files:
        names.update(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", f.read_text()))
    return names


async def _fill(config_file: Path, tmp_path: Path, message_id: str = "<m@x>") -> list[str]:
    spool = Spool(tmp_path / "spool.sqlite3", min_free_space=0)
    await spool.open()
    env = Envelope(mail_from="a@example.com", rcpt_to=("b@example.org",))
    ids = await spool.put(
        b"Subject: x\r\n\r\ny\r\n", [NewEntry(0, "hook", env)], message_id=message_id
    )
    (claim,) = await spool.claim_due(spool.clock(), 1)
    await spool.finish(claim.entry, state=State.DEAD, started_at=0.0, outcome="permanent",
                       status=400, detail="HTTP 400: nope")  # fmt: skip
    await spool.close()
    return ids


def test_queue_list_show_retry(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """queue list shows the entry, show gives its log, retry makes a dead entry due."""
    (eid,) = asyncio.run(_fill(config_file, tmp_path))

    listed = main(["queue", "--config", str(config_file), "list"])
    out_list = capsys.readouterr().out
    shown = main(["queue", "--config", str(config_file), "show", eid[:10]])
    out_show = capsys.readouterr().out
    as_json = main(["queue", "--config", str(config_file), "list", "--json", "--state", "dead"])
    doc = json.loads(capsys.readouterr().out.splitlines()[0])
    retried = main(["queue", "--config", str(config_file), "retry", eid])
    again = main(["queue", "--config", str(config_file), "retry", eid])

    assert (EX_OK, EX_OK, EX_OK, EX_OK) == (listed, shown, as_json, retried)
    assert eid in out_list
    assert "HTTP 400: nope" in out_list
    assert "last_error" in out_show
    assert "#1" in out_show
    assert "permanent 400" in out_show
    assert (eid, "dead", "<m@x>") == (doc["id"], doc["state"], doc["message_id"])
    assert 1 == again


def test_queue_needs_neither_provider_secrets_nor_a_fixed_option_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """queue works from a shell without the service's secrets, --config before or after."""
    path = tmp_path / "bridge.yaml"
    path.write_text(
        config_text(tmp_path).replace(
            "url: https://127.0.0.1:9/messages",
            "url: https://127.0.0.1:9/messages\n    headers:"
            " {Authorization: 'Bearer ${UNSET_IN_THIS_SHELL}'}",
        )
    )
    asyncio.run(_fill(path, tmp_path))

    before = main(["queue", "--config", str(path), "list"])
    after = main(["queue", "list", "--config", str(path)])
    checked = main(["check-config", str(path)])

    err = capsys.readouterr().err
    assert (EX_OK, EX_OK, EX_CONFIG) == (before, after, checked)
    assert "UNSET_IN_THIS_SHELL is not set" in err


def test_queue_show_escapes_control_characters_and_refuses_odd_ids(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Message-ID with ESC sequences is printed escaped; an undecodable id is 'no entry'."""
    (eid,) = asyncio.run(_fill(config_file, tmp_path, message_id="<\x1b[2Jx\x07@y>"))

    shown = main(["queue", "show", eid, "--config", str(config_file)])
    out = capsys.readouterr().out
    odd = main(
        ["queue", "show", "\udcff\udcfe\udcfd\udcfc\udcfb\udcfa", "--config", str(config_file)]
    )
    err = capsys.readouterr().err

    assert (EX_OK, EX_NOINPUT) == (shown, odd)
    assert "<\\x1b[2Jx\\x07@y>" in out
    assert "\x1b" not in out
    assert "no entry \\udcff" in err


def test_check_config_on_a_self_referencing_alias_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A YAML alias that contains itself is one line of error, not a RecursionError."""
    path = tmp_path / "loop.yaml"
    path.write_text("a: &a [*a]\n")

    assert EX_CONFIG == main(["check-config", str(path)])
    assert "a YAML alias that contains itself" in capsys.readouterr().err


def test_queue_without_spool(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Asking for the queue before the daemon ever ran is a clear message, exit 66."""
    code = main(["queue", "--config", str(config_file), "list"])

    assert EX_NOINPUT == code
    assert "no spool at" in capsys.readouterr().err


def test_passwd_reads_stdin_and_prints_a_verifiable_hash() -> None:
    """`smtp-bridge passwd` with a piped password prints a hash that verifies it."""
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "passwd"], input="s3cret!\n", capture_output=True,
        text=True, check=False, timeout=60,
    )  # fmt: skip

    assert 0 == proc.returncode, proc.stderr
    assert verify_password(b"s3cret!", proc.stdout.strip())


def test_config_schema_is_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    """`config schema` prints a JSON Schema naming the top-level sections."""
    code = main(["config", "schema"])

    schema = json.loads(capsys.readouterr().out)
    assert EX_OK == code
    assert {"listen", "spool", "delivery", "providers", "routes"} <= set(schema["properties"])


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """--help names each subcommand."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])

    out = capsys.readouterr().out
    assert 0 == info.value.code
    for command in ("serve", "check-config", "queue", "receive", "health", "passwd", "providers"):
        assert command in out


def test_health_when_nothing_listens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`health` against a port where nothing listens exits 1 with a reason."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "b.yaml"
    path.write_text(config_text(tmp_path, health={"enabled": True, "port": port}))

    code = main(["health", "--config", str(path)])

    assert 1 == code
    assert "not ready" in capsys.readouterr().err


async def test_providers_test_reports_a_refused_key_as_retryable(tmp_path: Path) -> None:
    """A 401 is what the daemon retries, so `providers test` says retryable, not permanent."""
    from bridge.receiver import Receiver

    rec = Receiver("127.0.0.1", 0, tmp_path / "rx", token="the-right-token")
    await rec.start()
    path = tmp_path / "b.yaml"
    path.write_text(config_text(tmp_path, url=f"{rec.url}/m", ca_file=str(rec.cert_paths.ca_cert)))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "providers", "test", "0", "--to", "you@example.org",
            "--from", "ops@example.com", "--config", str(path), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
    finally:
        await rec.close()

    assert 1 == proc.returncode
    assert out.decode().startswith("hook (webhook): retryable 401")


def test_providers_test_without_a_sender_is_a_usage_error(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --from and no default_sender: exit 2 (usage), nothing is sent."""
    code = main(["providers", "test", "0", "--to", "you@example.org", "--config", str(config_file)])

    assert 2 == code
    assert "give --from" in capsys.readouterr().err


async def test_providers_test_sends_through_the_route_and_prints_the_answer(
    tmp_path: Path,
) -> None:
    """`providers test ROUTE` sends one message to the route's provider and prints 'delivered'."""
    from bridge.receiver import ReceivedMessage, Receiver

    got: list[ReceivedMessage] = []
    rec = Receiver("127.0.0.1", 0, tmp_path / "rx", on_message=got.append)
    await rec.start()
    path = tmp_path / "b.yaml"
    path.write_text(
        config_text(
            tmp_path,
            url=f"{rec.url}/m",
            ca_file=str(rec.cert_paths.ca_cert),
            routes=[{"name": "main", "provider": "hook", "default_sender": "ops@example.com"}],
        )
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "providers", "--config", str(path), "test", "main",
            "--to", "you@example.org", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        missing = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "providers", "--config", str(path), "test", "nope",
            "--to", "you@example.org", stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await missing.communicate()
    finally:
        await rec.close()

    assert 0 == proc.returncode
    assert out.decode().startswith("hook (webhook): delivered 200")
    assert ["you@example.org"] == got[0].document["envelope"]["rcpt_to"]
    assert "smtp-bridge test message" == got[0].document["subject"]
    assert (EX_NOINPUT, b"no route 'nope'") == (missing.returncode, err[13:28])
