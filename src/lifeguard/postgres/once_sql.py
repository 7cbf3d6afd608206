"""The SQL of exactly-once keys and singleton locks, free of any driver or ORM.

One table, ``lifeguard_once``: a key is committed in the same transaction as the writes
it guards, so the key and the effect exist together or not at all (docs/once.md). The
statements use ``%s`` placeholders (psycopg 3, psycopg2 and Django cursors);
:func:`named` rewrites them for SQLAlchemy's ``text()``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ..errors import LifeguardError

TABLE = "lifeguard_once"
DEFAULT_RETENTION_DAYS = 30

CREATE_TABLE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    key text PRIMARY KEY,
    task_name text,
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
)"""
CREATE_INDEX = f"CREATE INDEX IF NOT EXISTS {TABLE}_created_at ON {TABLE} (created_at)"
DROP_TABLE = f"DROP TABLE IF EXISTS {TABLE}"
MIGRATION = [CREATE_TABLE, CREATE_INDEX]

# Claim the key: inserted -> a row; already committed by another run -> no row. A
# concurrent run's uncommitted key makes this statement wait for that run's end: it
# commits (no row here) or rolls back (this run inserts): the unique index serialises.
CLAIM = (
    f"INSERT INTO {TABLE} (key, task_name) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING "
    "RETURNING true"
)
# The claim and, on the skip path, the stored result in one statement (one round trip):
# (true, NULL) when this run inserted the key; (false, result) when a run had committed
# it. DO UPDATE, unlike DO NOTHING, locks and reads the newest committed version of a
# conflicting row even when the statement's snapshot predates it (READ COMMITTED): a run
# that waited on a concurrent uncommitted key gets that run's result once it commits,
# and inserts the key itself if it rolled back. ``xmax = 0`` holds only for a version
# this statement inserted (an updated one carries this transaction's id). The no-op
# update makes a dead row version per skipped run, which the skipping run rolls back.
CLAIM_OR_FETCH = (
    f"INSERT INTO {TABLE} AS once (key, task_name) VALUES (%s, %s) ON CONFLICT (key) "
    "DO UPDATE SET task_name = once.task_name RETURNING once.xmax = 0, once.result::text"
)
# The skip path of CLAIM (DO NOTHING): the committed run's result.
FETCH = f"SELECT result::text FROM {TABLE} WHERE key = %s"
# Only when the block has a result to keep (None costs nothing).
STORE = f"UPDATE {TABLE} SET result = CAST(%s AS jsonb) WHERE key = %s"
# The result and the commit in one message, when the block owns the transaction.
STORE_AND_COMMIT = f"{STORE}; COMMIT"
# Retention: in batches, so a prune never holds millions of row locks at once.
PRUNE_BATCH = (
    f"DELETE FROM {TABLE} WHERE key IN (SELECT key FROM {TABLE} "
    "WHERE created_at < now() - CAST(%s AS interval) LIMIT %s)"
)

LOCK = "SELECT pg_advisory_lock(%s)"
TRY_LOCK = "SELECT pg_try_advisory_lock(%s)"
UNLOCK = "SELECT pg_advisory_unlock(%s)"

# The lock session runs nothing after its lock statement, so pg_stat_activity.query keeps
# showing it while the lock is held: a comment there names the key and the task, for
# `lifeguard monitor` (pg_locks has only the 64-bit id). JSON with "/" escaped cannot
# close the comment; "%" is doubled for the drivers' %s placeholders.
_LABEL = re.compile(r"/\* lifeguard singleton (\{.*\}) \*/")
#: The monitor keeps the first 200 characters of each backend's query (monitor/snapshot.py).
LABEL_STATEMENT_CHARS = 200


def labelled(statement: str, key: str, task_name: str | None) -> str:
    """``statement`` with a comment naming the singleton ``key`` and ``task_name``, the
    key cut (then the task name) until the statement, as the server shows it with its
    parameter bound, fits in what the monitor reads."""
    room = LABEL_STATEMENT_CHARS - len(statement.replace("%s", "-" * 20))
    task = (task_name or "")[:80]
    cut = len(key)
    while True:
        label = json.dumps({"key": key[:cut], "task": task}).replace("/", "\\/")
        comment = f" /* lifeguard singleton {label} */"
        if len(comment) <= room or (cut == 0 and not task):
            return statement + comment.replace("%", "%%")
        if cut > 0:
            cut = max(cut - 8, 0)
        else:
            task = task[:-8]


def lock_label(query: str | None) -> tuple[str, str | None] | None:
    """(key, task name) of a lock statement made by :func:`labelled`, else None."""
    match = _LABEL.search(query or "")
    if match is None:
        return None
    try:
        data = json.loads(match.group(1))
        return str(data["key"]), (str(data["task"]) or None)
    except (ValueError, KeyError, TypeError):
        return None


INSUFFICIENT_PRIVILEGE = "42501"
UNDEFINED_TABLE = "42P01"


def named(sql: str, *names: str) -> str:
    """``sql`` with its ``%s`` placeholders renamed ``:name`` in order (SQLAlchemy text)."""
    parts = sql.split("%s")
    if len(parts) != len(names) + 1:
        raise ValueError(f"{len(parts) - 1} placeholders, {len(names)} names")
    out = parts[0]
    for name, part in zip(names, parts[1:], strict=True):
        out += f":{name}{part}"
    return out


def lock_id(key: str) -> int:
    """A stable signed 64-bit id of ``key`` for pg_advisory_lock(bigint): the same in every
    process and every Python (``hash()`` is salted per process)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"lifeguard").digest()
    return int.from_bytes(digest, "big", signed=True)


_RETENTION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_retention(text: str) -> str:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` -> a PostgreSQL interval literal."""
    match = _RETENTION.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r}: give a positive number and a unit s, m, h, d or w (30d)")
    return f"{match.group(1)} {_UNITS[match.group(2)]}"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, through Django's and SQLAlchemy's wrappers."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        code = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(code, str):
            return code
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


class OnceStorageError(LifeguardError):
    """The key table is missing, or the role may not use it: the guarantee cannot hold,
    so the task fails loudly instead of running unguarded."""


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def storage_error(exc: BaseException, role: Any = None) -> OnceStorageError | None:
    """A clear error for a missing table or privilege; None for any other error."""
    code = sqlstate(exc)
    who = "<the workers' role>"
    if role:
        who = str(role) if re.fullmatch(r"[a-z_][a-z0-9_]*", str(role)) else _quoted(str(role))
    if code == INSUFFICIENT_PRIVILEGE:
        return OnceStorageError(
            f"permission denied on table {TABLE}: run "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {who}; "
            f"(creating it needs CREATE on the schema: lifeguard migrate as its owner)"
        )
    if code == UNDEFINED_TABLE:
        return OnceStorageError(
            f"table {TABLE} does not exist: run `lifeguard migrate --database-url URL` "
            "(or `manage.py migrate lifeguard` with lifeguard.contrib.django installed)"
        )
    return None
