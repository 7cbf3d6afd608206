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
from .failures import chain_sqlstate

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
    "WHERE created_at < now() - CAST(%s AS interval) AND state <> 'claimed' LIMIT %s)"
)  # an unresolved effect claim is kept until it completes or an operator resolves it

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
LOCK_NOT_AVAILABLE = "55P03"
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


class OnceStorageError(LifeguardError):
    """The key table is missing, or the role may not use it: the guarantee cannot hold,
    so the task fails loudly instead of running unguarded."""


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def storage_error(exc: BaseException, role: Any = None) -> OnceStorageError | None:
    """A clear error for a missing table or privilege; None for any other error."""
    code = chain_sqlstate(exc)
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


# --- external side effects: claim / complete (concerns/effects.py, docs/once.md) --------
# The same table. An effect's row is 'claimed' from its claim (committed before the effect)
# until its completion ('done', with the result) or until a rerun found its owner dead and
# skipped it by policy ('skipped'). Rows of once() keys take the default 'done'. The columns
# are added with ADD COLUMN IF NOT EXISTS, so a table made before them keeps its keys
# (PostgreSQL 11+ adds a column with a constant default without rewriting the table).
CLAIMED, DONE, SKIPPED = "claimed", "done", "skipped"
EFFECT_MIGRATION = [
    f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS state text NOT NULL DEFAULT 'done'",
    f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS claimed_at timestamptz",
    f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS claimed_by text",
    f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS completed_at timestamptz",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_claimed ON {TABLE} (claimed_at) WHERE state = 'claimed'",
]
EFFECT_MIGRATION_REVERSE = [
    f"ALTER TABLE {TABLE} DROP COLUMN IF EXISTS state",
    f"ALTER TABLE {TABLE} DROP COLUMN IF EXISTS claimed_at",
    f"ALTER TABLE {TABLE} DROP COLUMN IF EXISTS claimed_by",
    f"ALTER TABLE {TABLE} DROP COLUMN IF EXISTS completed_at",
    f"DROP INDEX IF EXISTS {TABLE}_claimed",
]

_EFFECT_ROW = "state, result::text, task_name, claimed_at, claimed_by"
# Under the key's advisory lock, in autocommit: insert the claim (committed at once), or
# read the row an earlier run left. Every claimer holds the lock first, so the row seen is
# not changing under it.
EFFECT_CLAIM = (
    f"WITH claimed AS (INSERT INTO {TABLE} (key, task_name, state, claimed_at, claimed_by) "
    f"VALUES (%s, %s, '{CLAIMED}', now(), %s) ON CONFLICT (key) DO NOTHING "
    f"RETURNING {_EFFECT_ROW}, true AS new) "
    "SELECT * FROM claimed UNION ALL "
    f"SELECT {_EFFECT_ROW}, false FROM {TABLE} WHERE key = %s AND NOT EXISTS (SELECT FROM claimed)"
)
# A rerun of an orphaned claim takes it over (policy "rerun").
EFFECT_RECLAIM = (
    f"UPDATE {TABLE} SET claimed_at = now(), claimed_by = %s, task_name = coalesce(%s, task_name) "
    f"WHERE key = %s AND state = '{CLAIMED}'"
)
# The owner's completion, or an operator's "it happened".
EFFECT_COMPLETE = (
    f"UPDATE {TABLE} SET state = '{DONE}', result = CAST(%s AS jsonb), completed_at = now() "
    f"WHERE key = %s AND state = '{CLAIMED}'"
)
EFFECT_SKIP = (
    f"UPDATE {TABLE} SET state = '{SKIPPED}', completed_at = now() "
    f"WHERE key = %s AND state = '{CLAIMED}'"
)
# For an operator (lifeguard effects): the claims not completed, oldest first.
EFFECT_UNRESOLVED = (
    f"SELECT key, task_name, claimed_at, claimed_by FROM {TABLE} "
    f"WHERE state = '{CLAIMED}' ORDER BY claimed_at LIMIT %s"
)
EFFECT_RELEASE = f"DELETE FROM {TABLE} WHERE key = %s AND state = '{CLAIMED}'"
# Is the owner alive: is its bigint advisory lock (classid high, objid low 32 bits) held?
EFFECT_LOCK_HELD = (
    "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND objsubid = 1 AND classid = %s AND objid = %s "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)

UNDEFINED_COLUMN = "42703"


def effect_lock_id(key: str) -> int:
    """The advisory lock an effect's owner holds from claim to completion: not the
    singleton lock of the same key (:func:`lock_id`), so the two never block each other."""
    return lock_id(f"effect\0{key}")


def effect_storage_error(exc: BaseException) -> OnceStorageError | None:
    """:func:`storage_error`, and the table of an older lifeguard, without the effect
    columns."""
    if chain_sqlstate(exc) == UNDEFINED_COLUMN:
        return OnceStorageError(
            f"table {TABLE} has no effect columns (state, claimed_at...): run "
            "`lifeguard migrate --database-url URL` again (or `manage.py migrate lifeguard`)"
        )
    return storage_error(exc)


def wait_for_lock(cur: Any, statement: str, lock: int, timeout: float | None) -> bool:
    """Runs ``statement`` (a blocking ``LOCK``) on ``cur``: True once the lock is granted,
    False when ``timeout`` seconds pass first (the server's ``lock_timeout``)."""
    if timeout is not None:
        cur.execute("SELECT set_config('lock_timeout', %s, false)", [f"{timeout}s"])
    try:
        cur.execute(statement, [lock])
        cur.fetchone()
    except Exception as exc:
        if chain_sqlstate(exc) == LOCK_NOT_AVAILABLE:
            return False
        raise
    return True
