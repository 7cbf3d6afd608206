"""The ``application_name`` that attributes every database backend to a worker process.

Format: ``<prefix>:<hostname>:<pid>``, at most 63 bytes (PostgreSQL truncates longer
names). The hostname is shortened when needed, never the prefix or the pid, so the
database side (``lifeguard monitor``) can always join a backend to a worker process.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

MAX_BYTES = 63  # NAMEDATALEN - 1
DEFAULT_PREFIX = "lifeguard"


def _printable_ascii(text: str) -> str:
    # PostgreSQL replaces non-printable-ASCII characters in application_name with '?'.
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


def validate_prefix(prefix: str) -> str | None:
    """An error message for an unusable prefix, or None."""
    if not prefix:
        return "the application_name prefix must not be empty"
    if ":" in prefix:
        return f"the application_name prefix {prefix!r} must not contain ':'"
    if _printable_ascii(prefix) != prefix:
        return f"the application_name prefix {prefix!r} must be printable ASCII"
    if len(prefix) > 40:
        return f"the application_name prefix {prefix!r} is longer than 40 characters"
    return None


def application_name(prefix: str, hostname: str | None = None, pid: int | None = None) -> str:
    """``<prefix>:<hostname>:<pid>``, the hostname cut so the whole fits in 63 bytes."""
    host = _printable_ascii(hostname if hostname is not None else socket.gethostname())
    host = host.replace(":", "_")
    tail = f":{pid if pid is not None else os.getpid()}"
    room = MAX_BYTES - len(prefix) - 1 - len(tail)
    return f"{prefix}:{host[: max(room, 0)]}{tail}"


@dataclass(frozen=True)
class WorkerProcessName:
    """A parsed lifeguard ``application_name``."""

    prefix: str
    hostname: str  # possibly shortened to fit 63 bytes
    pid: int


def parse_application_name(value: str | None, prefix: str) -> WorkerProcessName | None:
    """The worker process behind an ``application_name``, or None if it isn't one of ours."""
    if not value or not value.startswith(prefix + ":"):
        return None
    rest = value[len(prefix) + 1 :]
    host, sep, pid_text = rest.rpartition(":")
    if not sep or not pid_text.isdigit():
        return None
    return WorkerProcessName(prefix=prefix, hostname=host, pid=int(pid_text))
