"""failures.classify against the real thing: each fault produced on a private server.

Every fault is provoked for real (a stopped port, a smart shutdown in progress, a
standby, pg_terminate_backend, a fast restart, max_connections and reserved slots, a
role's CONNECTION LIMIT, scram authentication, privileges) and the exception each client
really raises is classified: psycopg 3, psycopg2 and asyncpg directly, through
SQLAlchemy (sync and asyncio engines) and through Django's error wrapper. The messages
and SQLSTATEs differ per driver (libpq reports a refusal at connect as text only,
asyncpg with its own classes and bare OSErrors), which is what these tests pin down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from lifeguard.demo.postgres import EmbeddedPostgres, PostgresServer, free_port
from lifeguard.postgres.failures import Failure, classify, read_only

MAX_CONNECTIONS = 10  # room for one session per client in the restart test
RESERVED = 2  # superuser_reserved_connections: PostgreSQL 15 has no reserved_connections
PASSWORD = "right-horse-battery"


@dataclass
class Target:
    port: int
    user: str = "postgres"
    password: str | None = None
    dbname: str = "app"


_loop = asyncio.new_event_loop()


def _sync(coro: Any) -> Any:
    return _loop.run_until_complete(coro)


def _libpq_kwargs(t: Target) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": t.port,
        "user": t.user,
        "dbname": t.dbname,
        "connect_timeout": 5,
    }
    if t.password is not None:
        kwargs["password"] = t.password
    return kwargs


def _url(t: Target, scheme: str) -> str:
    auth = t.user + (f":{t.password}" if t.password is not None else "")
    return f"{scheme}://{auth}@127.0.0.1:{t.port}/{t.dbname}"


class Client:
    """One way an application reaches PostgreSQL: connect, run SQL, close."""

    name = ""

    def connect(self, t: Target) -> Any:
        raise NotImplementedError

    def run(self, conn: Any, sql: str) -> None:
        raise NotImplementedError

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()


class Psycopg3(Client):
    name = "psycopg"

    def connect(self, t: Target) -> Any:
        import psycopg

        return psycopg.connect(**_libpq_kwargs(t), autocommit=True)

    def run(self, conn: Any, sql: str) -> None:
        conn.execute(sql)


class Psycopg2(Client):
    name = "psycopg2"

    def connect(self, t: Target) -> Any:
        import psycopg2

        conn = psycopg2.connect(**_libpq_kwargs(t))
        conn.autocommit = True
        return conn

    def run(self, conn: Any, sql: str) -> None:
        with conn.cursor() as cur:
            cur.execute(sql)


class Asyncpg(Client):
    name = "asyncpg"

    def connect(self, t: Target) -> Any:
        import asyncpg

        return _sync(
            asyncpg.connect(
                host="127.0.0.1",
                port=t.port,
                user=t.user,
                password=t.password,
                database=t.dbname,
                timeout=5,
            )
        )

    def run(self, conn: Any, sql: str) -> None:
        _sync(conn.execute(sql))

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            _sync(conn.close(timeout=2))


class SQLAlchemySync(Client):
    def __init__(self, driver: str) -> None:
        self.driver = driver
        self.name = f"sqlalchemy+{driver}"

    def connect(self, t: Target) -> Any:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(
            _url(t, f"postgresql+{self.driver}"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        return engine.connect()

    def run(self, conn: Any, sql: str) -> None:
        conn.exec_driver_sql(sql)


class SQLAlchemyAsyncpg(Client):
    name = "sqlalchemy+asyncpg"

    def connect(self, t: Target) -> Any:
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy.pool import NullPool

        engine = create_async_engine(
            _url(t, "postgresql+asyncpg"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        return _sync(engine.connect())

    def run(self, conn: Any, sql: str) -> None:
        _sync(conn.exec_driver_sql(sql))

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            _sync(conn.close())


class Django(Client):
    """Django's own DatabaseErrorWrapper around the driver, as its backend uses it."""

    def __init__(self, inner: Client, module: str) -> None:
        self.inner = inner
        self.module = module
        self.name = f"django+{inner.name}"

    def _wrapped(self) -> Any:
        import importlib

        from django.db.utils import DatabaseErrorWrapper

        database = importlib.import_module(self.module)
        return DatabaseErrorWrapper(SimpleNamespace(Database=database, errors_occurred=False))

    def connect(self, t: Target) -> Any:
        with self._wrapped():
            return self.inner.connect(t)

    def run(self, conn: Any, sql: str) -> None:
        with self._wrapped():
            self.inner.run(conn, sql)


CLIENTS: list[Client] = [
    Psycopg3(),
    Psycopg2(),
    Asyncpg(),
    SQLAlchemySync("psycopg"),
    SQLAlchemySync("psycopg2"),
    SQLAlchemyAsyncpg(),
    Django(Psycopg3(), "psycopg"),
    Django(Psycopg2(), "psycopg2"),
]


