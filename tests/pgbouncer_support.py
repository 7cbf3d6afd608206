"""A real PgBouncer in front of a test database (skipped when the binary is absent)."""

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

from lifeguard.demo.postgres import PostgresServer, _port_open, _run_as_user, free_port

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
)


@contextlib.contextmanager
def running_pgbouncer(
    server: PostgresServer,
    database: str,
    *,
    pool_mode: str = "transaction",
    admin: bool = False,
    pool_size: int = 2,
) -> Iterator[str]:
    """PgBouncer in ``pool_mode`` in front of ``database``; yields its URL.

    ``admin``: the server's administrator may use PgBouncer's admin console
    (``admin_users``), which tells the pool mode.
    """
    if PGBOUNCER is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="lifeguard-pgbouncer-"))
    target = f"host={server.host} port={server.port} dbname={database} user={server.admin_user}"
    if server.admin_password:
        target += f" password={server.admin_password}"
    (root / "userlist.txt").write_text(f'"{server.admin_user}" ""\n')
    settings = [
        "[databases]",
        f"{database} = {target}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {root / 'userlist.txt'}",
        f"pool_mode = {pool_mode}",
        f"default_pool_size = {pool_size}",
        "max_client_conn = 100",
        f"server_tls_sslmode = {'require' if server.tls else 'disable'}",
        "ignore_startup_parameters = extra_float_digits,options",
        f"logfile = {root / 'pgbouncer.log'}",
    ]
    if admin:
        settings.append(f"admin_users = {server.admin_user}")
    (root / "pgbouncer.ini").write_text("\n".join(settings) + "\n")
    command = [PGBOUNCER, str(root / "pgbouncer.ini")]
    user = _run_as_user()
    if user is not None:  # PgBouncer refuses to run as root
        shutil.chown(root, user)
        command = ["runuser", "-u", user, "--", *command]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while not _port_open("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pgbouncer did not start:\n{(root / 'pgbouncer.log').read_text()}")
            time.sleep(0.05)
        yield f"postgresql://{server.admin_user}@127.0.0.1:{port}/{database}?sslmode=disable"
    finally:
        # Stopped before the workers: its server sessions carry the workers' names.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # immediate shutdown, clients or not
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
