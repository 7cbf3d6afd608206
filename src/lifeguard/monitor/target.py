"""Which database the monitor watches, and a connection to it that never shows a password.

The database comes from, in order: ``--database-url``, the ``LIFEGUARD_DATABASE_URL``
environment variable, or the Celery app given with ``-A``: its Django ``DATABASES``
entry when Django is configured, else any lifeguard concern of the app that offers a
URL (:class:`DatabaseUrlSource`, e.g. the SQLAlchemy integration).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigurationError, LifeguardError
from ..postgres.conninfo import (
    ConninfoError,
    describe_django_database,
    error_line,
    parse_conninfo,
    redact_url,
)
from ..postgres.slots import refusal

ENV_URL = "LIFEGUARD_DATABASE_URL"
#: How the monitor's own session shows in pg_stat_activity (never a worker's prefix).
MONITOR_APPLICATION_NAME = "lifeguard-monitor"

# SQLAlchemy spells the driver into the scheme (postgresql+psycopg://); libpq does not.
_DRIVER_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+\w+)?://", re.IGNORECASE)

# libpq connection keywords: the OPTIONS of a Django database that libpq understands.
_LIBPQ_KEYWORDS = frozenset(
    (  # noqa: SIM905
        "host hostaddr port dbname user password passfile channel_binding connect_timeout "
        "client_encoding options application_name fallback_application_name keepalives "
        "keepalives_idle keepalives_interval keepalives_count tcp_user_timeout gssencmode "
        "sslmode sslnegotiation sslcompression sslcert sslkey sslpassword sslcertmode "
        "sslrootcert sslcrl sslcrldir sslsni requirepeer ssl_min_protocol_version "
        "ssl_max_protocol_version krbsrvname gsslib gssdelegation service "
        "target_session_attrs load_balance_hosts"
    ).split()
)


class DatabaseUnreachable(LifeguardError):
    """The monitored database did not accept a connection (one line, no password)."""


@runtime_checkable
class DatabaseUrlSource(Protocol):
    """A lifeguard concern that knows the app's database (e.g. an SQLAlchemy engine's URL).

    ``lifeguard monitor -A app`` asks every hook of the app's guard that has this
    method, after Django; the first URL returned is used.
    """

    def monitor_database_url(self) -> str | None: ...


@dataclass(frozen=True)
class DatabaseTarget:
    """How to reach the database: a libpq URL or keyword string and/or keywords."""

    dsn: str = field(default="", repr=False)  # may hold the password: never printed
    keywords: Mapping[str, str] = field(default_factory=dict, repr=False)
    where: str = ""  # the database, as shown to users: never holds the password
    source: str = ""  # where the setting came from

    def __str__(self) -> str:
        return f"{self.where} (from {self.source})"


def from_url(url: str, source: str) -> DatabaseTarget:
    """A target from a PostgreSQL URL (SQLAlchemy driver schemes accepted) or libpq DSN."""
    url = url.strip()
    if not url:
        raise ConfigurationError(f"{source} is empty: give a postgresql:// URL")
    if "://" in url:
        if not _DRIVER_SCHEME.match(url):
            scheme = url.split("://", 1)[0]
            raise ConfigurationError(
                f"{source} uses the scheme {scheme!r}; lifeguard monitors PostgreSQL: "
                "give a postgresql:// URL"
            )
        url = _DRIVER_SCHEME.sub("postgresql://", url, count=1)
    try:
        parse_conninfo(url)  # libpq's own rules; the message holds no value of the URL
    except ConninfoError as exc:
        raise ConfigurationError(
            f"{source} is not a connection string libpq can use ({redact_url(url)}): {exc}"
        ) from None
    return DatabaseTarget(dsn=url, where=redact_url(url), source=source)


def django_databases() -> Mapping[str, Mapping[str, Any]] | None:
    """Django's ``DATABASES``, or None when Django isn't installed or configured."""
    try:
        from django.conf import settings
    except ImportError:
        return None
    if not (settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE")):
        return None
    try:
        databases: Mapping[str, Mapping[str, Any]] = settings.DATABASES
    except Exception as exc:  # ImproperlyConfigured, ImportError of the settings module
        raise ConfigurationError(f"cannot read Django's DATABASES setting: {exc}") from exc
    return databases


def from_django(alias: str = "default") -> DatabaseTarget | None:
    """The target of Django's ``DATABASES[alias]``, or None when Django isn't configured."""
    databases = django_databases()
    if databases is None:
        return None
    if alias not in databases:
        raise ConfigurationError(
            f"Django's DATABASES has no alias {alias!r} (aliases: {sorted(databases)}): "
            "pass --database-alias"
        )
    entry: Mapping[str, Any] = databases[alias]
    engine = str(entry.get("ENGINE", ""))
    if "postg" not in engine:
        raise ConfigurationError(
            f"DATABASES[{alias!r}] uses {engine or 'no ENGINE'}; lifeguard monitors "
            "PostgreSQL only: pass --database-url or another --database-alias"
        )
    keywords = {
        key: str(value)
        for key, value in (entry.get("OPTIONS") or {}).items()
        if key in _LIBPQ_KEYWORDS and isinstance(value, (str, int))
    }
    for key, setting in (("dbname", "NAME"), ("user", "USER"), ("password", "PASSWORD")):
        if entry.get(setting):
            keywords[key] = str(entry[setting])
    for key, setting in (("host", "HOST"), ("port", "PORT")):
        if entry.get(setting):
            keywords[key] = str(entry[setting])
    return DatabaseTarget(
        keywords=keywords,
        where=describe_django_database(alias, entry),
        source="Django DATABASES",
    )


def from_guard(app: Any) -> DatabaseTarget | None:
    """A URL offered by a concern of the lifeguard installed on ``app``, if any."""
    from ..guard import current_guard

    guard = current_guard(app)
    for hook in guard.hooks if guard is not None else ():
        if isinstance(hook, DatabaseUrlSource):
            url = hook.monitor_database_url()
            if url:
                return from_url(str(url), f"the {hook.name} integration of the app")
    return None


def resolve_target(
    url: str | None, app: Any = None, django_alias: str = "default"
) -> DatabaseTarget:
    """The database to watch; raises :class:`ConfigurationError` saying how to name one."""
    if url:
        return from_url(url, "--database-url")
    if os.environ.get(ENV_URL):
        return from_url(os.environ[ENV_URL], ENV_URL)
    if app is not None:
        target = from_django(django_alias) or from_guard(app)
        if target is not None:
            return target
        raise ConfigurationError(
            "the app has no PostgreSQL database lifeguard can find (no Django DATABASES, "
            f"no SQLAlchemy engine): pass --database-url or set {ENV_URL}"
        )
    raise ConfigurationError(
        f"which database? pass --database-url, set {ENV_URL}, or give the Celery app "
        "with -A so its Django/SQLAlchemy settings are used"
    )


def one_line_error(exc: BaseException, target: DatabaseTarget) -> str:
    """A driver error as one line, with every secret of the target masked."""
    return error_line(exc, target.dsn, target.keywords)


def connect(target: DatabaseTarget, timeout: float = 5.0) -> Any:
    """An autocommit DB-API connection (psycopg 3, else psycopg2) for the monitor.

    It sets nothing on the session: its queries run in :func:`time_limited`
    transactions, so that behind a pooler in transaction mode no setting stays on a server
    connection other clients get next. For the same pooler, psycopg 3 never prepares
    (``lifeguard monitor`` repeats one query; a prepared statement would be missing on the
    next server connection).
    """
    keywords = dict(target.keywords)
    keywords["connect_timeout"] = str(max(1, round(timeout)))
    keywords["application_name"] = MONITOR_APPLICATION_NAME
    module = driver()
    try:
        conn = module.connect(target.dsn, **keywords)
        conn.autocommit = True
        if hasattr(conn, "prepare_threshold"):  # psycopg 3
            conn.prepare_threshold = None
    except module.Error as exc:
        slots = refusal(exc)  # "slots exhausted: ..." first: the reason, not the symptom
        raise DatabaseUnreachable(
            f"{slots + '; ' if slots else ''}cannot connect to {target}: "
            f"{one_line_error(exc, target)}"
        ) from None
    return conn


@contextmanager
def time_limited(conn: Any, timeout: float) -> Iterator[None]:
    """A transaction on the autocommit ``conn`` whose statements time out after ``timeout``.

    A monitor must never hang on a busy server. ``SET LOCAL`` ends with the transaction,
    which commits when the block succeeds and rolls back when it raises.
    """
    with conn.cursor() as cur:  # one round trip
        cur.execute(f"BEGIN; SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
    try:
        yield
    except BaseException:
        try:
            with conn.cursor() as cur:
                cur.execute("ROLLBACK")
        except Exception:  # the connection is gone; the caller's error says why
            pass
        raise
    with conn.cursor() as cur:
        cur.execute("COMMIT")


def driver() -> Any:
    """The DB-API module to use: psycopg 3 when installed, else psycopg2."""
    try:
        import psycopg

        return psycopg
    except ImportError:
        pass
    try:
        import psycopg2

        return psycopg2
    except ImportError:
        raise ConfigurationError(
            "the monitor needs a PostgreSQL driver: pip install 'celery-lifeguard[psycopg]'"
        ) from None
