"""Configuration: YAML text + an environment mapping → one frozen, validated `Config`.

`load_config(text, env)` does all the work and raises `ConfigError` listing *every*
problem with its key path (``routes[0].provider: no provider account named 'x'``). It
never exits; only `cli.py` turns the error into exit status 78.

Two expansions happen before validation, so they work in every section:

* ``${VAR}`` (and ``${VAR:-default}``) in any string value is replaced from `env`; an
  unset variable without a default is a problem at that key path. ``$$`` is a literal ``$``.
* In a provider block, a key ``NAME_file`` whose settings model has a field ``NAME`` (and
  no field ``NAME_file``) is read from that file at load time, trailing newline stripped:
  ``api_key_file: /run/credentials/smtp-bridge/sendgrid``. Paths such as ``ca_file`` stay
  paths.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge import providers
from bridge.errors import ConfigError, KeyPath
from bridge.passwords import is_hash
from bridge.providers.base import ProviderSettings, is_loopback_host

__all__ = [
    "AccountLimits",
    "AuthConfig",
    "AuthUser",
    "Config",
    "DeliveryConfig",
    "ListenConfig",
    "LoggingConfig",
    "ProviderAccount",
    "RetryConfig",
    "Route",
    "SpoolConfig",
    "TLSConfig",
    "load_config",
    "load_config_file",
    "load_local_settings",
    "parse_duration",
    "parse_size",
]

# --------------------------------------------------------------------------- value types

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*")
_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    None: 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}


def parse_duration(value: object) -> float:
    """``"10s"``, ``"500ms"``, ``"10m"``, ``"7d"`` or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 5m or 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 10s, 5m or 7d")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 1000**2,
               "mb": 1000**2, "mib": 1024**2, "mi": 1024**2, "g": 1000**3, "gb": 1000**3,
               "gib": 1024**3, "gi": 1024**3}  # fmt: skip


def parse_size(value: object) -> int:
    """``26214400``, ``"25MiB"`` or ``"10MB"`` → bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes such as 26214400 or 25MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    else:
        raise ValueError("expected a size in bytes such as 26214400 or 25MiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Section(BaseModel):
    """Strict, frozen config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- sections


class TLSConfig(_Section):
    """``listen.tls:`` certificate for STARTTLS or implicit TLS (re-read on SIGHUP)."""

    cert_file: str
    key_file: str
    #: True: TLS from the first byte (port 465 style); False: offer STARTTLS.
    implicit: bool = False
    #: Refuse MAIL until the client has done STARTTLS.
    require_starttls: bool = False


class ListenConfig(_Section):
    """``listen:`` the SMTP side."""

    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535, strict=True)
    hostname: str = "smtp-bridge.local"
    max_message_size: Annotated[Size, Field(gt=0)] = 26214400
    max_recipients: int = Field(default=1000, gt=0)
    #: Seconds a client may idle between commands before the session is closed.
    timeout: Duration = 300.0
    #: Longest a whole DATA transfer may take (cuts clients that trickle bytes).
    data_timeout: Duration = 600.0
    #: Concurrent sessions, in all and from one IP address; more get 421.
    max_connections: int = Field(default=200, gt=0)
    max_connections_per_ip: int = Field(default=50, gt=0)
    #: 5xx replies one session may collect before it is closed with 421.
    max_errors: int = Field(default=20, gt=0)
    #: Client networks (CIDR) allowed to connect; empty means any.
    allow_networks: tuple[str, ...] = ()
    tls: TLSConfig | None = None

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network in CIDR form") from None
        return value

    def is_loopback(self) -> bool:
        """True when the listener binds only a loopback address."""
        return is_loopback_host(self.host)


