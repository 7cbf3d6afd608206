"""What Linux's ``/proc`` says about other processes of this machine: their RSS, their
children, their parent, and the TCP connections they hold.

Used where lifeguard looks at worker processes from outside: the remote-control
command (:mod:`lifeguard.control`, run by a worker's MainProcess about its children)
and ``lifeguard validate`` (about workers running on the same machine). Every function
answers None or nothing for a process that is gone or unreadable; off Linux, RSS falls
back to psutil when it is installed, the rest answers nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import struct
from collections.abc import Iterable
from pathlib import Path

#: A TCP endpoint: (address, port), the address normalised (IPv4-mapped IPv6 as IPv4).
Endpoint = tuple[str, int]


def process_rss(pid: int) -> int | None:
    """The current RSS of a process, in bytes."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read(128).split(None, 2)[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # Linux, and the process is gone
    except (OSError, ValueError, IndexError):
        return None
    try:
        import psutil
    except ImportError:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (a prefork worker's pool processes), sorted."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in (task / "children").read_text().split())
    return sorted(found)


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        return int(stat.rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets a process has open (its ``/proc/<pid>/fd`` links)."""
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError, ValueError):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def tcp_endpoints_of(pids: Iterable[int]) -> dict[Endpoint, int]:
    """The local end of every TCP connection the processes hold -> the process's pid.

    A PostgreSQL backend's ``client_addr``/``client_port`` is the local end of the
    client's socket: this joins backends to the processes of this machine that opened
    them, without anything on their side (``/proc/net/tcp`` and ``tcp6`` of this
    network namespace, matched by socket inode).
    """
    owners: dict[int, int] = {}
    for pid in pids:
        owners.update(dict.fromkeys(socket_inodes(pid), pid))
    if not owners:
        return {}
    found: dict[Endpoint, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines, None)  # header
            for line in lines:
                fields = line.split()
                if len(fields) < 10 or not fields[9].isdigit():
                    continue
                owner = owners.get(int(fields[9]))
                if owner is not None:
                    found[parse_endpoint(fields[1])] = owner
    return found


def parse_endpoint(text: str) -> Endpoint:
    """``0100007F:D431`` (``/proc/net/tcp``: words in host byte order) -> ('127.0.0.1', 54321)."""
    address_hex, _, port_hex = text.partition(":")
    words = [int(address_hex[i : i + 8], 16) for i in range(0, len(address_hex), 8)]
    packed = b"".join(struct.pack("=I", word) for word in words)
    return normalise_address(str(ipaddress.ip_address(packed))), int(port_hex, 16)


def normalise_address(address: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 (``::ffff:10.0.0.1``) as IPv4."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)