@pytest.fixture(params=CLIENTS, ids=[c.name for c in CLIENTS])
def client(request: pytest.FixtureRequest) -> Client:
    return request.param  # type: ignore[no-any-return]


def _check_wrapped(client: Client, exc: BaseException) -> None:
    """Through a wrapper the wrapper's class is raised, the driver's error in __cause__."""
    if client.name.startswith("django"):
        assert type(exc).__module__ == "django.db.utils", repr(exc)
        assert exc.__cause__ is not None
    elif client.name.startswith("sqlalchemy") and not isinstance(exc, OSError):
        assert type(exc).__module__ == "sqlalchemy.exc", repr(exc)


def failure_at_connect(client: Client, t: Target) -> BaseException:
    try:
        conn = client.connect(t)
    except Exception as exc:
        _check_wrapped(client, exc)
        return exc
    client.close(conn)
    pytest.fail(f"{client.name} connected as {t.user} to {t.dbname}")


def failure_of_sql(client: Client, conn: Any, sql: str) -> BaseException:
    try:
        client.run(conn, sql)
    except Exception as exc:
        _check_wrapped(client, exc)
        return exc
    finally:
        client.close(conn)
    pytest.fail(f"{client.name} ran {sql!r}")


def assert_class(exc: BaseException, expected: Failure, *texts: str) -> None:
    """The class, and that the fault was the intended one (its message names it)."""
    messages = " | ".join(str(e) for e in _causes(exc))
    assert classify(exc) is expected, f"{type(exc).__name__}: {messages}"
    if texts:
        assert any(text in messages for text in texts), messages


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


# --- the private server --------------------------------------------------------------


def _pg_ctl(embedded: EmbeddedPostgres, *args: str) -> None:
    embedded._cmd(str(embedded.bin / "pg_ctl"), "-D", str(embedded.data), *args, check=False)


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedPostgres]:
    embedded = EmbeddedPostgres(
        max_connections=MAX_CONNECTIONS,
        settings={"superuser_reserved_connections": str(RESERVED)},
    )
    server = embedded.start()
    (embedded.data / "pg_hba.conf").write_text(
        "local all all trust\n"
        "host all pwrole 127.0.0.1/32 scram-sha-256\n"
        "host all all 127.0.0.1/32 trust\n"
    )
    with server.admin() as conn:
        conn.execute("SELECT pg_reload_conf()")
        conn.execute(f"CREATE ROLE pwrole LOGIN PASSWORD '{PASSWORD}'")
        for role in ("plain", "victim", "readonly", "outsider"):
            conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("CREATE ROLE limited LOGIN CONNECTION LIMIT 1")
        conn.execute("CREATE ROLE nologin NOLOGIN")
        conn.execute("ALTER ROLE readonly SET default_transaction_read_only = on")
        conn.execute("CREATE DATABASE app")
        conn.execute("CREATE DATABASE closed_db")
        conn.execute("REVOKE CONNECT ON DATABASE closed_db FROM PUBLIC")
    with server.admin("app") as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO items VALUES (1, 'x')")
        conn.execute("GRANT ALL ON items TO readonly, victim")
        conn.execute("CREATE TABLE secrets (x int)")
    yield embedded
    embedded.destroy()


@pytest.fixture
def server(embedded: EmbeddedPostgres) -> PostgresServer:
    assert embedded.server is not None
    return embedded.server


def _target(server: PostgresServer, **kwargs: Any) -> Target:
    return Target(port=server.port, **kwargs)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _backends(server: PostgresServer, user: str | None = None) -> int:
    with server.admin() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid() AND (%s::text IS NULL OR usename = %s)",
            [user, user],
        ).fetchone()
    return int(row[0]) if row else 0


# --- unavailable ---------------------------------------------------------------------


def test_connection_refused(client: Client):
    exc = failure_at_connect(client, Target(port=free_port()))
    assert_class(exc, Failure.UNAVAILABLE, "refused", "Connect call failed")


def test_shutting_down(embedded: EmbeddedPostgres, server: PostgresServer):
    """A smart shutdown waits for the last session; meanwhile new ones get 57P03."""
    held = server.admin()
    stopper = threading.Thread(target=embedded.stop, args=("smart",))
    stopper.start()
    try:

        def refusing() -> bool:
            try:
                server.admin().close()
            except Exception as exc:
                return "shutting down" in str(exc)
            return False

        _wait(refusing, "the smart shutdown to begin")
        for client in CLIENTS:
            exc = failure_at_connect(client, _target(server))
            assert_class(exc, Failure.UNAVAILABLE, "the database system is shutting down")
    finally:
        held.close()
        stopper.join(30)
        embedded.start()


