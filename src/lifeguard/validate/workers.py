"""The user's running workers a validation loads, and their task processes' memory.

Found once, with Celery's remote control (workers must have it enabled, the default):
``inspect().active_queues()`` names the nodes consuming the task's queue,
``inspect().stats()`` gives each node's pool, concurrency and MainProcess pid, and
``inspect().registered()`` says whether they know the task.

Then, at every sample, :class:`ProcessSampler` lists each node's task processes (prefork
children, or the worker itself on the other pools) and their RSS, the best way each node
allows:

* ``lifeguard_processes`` (:mod:`lifeguard.control`) when the app installs lifeguard:
  the worker's MainProcess reads its children's RSS, on whichever host it runs;
* ``/proc`` when the worker runs on this machine: children and ``statm``;
* else ``inspect().stats()``: the pool's pids without RSS (recycles still show).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import procfs
from ..concerns.control import COMMAND
from ..errors import LifeguardError
from ..hooks import PoolKind
from ..monitor.attribution import node_host
from ..postgres.conninfo import broker_error

#: How a node's processes were read (JSON and report).
VIA_LIFEGUARD = COMMAND
VIA_PROC = "/proc"
VIA_STATS = "inspect stats (no RSS)"


class CannotValidate(LifeguardError):
    """Validation cannot run: no worker, unknown task, no result backend, ..."""


@dataclass(frozen=True)
class WorkerNode:
    """One running worker that consumes the validated queue."""

    name: str  # celery@web-1
    main_pid: int
    pool: PoolKind
    concurrency: int
    lifeguard: bool  # its app installs lifeguard: it answers lifeguard_processes
    local: bool  # runs on this machine: /proc shows its processes

    @property
    def host(self) -> str:
        return node_host(self.name)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "pid": self.main_pid,
            "pool": self.pool.value,
            "concurrency": self.concurrency,
            "lifeguard": self.lifeguard,
            "local": self.local,
        }


@dataclass(frozen=True)
class TaskProcess:
    """A process that runs tasks, at one sample."""

    node: str
    pid: int
    rss: int | None  # bytes; None: not readable from here

    @property
    def label(self) -> str:
        return f"{node_host(self.node)}:{self.pid}"


def find_workers(
    app: Any, queue: str, task: str, timeout: float, *, lifeguard: bool
) -> list[WorkerNode]:
    """The nodes consuming ``queue``; raises :class:`CannotValidate` saying what to do."""
    try:
        queues = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as exc:  # broker down, wrong URL
        raise CannotValidate(f"cannot ask the workers: {broker_error(exc, app)}") from None
    names = sorted(node for node, consumed in queues.items() if _consumes(consumed, queue))
    if not names:
        seen = ", ".join(sorted(queues)) or "none answered"
        raise CannotValidate(
            f"no running worker consumes the queue {queue!r} (workers: {seen}): start one "
            f"(celery -A <app> worker -Q {queue}) or pass --queue"
        )
    inspect = app.control.inspect(destination=names, timeout=timeout, limit=len(names))
    stats = inspect.stats() or {}
    registered = inspect.registered() or {}
    unaware = [node for node in names if node in registered and task not in registered[node]]
    if unaware:
        raise CannotValidate(
            f"the workers {', '.join(unaware)} do not know the task {task!r}: check its name "
            "(celery -A <app> inspect registered)"
        )
    return [_node(name, stats.get(name) or {}, lifeguard) for name in names]


def lifeguard_nodes(app: Any, names: list[str], timeout: float) -> set[str]:
    """The nodes among ``names`` that answer ``lifeguard_processes``: lifeguard runs in
    the worker itself (a worker without it logs a ``pidbox command error`` once)."""
    try:
        replies = app.control.broadcast(
            COMMAND, destination=names, reply=True, timeout=timeout, limit=len(names)
        )
    except Exception:
        return set()
    return {
        name
        for reply in replies or ()
        for name, answer in reply.items()
        if isinstance(answer, Mapping) and "error" not in answer and "lifeguard" in answer
    }


def _consumes(consumed: Iterable[Mapping[str, Any]] | None, queue: str) -> bool:
    return any(entry.get("name") == queue for entry in consumed or ())


def _node(name: str, stats: Mapping[str, Any], lifeguard: bool) -> WorkerNode:
    pool_info: Mapping[str, Any] = stats.get("pool") or {}
    main_pid = int(stats.get("pid") or 0)
    pool = PoolKind.from_pool_cls(str(pool_info.get("implementation", "")))
    children = [int(pid) for pid in pool_info.get("processes", ())]
    return WorkerNode(
        name=name,
        main_pid=main_pid,
        pool=pool,
        concurrency=int(pool_info.get("max-concurrency") or 1),
        lifeguard=lifeguard,
        local=_runs_here(node_host(name), main_pid, children),
    )


def _runs_here(host: str, main_pid: int, children: list[int]) -> bool:
    """The node's host is this machine's and /proc agrees: its pid exists, and the pool's
    children (prefork) are that pid's children."""
    if host not in (socket.gethostname(), socket.getfqdn()) or not procfs.exists(main_pid):
        return False
    return all(procfs.parent_pid(child) == main_pid for child in children)


