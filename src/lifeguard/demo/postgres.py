"""A real PostgreSQL for the demo, the tests and the benchmarks.

:func:`find_postgres` uses, in order: a URL from the environment, the local server on
127.0.0.1:5432 when it answers, or an embedded server this process starts
(:class:`EmbeddedPostgres`) from the system's PostgreSQL binaries or, on a machine with
none, from the ``pgserver`` package. The embedded server can be configured the way
production servers are: TLS and scram-sha-256 password authentication.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..postgres.conninfo import parse_conninfo

ENV_URL = "LIFEGUARD_TEST_DATABASE_URL"  # a superuser URL; any database on the server


@dataclass
class PostgresServer:
    """Where a PostgreSQL server is and how to reach it as an administrator."""

    host: str
    port: int
    admin_user: str
    admin_password: str | None = field(default=None, repr=False)  # never printed
    tls: bool = False
    embedded: EmbeddedPostgres | None = field(default=None, repr=False)

    def url(
        self,
        database: str,
        user: str | None = None,
        password: str | None = None,
        scheme: str = "postgresql",
        **query: str,
    ) -> str:
        """A URL for SQLAlchemy/Celery style configuration (``scheme`` may name a driver)."""
        user = user or self.admin_user
        if password is None and user == self.admin_user:
            password = self.admin_password
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        params = dict(query)
        if self.tls:
            params.setdefault("sslmode", "require")
        tail = ("?" + "&".join(f"{k}={v}" for k, v in params.items())) if params else ""
        return f"{scheme}://{auth}@{self.host}:{self.port}/{database}{tail}"

    def connect_kwargs(
        self, database: str, user: str | None = None, password: str | None = None
    ) -> dict[str, Any]:
        """libpq keywords for psycopg.connect()."""
        user = user or self.admin_user
        if password is None and user == self.admin_user:
            password = self.admin_password
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": user,
            "dbname": database,
            "sslmode": "require" if self.tls else "disable",
        }
        if password:
            kwargs["password"] = password
        return kwargs

    def admin(self, database: str = "postgres") -> Any:
        """An autocommit psycopg connection as the administrator."""
        import psycopg

        return psycopg.connect(**self.connect_kwargs(database), autocommit=True)

    def create_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def ensure_role(self, name: str, password: str, *, superuser: bool = False) -> None:
        """A login role with this password (SCRAM-hashed when the server does so)."""
        from psycopg import sql

        with self.admin() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [name]).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL("{} ROLE {} WITH LOGIN {} PASSWORD {}").format(
                    sql.SQL(verb),
                    sql.Identifier(name),
                    sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"),
                    sql.Literal(password),
                )
            )

    def session_count(self, database: str) -> int:
        """``pg_stat_database.sessions``: sessions ever opened to ``database``.

        A backend's statistics are flushed when it exits (and now and then while it
        runs): read it after the sessions being counted have ended.
        """
        with self.admin() as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = %s", [database]
            ).fetchone()
        return int(row[0]) if row else 0

    def stop(self) -> None:
        if self.embedded is None:
            raise RuntimeError("only a server this process started may be stopped")
        self.embedded.stop()

    def start(self) -> None:
        if self.embedded is None:
            raise RuntimeError("only a server this process started may be started")
        self.embedded.start()

    def restart(self) -> None:
        if self.embedded is None:
            raise RuntimeError("only a server this process started may be restarted")
        self.embedded.restart()


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_from_url(url: str) -> PostgresServer:
    """The server of a URL, read as libpq reads it (raises ``ConninfoError``)."""
    options = parse_conninfo(url)
    return PostgresServer(
        host=options.get("host", "").split(",")[0] or "127.0.0.1",
        port=int(options.get("port", "").split(",")[0] or 5432),
        admin_user=options.get("user") or "postgres",
        admin_password=options.get("password"),
        tls=options.get("sslmode") == "require",
    )


def _local_server() -> PostgresServer | None:
    if not _port_open("127.0.0.1", 5432):
        return None
    server = PostgresServer(host="127.0.0.1", port=5432, admin_user="postgres")
    try:
        with server.admin() as conn:
            conn.execute("SELECT 1")
    except Exception:
        return None
    return server


@functools.cache
def find_postgres() -> PostgresServer:
    """A PostgreSQL to use: from the environment, local, or embedded (started once)."""
    url = os.environ.get(ENV_URL)
    return server_from_url(url) if url else _local_server() or EmbeddedPostgres().start()


# --- an embedded server ---------------------------------------------------------------


def find_binaries() -> Path:
    """A directory with initdb, pg_ctl and postgres."""
    candidates: list[str] = []
    if os.environ.get("LIFEGUARD_PG_BIN"):
        candidates.append(os.environ["LIFEGUARD_PG_BIN"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            candidates.append(subprocess.check_output([pg_config, "--bindir"], text=True).strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    spec = importlib.util.find_spec("pgserver")  # binaries from pip, no TLS support
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "pginstall" / "bin"
        if (bundled / "postgres").exists():
            return bundled
    if sys.version_info >= (3, 13):  # pgserver 0.1.4 has wheels for CPython 3.9-3.12 only
        bundled_hint = "or, from a Python 3.9-3.12 environment, pip install pgserver and set "
        bundled_hint += "LIFEGUARD_PG_BIN to its pgserver/pginstall/bin"
    else:
        bundled_hint = "or pip install pgserver (PostgreSQL binaries in a wheel)"
    raise RuntimeError(
        "No PostgreSQL binaries found (initdb, pg_ctl, postgres). Install PostgreSQL's "
        "server binaries (Debian/Ubuntu: apt-get install postgresql; Fedora: dnf install "
        f"postgresql-server; macOS: brew install postgresql), {bundled_hint}, or set "
        f"LIFEGUARD_PG_BIN to a directory holding them, or point {ENV_URL} at a running server."
    )


def _run_as_user() -> str | None:
    """PostgreSQL refuses to run as root: pick (or create) an unprivileged user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "-r", "-s", "/bin/false", "pgserver"], check=True)
    return "pgserver"