def test_not_accepting_connections(embedded: EmbeddedPostgres, server: PostgresServer):
    """A standby with hot_standby off never accepts connections (57P03)."""
    embedded.stop()
    signal = embedded.data / "standby.signal"
    signal.touch()
    _pg_ctl(embedded, "-l", str(embedded.log), "-o", "-c hot_standby=off", "-W", "start")
    try:

        def refusing() -> bool:
            try:
                server.admin().close()
            except Exception as exc:
                return "not accepting connections" in str(exc) or "starting up" in str(exc)
            return False

        _wait(refusing, "the standby to start")
        for client in CLIENTS:
            exc = failure_at_connect(client, _target(server))
            assert_class(
                exc,
                Failure.UNAVAILABLE,
                "the database system is not accepting connections",
                "the database system is starting up",
                "the database system is not yet accepting connections",
            )
    finally:
        _pg_ctl(embedded, "-m", "fast", "-w", "stop")
        signal.unlink()
        embedded._running = False
        embedded.start()


def test_hot_standby_refuses_writes(
    embedded: EmbeddedPostgres, server: PostgresServer, client: Client
):
    """A read-only session (a standby after failover, or default_transaction_read_only)
    refuses writes with 25006."""
    conn = client.connect(_target(server, user="readonly"))
    exc = failure_of_sql(client, conn, "UPDATE items SET note = 'y'")
    assert_class(exc, Failure.UNAVAILABLE, "read-only transaction")
    assert read_only(exc)  # the probe of a pause it starts must find the server writable


def test_standby_in_recovery_refuses_writes(embedded: EmbeddedPostgres, server: PostgresServer):
    embedded.stop()
    signal = embedded.data / "standby.signal"
    signal.touch()
    embedded.start()  # pg_ctl -w returns once the standby accepts read-only sessions
    try:
        for client in CLIENTS:
            conn = client.connect(_target(server))
            exc = failure_of_sql(client, conn, "INSERT INTO items VALUES (2, 'z')")
            assert_class(exc, Failure.UNAVAILABLE, "read-only transaction")
            assert read_only(exc)
    finally:
        embedded.stop()
        signal.unlink()
        embedded.start()


def test_session_terminated_by_pg_terminate_backend(server: PostgresServer, client: Client):
    conn = client.connect(_target(server, user="victim"))
    client.run(conn, "SELECT 1")
    with server.admin() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'victim'"
        )
    _wait(lambda: _backends(server, "victim") == 0, "the session to end")
    exc = failure_of_sql(client, conn, "SELECT 1")
    assert_class(exc, Failure.UNAVAILABLE)


def test_session_terminated_by_fast_restart(embedded: EmbeddedPostgres, server: PostgresServer):
    clients = [(client, client.connect(_target(server, user="victim"))) for client in CLIENTS]
    for client, conn in clients:
        client.run(conn, "SELECT 1")
    embedded.restart()
    for client, conn in clients:
        exc = failure_of_sql(client, conn, "SELECT 1")
        assert_class(exc, Failure.UNAVAILABLE)


# --- slots exhausted -----------------------------------------------------------------


def test_role_connection_limit(server: PostgresServer, client: Client):
    held = server.admin()
    held.close()
    import psycopg

    held = psycopg.connect(**_libpq_kwargs(_target(server, user="limited")))
    try:
        exc = failure_at_connect(client, _target(server, user="limited"))
        assert_class(exc, Failure.SLOTS_EXHAUSTED, 'too many connections for role "limited"')
    finally:
        held.close()


def test_reserved_slots_and_too_many_clients(server: PostgresServer):
    """Ordinary roles run out first (the rest is reserved for superusers), then all."""
    import psycopg

    _wait(lambda: _backends(server) == 0, "an empty server")
    held = [
        psycopg.connect(**_libpq_kwargs(_target(server, user="plain")))
        for _ in range(MAX_CONNECTIONS - RESERVED)
    ]
    try:
        for client in CLIENTS:
            exc = failure_at_connect(client, _target(server, user="plain"))
            assert_class(
                exc,
                Failure.SLOTS_EXHAUSTED,
                "remaining connection slots are reserved",
                "too many clients already",
            )
        held += [psycopg.connect(**_libpq_kwargs(_target(server))) for _ in range(RESERVED)]
        for client in CLIENTS:
            exc = failure_at_connect(client, _target(server))
            assert_class(exc, Failure.SLOTS_EXHAUSTED, "sorry, too many clients already")
    finally:
        for conn in held:
            conn.close()
    _wait(lambda: _backends(server) == 0, "the held sessions to end")


# --- authentication ------------------------------------------------------------------