class AuthUser(_Section):
    """``auth.users[]:`` one SMTP AUTH account."""

    username: str = Field(min_length=1)
    #: scrypt hash from `smtp-bridge passwd` (never the password itself).
    password_hash: str
    #: Envelope senders this user may use (addresses, globs, domains; "<>" for bounces).
    #: Empty means any.
    allowed_senders: tuple[str, ...] = ()

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, value: str) -> str:
        if not is_hash(value):
            raise ValueError("must be a hash made by `smtp-bridge passwd` ($scrypt$...)")
        return value


class AuthConfig(_Section):
    """``auth:`` SMTP AUTH PLAIN/LOGIN for clients that must log in."""

    users: tuple[AuthUser, ...] = ()
    #: With users configured, refuse MAIL from sessions that have not authenticated.
    required: bool = True
    #: Offer AUTH without TLS on a non-loopback listener (passwords in clear text).
    allow_plaintext: bool = False


class SpoolConfig(_Section):
    """``spool:`` where accepted mail waits, and how long the delivery log is kept."""

    path: str = "var/spool.sqlite3"
    retention: Duration = 7 * 86400.0
    #: Most undelivered entries the spool holds; beyond it new mail gets 452 (try later).
    max_entries: int = Field(default=100_000, gt=0)
    #: Free disk space kept back for bookkeeping and WAL checkpoints (see spool.py).
    min_free_space: Size = 512 * 1024


class RetryConfig(_Section):
    """``delivery.retry:`` exponential backoff with full jitter, bounded by age."""

    first_delay: Duration = 10.0
    max_delay: Duration = 600.0
    max_age: Duration = 5 * 86400.0
    #: Optional cap on attempts; None means only `max_age` ends retrying (as Postfix).
    max_attempts: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _delays_ordered(self) -> RetryConfig:
        if self.max_delay < self.first_delay:
            raise ValueError("max_delay must not be shorter than first_delay")
        return self


class DeliveryConfig(_Section):
    """``delivery:`` the worker pool."""

    concurrency: int = Field(default=32, gt=0, le=1024)
    timeout: Annotated[Duration, Field(gt=0)] = 30.0
    retry: RetryConfig = RetryConfig()
    shutdown_grace: Duration = 30.0


class RouteMatch(_Section):
    """``routes[].match:`` glob patterns; a bare domain means ``*@domain``."""

    recipients: tuple[str, ...] = ("*",)
    sender: tuple[str, ...] | None = None


class Route(_Section):
    """``routes[]:`` which provider account delivers which recipients.

    `failover` names further accounts: after `failover_after` retryable failures at one
    account (or while its circuit is open) the next one in the chain delivers.
    """

    name: str | None = None
    match: RouteMatch = RouteMatch()
    provider: str
    failover: tuple[str, ...] = ()
    failover_after: int = Field(default=3, gt=0)
    #: Send a delivery status notification to the sender when an entry goes dead.
    bounces: bool = True
    #: From address of those bounces; default `default_sender`, else
    #: MAILER-DAEMON@listen.hostname (APIs that need a verified sender want this set).
    bounce_from: str | None = None
    #: `from` for mail that has no From header and a null envelope sender.
    default_sender: str | None = None


class LoggingConfig(_Section):
    """``logging:``."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class HealthConfig(_Section):
    """``health:`` the loopback HTTP endpoint with /metrics, /healthz and /readyz."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9025, ge=0, le=65535, strict=True)
    #: /readyz fails when the oldest due entry has waited longer than this.
    stale_after: Duration = 3600.0


class AccountLimits(_Section):
    """``providers.NAME.limits:`` pacing shared by every route using this account."""

    #: Attempts in flight at this account at once (None: only delivery.concurrency).
    concurrency: int | None = Field(default=None, gt=0)
    requests_per_second: float | None = Field(default=None, gt=0)
    recipients_per_second: float | None = Field(default=None, gt=0)
    #: Retryable failures in a row that open the account's circuit, and for how long.
    circuit_threshold: int = Field(default=5, gt=0)
    circuit_cooldown: Duration = 30.0


