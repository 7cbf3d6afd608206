"""The parts of ``lifeguard validate`` and of the run report on their own: /proc readings
of this machine's processes, which backends are the workers', the criteria's arithmetic,
the charts and the page."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from lifeguard import procfs
from lifeguard.hooks import PoolKind
from lifeguard.monitor.report import Monitor
from lifeguard.monitor.target import from_url
from lifeguard.monitor.thresholds import Thresholds
from lifeguard.report import (
    FAIL,
    NOT_APPLICABLE,
    PASS,
    UNIT_BYTES,
    Chart,
    Criterion,
    Marker,
    Phase,
    RunRecord,
    Series,
    Table,
    render_html,
    write_html,
)
from lifeguard.report.svg import chart_svg, format_time, nice_ticks, time_ticks
from lifeguard.validate import criteria
from lifeguard.validate.load import Outcomes
from lifeguard.validate.sampler import UNATTRIBUTED, Sample, Sampler, recycles
from lifeguard.validate.workers import ProcessSampler, TaskProcess, WorkerNode
from tests.support import Database
from tests.validate_support import data_block

MIB = 1024 * 1024
HOST = socket.gethostname()


# --- /proc ------------------------------------------------------------------------------


def test_proc_reads_rss_children_and_parent_of_real_processes():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        assert child.pid in procfs.child_pids(os.getpid())
        assert procfs.parent_pid(child.pid) == os.getpid()
        rss = procfs.process_rss(child.pid)
        assert rss is not None and 1 * MIB < rss < 200 * MIB
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert procfs.process_rss(child.pid) is None
    assert not procfs.exists(child.pid)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_tcp_endpoints_name_the_process_holding_each_connection(family: int):
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    try:
        server = socket.socket(family)
        server.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} on this machine")
    server.listen()
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    try:
        address, port = client.getsockname()[:2]
        found = procfs.tcp_endpoints_of([os.getpid()])
        assert found[(procfs.normalise_address(address), port)] == os.getpid()
        assert procfs.tcp_endpoints_of([]) == {}
    finally:
        for sock in (accepted, client, server):
            sock.close()


def test_endpoint_spellings():
    assert procfs.normalise_address("::ffff:10.1.2.3") == "10.1.2.3"
    assert procfs.normalise_address("::1") == "::1"
    address, port = procfs.parse_endpoint(
        "00000000000000000000000001000000:1F90"
        if sys.byteorder == "little"
        else "00000000000000000000000000000001:1F90"
    )
    assert (address, port) == ("::1", 8080)


# --- which backends are the workers' -----------------------------------------------------


@pytest.fixture
def connect(test_db: Database) -> Iterator[Any]:
    opened: list[psycopg.Connection[Any]] = []

    def open_one(name: str) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            **test_db.server.connect_kwargs(test_db.name), application_name=name, autocommit=True
        )
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        conn.close()


def sampler_for(test_db: Database, prefix: str, nodes: list[WorkerNode]) -> Sampler:
    monitor = Monitor(from_url(test_db.url, "test"), prefix, Thresholds())
    start = time.monotonic()
    return Sampler(
        monitor, ProcessSampler(None, [], 1.0), nodes, lambda: time.monotonic() - start, 1.0
    )


def test_backends_are_the_workers_when_named_or_opened_during_the_run(
    test_db: Database, prefix: str, connect
):
    connect("other-client")  # there before the run: not the workers'
    sampler = sampler_for(test_db, prefix, nodes=[])
    first, _ = sampler.take()
    assert first.workers == 0
    connect(f"{prefix}:web-1:4242")  # named by lifeguard: that process
    connect("")  # opened during the run by someone unknown
    sample, _ = sampler.take()
    sampler.monitor.close()

    assert sample.by_process == {"web-1:4242": {"idle": 1}, UNATTRIBUTED: {"idle": 1}}
    assert sample.workers == 2
    assert sample.by_state["idle"] >= 3  # every client backend, the monitor's own excluded


def test_local_worker_connections_are_attributed_by_their_socket(
    test_db: Database, prefix: str, connect
):
    """This test process plays a worker of this machine: its unnamed connection, opened
    before the run, is still attributed to it through its TCP socket."""
    if test_db.server.connect_kwargs(test_db.name).get("host", "").startswith("/"):
        pytest.skip("the test server is reached over a Unix socket")
    me = WorkerNode(f"me@{HOST}", os.getpid(), PoolKind.SOLO, 1, lifeguard=False, local=True)
    connect("no name")
    sampler = sampler_for(test_db, prefix, nodes=[me])
    sample, _ = sampler.take()
    sampler.monitor.close()
    assert sample.by_process == {f"{HOST}:{os.getpid()}": {"idle": 1}}


def test_a_process_gone_between_samples_is_a_recycle():
    def sample(t: float, *pids: int) -> Sample:
        return Sample(t, processes=tuple(TaskProcess("w@h", pid, None) for pid in pids))

    found = recycles(
        [sample(0, 1, 2), sample(1, 1, 2), Sample(2), sample(3, 1, 3), sample(4, 4, 3)]
    )
    assert [(r.t, r.pid, r.replaced_by) for r in found] == [(3, 2, (3,)), (4, 1, (4,))]


# --- criteria ------------------------------------------------------------------------------


def at(t: float, idle: int = 0, held: dict[str, dict[str, int]] | None = None) -> Sample:
    held = held or {}
    workers: Counter[str] = Counter()
    for states in held.values():
        workers.update(states)
    return Sample(t, {"idle": idle}, dict(workers), held)


def test_idle_back_to_baseline_allows_ten_percent_more():
    assert criteria.idle_back_to_baseline(at(0, 20), at(9, 22)).status == PASS
    over = criteria.idle_back_to_baseline(at(0, 20), at(9, 23, {"h:1": {"idle": 3}}))
    assert over.status == FAIL
    assert over.limit == pytest.approx(22.0)
    assert "held by h:1 (3)" in over.detail
    assert criteria.idle_back_to_baseline(at(0, 0), at(9, 1)).status == FAIL
    assert criteria.idle_back_to_baseline(at(0, 5), at(9, 2)).status == PASS  # fewer: fine


def test_idle_in_transaction_and_peak_name_the_processes():
    stuck = at(9, held={"h:1": {"idle in transaction": 1}, "h:2": {"idle": 1}})
    criterion = criteria.no_idle_in_transaction(stuck)
    assert (criterion.status, criterion.measured) == (FAIL, 1)
    assert "h:1 (1)" in criterion.detail and "h:2" not in criterion.detail

    samples = [
        at(0, held={"h:1": {"idle": 1}}),
        at(1, held={"h:1": {"idle": 5}}),
        Sample(2, error="x"),
    ]
    peak = criteria.peak_within_budget(samples, 2, "2 x 1")
    assert (peak.status, peak.measured, peak.limit) == (FAIL, 5, 2)
    assert "at 1.0s" in peak.detail
    assert criteria.peak_within_budget(samples, 5, "").status == PASS
    assert criteria.peak_within_budget([Sample(0, error="x")], 5, "").status == NOT_APPLICABLE


def test_every_task_succeeded_says_what_failed():
    outcomes = Outcomes(sent=10, succeeded=7, failed=2, errors=Counter({"OperationalError: x": 2}))
    criterion = criteria.every_task_succeeded(outcomes)
    assert criterion.status == FAIL
    assert criterion.detail == (
        "7 of 10 tasks succeeded, 2 failed (OperationalError: x x2), 1 did not finish in time"
    )


def rss_samples(
    growth_per_s: dict[int, float], seconds: float = 8, step: float = 0.25
) -> list[Sample]:
    """Samples of processes whose RSS grows linearly (bytes per second)."""
    return [
        Sample(
            i * step,
            processes=tuple(
                TaskProcess("w@h", pid, int(50 * MIB + rate * i * step))
                for pid, rate in growth_per_s.items()
            ),
        )
        for i in range(int(seconds / step) + 1)
    ]


def test_memory_slope_fails_the_process_that_keeps_growing():
    samples = rss_samples({1: 0.0, 2: MIB / 6})  # 10 MiB per minute
    criterion, slopes = criteria.memory_slope(Phase("soak", 0, 8), samples, 5 * MIB)
    assert criterion.status == FAIL
    assert "h:2 grew 10.0 MiB/min, 10.0 MiB/min, 10.0 MiB/min" in criterion.detail
    assert "h:1" not in criterion.detail
    assert [s.keeps_growing(5 * MIB) for s in slopes] == [False, True]
    passing, _ = criteria.memory_slope(Phase("soak", 0, 8), samples, 20 * MIB)
    assert passing.status == PASS


def test_growth_only_in_the_first_window_is_warm_up():
    samples = rss_samples({1: 0.0})
    for i, sample in enumerate(samples[:8]):  # +20 MiB over the first two seconds
        samples[i] = Sample(
            sample.t, processes=(TaskProcess("w@h", 1, int(30 * MIB + i * 2.5 * MIB)),)
        )
    criterion, slopes = criteria.memory_slope(Phase("soak", 0, 8), samples, 5 * MIB)
    assert criterion.status == PASS
    assert slopes[0].windows[0] is not None and slopes[0].windows[0] > 5 * MIB


def test_memory_slope_needs_enough_samples_and_readable_rss():
    short, _ = criteria.memory_slope(Phase("soak", 0, 1), rss_samples({1: MIB}, 1), MIB)
    assert short.status == NOT_APPLICABLE and "too short" in short.detail
    blind = [Sample(i / 4, processes=(TaskProcess("w@h", 1, None),)) for i in range(33)]
    unknown, _ = criteria.memory_slope(Phase("soak", 0, 8), blind, MIB, "remote")
    assert (unknown.status, unknown.detail) == (NOT_APPLICABLE, "remote")


def test_least_squares_slope():
    assert criteria.least_squares_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert criteria.least_squares_slope([(1, 1), (1, 2)]) is None
    assert criteria.least_squares_slope([(1, 1)]) is None


# --- the report ------------------------------------------------------------------------------


def test_ticks_are_round_and_cover_the_data():
    assert nice_ticks(9.4) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0.3, min_step=1) == [0, 1]
    assert nice_ticks(130, low=118) == [117.5, 120, 122.5, 125, 127.5, 130]
    assert time_ticks(65) == [0, 10, 20, 30, 40, 50, 60]
    assert time_ticks(3) == [0, 0.5, 1, 1.5, 2, 2.5, 3]
    assert [format_time(t) for t in (5, 90, 600, 630, 7200, 9000)] == [
        "5s",
        "90s",
        "10m",
        "10m30",
        "2h",
        "2h30",
    ]


def sample_record() -> RunRecord:
    record = RunRecord("validate </script><script>alert(1)</script>", started_at=1.7e9, duration=4)
    record.parameters = {"task": "proj.tasks.<b>bold</b>"}
    record.phases = [Phase("burst", 0, 2), Phase("settle", 2, 4)]
    chart = Chart("rss", "RSS", UNIT_BYTES, zero_based=False)
    chart.series.append(
        Series("h:1", [(0, 50 * MIB), (0.5, 51 * MIB), (1, None), (2, 52 * MIB), (3, 53 * MIB)])
    )
    chart.markers.append(Marker(2.5, "h:1 went away", series="h:1", kind="recycle"))
    connections = Chart("connections", "Connections", "connections", limit=2)
    connections.series += [
        Series("active", [(0, 1), (1, 2)], area=True, color="#16a34a"),
        Series("idle", [(0, 1), (1, 0)], area=True),
        Series("workers", [(0, 2), (1, 2)], dashed=True),
    ]
    record.charts += [chart, connections]
    record.criteria = [
        Criterion("a", "A", PASS, "fine"),
        Criterion("b", "B", FAIL, "not fine", 3, 2),
        Criterion("c", "C", NOT_APPLICABLE, "unknown"),
    ]
    record.tables = [Table("T", ["process", "peak"], [["h:1", "3"]])]
    return record


def test_record_round_trips_through_json():
    record = sample_record()
    assert RunRecord.from_json(record.to_json()) == record
    assert record.verdict == FAIL
    assert RunRecord("empty", 0).verdict == PASS


def test_page_escapes_text_and_keeps_the_data_block_whole(tmp_path):
    record = sample_record()
    html = render_html(record)
    assert "<script>alert" not in html
    assert "<b>bold</b>" not in html
    (parsed,) = data_block(html)["records"]
    assert RunRecord.from_json(parsed) == record
    path = write_html([record, record], tmp_path / "sub" / "report.html", title="two runs")
    assert path.is_absolute() and path.exists()
    assert len(data_block(path.read_text())["records"]) == 2
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_chart_draws_areas_lines_gaps_limit_and_markers():
    record = sample_record()
    rss = chart_svg(record.chart("rss"), record.phases, record.duration)
    assert rss.count('<path class="line"') == 2  # the gap splits the line in two
    assert '<g class="marker recycle">' in rss and "h:1 went away" in rss
    assert ">50<" in rss and ">0<" not in rss  # the memory axis spans the data, not 0
    connections = chart_svg(record.chart("connections"), record.phases, record.duration)
    assert connections.count('<polygon class="area"') == 2
    assert 'class="limit"' in connections and "stroke-dasharray" in connections
    assert ">0.5<" not in connections  # whole connections only