def test_wrong_password(server: PostgresServer, client: Client):
    exc = failure_at_connect(client, _target(server, user="pwrole", password="wrong"))
    assert_class(exc, Failure.AUTHENTICATION, 'password authentication failed for user "pwrole"')


def test_missing_password(server: PostgresServer, client: Client):
    exc = failure_at_connect(client, _target(server, user="pwrole"))
    assert_class(exc, Failure.AUTHENTICATION, "no password supplied", "password authentication")


def test_right_password_connects(server: PostgresServer, client: Client):
    """The control for the two above: scram with the right password works."""
    conn = client.connect(_target(server, user="pwrole", password=PASSWORD))
    client.run(conn, "SELECT 1")
    client.close(conn)


def test_no_such_role(server: PostgresServer, client: Client):
    exc = failure_at_connect(client, _target(server, user="ghost"))
    assert_class(exc, Failure.AUTHENTICATION, 'role "ghost" does not exist')


def test_role_not_permitted_to_log_in(server: PostgresServer, client: Client):
    exc = failure_at_connect(client, _target(server, user="nologin"))
    assert_class(exc, Failure.AUTHENTICATION, "is not permitted to log in")


def test_no_connect_privilege(server: PostgresServer, client: Client):
    exc = failure_at_connect(client, _target(server, user="outsider", dbname="closed_db"))
    assert_class(exc, Failure.AUTHENTICATION, "permission denied for database")


def test_missing_privilege(server: PostgresServer, client: Client):
    conn = client.connect(_target(server, user="outsider"))
    exc = failure_of_sql(client, conn, "SELECT * FROM secrets")
    assert_class(exc, Failure.AUTHENTICATION, "permission denied for table secrets")


# --- other ---------------------------------------------------------------------------


def test_database_does_not_exist(server: PostgresServer, client: Client):
    exc = failure_at_connect(client, _target(server, dbname="nope"))
    assert_class(exc, Failure.OTHER, 'database "nope" does not exist')
    assert not classify(exc).transient


def test_sql_errors_are_other_whatever_the_sql_says(server: PostgresServer, client: Client):
    """SQLAlchemy's message carries the SQL: words in it must not decide the class."""
    conn = client.connect(_target(server))
    exc = failure_of_sql(
        client, conn, "INSERT INTO items VALUES (1, 'connection refused: too many clients already')"
    )
    assert_class(exc, Failure.OTHER, "duplicate key")
    conn = client.connect(_target(server))
    exc = failure_of_sql(client, conn, "SELEC 'permission denied'")
    assert_class(exc, Failure.OTHER, "syntax error")
    conn = client.connect(_target(server))
    exc = failure_of_sql(
        client, conn, "SELECT 'cannot execute INSERT in a read-only transaction'::int"
    )
    assert not read_only(exc)  # a SQLSTATE (22P02) decides, not the words


def test_a_tasks_own_network_errors_are_not_database_failures():
    """A refused HTTP call in a task is no database outage: nothing to hand back."""
    try:
        socket.create_connection(("127.0.0.1", free_port()), timeout=2)
    except OSError as exc:
        assert isinstance(exc, ConnectionRefusedError)
        assert classify(exc) is Failure.OTHER
    assert classify(TimeoutError("upstream timed out")) is Failure.OTHER
    assert classify(ValueError("connection refused")) is Failure.OTHER


def test_transient_classes():
    assert Failure.UNAVAILABLE.transient and Failure.SLOTS_EXHAUSTED.transient
    assert not Failure.AUTHENTICATION.transient and not Failure.OTHER.transient


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("FATAL:  the database system is starting up", Failure.UNAVAILABLE),
        ("FATAL:  the database system is not yet accepting connections", Failure.UNAVAILABLE),
        ("FATAL:  the database system is in recovery mode", Failure.UNAVAILABLE),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "app"', Failure.AUTHENTICATION),
        ("timeout expired", Failure.UNAVAILABLE),
        ('could not translate host name "db.internal" to address', Failure.UNAVAILABLE),
        ("server closed the connection unexpectedly", Failure.UNAVAILABLE),
        ('FATAL:  too many connections for database "app"', Failure.SLOTS_EXHAUSTED),
        ('FATAL:  database "app" is not currently accepting connections', Failure.OTHER),
    ],
)
@pytest.mark.parametrize("module", ["psycopg", "psycopg2"])
def test_libpq_messages_not_produced_here(message: str, expected: Failure, module: str):
    """libpq's texts for faults this module does not provoke (a starting server, a
    missing pg_hba line, DNS): libpq reports them at connect without a SQLSTATE."""
    import importlib

    error = importlib.import_module(module).OperationalError
    text = f'connection to server at "127.0.0.1", port 5432 failed: {message}'
    assert classify(error(text)) is expected
