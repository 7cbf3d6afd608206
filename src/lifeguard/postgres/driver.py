"""Driver-level checks on a PostgreSQL DB-API connection, shared by every integration.

Django and SQLAlchemy both hand us a raw driver connection (psycopg 3, psycopg2, or
asyncpg under SQLAlchemy's asyncio extension).
Whether it can be reused is decided here, from signals that cost no round trip:

* the libpq transaction status: ``ACTIVE`` means a query was interrupted mid-flight
  (a soft time limit, a gevent timeout), ``INTRANS``/``INERROR`` a transaction left open;
* whether the driver already knows the connection is closed;
* whether the idle socket is readable: an idle connection receives nothing unless
  the server terminated it (``pg_terminate_backend``, ``idle_session_timeout``,
  a restart), so readable means dead (or, rarely, a harmless NOTIFY).

Measured cost of :func:`reuse_problem` on a healthy connection: a few microseconds,
against ~0.1 ms (plaintext) to ~0.35 ms (TLS) for a ``SELECT 1`` round trip.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import select
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger("lifeguard.pgdriver")


class TransactionStatus(enum.Enum):
    """libpq's ``PQtransactionStatus``, the same numbers in psycopg 3 and psycopg2."""

    IDLE = 0
    ACTIVE = 1
    INTRANS = 2
    INERROR = 3
    UNKNOWN = 4


class Problem(str, enum.Enum):
    """Why a connection must not be reused; the value is the discard reason in stats."""

    CLOSED = "closed"
    INTERRUPTED = "interrupted"  # a command is still in progress (ACTIVE)
    IN_TRANSACTION = "in_transaction"
    FAILED_TRANSACTION = "failed_transaction"
    SERVER_CLOSED = "server_closed"  # idle socket readable: terminated or timed out
    UNKNOWN_DRIVER = "unknown_driver"


_PROBLEM_EXPLANATIONS = {
    Problem.CLOSED: "it was already closed",
    Problem.INTERRUPTED: "a statement was interrupted mid-flight (cancelled on the server)",
    Problem.IN_TRANSACTION: "a transaction was left open (rolled back)",
    Problem.FAILED_TRANSACTION: "a failed transaction was left open (rolled back)",
    Problem.SERVER_CLOSED: "the server closed it (terminated or timed out while idle)",
    Problem.UNKNOWN_DRIVER: "lifeguard does not know its driver",
}


def explain(reason: str, own: dict[str, str]) -> str:
    """A discard reason in words: an integration's ``own`` reasons, else a Problem's."""
    if reason in own:
        return own[reason]
    try:
        return _PROBLEM_EXPLANATIONS[Problem(reason)]
    except ValueError:
        return reason


class DriverAdapter(Protocol):
    """What lifeguard needs from a driver; one implementation per driver."""

    def is_closed(self, conn: Any) -> bool: ...
    def transaction_status(self, conn: Any) -> TransactionStatus: ...
    def fileno(self, conn: Any) -> int: ...
    def backend_pid(self, conn: Any) -> int | None: ...
    def send_cancel(self, conn: Any, timeout: float) -> None: ...
    def drain(self, conn: Any, timeout: float) -> bool: ...
    def rollback(self, conn: Any) -> None: ...


