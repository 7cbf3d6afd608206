"""Real ``celery worker`` processes, started and stopped the way an operator would."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from ..procfs import child_pids


class WorkerFailedToStart(RuntimeError):
    pass


def sandbox_settings(
    *,
    db_url: str,
    broker_url: str,
    queue: str,
    mode: str,
    prefix: str,
    options: str,
    quiet: bool,
    **more: str,
) -> dict[str, str]:
    """The ``LIFEGUARD_SANDBOX_*`` variables every sandbox app reads, plus its own."""
    settings = {
        "LIFEGUARD_SANDBOX_DB_URL": db_url,
        "LIFEGUARD_SANDBOX_BROKER_URL": broker_url,
        "LIFEGUARD_SANDBOX_QUEUE": queue,
        "LIFEGUARD_SANDBOX_MODE": mode,
        "LIFEGUARD_SANDBOX_PREFIX": prefix,
        "LIFEGUARD_SANDBOX_OPTIONS": options,
        **{f"LIFEGUARD_SANDBOX_{name.upper()}": value for name, value in more.items()},
    }
    if quiet:
        settings["LIFEGUARD_SANDBOX_QUIET"] = "1"
    return settings


GREEN_POOLS = ("gevent", "eventlet")


class CeleryWorker:
    """``celery -A <app> worker`` in a subprocess of its own session, logging to a file."""

    _running: dict[str, int] = {}  # node name -> how many started workers carry it

    def __init__(
        self,
        app: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        queue: str = "celery",
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        cwd: str | os.PathLike[str] | None = None,
        loglevel: str = "INFO",
        python: str = sys.executable,
    ) -> None:
        self.app = app
        self.pool = pool
        self.concurrency = concurrency
        self.queue = queue
        self.hostname = hostname or f"{queue}@%h"
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.args = list(args)
        self.cwd = cwd
        self.loglevel = loglevel
        self.python = python
        fd, name = tempfile.mkstemp(prefix=f"worker-{queue}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._counted = False  # in _running

    @property
    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "-P",
            self.pool,
            "-c",
            str(self.concurrency),
            "-Q",
            self.queue,
            "-n",
            self.hostname,
            f"--loglevel={self.loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *self.args,
        ]

    @property
    def pid(self) -> int:
        assert self.process is not None, "worker not started"
        return self.process.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        return child_pids(self.pid)

    def start(self, timeout: float = 60.0, wait_children: bool = True) -> CeleryWorker:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while " ready." not in self.log:
            if self.process.poll() is not None:
                self.returncode = self.process.returncode
                raise WorkerFailedToStart(
                    f"worker exited with status {self.returncode}:\n{self.log[-4000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerFailedToStart(f"worker not ready after {timeout}s:\n{self.log[-4000:]}")
            time.sleep(0.05)
        if wait_children and self.pool == "prefork":
            while len(self.children()) < self.concurrency and time.monotonic() < deadline:
                time.sleep(0.05)
        self._running[self.nodename] = self._running.get(self.nodename, 0) + 1
        self._counted = True
        return self

    @property
    def nodename(self) -> str:
        return self.hostname.replace("%h", socket.gethostname())

    def run_to_exit(self, timeout: float = 60.0) -> int:
        """Start a worker that is expected to exit by itself (a startup error)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.returncode

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM): running tasks finish, children exit, then the worker."""
        if self.process is None or self.process.poll() is not None:
            self._forget()
            return self.process.returncode if self.process else None
        if self.pool in GREEN_POOLS:
            self._ask_to_shut_down()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._forget()
        return self.returncode

    def _ask_to_shut_down(self) -> None:
        """The same warm shutdown by remote control: a gevent or eventlet worker acts on
        SIGTERM only when its event loop next wakes (4 to 5 s with a Redis broker), on the
        control message at once. Only when this worker alone carries its node name."""
        broker_url = self.env.get("LIFEGUARD_SANDBOX_BROKER_URL")
        if not broker_url or self._running.get(self.nodename, 0) != 1 or self.process is None:
            return
        from celery import Celery

        client = Celery("lifeguard-stop", broker=broker_url, set_as_current=False)
        try:
            client.control.shutdown(destination=[self.nodename])
            self.process.wait(10)
        except Exception:  # remote control off, broker gone, slow to stop: SIGTERM follows
            pass
        finally:
            client.close()

    def _forget(self) -> None:
        if not self._counted:
            return
        self._counted = False
        count = self._running.get(self.nodename, 0)
        if count <= 1:
            self._running.pop(self.nodename, None)
        else:
            self._running[self.nodename] = count - 1

    def kill(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.returncode = self.process.wait(10)
        self._forget()

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
