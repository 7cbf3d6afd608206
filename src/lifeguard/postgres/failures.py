"""What kind of database failure an exception is, for every driver, in one list.

lifeguard hands a task back instead of failing it, pauses a worker, or stops hoarding
connections according to these classes, so they must be right:

* :attr:`Failure.UNAVAILABLE`: the server cannot serve now (refused, shutting down,
  starting up, in recovery, read-only after a failover, network unreachable or timed
  out, the session terminated by a restart). Transient.
* :attr:`Failure.SLOTS_EXHAUSTED`: the server or the role has no connection slot left
  (``max_connections``, reserved slots, ``ALTER ROLE ... CONNECTION LIMIT``). Transient.
* :attr:`Failure.AUTHENTICATION`: wrong password, no ``pg_hba.conf`` entry, no such role,
  missing privilege. Never transient: retrying cannot fix it.
* :attr:`Failure.OTHER`: everything else (SQL errors, bugs, a database that does not
  exist). Not lifeguard's business.

Where the server's SQLSTATE reaches the client it decides. At connection start libpq
(psycopg 3 and psycopg2) reports a server's ``FATAL`` as text only, and a refused or
timed-out TCP connection has no SQLSTATE at all; only then are messages matched,
against the server's and libpq's English texts (``lc_messages`` other than English
leaves such failures as ``OTHER``: lifeguard then behaves as stock Celery).

Verified against real servers, for each driver and through Django's and SQLAlchemy's
wrappers, in tests/test_failures.py. What reality looks like there:

* psycopg 3 and psycopg2 raise ``OperationalError`` without SQLSTATE for everything
  refused at connection start (the server's ``FATAL`` text is in the message);
* asyncpg raises its own classes with ``.sqlstate`` for a server's refusal, and bare
  ``OSError`` subclasses (``ConnectionRefusedError``) when nothing listens; SQLAlchemy
  passes those through unwrapped. A bare ``OSError`` counts only when it was raised
  through a driver's code (its traceback says so) or wraps/is wrapped by a driver error,
  so that a task's own failing HTTP call is not mistaken for a database outage;
* wrappers (SQLAlchemy's ``StatementError`` carries the SQL text and parameters) are
  never matched by message themselves: only the driver error they wrap is.
"""

from __future__ import annotations

import enum
import re
import socket
from collections.abc import Iterator


class Failure(str, enum.Enum):
    UNAVAILABLE = "unavailable"
    SLOTS_EXHAUSTED = "slots_exhausted"
    AUTHENTICATION = "authentication"
    OTHER = "other"

    @property
    def transient(self) -> bool:
        """Worth waiting for: the same attempt later may succeed."""
        return self in (Failure.UNAVAILABLE, Failure.SLOTS_EXHAUSTED)


#: SQLSTATE (or its class, two characters) -> failure class.
SQLSTATES: dict[str, Failure] = {
    "53300": Failure.SLOTS_EXHAUSTED,  # too_many_connections (server, role, database)
    "57P01": Failure.UNAVAILABLE,  # admin_shutdown: terminated by a fast shutdown
    "57P02": Failure.UNAVAILABLE,  # crash_shutdown
    "57P03": Failure.UNAVAILABLE,  # cannot_connect_now: starting up, shutting down, recovery
    "57P05": Failure.UNAVAILABLE,  # idle_session_timeout (the session is gone)
    "25006": Failure.UNAVAILABLE,  # read_only_sql_transaction: a standby after failover
    "08P01": Failure.OTHER,  # protocol_violation: a bug, not an outage
    "08": Failure.UNAVAILABLE,  # connection_exception and its subclasses
    "28": Failure.AUTHENTICATION,  # invalid_authorization_specification, invalid_password
    "42501": Failure.AUTHENTICATION,  # insufficient_privilege
}