class _Psycopg3:
    def is_closed(self, conn: Any) -> bool:
        return bool(conn.closed)

    def transaction_status(self, conn: Any) -> TransactionStatus:
        return TransactionStatus(int(conn.pgconn.transaction_status))

    def fileno(self, conn: Any) -> int:
        return int(conn.pgconn.socket)

    def backend_pid(self, conn: Any) -> int | None:
        return int(conn.info.backend_pid) or None

    def send_cancel(self, conn: Any, timeout: float) -> None:
        cancel_safe = getattr(conn, "cancel_safe", None)  # psycopg >= 3.2
        # AsyncConnection.cancel_safe is a coroutine; its blocking cancel() serves here.
        if cancel_safe is not None and not inspect.iscoroutinefunction(cancel_safe):
            cancel_safe(timeout=timeout)
        else:
            conn.cancel()

    def drain(self, conn: Any, timeout: float) -> bool:
        """Read the interrupted statement's results (its 57014 error) up to ReadyForQuery,
        with libpq's non-blocking calls; the high-level connection is not used, its
        interrupted command is gone."""
        from psycopg import pq

        pgconn = conn.pgconn
        if pgconn.pipeline_status != pq.PipelineStatus.OFF:
            return False
        copy = (pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_BOTH)
        deadline = time.monotonic() + timeout
        while True:
            if pgconn.flush() == 1:  # the interrupted statement was still being sent
                if not _wait_for(pgconn.socket, deadline, write=True):
                    return False
                continue
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    return TransactionStatus(int(pgconn.transaction_status)) in _DRAINED
                if result.status in copy:
                    return False
            if not _wait_for(pgconn.socket, deadline):
                return False

    def rollback(self, conn: Any) -> None:
        conn.rollback()  # sends ROLLBACK whenever a transaction is open, autocommit or not


class _Psycopg2:
    def is_closed(self, conn: Any) -> bool:
        return bool(conn.closed)

    def transaction_status(self, conn: Any) -> TransactionStatus:
        return TransactionStatus(int(conn.get_transaction_status()))

    def fileno(self, conn: Any) -> int:
        return int(conn.fileno())

    def backend_pid(self, conn: Any) -> int | None:
        return int(conn.info.backend_pid) or None

    def send_cancel(self, conn: Any, timeout: float) -> None:
        conn.cancel()  # PQcancel: blocking, bounded by the server's answer

    def drain(self, conn: Any, timeout: float) -> bool:
        """``poll()`` until the cancelled statement's error has been read. A blocking
        psycopg2 connection is never left ACTIVE (a signal waits for libpq to return),
        and its green mode closes the connection itself: this serves async ones."""
        import psycopg2
        import psycopg2.extensions as ext

        deadline = time.monotonic() + timeout
        while True:
            try:
                state = conn.poll()
            except psycopg2.Error:  # QueryCanceled: the expected answer (or its cursor is gone)
                state = ext.POLL_OK
            if state == ext.POLL_OK:
                return self.transaction_status(conn) in _DRAINED
            if not _wait_for(conn.fileno(), deadline, write=state == ext.POLL_WRITE):
                return False

    def rollback(self, conn: Any) -> None:
        if conn.autocommit:  # psycopg2's rollback() does nothing in autocommit mode
            with conn.cursor() as cur:
                cur.execute("ROLLBACK")
        else:
            conn.rollback()


class _Asyncpg:
    """asyncpg keeps its protocol state in Cython; what it exposes is enough for the
    cheap checks. A statement in flight is not visible (no ``ACTIVE``): asyncpg cancels
    it by itself when the awaiting coroutine is cancelled, which is how lifeguard
    interrupts async tasks."""

    def is_closed(self, conn: Any) -> bool:
        return bool(conn.is_closed())

    def transaction_status(self, conn: Any) -> TransactionStatus:
        if conn.is_in_transaction():
            return TransactionStatus.INTRANS
        return TransactionStatus.IDLE

    def fileno(self, conn: Any) -> int:
        return int(conn._transport.get_extra_info("socket").fileno())

    def backend_pid(self, conn: Any) -> int | None:
        return int(conn.get_server_pid()) or None

    def drain(self, conn: Any, timeout: float) -> bool:
        # asyncpg reads the cancelled statement's answer itself, on its event loop, when
        # the awaiting coroutine is cancelled; nothing can be read from this thread.
        return False

    def rollback(self, conn: Any) -> None:
        # asyncpg only rolls back from a coroutine: SQLAlchemy's pool reset does it on
        # the event loop. Callers treat this like a failed rollback and close instead.
        raise NotImplementedError("asyncpg rolls back on its event loop only")

    def send_cancel(self, conn: Any, timeout: float) -> None:
        """A CancelRequest on a new plain socket, as libpq's PQcancel sends it.

        Cancel requests are read before authentication and TLS negotiation is
        optional for them, so this works against ``hostssl``-only servers too.
        """
        import socket
        import struct

        protocol = conn._protocol
        message = struct.pack("!llll", 16, 80877102, protocol.backend_pid, protocol.backend_secret)
        address = conn._addr
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        if not isinstance(address, str) and ":" in str(address[0]):
            family = socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address if isinstance(address, str) else tuple(address[:2]))
            sock.sendall(message)
            sock.recv(1)  # the server closes the socket once it has read the request