def _make_traversable(path: Path) -> None:
    """Let the unprivileged server user reach ``path`` (chmod o+x on its parents)."""
    for parent in [path, *path.parents]:
        with contextlib.suppress(OSError):
            mode = parent.stat().st_mode
            parent.chmod(mode | stat.S_IXOTH | stat.S_IROTH)


def binaries_support_tls(bin_dir: Path) -> bool:
    """Whether these PostgreSQL binaries were built with OpenSSL (pgserver's are not)."""
    pg_config = bin_dir / "pg_config"
    if not pg_config.exists():
        return False
    out = subprocess.run(
        [str(pg_config), "--configure"], check=False, capture_output=True, text=True
    )
    return "--with-openssl" in out.stdout or "--with-ssl=openssl" in out.stdout


class EmbeddedPostgres:
    """A throw-away cluster in a temporary directory, on a free port of 127.0.0.1."""

    def __init__(
        self,
        *,
        tls: bool | None = False,
        password: str | None = None,
        max_connections: int = 200,
        settings: dict[str, str] | None = None,
    ) -> None:
        """``tls=None``: TLS when the binaries were built with OpenSSL (pgserver's are not)."""
        self.bin = find_binaries()
        self.user = _run_as_user()
        self.tls = binaries_support_tls(self.bin) if tls is None else tls
        self.password = password
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lifeguard-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.server: PostgresServer | None = None
        self._running = False

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        env = dict(os.environ, LC_ALL="C", LANG="C")
        lib = self.bin.parent / "lib"
        if lib.exists():
            env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}"
        return subprocess.run(command, check=check, capture_output=True, text=True, env=env)

    def start(self) -> PostgresServer:
        if self.server is None:
            self._init()
        self._start_server()
        return self.server  # type: ignore[return-value]

    def _init(self) -> None:
        if self.user is not None:
            if not str(self.bin).startswith("/usr/"):
                _make_traversable(self.bin)  # pgserver's binaries inside a virtualenv
            _make_traversable(self.root)
            shutil.chown(self.root, self.user)
        auth = "scram-sha-256" if self.password else "trust"
        self._cmd(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            f"--auth-host={auth}",
            "--encoding=UTF8",
            "--no-sync",
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": str(self.max_connections),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
            **self.settings,
        }
        hba = [
            "local all all trust",
            f"host all all 127.0.0.1/32 {auth}",
            f"host all all ::1/128 {auth}",
        ]
        if self.tls:
            self._make_certificate()
            conf.update(
                {
                    "ssl": "on",
                    "ssl_cert_file": "'server.crt'",
                    "ssl_key_file": "'server.key'",
                }
            )
            hba = ["local all all trust", f"hostssl all all 127.0.0.1/32 {auth}"]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# lifeguard sandbox\n")
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        self.server = PostgresServer(
            host="127.0.0.1",
            port=self.port,
            admin_user="postgres",
            admin_password=self.password,
            tls=self.tls,
            embedded=self,
        )
        atexit.register(self.destroy)

    def _make_certificate(self) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("TLS needs the openssl command to make a test certificate")
        crt, key = self.data / "server.crt", self.data / "server.key"
        subprocess.run(
            [
                openssl,
                "req",
                "-new",
                "-x509",
                "-days",
                "2",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-newkey",
                "rsa:2048",
                "-keyout",
                str(key),
                "-out",
                str(crt),
            ],
            check=True,
            capture_output=True,
        )
        key.chmod(0o600)
        if self.user is not None:
            shutil.chown(crt, self.user)
            shutil.chown(key, self.user)

    def _start_server(self) -> None:
        result = self._cmd(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"embedded PostgreSQL did not start: {result.stderr}\n{log}")
        self._running = True
        if self.password and self.server is not None:
            self._cmd(
                str(self.bin / "psql"),
                "-h",
                str(self.root),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                f"ALTER ROLE postgres PASSWORD '{self.password}'",
            )

    def stop(self, mode: str = "fast") -> None:
        if not self._running:
            return
        self._cmd(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )
        self._running = False

    def restart(self) -> None:
        self.stop()
        # The port stays ours: the server comes back on the same address.
        deadline = time.monotonic() + 10
        while _port_open("127.0.0.1", self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._start_server()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)
