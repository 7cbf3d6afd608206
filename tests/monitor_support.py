"""Helpers for the monitor scenarios: real sessions in each state, named like lifeguard
workers' connections; roles with and without monitoring grants; the commands run as an
operator runs them; Prometheus endpoints scraped and parsed back."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from lifeguard.demo.postgres import PostgresServer
from tests.support import Database

HOST = "web-1"  # the host in the application_name of hand-made sessions

IDLE = "idle"
ACTIVE = "active"
IDLE_IN_TRANSACTION = "idle in transaction"
ABORTED = "idle in transaction (aborted)"


@dataclass
class Session:
    conn: psycopg.Connection[Any]
    pid: int  # the backend's
    application_name: str
    state: str


@dataclass
class Sessions:
    """Sessions opened with psycopg, each left in a chosen state; all closed at the end."""

    server: PostgresServer
    database: str
    prefix: str
    opened: list[Session] = field(default_factory=list)

    def name(self, worker_pid: int, host: str = HOST) -> str:
        return f"{self.prefix}:{host}:{worker_pid}"

    def open(
        self,
        state: str,
        *,
        worker_pid: int = 4242,
        application_name: str | None = None,
        user: str | None = None,
        database: str | None = None,
    ) -> Session:
        name = application_name or self.name(worker_pid)
        conn = psycopg.connect(
            **self.server.connect_kwargs(database or self.database, user=user),
            application_name=name,
            autocommit=state in (IDLE, ACTIVE),
        )
        if state == ACTIVE:
            conn.pgconn.send_query(b"SELECT pg_sleep(60)")
        elif state == ABORTED:
            with contextlib.suppress(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0")
        else:
            conn.execute("SELECT 1")
        session = Session(conn, conn.info.backend_pid, name, state)
        self.opened.append(session)
        return session

    def close_all(self) -> None:
        for session in self.opened:
            with contextlib.suppress(Exception):
                if session.state == ACTIVE:
                    session.conn.cancel()
                session.conn.close()
        self.opened.clear()


def backend_pids(db: Database) -> set[int]:
    """Every backend of the database now, as the administrator sees it."""
    rows = db.admin("SELECT pid FROM pg_stat_activity WHERE datname = %s", [db.name])
    return {row[0] for row in rows}


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def session_counters(db: Database) -> tuple[int, int, int, int]:
    with db.server.admin() as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT sessions, sessions_abandoned, sessions_fatal, sessions_killed "
            "FROM pg_stat_database WHERE datname = %s",
            [db.name],
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


@contextlib.contextmanager
def role(server: PostgresServer, name: str, *grants: str) -> Iterator[str]:
    """A login role holding ``grants`` (predefined roles); dropped afterwards."""
    with server.admin() as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
        for grant in grants:
            conn.execute(f'GRANT {grant} TO "{name}"')
    try:
        yield name
    finally:
        with server.admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                [name],
            )
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def lifeguard(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """``lifeguard <args>`` in a subprocess, as an operator or cron runs it."""
    environment = {k: v for k, v in os.environ.items() if k != "LIFEGUARD_DATABASE_URL"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", "from lifeguard.cli import main; main()", *args],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


def start_lifeguard(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if k != "LIFEGUARD_DATABASE_URL"}
    environment.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", "from lifeguard.cli import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def scrape(port: int, timeout: float = 15.0) -> dict[str, Any]:
    """The metric families served on ``port``, parsed back (retries until it answers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """``{sorted labels: value}`` of one family's samples called ``name``."""
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in families.values():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found