class ProviderAccount(BaseModel):
    """One named provider account: its `type`, validated settings and pacing limits."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    type: str
    settings: ProviderSettings
    limits: AccountLimits = AccountLimits()


class Config(BaseModel):
    """The whole, validated configuration."""

    model_config = ConfigDict(frozen=True)

    listen: ListenConfig = ListenConfig()
    auth: AuthConfig = AuthConfig()
    spool: SpoolConfig = SpoolConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    providers: dict[str, ProviderAccount]
    routes: tuple[Route, ...]
    logging: LoggingConfig = LoggingConfig()
    health: HealthConfig = HealthConfig()
    #: Directory relative paths (spool, ca_file) are resolved against: the config file's.
    base_dir: Path = Path()

    def resolve_path(self, value: str) -> Path:
        """A path from the config, relative ones taken from the current directory.

        Relative paths are relative to the working directory (as `make run` and the
        systemd unit's WorkingDirectory= expect), not to the file.
        """
        path = Path(value)
        return path if path.is_absolute() else self.base_dir / path

    def chain(self, route: Route) -> tuple[str, ...]:
        """The provider accounts of a route, in failover order."""
        return (route.provider, *route.failover)


class _Document(_Section):
    """The top level as written, before provider settings are validated."""

    listen: ListenConfig = ListenConfig()
    auth: AuthConfig = AuthConfig()
    spool: SpoolConfig = SpoolConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    providers: dict[str, dict[str, Any]] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)
    logging: LoggingConfig = LoggingConfig()
    health: HealthConfig = HealthConfig()


# --------------------------------------------------------------------------- loading

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(
    node: Any, env: Mapping[str, str], path: KeyPath, problems: list[tuple[KeyPath, str]]
) -> Any:
    """Replace ``${VAR}`` in every string of the tree; collect unset variables."""
    if isinstance(node, dict):
        return {k: _expand(v, env, (*path, str(k)), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, env, (*path, i), problems) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append((path, f"environment variable {name} is not set"))
        # A stand-in that passes the value checks, so that the unset variable is the one
        # problem reported here (an empty string made "Bearer " fail as whitespace).
        return "unset"

    return _ENV_REF.sub(repl, node)


def _read_file_keys(
    raw: dict[str, Any],
    fields: Mapping[str, Any],
    path: KeyPath,
    problems: list[tuple[KeyPath, str]],
) -> dict[str, Any]:
    """Turn ``NAME_file: PATH`` into ``NAME: <file contents>`` where NAME is a field."""
    out = dict(raw)
    for key in list(raw):
        if not (isinstance(key, str) and key.endswith("_file")):
            continue
        target = key[: -len("_file")]
        if key in fields or target not in fields:
            continue
        if target in raw:
            problems.append(((*path, key), f"give either {target} or {key}, not both"))
            continue
        try:
            out[target] = Path(str(raw[key])).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
            problems.append(((*path, key), f"cannot read {raw[key]}: {reason or exc}"))
            # A stand-in value, and an empty problem that hides the validation error it
            # would cause at `target` (see _first_per_path).
            out[target] = ""
            problems.append(((*path, target), ""))
        del out[key]
    return out


def _problems_from(exc: ValidationError, prefix: KeyPath) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        out.append(((*prefix, *loc), message))
    return out


def _first_per_path(problems: list[tuple[KeyPath, str]]) -> list[tuple[KeyPath, str]]:
    """One problem per key: an unset ${VAR} explains the invalid value it leaves behind.

    An empty message marks a key whose later problems are consequences of an earlier one.
    """
    seen: set[KeyPath] = set()
    out = []
    for path, message in problems:
        if path not in seen:
            seen.add(path)
            if message:
                out.append((path, message))
    return out


def load_config(text: str, env: Mapping[str, str], *, base_dir: Path | None = None) -> Config:
    """Parse and validate a config document (see `_load_config`)."""
    try:
        return _load_config(text, env, base_dir=base_dir)
    except RecursionError:
        raise ConfigError([((), _TOO_DEEP)]) from None


_TOO_DEEP = "nesting too deep, or a YAML alias that contains itself"


def _load_config(text: str, env: Mapping[str, str], *, base_dir: Path | None = None) -> Config:
    """Parse and validate a config document.

    Args:
        text: The YAML document.
        env: Environment used for ``${VAR}`` references.
        base_dir: Directory that relative paths are resolved against (default: cwd).

    Returns:
        The frozen `Config`.

    Raises:
        ConfigError: with every problem found, each with its key path.
    """
    doc = _parse_yaml(text)
    problems: list[tuple[KeyPath, str]] = []
    doc = _expand(doc, env, (), problems)
    try:
        top: _Document | None = _Document.model_validate(doc)
    except ValidationError as exc:
        # Keep going: provider settings and route names are checked below on the raw
        # document, so one run reports every mistake in the file.
        problems.extend(_problems_from(exc, ()))
        top = None

    raw_providers = doc.get("providers")
    accounts = _accounts(raw_providers if isinstance(raw_providers, dict) else {}, problems)
    names = set(raw_providers) if isinstance(raw_providers, dict) else set()
    routes = top.routes if top is not None else _valid_routes(doc.get("routes"))
    for i, route in enumerate(routes):
        if route.provider not in names:
            problems.append(
                (("routes", i, "provider"), f"no provider account named {route.provider!r}")
            )
        for j, other in enumerate(route.failover):
            at: KeyPath = ("routes", i, "failover", j)
            if other not in names:
                problems.append((at, f"no provider account named {other!r}"))
            elif other == route.provider or route.failover.index(other) != j:
                problems.append((at, f"{other!r} is already in the chain"))
    if top is None:
        raise ConfigError(_first_per_path(problems))

    if not top.listen.is_loopback() and not top.listen.allow_networks and not top.auth.users:
        problems.append(
            (
                ("listen", "host"),
                "a non-loopback listener needs auth.users or listen.allow_networks "
                "(it would be an open relay)",
            )
        )
    if (
        top.health.enabled
        and top.health.port == top.listen.port != 0
        and top.health.host == top.listen.host
    ):
        problems.append((("health", "port"), "must differ from listen.port"))
    for i, user in enumerate(top.auth.users):
        if [u.username for u in top.auth.users].index(user.username) != i:
            problems.append((("auth", "users", i, "username"), "duplicate username"))

    if problems:
        raise ConfigError(_first_per_path(problems))
    return Config(
        listen=top.listen,
        auth=top.auth,
        spool=top.spool,
        delivery=top.delivery,
        providers=accounts,
        routes=tuple(routes),
        logging=top.logging,
        health=top.health,
        base_dir=base_dir or Path(),
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a repeated key is an error instead of "the last wins".

    A second ``listen:`` block at the end of a long file would silently replace the
    first one, with all its limits.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key != "<<":
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str) -> dict[str, Any]:
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError([((), f"{where}{problem}")]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([((), "the config file must be a mapping of sections")])
    return doc


class LocalSettings(BaseModel):
    """The sections the operator commands (`queue`, `health`) need, and no others."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    spool: SpoolConfig = SpoolConfig()
    health: HealthConfig = HealthConfig()

    def resolve_path(self, value: str) -> Path:
        """A relative path is taken from the current directory, as in `Config`."""
        return Path(value)


def load_local_settings(path: Path, env: Mapping[str, str]) -> LocalSettings:
    """Read only `spool` and `health` from the config file at `path`.

    `smtp-bridge queue list` on a server must work from an operator's shell, where the
    provider secrets of the service's environment (or its systemd credentials) are not
    set; so a ${VAR} or a file elsewhere in the file is not even looked at.

    Raises:
        ConfigError: The file is unreadable, or these two sections are invalid.
    """
    doc = _parse_yaml(_read_text(path))
    problems: list[tuple[KeyPath, str]] = []
    try:
        sections = {
            k: _expand(doc[k], env, (k,), problems) for k in ("spool", "health") if k in doc
        }
    except RecursionError:
        raise ConfigError([((), _TOO_DEEP)]) from None
    try:
        settings = LocalSettings.model_validate(sections)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, ()))
    if problems:
        raise ConfigError(_first_per_path(problems))
    return settings


