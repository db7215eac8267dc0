"""Configuration: ``config.toml`` read with tomllib into frozen dataclasses.

Every key has a default except ``gateway.internal_domains``.  Unknown keys,
wrong types and bad values are errors, and every error names its key in one
line, e.g. ``config.toml: gateway.listen_adress: unknown key``.

The same generic loader builds each filter's own ``Settings`` dataclass from
its ``[filters.<name>]`` section, so filters declare their options as typed
dataclass fields (with an optional ``metadata={"check": fn}`` validator) and
never parse TOML themselves.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from filters.base import SettingsError

DEFAULT_CONFIG_PATHS = ("./config.toml", "/etc/mailwarden/config.toml")


class ConfigError(Exception):
    """A bad configuration: the message is one line naming the key."""


# ----------------------------------------------------------------- value checks


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` for IPv6).  Raises ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected \"host:port\"")
    host: str
    port_s: str
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"bad address {value!r}")
        host = value[1:end]
        rest = value[end + 1 :]
        if not rest and default_port is not None:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"bad address {value!r}: expected [host]:port")
        port_s = rest[1:]
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    elif ":" not in value and default_port is not None:
        return value, default_port
    else:
        raise ValueError(f"bad address {value!r}: expected host:port")
    if not host:
        raise ValueError(f"bad address {value!r}: empty host")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


def check_hostport(value: str) -> str:
    parse_hostport(value)
    return value


def check_optional_hostport(value: str) -> str:
    if value:
        parse_hostport(value)
    return value


def check_networks(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"bad network {item!r}") from None
    return value


def check_domains(value: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for item in value:
        d = item.strip().lower().rstrip(".")
        if not d or " " in d or "@" in d:
            raise ValueError(f"bad domain {item!r}")
        out.append(d)
    return tuple(out)


def positive(value: int | float) -> int | float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def non_negative(value: int | float) -> int | float:
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _check(fn: Callable[[Any], Any]) -> dict[str, Any]:
    return {"check": fn}


# --------------------------------------------------------------------- sections


@dataclass(frozen=True)
class GatewaySettings:
    #: the SMTP proxy's "host:port"; "" = off (the milter front end only)
    listen: str = field(default="127.0.0.1:10025", metadata=_check(check_optional_hostport))
    next_hop: str = field(default="127.0.0.1:10026", metadata=_check(check_hostport))
    hostname: str = "mailwarden.example.com"
    internal_domains: tuple[str, ...] = field(default=(), metadata=_check(check_domains))
    trusted_networks: tuple[str, ...] = field(
        default=("127.0.0.0/8", "::1/128"), metadata=_check(check_networks)
    )
    max_message_size: int = field(default=52428800, metadata=_check(positive))
    max_sessions: int = field(default=200, metadata=_check(positive))
    #: seconds to wait for the next hop (connect, each command, DATA)
    next_hop_timeout: float = field(default=60.0, metadata=_check(positive))
    #: seconds an idle next-hop connection is kept for the next session (0 = off)
    next_hop_cache_time: float = field(default=2.0, metadata=_check(non_negative))
    #: idle seconds before a client session is closed
    session_timeout: float = field(default=300.0, metadata=_check(positive))
    #: seconds SIGTERM waits for sessions in flight before closing them
    drain_timeout: float = field(default=30.0, metadata=_check(non_negative))
    #: overall per-message deadline for the whole filter chain (seconds)
    filter_timeout: float = field(default=80.0, metadata=_check(positive))
    #: threads for blocking work (libmagic, DKIM crypto, file I/O)
    workers: int = field(default=4, metadata=_check(positive))
    tls_cert: str = ""
    tls_key: str = ""
    #: "reject" (550) or "normalize" (bare CR/LF become CRLF) for DATA that
    #: contains a bare CR or LF; mailwarden never emits one either way.
    bare_newlines: Literal["reject", "normalize"] = "reject"
    #: host:port for the Prometheus /metrics and /healthz endpoint ("" = off)
    metrics_listen: str = field(default="", metadata=_check(check_optional_hostport))

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("tls_key" if self.tls_cert else "tls_cert",
                                "tls_cert and tls_key must be set together")


@dataclass(frozen=True)
class StoreSettings:
    path: str = "/var/lib/mailwarden"
    retention_days: int = field(default=90, metadata=_check(positive))
    audit_retention_days: int = field(default=365, metadata=_check(positive))
    #: seconds between automatic retention purges while serving
    purge_interval: float = field(default=3600.0, metadata=_check(positive))
    #: log records per batch written by the log writer task
    log_batch_size: int = field(default=200, metadata=_check(positive))
    #: seconds the log writer waits to fill a batch
    log_flush_interval: float = field(default=0.5, metadata=_check(positive))
    #: sqlite (embedded, one gateway) | postgresql (several gateways share it)
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    #: postgresql: a libpq connection string ("host=/run/postgresql dbname=mailwarden")
    dsn: str = ""
    #: this gateway's name in a shared store; "" = the host name
    instance: str = ""
    #: key-encryption key file for the per-period data keys ("" = no encryption)
    key_file: str = ""
    #: postgresql: the database of the wrapped data keys, apart from the data;
    #: "" = the dsn's database name + "_keys" on the same server
    key_dsn: str = ""


def check_milter_listen(value: str) -> str:
    """``""`` (off), ``host:port`` or ``unix:/absolute/path``."""
    if value.startswith("unix:"):
        if not value[5:].startswith("/"):
            raise ValueError(f"bad address {value!r}: expected unix:/absolute/path")
        return value
    if value:
        parse_hostport(value)
    return value


def check_progress_interval(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    if value >= 300:
        raise ValueError("must be below 300 (Postfix's default milter_content_timeout)")
    return value


@dataclass(frozen=True)
class MilterSettings:
    #: "host:port" or "unix:/path"; "" = the milter front end is off
    listen: str = field(default="", metadata=_check(check_milter_listen))
    #: own: mailwarden's quarantine, then DISCARD; hold: also Postfix's hold queue
    #: (SMFIR_QUARANTINE, then ACCEPT)
    quarantine: Literal["own", "hold"] = "own"
    #: seconds between SMFIR_PROGRESS while a message is being decided; keep it
    #: well below Postfix's milter_content_timeout
    progress_interval: float = field(default=10.0, metadata=_check(check_progress_interval))


#: The roles of ``[access.roles]`` (see ``quarantine/access.py``).
ROLES = ("reviewer", "investigator", "auditor", "dpo", "operator")

#: The policy's valid reasons for reading content or identifying a person.
DEFAULT_GROUNDS = ("absence", "offensive-material", "excessive-personal", "detrimental",
                   "legal-duty", "subject-access", "false-positive")


def check_grounds(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("needs at least one ground")
    for g in value:
        if not g or not all(c.isalnum() or c in "-_" for c in g):
            raise ValueError(f"bad ground {g!r}: letters, digits, '-' and '_' only")
    if len(set(value)) != len(value):
        raise ValueError("a ground is listed twice")
    return value


def check_socket_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("expected an absolute path")
    return value


def check_socket_mode(value: str) -> str:
    try:
        mode = int(value, 8)
    except ValueError:
        raise ValueError("expected an octal mode such as \"0666\"") from None
    if not 0 <= mode <= 0o777:
        raise ValueError("expected an octal mode such as \"0666\"")
    return value


@dataclass(frozen=True)
class AccessSettings:
    """``[access]``: present = access control on (the CLI goes through the daemon)."""

    #: off when the config has no [access] section (direct store access, owner only)
    enabled: bool = field(default=False, init=False)
    control_socket: str = field(default="/run/mailwarden/control.sock",
                                metadata=_check(check_socket_path))
    #: the socket's mode: who may connect (each request is then checked by role)
    socket_mode: str = field(default="0666", metadata=_check(check_socket_mode))
    grounds: tuple[str, ...] = field(default=DEFAULT_GROUNDS, metadata=_check(check_grounds))
    #: how long an approved exceptional-access grant lasts
    grant_hours: int = field(default=24, metadata=_check(positive))
    #: role -> Unix groups whose members hold it (from [access.roles])
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict, init=False)


def parse_access(data: Any) -> AccessSettings:
    """``[access]`` with its ``[access.roles]`` table; absent = access control off."""
    if data is None:
        return AccessSettings()
    if not isinstance(data, dict):
        raise ConfigError("access: expected a table")
    data = dict(data)
    roles_raw = data.pop("roles", {})
    if not isinstance(roles_raw, dict):
        raise ConfigError("access.roles: expected a table (role = [groups])")
    roles: dict[str, tuple[str, ...]] = {}
    for role, groups in roles_raw.items():
        if role not in ROLES:
            raise ConfigError(f"access.roles.{role}: unknown role (known: {', '.join(ROLES)})")
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise ConfigError(f"access.roles.{role}: expected a list of group names")
        roles[role] = tuple(groups)
    settings = build_settings(AccessSettings, data, "access")
    object.__setattr__(settings, "enabled", True)
    object.__setattr__(settings, "roles", types.MappingProxyType(roles))
    return settings


@dataclass(frozen=True)
class Config:
    gateway: GatewaySettings
    store: StoreSettings
    chain: tuple[str, ...]
    filters: Mapping[str, Any]  # filter name -> its Settings instance
    path: str = "config.toml"
    milter: MilterSettings = field(default_factory=MilterSettings)
    access: AccessSettings = field(default_factory=AccessSettings)

    def filter_settings(self, name: str) -> Any:
        return self.filters[name]


DEFAULT_CHAIN = ("clamav", "attachment_types", "external_attachments", "personal", "header_log")


# ------------------------------------------------------------------ the loader


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any) -> Any:
    """Check ``value`` against the type hint ``tp``; raise ValueError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else "bad value")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"expected {_type_name(tp)}")
        return tuple(_convert(item_tp, v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    raise ValueError(f"unsupported setting type {tp!r}")  # pragma: no cover


def build_settings(cls: type, data: Any, prefix: str, required: tuple[str, ...] = ()) -> Any:
    """Build the frozen dataclass ``cls`` from a TOML table.

    ``prefix`` is the dotted section name used in error messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}: unknown key")
    for key in required:
        if key not in data:
            raise ConfigError(f"{prefix}.{key}: required key is missing")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        try:
            value = _convert(hints[name], data[name])
            check = f.metadata.get("check")
            if check is not None:
                value = check(value)
        except SettingsError as exc:
            raise ConfigError(f"{prefix}.{name}: {exc.message}") from None
        except ValueError as exc:
            raise ConfigError(f"{prefix}.{name}: {exc}") from None
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except SettingsError as exc:
        raise ConfigError(f"{prefix}.{exc.key}: {exc.message}") from None
    except ValueError as exc:
        raise ConfigError(f"{prefix}: {exc}") from None


def parse_config(data: Mapping[str, Any], path: str = "config.toml", *,
                 with_filters: bool = True) -> Config:
    """Build a :class:`Config` from an already-parsed TOML document.

    ``with_filters=False`` checks the filter names (chain and sections) but
    builds no filter settings (``Config.filters`` is empty): for commands
    that never run the chain, which then do not import the filters' scanners.
    """
    import filters

    registry: Mapping[str, Any] = (
        filters.REGISTRY if with_filters else dict.fromkeys(filters.FILTERS)
    )
    try:
        return _parse(data, path, registry)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _parse(data: Mapping[str, Any], path: str, registry: Mapping[str, Any]) -> Config:
    for key in data:
        if key not in ("gateway", "store", "filters", "milter", "access"):
            raise ConfigError(f"{key}: unknown key")
    gateway = build_settings(
        GatewaySettings, data.get("gateway"), "gateway", required=("internal_domains",)
    )
    store = build_settings(StoreSettings, data.get("store"), "store")
    milter = build_settings(MilterSettings, data.get("milter"), "milter")
    access = parse_access(data.get("access"))
    if store.backend == "postgresql" and not store.dsn:
        raise ConfigError('store.dsn: required with backend = "postgresql"')
    if not gateway.listen and not milter.listen:
        raise ConfigError('gateway.listen: "" (off) needs milter.listen: nothing would listen')
    fdata = data.get("filters", {})
    if not isinstance(fdata, dict):
        raise ConfigError("filters: expected a table")
    chain_raw = fdata.get("chain", list(DEFAULT_CHAIN))
    if not isinstance(chain_raw, list) or not all(isinstance(c, str) for c in chain_raw):
        raise ConfigError("filters.chain: expected a list of strings")
    seen: set[str] = set()
    for name in chain_raw:
        if name not in registry:
            raise ConfigError(
                f"filters.chain: unknown filter {name!r} (known: {', '.join(registry)})"
            )
        if name in seen:
            raise ConfigError(f"filters.chain: filter {name!r} listed twice")
        seen.add(name)
    for key in fdata:
        if key != "chain" and key not in registry:
            raise ConfigError(f"filters.{key}: unknown key")
    settings = {
        name: build_settings(cls.Settings, fdata.get(name), f"filters.{name}")
        for name, cls in registry.items() if cls is not None
    }
    return Config(gateway, store, tuple(chain_raw), types.MappingProxyType(settings), path,
                  milter=milter, access=access)


def resolve_path(path: str | None) -> str:
    """--config, else $MAILWARDEN_CONFIG, else ./config.toml, else /etc/..."""
    if path:
        return path
    env = os.environ.get("MAILWARDEN_CONFIG")
    if env:
        return env
    for candidate in DEFAULT_CONFIG_PATHS:
        if Path(candidate).exists():
            return candidate
    return DEFAULT_CONFIG_PATHS[-1]


def load_config(path: str | os.PathLike[str], *, with_filters: bool = True) -> Config:
    """Read and validate a config file (see :func:`parse_config` for
    ``with_filters``).  Raises :class:`ConfigError`."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{p}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse_config(data, str(p), with_filters=with_filters)