#: Messages of failures that reach the client without a SQLSTATE (libpq at connect).
MESSAGES: tuple[tuple[re.Pattern[str], Failure], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), failure)
    for pattern, failure in (
        (r"too many clients already", Failure.SLOTS_EXHAUSTED),
        (r"remaining connection slots are reserved", Failure.SLOTS_EXHAUSTED),
        (r"too many connections for (role|database)", Failure.SLOTS_EXHAUSTED),
        (r"password authentication failed", Failure.AUTHENTICATION),
        (r"no password supplied|password is required", Failure.AUTHENTICATION),
        (r"no pg_hba\.conf entry", Failure.AUTHENTICATION),
        (r"authentication failed", Failure.AUTHENTICATION),
        (r"role \S+ does not exist", Failure.AUTHENTICATION),
        (r"permission denied", Failure.AUTHENTICATION),
        (r"is not permitted to log in", Failure.AUTHENTICATION),
        (r"the database system is (shutting down|starting up|in recovery mode)", None),
        (r"the database system is not (yet )?accepting connections", None),
        (r"the database system is in recovery mode|hot standby mode is disabled", None),
        (r"cannot execute \S+ in a read-only transaction", None),
        (r"terminating connection due to administrator command", None),
        (r"connection refused", None),
        (r"could not connect to server", None),
        (r"server closed the connection unexpectedly", None),
        (r"connection (timed out|reset by peer)", None),
        (r"timeout expired", None),
        (r"no route to host|network is unreachable|host is unreachable", None),
        (r"could not translate host name", None),
        (r"ssl syscall error|ssl connection has been closed unexpectedly", None),
        (r"consuming input failed|the connection is lost|connection (is|was) closed", None),
        (r"could not receive data from server|could not send data to server", None),
    )
    for failure in [failure or Failure.UNAVAILABLE]
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, the driver error it wraps (SQLAlchemy's ``.orig``), and its causes."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        pending += [orig if isinstance(orig, BaseException) else None]
        pending += [current.__cause__, current.__context__]


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg 3 (``sqlstate``), psycopg2 (``pgcode``) or asyncpg
    (``sqlstate``) error, if the server sent one."""
    for attribute in ("sqlstate", "pgcode"):
        code = getattr(exc, attribute, None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return None


def chain_sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the first error in the exception's chain that has one (Django's
    and SQLAlchemy's wrappers carry the driver's error as a cause or as ``.orig``)."""
    return next((code for c in _chain(exc) if (code := sqlstate(c)) is not None), None)


def _by_sqlstate(code: str) -> Failure | None:
    return SQLSTATES.get(code) or SQLSTATES.get(code[:2])


_DRIVERS = ("psycopg", "psycopg2", "asyncpg")
_WRAPPERS = ("django", "sqlalchemy")


def _top_module(obj: object) -> str:
    return (type(obj).__module__ or "").split(".")[0]


def _is_driver_error(exc: BaseException) -> bool:
    """A driver's own error (SQLAlchemy's asyncio adaptation of asyncpg's counts)."""
    if _top_module(exc) in _DRIVERS:
        return True
    return type(exc).__module__.startswith("sqlalchemy.dialects") and not hasattr(exc, "orig")


def _raised_by_driver(exc: BaseException) -> bool:
    """Whether the exception's traceback passes through a driver's (or wrapper's) code."""
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0]
        if module in _DRIVERS or module in _WRAPPERS:
            return True
        tb = tb.tb_next
    return False


def _by_message(exc: BaseException) -> Failure | None:
    text = str(exc)
    for pattern, failure in MESSAGES:
        if pattern.search(text):
            return failure
    return None


def classify(exc: BaseException) -> Failure:
    """The failure class of ``exc`` (a driver, Django or SQLAlchemy error, or an
    ``OSError`` raised while connecting)."""
    chain = list(_chain(exc))
    for current in chain:
        code = sqlstate(current)
        if code is not None:
            return _by_sqlstate(code) or Failure.OTHER
    involved = any(_is_driver_error(c) or _top_module(c) in _WRAPPERS for c in chain)
    for current in chain:
        if _is_driver_error(current):
            found = _by_message(current)
            if found is not None:
                return found
        elif isinstance(current, OSError) and (involved or _raised_by_driver(current)):
            if isinstance(current, (ConnectionError, TimeoutError)):
                return Failure.UNAVAILABLE  # asyncpg: refused, reset, timed out
            found = _by_message(current)
            if found is not None:
                return found
            if current.errno is not None or isinstance(current, socket.gaierror):
                return Failure.UNAVAILABLE  # no route to host, unknown host name
    return Failure.OTHER


READ_ONLY = "25006"  # read_only_sql_transaction
_READ_ONLY_TEXT = re.compile(r"cannot execute \S+ in a read-only transaction", re.IGNORECASE)


def read_only(exc: BaseException) -> bool:
    """A write refused because the server (a standby, or one switched to
    ``default_transaction_read_only``) takes none now: SQLSTATE 25006, or its message
    where no SQLSTATE came."""
    for current in _chain(exc):
        code = sqlstate(current)
        if code is not None:
            return code == READ_ONLY
    return any(_is_driver_error(c) and _READ_ONLY_TEXT.search(str(c)) for c in _chain(exc))
