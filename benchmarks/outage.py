"""Database trouble under a stream of tasks: stock Celery against lifeguard, side by side.

A real `celery worker -P prefork -c 2` receives a steady stream of tasks, each inserting
a row keyed by a unique value, from a PostgreSQL configured like production (TLS when
the binaries have it, scram-sha-256 passwords), while the server is:

  restart      `pg_ctl restart -m fast` (the server is back within about a second)
  outage 15s   stopped for 15 seconds, then started

For each run the table counts, from the results and the rows: failed tasks, lost tasks
(no result and no row), duplicated tasks (a value with two rows), and the recovery
time: from the server answering again to the next task succeeding; "caught up" is how
long after the last task was sent the last one finished (the stream goes on for a few
seconds after the fault: a backlog shows here). Medians over the runs, configurations
interleaved.

    python benchmarks/outage.py --rate 60 --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from _harness import production_like_server
from lifeguard.demo.postgres import EmbeddedPostgres, PostgresServer
from lifeguard.demo.project import TASKS, sandbox_worker

TABLE = "lifeguard_sandbox_items"
DATABASE = "bench"


@dataclass(frozen=True)
class Fault:
    label: str
    lead: float  # seconds of stream before the fault
    tail: float  # seconds of stream after the fault began


@dataclass
class Outcome:
    failed: int
    lost: int
    duplicated: int
    first_success: float  # seconds from the server answering to the next task succeeding
    caught_up: float  # seconds from the last task sent to the last task finished
    handed_back: int  # lifeguard's hand-backs (its log lines)


FAULTS = [Fault("restart", 2.0, 6.0), Fault("outage 15s", 2.0, 20.0)]
MODES = ["stock", "lifeguard"]


def apply_fault(embedded: EmbeddedPostgres, fault: Fault) -> None:
    if fault.label == "restart":
        embedded.restart()
    else:
        embedded.stop()
        time.sleep(15)
        embedded.start()


def one_run(
    *,
    embedded: EmbeddedPostgres,
    server: PostgresServer,
    db_url: str,
    redis: str,
    mode: str,
    fault: Fault,
    rate: float,
) -> Outcome:
    from celery import Celery

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:8]
    worker = sandbox_worker(
        db_url=db_url, broker_url=redis, queue=queue, mode=mode, prefix="bench", quiet=True
    )
    client = Celery(f"bench-{tag}", broker=redis, backend=redis)
    worker.start()
    back = {"at": 0.0}

    def at_fault() -> None:
        time.sleep(fault.lead)
        apply_fault(embedded, fault)
        back["at"] = time.time()

    thread = threading.Thread(target=at_fault)
    results = []
    count = int(rate * (fault.lead + fault.tail))
    try:
        thread.start()
        start = time.monotonic()
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            results.append(
                client.send_task(f"{TASKS}.insert_row", args=(f"{tag}-{i}",), queue=queue)
            )
        last_sent = time.time()
        thread.join()
        deadline = time.monotonic() + 300
        for result in results:
            with contextlib.suppress(Exception):  # unfinished: counted as lost
                result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
    finally:
        worker.stop()
        client.close()
    with server.admin(DATABASE) as conn:
        rows = conn.execute(
            f"SELECT value, count(*) FROM {TABLE} WHERE value LIKE %s GROUP BY value",
            [tag + "-%"],
        ).fetchall()
    counts = dict(rows)
    failed = sum(1 for r in results if r.state == "FAILURE")
    missing = sum(1 for i in range(count) if f"{tag}-{i}" not in counts)
    done = [
        (r.date_done.timestamp(), r.state) for r in results if r.date_done is not None
    ]  # the result backend's UTC completion times
    successes = sorted(
        at - back["at"] for at, state in done if at >= back["at"] and state == "SUCCESS"
    )
    return Outcome(
        failed=failed,
        lost=max(0, missing - failed),
        duplicated=sum(n - 1 for n in counts.values() if n > 1),
        first_success=successes[0] if successes else float("nan"),
        caught_up=max((at for at, _ in done), default=last_sent) - last_sent,
        handed_back=worker.log.count("lifeguard: handed task"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=60.0, help="tasks per second")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="no TLS")
    args = parser.parse_args()

    from lifeguard.demo.redis import find_redis

    embedded, server, db_url = production_like_server(DATABASE, plain=args.plain)
    redis = f"{find_redis()}/13"
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, value text NOT NULL)")
    outcomes: dict[tuple[str, str], list[Outcome]] = {}
    configs: list[tuple[str, Fault]] = [(mode, fault) for fault in FAULTS for mode in MODES]
    try:
        for round_no in range(args.runs):
            shift = round_no % len(configs)
            for mode, fault in [*configs[shift:], *configs[:shift]]:
                got = one_run(
                    embedded=embedded,
                    server=server,
                    db_url=db_url,
                    redis=redis,
                    mode=mode,
                    fault=fault,
                    rate=args.rate,
                )
                outcomes.setdefault((mode, fault.label), []).append(got)
                print(f"round {round_no + 1}: {mode:<9} {fault.label:<10} {got}", file=sys.stderr)
    finally:
        embedded.destroy()

    def median(mode: str, fault: Fault, pick: Callable[[Outcome], float]) -> float:
        return statistics.median(pick(o) for o in outcomes[(mode, fault.label)])

    tls = "TLS + scram-sha-256" if server.tls else "plaintext + scram-sha-256"
    print(
        f"\nprefork -c 2, {args.rate:.0f} tasks/s, PostgreSQL over {tls}, "
        f"median of {args.runs} runs\n"
    )
    print(
        "| fault | configuration | tasks | failed | lost | duplicated | handed back "
        "| next success (s) | caught up (s) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for fault in FAULTS:
        count = int(args.rate * (fault.lead + fault.tail))
        for mode in MODES:
            label = "stock Celery" if mode == "stock" else "**lifeguard**"
            failed = median(mode, fault, lambda o: o.failed)
            print(
                f"| {fault.label} | {label} | {count} | {failed:.0f}"
                f" | {median(mode, fault, lambda o: o.lost):.0f}"
                f" | {median(mode, fault, lambda o: o.duplicated):.0f}"
                f" | {median(mode, fault, lambda o: o.handed_back):.0f}"
                f" | {median(mode, fault, lambda o: o.first_success):.1f}"
                f" | {median(mode, fault, lambda o: o.caught_up):.1f} |"
            )
    print()
    for fault in FAULTS:
        stock = median("stock", fault, lambda o: o.failed)
        lg = median("lifeguard", fault, lambda o: o.failed)
        count = int(args.rate * (fault.lead + fault.tail))
        print(
            f"{fault.label}: failed {stock:.0f} -> {lg:.0f} of {count} "
            f"({100 * stock / count:.1f}% -> {100 * lg / count:.1f}%); next success after "
            f"the server is back: {median('stock', fault, lambda o: o.first_success):.1f}s "
            f"stock, {median('lifeguard', fault, lambda o: o.first_success):.1f}s lifeguard"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
