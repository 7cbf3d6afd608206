"""Connection slots: what the server allows, what is in use, and who is at a limit.

One query (:func:`read_limits`) for everyone who needs the figures: ``lifeguard check``,
``monitor`` and ``doctor`` report the condition when a limit is reached; when the
database refuses them a slot they say "slots exhausted" and which limit the server
named (:func:`refusal`), rather than only "cannot connect". In the worker, the database
trouble concern names the limits in its log line (:meth:`Limits.summary`) and the green
budget shrinks to the free slots (:attr:`Limits.free_slots`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .failures import Failure, classify

logger = logging.getLogger("lifeguard.slots")

SLOTS_EXHAUSTED = "slots exhausted"

_SQL = """
SELECT
    current_user,
    r.rolsuper,
    current_setting('max_connections')::int,
    current_setting('superuser_reserved_connections')::int,
    coalesce(current_setting('reserved_connections', true), '0')::int,
    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int,
    r.rolconnlimit,
    (SELECT count(*) FROM pg_stat_activity
     WHERE backend_type = 'client backend' AND usename = current_user)::int
FROM pg_roles r WHERE r.rolname = current_user
"""


@dataclass(frozen=True)
class Limits:
    """The slot figures visible to the connected role (its own session included)."""

    role: str
    superuser: bool
    max_connections: int
    superuser_reserved: int
    reserved: int  # reserved_connections, PostgreSQL 16+
    server_backends: int  # client backends of the whole server
    role_limit: int  # rolconnlimit; -1: none
    role_backends: int

    @property
    def usable_slots(self) -> int:
        return self.max_connections - self.superuser_reserved - self.reserved

    @property
    def free_slots(self) -> int:
        """Slots an ordinary role may still take now."""
        return max(0, self.usable_slots - self.server_backends)

    def summary(self) -> str:
        """The limits in one clause, for a log line that says what to change."""
        reserved = self.superuser_reserved + self.reserved
        limit = "no limit" if self.role_limit < 0 else str(self.role_limit)
        return (
            f"the server has max_connections={self.max_connections}, {reserved} of them "
            f"reserved (superuser_reserved_connections, reserved_connections), so "
            f"{self.usable_slots} usable by other roles; "
            f"role {self.role!r} CONNECTION LIMIT {limit}"
        )

    def _reserved_text(self) -> str:
        text = f"superuser_reserved_connections {self.superuser_reserved}"
        if self.reserved:
            text += f", reserved_connections {self.reserved}"
        return text

    def exhausted(self) -> str | None:
        """ "slots exhausted: ..." with the figures, when a new session of an ordinary
        role (or of this role) would be refused now; else None."""
        reasons = []
        if self.server_backends >= self.max_connections:
            reasons.append(
                f"the server is at max_connections: {self.server_backends} backends of "
                f"max_connections {self.max_connections}"
            )
        elif self.server_backends >= self.usable_slots:
            reasons.append(
                f"{self.server_backends} backends fill the {self.usable_slots} slots "
                f"ordinary roles may use (max_connections {self.max_connections} minus "
                f"{self._reserved_text()}); only superusers get in"
            )
        if 0 <= self.role_limit <= self.role_backends:
            reasons.append(
                f'role "{self.role}" is at its CONNECTION LIMIT: {self.role_backends} '
                f"sessions of rolconnlimit {self.role_limit}"
            )
        if not reasons:
            return None
        return f"{SLOTS_EXHAUSTED}: " + "; ".join(reasons)

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "max_connections": self.max_connections,
            "superuser_reserved_connections": self.superuser_reserved,
            "reserved_connections": self.reserved,
            "usable_slots": self.usable_slots,
            "server_backends": self.server_backends,
            "role_connection_limit": self.role_limit,
            "role_backends": self.role_backends,
        }


def read_limits(conn: Any) -> Limits | None:
    """The figures, over a DB-API connection (None if the role cannot be read)."""
    with conn.cursor() as cur:
        cur.execute(_SQL)
        row = cur.fetchone()
    if row is None:
        return None
    role, superuser, max_conn, su_reserved, reserved, backends, limit, role_backends = row
    return Limits(
        role=str(role),
        superuser=bool(superuser),
        max_connections=int(max_conn),
        superuser_reserved=int(su_reserved),
        reserved=int(reserved),
        server_backends=int(backends),
        role_limit=int(limit),
        role_backends=int(role_backends),
    )


def limits_on(conn: Any) -> Limits | None:
    """:func:`read_limits` as lifeguard's own query on a worker's DB-API connection: the
    transaction the query opened is ended (unless in autocommit), and a failure to read
    is None, logged at debug: the figures only ever inform a log line or a budget."""
    try:
        limits = read_limits(conn)
        if not getattr(conn, "autocommit", False):
            conn.rollback()
    except Exception:
        logger.debug("reading the server's connection slots failed", exc_info=True)
        return None
    return limits


def fair_share(free_slots: int) -> int:
    """The connections one process may take of the slots still free: half of them (at
    least one), so that the next process started finds some too."""
    return max(1, free_slots // 2)


def refusal(exc: BaseException) -> str | None:
    """ "slots exhausted: <which limit>" when ``exc`` is the server refusing a slot.

    No session means no figures: what is said is what the server's message names.
    """
    if classify(exc) is not Failure.SLOTS_EXHAUSTED:
        return None
    text = str(exc)
    if "for role" in text:
        which = "the role is at its CONNECTION LIMIT (pg_roles.rolconnlimit)"
    elif "for database" in text:
        which = "the database is at its CONNECTION LIMIT (pg_database.datconnlimit)"
    elif "reserved" in text:
        which = (
            "every slot ordinary roles may use is taken (max_connections minus "
            "superuser_reserved_connections and reserved_connections)"
        )
    elif "too many clients" in text:
        which = "the server is at max_connections"
    else:
        which = "the server has no connection slot left"
    return f"{SLOTS_EXHAUSTED}: {which}"
