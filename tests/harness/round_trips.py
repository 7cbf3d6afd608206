"""Round trips to PostgreSQL, counted from libpq's protocol trace (psycopg 3).

Each change from messages the client sent to messages the server sent is one wait for
the server: one round trip. Used by the benchmark tasks (tests/harness/django_tasks.py)
and tests/test_once.py.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from typing import Any


def count_round_trips(pgconn: Any, work: Callable[[], None]) -> int:
    """Round trips ``work`` makes on ``pgconn`` (a psycopg 3 ``connection.pgconn``)."""
    from psycopg import pq

    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            work()
        finally:
            pgconn.untrace()
        trace.seek(0)
        directions = [line.split("\t", 1)[0] for line in trace if line.strip()]
    return sum(1 for pair in itertools.pairwise(directions) if pair == ("F", "B"))
