"""What the database server says about itself, read once, without changing anything.

One connection (the monitor's :func:`~lifeguard.monitor.target.connect`), one
transaction: the monitor's snapshot (connection slots, version, role), the settings
the rules judge (``pg_settings``, as the connecting role sees them, so ``ALTER ROLE``
and ``ALTER DATABASE`` settings count), and whether a connection pooler answers.

**Detecting a pooler.** PostgreSQL tells each client its backend's process id in the
``BackendKeyData`` message at connection start, and ``pg_backend_pid()`` returns the same
number. PgBouncer (and other poolers: pgcat, Odyssey, RDS Proxy) answer the startup
themselves and hand out their own cancel key, so the two numbers differ. A port number
says nothing (PgBouncer's 6432 is a convention), and ``SHOW pool_mode`` is not a
PostgreSQL setting. The pool mode is then read from PgBouncer's admin console (database
``pgbouncer``, same credentials), which answers only users listed in ``admin_users`` or
``stats_users``; otherwise it stays unknown unless ``--pgbouncer MODE`` says it.

Everything runs in one :func:`~lifeguard.monitor.target.time_limited` transaction: behind
a pooler in transaction mode a session-level ``SET`` would stay on a server connection
other clients get next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..monitor.snapshot import Snapshot, take_snapshot
from ..monitor.target import (
    DatabaseTarget,
    DatabaseUnreachable,
    connect,
    driver,
    one_line_error,
    time_limited,
)
from ..postgres.conninfo import ConninfoError, parse_conninfo
from ..postgres.slots import Limits, read_limits

if TYPE_CHECKING:
    pass

#: Server settings the rules read; absent ones (older servers) are simply missing.
SETTINGS = (
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "transaction_timeout",
    "statement_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "client_connection_check_interval",
)

_TO_SECONDS = {"ms": 0.001, "s": 1.0, "min": 60.0}


@dataclass(frozen=True)
class ServerSetting:
    """One ``pg_settings`` row: the value in seconds for times, and where it came from."""

    name: str
    value: float  # seconds for times, else the raw number
    source: str  # default, configuration file, user, database, ...

    @property
    def configured(self) -> bool:
        return self.source not in ("default", "override")


@dataclass(frozen=True)
class Pooler:
    """A connection pooler between the app and PostgreSQL, and what is known of it."""

    mode: str | None  # session | transaction | statement, or None: unknown
    source: str  # how it was found and how the mode is known
    settings: Mapping[str, str] = field(default_factory=dict)  # from its admin console

    @property
    def max_prepared_statements(self) -> int:
        """PgBouncer 1.21+ keeps protocol-level prepared statements across server
        connections when this is above 0; older versions, or 0, do not."""
        try:
            return int(self.settings.get("max_prepared_statements", "0"))
        except ValueError:
            return 0


@dataclass(frozen=True)
class ServerInfo:
    """The database server as the doctor read it."""

    target: DatabaseTarget
    snapshot: Snapshot
    settings: Mapping[str, ServerSetting]
    pooler: Pooler | None
    endpoint: str  # host:port the doctor connected to
    limits: Limits | None = None  # connection slots as the doctor's role sees them

    @property
    def version(self) -> int:
        return self.snapshot.server_version

    @property
    def role(self) -> str:
        return self.snapshot.role

    def seconds(self, name: str) -> float | None:
        setting = self.settings.get(name)
        return None if setting is None else setting.value


def read_server(
    target: DatabaseTarget, *, prefix: str, timeout: float, console: bool = True
) -> ServerInfo:
    """Read the server; raises :class:`DatabaseUnreachable` with a one-line reason.

    ``console``: when a pooler is found, ask its admin console for the pool mode.
    """
    conn = connect(target, timeout)
    module = driver()
    announced_pid = _announced_backend_pid(conn)
    try:
        with time_limited(conn, timeout):
            with conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                server_pid = int(cur.fetchone()[0])
            snapshot = take_snapshot(conn, prefix)
            settings = _read_settings(conn)
            limits = read_limits(conn)
    except module.Error as exc:
        raise DatabaseUnreachable(
            f"cannot read the server settings of {target}: {one_line_error(exc, target)}"
        ) from None
    finally:
        conn.close()
    pooler = None
    if announced_pid is not None and announced_pid != server_pid:
        pooler = _ask_console(target, timeout) if console else None
        found = (
            f"the backend pid announced at connection ({announced_pid}) is not "
            f"pg_backend_pid() ({server_pid}): a pooler answers"
        )
        if pooler is None:
            pooler = Pooler(mode=None, source=found + "; its pool mode is unknown")
        else:
            pooler = Pooler(pooler.mode, f"{found}; {pooler.source}", pooler.settings)
    return ServerInfo(
        target=target,
        snapshot=snapshot,
        settings=settings,
        pooler=pooler,
        endpoint=target_endpoint(target),
        limits=limits,
    )


def _read_settings(conn: Any) -> dict[str, ServerSetting]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT name, setting, unit, source FROM pg_settings WHERE name = ANY(%s)",
            (list(SETTINGS),),
        )
        rows = cur.fetchall()
    found = {}
    for name, setting, unit, source in rows:
        try:
            value = float(setting) * _TO_SECONDS.get(unit or "", 1.0)
        except (TypeError, ValueError):
            continue
        found[name] = ServerSetting(name, value, source)
    return found


def _announced_backend_pid(conn: Any) -> int | None:
    """The pid from ``BackendKeyData`` (psycopg 3 ``info.backend_pid``, psycopg2
    ``get_backend_pid()``, both libpq's ``PQbackendPID``)."""
    info = getattr(conn, "info", None)
    pid = getattr(info, "backend_pid", None)
    if pid is None and hasattr(conn, "get_backend_pid"):
        try:
            pid = conn.get_backend_pid()
        except Exception:
            return None
    return int(pid) if pid is not None else None


def _console_target(target: DatabaseTarget) -> DatabaseTarget:
    """The same server and credentials, database ``pgbouncer`` (its admin console).

    The drivers let keywords override the URL's own (``make_conninfo``, ``make_dsn``).
    """
    return DatabaseTarget(
        dsn=target.dsn, keywords={**target.keywords, "dbname": "pgbouncer"}, where=target.where
    )


def _ask_console(target: DatabaseTarget, timeout: float) -> Pooler | None:
    """PgBouncer's pool mode for the target's database, from its admin console."""
    console = _console_target(target)
    module = driver()
    try:
        conn = connect(console, timeout)
    except DatabaseUnreachable:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW CONFIG")
            config = {str(row[0]): str(row[1]) for row in cur.fetchall()}
            cur.execute("SHOW DATABASES")
            columns = [column[0] for column in cur.description]
            databases = [dict(zip(columns, row, strict=False)) for row in cur.fetchall()]
    except module.Error:
        return None
    finally:
        conn.close()
    dbname = _target_dbname(target)
    mode = config.get("pool_mode")
    for entry in databases:
        if entry.get("name") == dbname and entry.get("pool_mode"):
            mode = str(entry["pool_mode"])
    return Pooler(mode=mode, source=f"its admin console says pool_mode={mode}", settings=config)


def _target_dbname(target: DatabaseTarget) -> str | None:
    if "dbname" in target.keywords:
        return target.keywords["dbname"]
    return _dsn_options(target).get("dbname") or None


def _dsn_options(target: DatabaseTarget) -> dict[str, str]:
    """What libpq reads from the target's URL or keyword string (never a urlsplit)."""
    try:
        return parse_conninfo(target.dsn) if target.dsn else {}
    except ConninfoError:
        return {}


# --- endpoints: which connections go to the server that was read ------------------------

_LOCAL = {"", "localhost", "127.0.0.1", "::1"}


def endpoint(host: Any, port: Any) -> str:
    """``host:port``, with every spelling of this machine (and Unix sockets) as localhost."""
    text = str(host or "").strip().lower()
    if text in _LOCAL or text.startswith("/"):
        text = "localhost"
    try:
        number = int(port) if port not in (None, "") else 5432
    except (TypeError, ValueError):
        number = 5432
    return f"{text}:{number}"


def target_endpoint(target: DatabaseTarget) -> str:
    options = {**_dsn_options(target), **target.keywords}
    first_host = (options.get("host") or "").split(",")[0]
    return endpoint(first_host, (options.get("port") or "").split(",")[0])
