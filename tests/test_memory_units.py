"""The memory watchdog's pure logic, in this process: options, slope, attribution."""

from __future__ import annotations

import mmap
import os

import pytest
from celery import Celery

from lifeguard import ConfigurationError, PoolKind, TaskOutcome, TaskRun, WorkerInfo
from lifeguard.concerns.memory import (
    MemoryWatchdog,
    RssReader,
    SlopeWindow,
    TaskMemory,
    top_growers,
)
from lifeguard.guard import Lifeguard
from lifeguard.options import Options

MIB = 1024 * 1024


# --- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * MIB),
        ("512m", 512 * MIB),
        ("1.5GiB", 3 * 512 * MIB),
        ("2GB", 2_000_000_000),
        (" 300 MB ", 300_000_000),
        (64 * MIB, 64 * MIB),
        (None, None),
        ("none", None),
    ],
)
def test_memory_limit_accepts_sizes_with_units(text, size):
    assert Options.resolve({"memory_limit": text}).memory_limit == size


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("lots", "must be a size such as '512MiB'"),
        ("512", "integers are bytes. Give a unit, e.g. '512MiB'"),
        (512000, "integers are bytes"),  # Celery's max_memory_per_child is in KiB
        ("12 parsecs", "units: B, KiB, MiB, GiB"),
        (True, "must be a size"),
    ],
)
def test_memory_limit_mistakes_say_what_to_write(value, hint):
    with pytest.raises(ConfigurationError, match=hint.replace(".", r"\.").replace("(", r"\(")):
        Options.resolve({"memory_limit": value})


def test_slope_limit_may_be_small_but_not_unitless_bytes():
    assert Options.resolve({"memory_slope_limit": "256KiB"}).memory_slope_limit == 256 * 1024
    with pytest.raises(ConfigurationError, match="Give a unit"):
        Options.resolve({"memory_slope_limit": 256})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("memory_slope_window", 0),
        ("memory_slope_window", "many"),
        ("memory_leak_sites_every", -1),
        ("recycle_exit_code", 256),
    ],
)
def test_counts_and_exit_status_are_checked(name, value):
    with pytest.raises(ConfigurationError, match=name):
        Options.resolve({name: value})


def test_options_from_configuration_strings():
    options = Options.resolve(
        {},
        {"memory_slope_window": "20", "memory_leak_sites_every": "none", "memory": "off"},
    )
    assert options.memory_slope_window == 20
    assert options.memory_leak_sites_every is None
    assert options.memory is False


# --- slope and figures -----------------------------------------------------------------


def test_slope_is_the_least_squares_fit_of_the_last_tasks():
    window = SlopeWindow(size=4)
    assert window.slope() is None
    for task, rss in enumerate([100, 100, 100, 100, 200, 300, 400, 500], start=1):
        window.add(task, rss)
    assert len(window) == 4
    assert window.slope() == pytest.approx(100.0)  # only tasks 5-8 count


def test_slope_stays_exact_for_a_long_lived_process():
    window = SlopeWindow(size=3)
    base = 10**9
    for task in range(10_000_000, 10_000_010):
        window.add(task, base + 4096 * task)
    assert window.slope() == 4096.0


def test_top_growers_ranks_by_growth_and_gives_shares():
    by_task = {
        "a": TaskMemory(runs=4, measured=4, growth=3 * MIB),
        "b": TaskMemory(runs=4, measured=4, growth=1 * MIB),
        "c": TaskMemory(runs=4, measured=4, growth=-2 * MIB),
    }
    assert top_growers(by_task) == "a +3.0 MiB (75%) in 4 runs, b +1.0 MiB (25%) in 4 runs"
    assert by_task["a"].as_dict(4 * MIB)["share"] == 0.75
    assert top_growers({}, unattributed=3) == (
        "nothing measured alone (3 tasks overlapped others and are not counted)"
    )


def test_rss_reader_sees_memory_this_process_touches():
    reader = RssReader.open()
    assert reader is not None
    try:
        before = reader.read()
        kept = b"\x01" * (20 * MIB)
        assert reader.read() - before > 18 * MIB
        del kept
    finally:
        reader.close()


# --- attribution under concurrent pools --------------------------------------------------


def _watchdog(pool: PoolKind, **options) -> MemoryWatchdog:
    guard = Lifeguard(Celery("units"), options)
    watchdog = guard.hook(MemoryWatchdog)
    worker = WorkerInfo(hostname="units@host", pool=pool, concurrency=2, main_pid=os.getpid())
    guard.lifecycle.worker = worker
    guard.configure()
    watchdog.on_worker_start(worker)
    watchdog.on_process_start(worker, forked=False)
    return watchdog


def _run(name: str) -> TaskRun:
    return TaskRun(id=name, name=name, unit=None)


def test_threads_credit_a_delta_only_to_a_task_that_ran_alone():
    watchdog = _watchdog(PoolKind.THREADS)
    done = TaskOutcome(state="SUCCESS")
    a, b, c = _run("a"), _run("b"), _run("c")
    watchdog.before_task(a)
    watchdog.before_task(b)  # overlaps a
    watchdog.after_task(a, done)
    watchdog.after_task(b, done)
    watchdog.before_task(c)  # alone
    # Pages of a fresh mapping, touched: malloc could hand back memory earlier tests
    # freed, which would not grow the RSS.
    kept = mmap.mmap(-1, 4 * MIB)
    for offset in range(0, 4 * MIB, mmap.PAGESIZE):
        kept[offset] = 1
    watchdog.after_task(c, done)

    assert watchdog.by_task["a"].measured == watchdog.by_task["b"].measured == 0
    assert watchdog.by_task["c"].measured == 1
    assert watchdog.by_task["c"].growth > 3 * MIB
    assert watchdog.unattributed == 2
    assert watchdog.stats()["unattributed_tasks"] == 2  # type: ignore[index]
    kept.close()
    watchdog.on_process_stop(watchdog.guard.lifecycle.worker)  # type: ignore[arg-type]


def test_limits_need_the_watchdog():
    with pytest.raises(ConfigurationError, match="memory=False"):
        _watchdog(PoolKind.PREFORK, memory=False, memory_limit="1GiB")


def test_recycle_needs_preparing_at_worker_start():
    guard = Lifeguard(Celery("units"), {})
    with pytest.raises(RuntimeError, match="prepare_recycling"):
        guard.lifecycle.request_recycle("memory_limit")


class StandInWorker:
    """What lifeguard reads from Celery's WorkController at worker_init."""

    def __init__(self, app: Celery, pool_cls: str) -> None:
        self.app = app
        self.pool_cls = pool_cls
        self.hostname = "units@host"
        self.concurrency = 5


def test_celery_memory_limit_on_a_pool_that_ignores_it_is_announced(caplog):
    from celery import signals

    app = Celery("units")
    app.conf.worker_max_memory_per_child = 200_000
    guard = Lifeguard(app, {"django": False})
    guard.lifecycle.connect()
    try:
        signals.worker_init.send(sender=StandInWorker(app, pool_cls="gevent"))
        with caplog.at_level("WARNING", logger="lifeguard.memory"):
            signals.worker_ready.send(sender=None)
    finally:
        guard.lifecycle.disconnect()
        guard.hook(MemoryWatchdog).on_process_stop(guard.lifecycle.worker)
    assert "worker_max_memory_per_child is ignored by the gevent pool" in caplog.text
