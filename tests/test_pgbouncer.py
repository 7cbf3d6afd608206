"""Scenario: the PgBouncer transaction-mode profile, through a real PgBouncer.

Skipped when the ``pgbouncer`` binary is absent (Debian package ``pgbouncer``). Three
worker children share two server connections, so consecutive transactions of one
client run on different server sessions: prepared statements made by asyncpg (always)
or psycopg (after 5 executions) would be missing there (research E10).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeguard.sandbox.postgres import _port_open, _run_as_user, free_port

from .sqla_support import SqlaWorkerFactory
from .support import Database, SandboxTasks

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
)


@pytest.fixture
def pgbouncer(test_db: Database) -> Iterator[str]:
    """A PgBouncer in transaction mode in front of the test database; yields its URL."""
    if PGBOUNCER is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    server = test_db.server
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="lifeguard-pgbouncer-"))
    target = f"host={server.host} port={server.port} dbname={test_db.name} user={server.admin_user}"
    if server.admin_password:
        target += f" password={server.admin_password}"
    (root / "userlist.txt").write_text(f'"{server.admin_user}" ""\n')
    (root / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"{test_db.name} = {target}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {root / 'userlist.txt'}",
                "pool_mode = transaction",
                "default_pool_size = 2",
                "max_client_conn = 100",
                f"server_tls_sslmode = {'require' if server.tls else 'disable'}",
                "ignore_startup_parameters = extra_float_digits,options",
                f"logfile = {root / 'pgbouncer.log'}",
            ]
        )
        + "\n"
    )
    command = [PGBOUNCER, str(root / "pgbouncer.ini")]
    user = _run_as_user()
    if user is not None:  # PgBouncer refuses to run as root
        shutil.chown(root, user)
        command = ["runuser", "-u", user, "--", *command]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 10
    while not _port_open("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"pgbouncer did not start:\n{(root / 'pgbouncer.log').read_text()}")
        time.sleep(0.05)
    yield f"postgresql://{server.admin_user}@127.0.0.1:{port}/{test_db.name}?sslmode=disable"
    # Stopped before the workers: its server sessions carry the workers' names.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)  # immediate shutdown, clients or not
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("async_driver", ["asyncpg", "psycopg"])
def test_transaction_mode_profile(
    sqla_worker: SqlaWorkerFactory, pgbouncer: str, sqla_tasks: SandboxTasks, async_driver: str
) -> None:
    sqla_worker(
        concurrency=3,
        async_driver=async_driver,
        db_url=pgbouncer,
        options='{"pgbouncer_transaction_mode": true}',
    )

    sync = [sqla_tasks.send("statements", 10) for _ in range(9)]
    async_ = [sqla_tasks.send("async_statements", 10) for _ in range(9)]

    outcomes = [r.get(timeout=120, propagate=False) for r in sync + async_]
    failures = [repr(outcome) for outcome in outcomes if outcome != 10]
    assert failures == []