#: After a drain, the connection waits for the next command (the session may still be
#: inside a failed or open transaction, which a Terminate ends cleanly).
_DRAINED = (TransactionStatus.IDLE, TransactionStatus.INTRANS, TransactionStatus.INERROR)


def _wait_for(fd: int, deadline: float, *, write: bool = False) -> bool:
    """Wait until ``fd`` is readable (writable) or the deadline passes; False then.

    ``select.select`` is looked up at call time: under gevent or eventlet it is their
    cooperative version, so other greenlets run meanwhile. (A descriptor past
    FD_SETSIZE raises ValueError: the caller then closes without draining, as before.)
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    sockets = [fd]
    readable, writable, _ = select.select(
        [] if write else sockets, sockets if write else [], [], remaining
    )
    return bool(readable or writable)


_ADAPTERS: dict[type, DriverAdapter | None] = {}


def adapter_for(conn: Any) -> DriverAdapter | None:
    """The adapter for this connection's driver, or None for drivers we don't know."""
    kind = type(conn)
    try:
        return _ADAPTERS[kind]
    except KeyError:
        pass
    module = kind.__module__
    found: DriverAdapter | None = None
    if module.startswith("psycopg2"):
        found = _Psycopg2()
    elif module.startswith("psycopg"):
        found = _Psycopg3()
    elif module.startswith("asyncpg"):
        found = _Asyncpg()
    _ADAPTERS[kind] = found
    return found


@functools.cache
def _poll_factory() -> Callable[[], Any]:
    """``select.poll`` even under gevent/eventlet, which remove or wrap it.

    A zero-timeout poll never blocks, so the cooperative version isn't needed. Only a
    green library already imported can have patched ``select``: importing one here would
    cost time and, from a pool thread at shutdown, can deadlock a threads worker.
    """
    if "gevent" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched("select"):
            poll: Callable[[], Any] = monkey.get_original("select", "poll")
            return poll
    if "eventlet" in sys.modules:
        from eventlet import patcher

        if patcher.is_monkey_patched("select"):
            original = patcher.original("select")
            return original.poll  # type: ignore[no-any-return]
    return select.poll


def socket_readable(fd: int) -> bool:
    """True when the socket has data or a hang-up waiting (checked without blocking)."""
    poller = _poll_factory()()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def transaction_status(conn: Any) -> TransactionStatus:
    adapter = adapter_for(conn)
    if adapter is None:
        return TransactionStatus.UNKNOWN
    if adapter.is_closed(conn):
        return TransactionStatus.UNKNOWN
    return adapter.transaction_status(conn)


def reuse_problem(conn: Any) -> Problem | None:
    """Why this idle connection must not be reused, or None when it is clean.

    No round trip: driver state, transaction status, and socket readability.
    """
    adapter = adapter_for(conn)
    if adapter is None:
        return Problem.UNKNOWN_DRIVER
    try:
        if adapter.is_closed(conn):
            return Problem.CLOSED
        status = adapter.transaction_status(conn)
        if status is TransactionStatus.ACTIVE:
            return Problem.INTERRUPTED
        if status is TransactionStatus.INTRANS:
            return Problem.IN_TRANSACTION
        if status is TransactionStatus.INERROR:
            return Problem.FAILED_TRANSACTION
        if status is TransactionStatus.UNKNOWN:
            return Problem.CLOSED
        if socket_readable(adapter.fileno(conn)):
            return Problem.SERVER_CLOSED
    except Exception:  # a driver that can't even answer is not reusable
        logger.debug("connection state unreadable", exc_info=True)
        return Problem.CLOSED
    return None


def is_busy(conn: Any) -> bool:
    """True when a command is still in progress (the query was interrupted client-side)."""
    try:
        return transaction_status(conn) is TransactionStatus.ACTIVE
    except Exception:
        return False


def cancel_query(conn: Any, timeout: float) -> bool:
    """Cancel the running statement on the server and read its answer; True if the
    cancel request was sent (see :func:`cancel_and_drain`, which it runs).

    Used before discarding an interrupted connection so the server stops working
    for a client that gave up (otherwise the query runs on, then sits idle in
    transaction until the socket closes).
    """
    return cancel_and_drain(conn, timeout) is not None


def cancel_and_drain(conn: Any, timeout: float) -> bool | None:
    """Cancel the interrupted statement, then read the server's answer on ``conn``.

    None: no cancel request could be sent. True: the answer (the statement's 57014
    error) and ReadyForQuery were read within ``timeout`` seconds in all: the session
    waits for its next command, so closing it sends a proper Terminate. False: no
    such proof (closing then may cut the server off mid-answer).

    Closing right after the cancel, before its answer, makes the server fail to send
    the "canceling statement" error ("could not send data to client: Broken pipe",
    "FATAL: connection to client lost"), which counts in
    ``pg_stat_database.sessions_fatal``: what ``lifeguard check`` alerts on.
    """
    adapter = adapter_for(conn)
    if adapter is None:
        return None
    deadline = time.monotonic() + timeout
    try:
        adapter.send_cancel(conn, timeout)
    except Exception as exc:
        logger.warning("lifeguard: could not cancel the interrupted query: %s", exc)
        return None
    try:
        drained = adapter.drain(conn, max(0.0, deadline - time.monotonic()))
    except Exception:
        logger.debug("reading the cancelled statement's answer failed", exc_info=True)
        drained = False
    if not drained:
        logger.info(
            "lifeguard: the cancelled statement's end was not read within %.1fs; "
            "closing its connection anyway",
            timeout,
        )
    return drained


def backend_pid(conn: Any) -> int | None:
    adapter = adapter_for(conn)
    if adapter is None:
        return None
    try:
        return adapter.backend_pid(conn)
    except Exception:
        return None


def close_quietly(conn: Any) -> None:
    """Close a driver connection, ignoring errors: it is being thrown away."""
    try:
        conn.close()
    except Exception:
        logger.debug("error while closing a discarded connection", exc_info=True)


def rollback_quietly(conn: Any) -> bool:
    """Roll back an open transaction; False if that failed (the caller then closes)."""
    adapter = adapter_for(conn)
    if adapter is None:
        return False
    try:
        adapter.rollback(conn)
    except Exception:
        logger.debug("rollback of a discarded connection failed", exc_info=True)
        return False
    return transaction_status(conn) is TransactionStatus.IDLE


# Objects inherited across fork whose sockets we closed at the fd level. They are kept
# alive for the life of the process so that no destructor ever runs on them: a destructor
# could send a Terminate message on a socket number the child has since reused.
_inherited: list[Any] = []


def abandon_inherited(conn: Any) -> None:
    """Forget a connection inherited from the parent process without any network I/O.

    Closing it normally would send Terminate (and a TLS close_notify) on a socket the
    parent still uses, killing the parent's session. Only this process's descriptor is
    let go: it is pointed at /dev/null rather than closed, so its number is not reused
    while the object holds it, and a destructor that still runs (at interpreter exit)
    writes nowhere. Also used for connections of this process whose event loop is gone.
    """
    adapter = adapter_for(conn)
    try:
        if adapter is not None and not adapter.is_closed(conn):
            _point_at_devnull(adapter.fileno(conn))
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    except Exception:
        logger.debug("could not close an inherited socket", exc_info=True)
    _inherited.append(conn)


def _point_at_devnull(fd: int) -> None:
    import os

    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd, inheritable=False)  # the socket loses this reference, silently
    finally:
        os.close(devnull)


def keep_forever(obj: Any) -> None:
    """Keep an inherited object (a pool, an engine) alive so its destructor never runs."""
    _inherited.append(obj)