class ProcessSampler:
    """Each node's task processes and their RSS, at every :meth:`sample`."""

    def __init__(self, app: Any, nodes: list[WorkerNode], timeout: float) -> None:
        self.app = app
        self.nodes = {node.name: node for node in nodes}
        self.timeout = timeout
        self.via: dict[str, str] = {}  # node -> how its processes are read
        self.main_rss: dict[str, int | None] = {}  # node -> its MainProcess RSS (prefork)
        self._lifeguard = [node.name for node in nodes if node.lifeguard]
        for node in nodes:
            self.via[node.name] = (
                VIA_LIFEGUARD if node.lifeguard else VIA_PROC if node.local else VIA_STATS
            )

    def sample(self) -> list[TaskProcess]:
        found: dict[str, list[TaskProcess]] = {}
        if self._lifeguard:
            found.update(self._ask_lifeguard())
        local = [n for n in self.nodes.values() if self.via[n.name] == VIA_PROC]
        for node in local:
            found[node.name] = self._read_proc(node)
        remote = [name for name, via in self.via.items() if via == VIA_STATS]
        if remote:
            found.update(self._ask_stats(remote))
        return [process for name in sorted(found) for process in found[name]]

    def _ask_lifeguard(self) -> dict[str, list[TaskProcess]]:
        try:
            replies = self.app.control.broadcast(
                COMMAND,
                destination=self._lifeguard,
                reply=True,
                timeout=self.timeout,
                limit=len(self._lifeguard),
            )
        except Exception:
            return {}  # a sample without memory; the next one asks again
        found: dict[str, list[TaskProcess]] = {}
        for reply in replies or ():
            for name, answer in reply.items():
                if name not in self.nodes:
                    continue
                if not isinstance(answer, Mapping) or "error" in answer:
                    self._stop_asking(name)  # an older lifeguard, or none: don't ask again
                    continue
                self.main_rss[name] = answer.get("main_rss")
                found[name] = [
                    TaskProcess(name, int(item["pid"]), item.get("rss"))
                    for item in answer.get("processes", ())
                ]
        return found

    def _stop_asking(self, name: str) -> None:
        self._lifeguard.remove(name)
        self.via[name] = VIA_PROC if self.nodes[name].local else VIA_STATS

    def _read_proc(self, node: WorkerNode) -> list[TaskProcess]:
        if node.pool.forks:
            self.main_rss[node.name] = procfs.process_rss(node.main_pid)
            pids = procfs.child_pids(node.main_pid)
        else:
            pids = [node.main_pid]
        return [TaskProcess(node.name, pid, procfs.process_rss(pid)) for pid in pids]

    def _ask_stats(self, names: list[str]) -> dict[str, list[TaskProcess]]:
        try:
            inspect = self.app.control.inspect(
                destination=names, timeout=self.timeout, limit=len(names)
            )
            stats = inspect.stats() or {}
        except Exception:
            return {}
        found: dict[str, list[TaskProcess]] = {}
        for name, answer in stats.items():
            node = self.nodes.get(name)
            if node is None:
                continue
            pool_info = (answer or {}).get("pool") or {}
            pids = pool_info.get("processes") if node.pool.forks else [node.main_pid]
            found[name] = [TaskProcess(name, int(pid), None) for pid in pids or ()]
        return found
