"""Running ``lifeguard doctor`` and ``manage.py check`` as users do, in a subprocess (each
app gets a fresh interpreter: Django settings and SQLAlchemy engines are process-wide),
and roles whose per-database settings stand for a server's configuration."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lifeguard.demo.postgres import PostgresServer
from tests.monitor_support import role as login_role

ROOT = Path(__file__).resolve().parent.parent
APPS = "tests.doctor_apps"

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DOCTOR_", "DJANGO_", "LIFEGUARD_DATABASE_URL", "CELERY_"))
    }
    environment.update(env or {})
    return environment


@dataclass
class DoctorRun:
    exit_code: int
    stdout: str
    stderr: str

    @cached_property
    def report(self) -> dict[str, Any]:
        try:
            document: dict[str, Any] = json.loads(self.stdout)
        except ValueError:
            raise AssertionError(f"not JSON:\n{self.stdout}\n{self.stderr}") from None
        return document

    @property
    def flat(self) -> str:
        """The text output with line wrapping undone (whitespace runs as one space)."""
        return " ".join(self.stdout.split())

    @property
    def ids(self) -> list[str]:
        return [finding["id"] for finding in self.report["findings"]]

    def only(self, rule_id: str) -> dict[str, Any]:
        """The one finding of this rule."""
        found = [f for f in self.report["findings"] if f["id"] == rule_id]
        assert len(found) == 1, f"{rule_id}: {found or self.ids}"
        return found[0]

    def of(self, rule_id: str) -> list[dict[str, Any]]:
        return [f for f in self.report["findings"] if f["id"] == rule_id]

    @property
    def skipped(self) -> dict[str, str]:
        return {entry["id"]: entry["reason"] for entry in self.report["skipped"]}


def doctor(
    app: str, *args: str, env: dict[str, str] | None = None, as_json: bool = True
) -> DoctorRun:
    """``lifeguard doctor -A tests.doctor_apps.<app> <args> [--json]``."""
    command = [sys.executable, "-c", "from lifeguard.cli import main; main()", "doctor"]
    command += ["-A", f"{APPS}.{app}", *args] + (["--json"] if as_json else [])
    return _run(command, env)


def manage_check(*args: str, env: dict[str, str] | None = None) -> DoctorRun:
    """``django-admin check`` of the doctor's Django project."""
    command = [sys.executable, "-m", "django", "check", *args]
    command += ["--settings", f"{APPS}.djproj.settings"]
    return _run(command, env)


def _run(command: list[str], env: dict[str, str] | None) -> DoctorRun:
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=_environment(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return DoctorRun(result.returncode, result.stdout, result.stderr)


@contextlib.contextmanager
def role(server: PostgresServer, name: str, database: str, **settings: str) -> Iterator[str]:
    """A login role whose sessions in ``database`` get ``settings`` (ALTER ROLE ... IN
    DATABASE ... SET): the server's own configuration is never touched. Dropped after."""
    with login_role(server, name) as created:
        with server.admin() as conn:
            for key, value in settings.items():
                conn.execute(
                    f'ALTER ROLE "{created}" IN DATABASE "{database}" SET {key} = \'{value}\''
                )
        yield created


def usable_slots(server: PostgresServer) -> int:
    """max_connections minus the reserved slots, read independently of lifeguard."""
    with server.admin() as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - coalesce(current_setting('reserved_connections', true), '0')::int"
        ).fetchone()
    assert row is not None
    return int(row[0])