def _accounts(
    raw: dict[str, Any], problems: list[tuple[KeyPath, str]]
) -> dict[str, ProviderAccount]:
    """Validate every provider block with its own adapter's settings model."""
    accounts: dict[str, ProviderAccount] = {}
    for name, block in raw.items():
        path: KeyPath = ("providers", str(name))
        if not isinstance(block, dict):
            problems.append((path, "must be a mapping with a type key"))
            continue
        type_name = block.get("type")
        if type_name not in providers.REGISTRY:
            known = ", ".join(sorted(providers.REGISTRY))
            problems.append(
                ((*path, "type"), f"unknown provider type {type_name!r} (one of: {known})")
            )
            continue
        cls = providers.get(type_name)
        try:
            limits = AccountLimits.model_validate(block.get("limits") or {})
        except ValidationError as exc:
            problems.extend(_problems_from(exc, (*path, "limits")))
            limits = AccountLimits()
        settings_raw = {k: v for k, v in block.items() if k not in ("type", "limits")}
        settings_raw = _read_file_keys(
            settings_raw, cls.settings_model.model_fields, path, problems
        )
        try:
            settings = cls.parse_settings(settings_raw)
        except ValidationError as exc:
            problems.extend(_problems_from(exc, path))
            continue
        accounts[str(name)] = ProviderAccount(
            name=str(name), type=type_name, settings=settings, limits=limits
        )
    return accounts


def _valid_routes(raw: object) -> list[Route]:
    """The routes that validate on their own (their own problems are already reported)."""
    out: list[Route] = []
    for item in raw if isinstance(raw, list) else []:
        try:
            out.append(Route.model_validate(item))
        except ValidationError:
            continue
    return out


def load_config_file(path: Path, env: Mapping[str, str]) -> Config:
    """Read `path` and `load_config` it; an unreadable file is a ConfigError too."""
    return load_config(_read_text(path), env)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([((), f"cannot read {path}: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([((), f"cannot read {path}: not UTF-8 text")]) from None


def check_files(config: Config) -> None:
    """Load every certificate and CA file the config names, as `serve` will.

    `load_config` only checks shapes; this catches the missing or unreadable file that
    would otherwise stop the daemon at start-up with a bare OSError.

    Raises:
        ConfigError: One problem per unusable file, with its key path.
    """
    problems: list[tuple[KeyPath, str]] = []
    tls = config.listen.tls
    if tls is not None:
        cert, key = config.resolve_path(tls.cert_file), config.resolve_path(tls.key_file)
        unreadable = [
            (name, path)
            for name, path in (("cert_file", cert), ("key_file", key))
            if not os.access(path, os.R_OK) or path.is_dir()
        ]
        for name, path in unreadable:
            problems.append((("listen", "tls", name), f"cannot read {path}"))
        if not unreadable:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                where = f"{cert} with {key}"
                problems.append((("listen", "tls", "cert_file"), _file_problem(exc, where)))
    for name, account in config.providers.items():
        ca = account.settings.ca_file
        if ca is None:
            continue
        path = config.resolve_path(ca)
        try:
            ssl.create_default_context(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            problems.append((("providers", name, "ca_file"), _file_problem(exc, str(path))))
    if problems:
        raise ConfigError(problems)


def _file_problem(exc: OSError | ssl.SSLError, where: str) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"{where}: not a usable PEM certificate/key ({exc.reason or exc})"
    return f"cannot read {where}: {exc.strerror or exc}"
