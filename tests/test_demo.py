"""Scenario: a user runs `lifeguard demo` in a fresh virtual environment, no services given.

The demo must start its own PostgreSQL (here from the pgserver wheel, as on a machine
without PostgreSQL; on Python 3.13, which pgserver has no wheel for, from the binaries
scripts/test lends it or the system's) and Redis, run every scenario on real workers, and
stop them. Its output must show each phase as it goes (not on a terminal here), and its
report, opened in headless Chromium, must show what each side measured: stock Celery a
session per task, the interrupted query running on and memory growing without recycle;
lifeguard none of it, no task failed after a fault, and its recycles. The slow scenario
of the suite (about two minutes).
"""

from __future__ import annotations

import os
import re
import subprocess
import venv
from pathlib import Path
from typing import Any

import pytest

from lifeguard.demo.postgres import find_binaries
from tests.validate_support import chromium, chromium_run, data_block, png_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with `pip install celery-lifeguard[demo]` from this checkout."""
    env_dir = tmp_path_factory.mktemp("demo-venv")
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    installed = subprocess.run(
        [
            str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
            "-c", str(ROOT / "constraints" / "newest.txt"), f"{ROOT}[demo]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-4000:]
    return env_dir


def test_demo_runs_to_the_end_with_no_services_given(fresh_env: Path, tmp_path: Path) -> None:
    found = subprocess.run(
        [
            str(fresh_env / "bin" / "python"),
            "-c",
            "import pathlib, pgserver; "
            "print(pathlib.Path(pgserver.__file__).parent / 'pginstall' / 'bin')",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # No pgserver wheel for this Python (3.13): the binaries the demo itself would find.
    pgserver_bin = found.stdout.strip() if found.returncode == 0 else str(find_binaries())
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFEGUARD_")}
    env.update(LIFEGUARD_PG_BIN=pgserver_bin, COLUMNS="200", HOME=str(tmp_path))
    env["PATH"] = f"{fresh_env / 'bin'}:{env.get('PATH', '')}"

    result = subprocess.run(
        [str(fresh_env / "bin" / "lifeguard"), "demo", "--tasks", "100", "--seconds", "22"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for scenario in (
        "100 one-query tasks",
        "soft time limit mid-query",
        "leaves a transaction open",
        "MiB per run",
        "which worker holds a backend",
    ):
        assert scenario in output
    assert "FAILED" not in output
    assert "127.0.0.1:5432" not in output  # its own server, not the machine's
    lines = result.stdout.splitlines()
    # Not on a terminal: plain lines from the start, each phase as it starts and ends.
    assert lines[0].startswith("[  0.") and "starting an embedded PostgreSQL" in lines[0]
    assert any(re.search(r"soft time limit mid-query, lifeguard: done in", x) for x in lines)
    assert any("report run, stock Celery: end" in line for line in lines)
    written = [line.split("report: ", 1)[1] for line in lines if line.startswith("report: ")]
    assert len(written) == 1, output[-3000:]
    report = Path(written[0])
    # The default location: lifeguard-reports/ in the current directory (git ignores it).
    assert report.parent == tmp_path / "lifeguard-reports" and report.suffix == ".html"
    assert "lifeguard-reports/" in (ROOT / ".gitignore").read_text().splitlines()
    _check_report(report, tmp_path)


def _criteria(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in record["criteria"]}


def _number(detail: str, pattern: str) -> float:
    found = re.search(pattern, detail)
    assert found, (pattern, detail)
    return float(found.group(1))


def _check_report(report: Path, workdir: Path) -> None:
    """The page in headless Chromium: it renders, and what it says is what was measured."""
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    dumped = chromium_run(report, workdir, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    assert 'id="summary"' in dom and dom.count('<svg class="chart"') == 8  # 4 charts x 2
    stock, guarded = data_block(dom)["records"]
    assert (stock["title"], guarded["title"]) == ("stock Celery", "lifeguard")
    assert (stock["verdict"], guarded["verdict"]) == ("fail", "pass")
    # Labels read from the workers themselves: lifeguard's answer, the real concurrency.
    assert stock["parameters"]["lifeguard"].startswith("not installed")
    assert guarded["parameters"]["lifeguard"].startswith("installed")
    for record in (stock, guarded):
        assert record["parameters"]["worker"].startswith("prefork, concurrency 2")
        charts = {chart["id"]: chart for chart in record["charts"]}
        assert set(charts) == {"sessions", "connections", "throughput", "rss"}
        faults = [m for m in charts["throughput"]["markers"] if m["kind"] == "fault"]
        assert [m["label"] for m in faults][:2] == [
            "soft time limit mid-query",
            "a task leaves a transaction open",
        ]
        labels = [series["label"] for series in charts["rss"]["series"]]
        assert len(labels) == len(set(labels))  # one legend line per child
    s, g = _criteria(stock), _criteria(guarded)
    # Stock Celery: a session per task, the interrupted query runs on, memory grows.
    per_task = _number(s["sessions_per_task"]["detail"], r"\(([\d.]+) per task\)")
    assert per_task >= 0.8 and s["sessions_per_task"]["status"] == "fail"
    assert s["query_cancelled"]["status"] == "fail"
    assert s["memory_growth"]["status"] == "fail"
    assert "; 0 recycle(s)" in s["memory_growth"]["detail"]
    stock_failed = [
        point[1]
        for series in {c["id"]: c for c in stock["charts"]}["throughput"]["series"]
        if series["label"] == "failed"
        for point in series["points"]
    ]
    assert sum(stock_failed) >= 1  # the failures are drawn, not only counted
    # lifeguard: none of it, and its recycles.
    assert _number(g["sessions_per_task"]["detail"], r"\(([\d.]+) per task\)") <= 0.1
    assert g["query_cancelled"]["status"] == "pass"
    failed_after = {k: c for k, c in g.items() if k.startswith("failed_after_")}
    assert "failed_after_soft_time_limit" in failed_after
    assert all(c["status"] == "pass" for c in failed_after.values()), failed_after
    assert _number(g["memory_growth"]["detail"], r"; (\d+) recycle") >= 1
    guarded_rss = {c["id"]: c for c in guarded["charts"]}["rss"]
    assert any(m["kind"] == "recycle" for m in guarded_rss["markers"])
    # What a reader sees: the summary in numbers at the top, and a screenshot to keep.
    assert "new database sessions" in dom and "children recycled" in dom
    shot = workdir / "lifeguard-demo-report.png"
    taken = chromium_run(report, workdir, f"--screenshot={shot}", "--window-size=1280,3000")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    assert png_size(shot) == (1280, 3000)
    print(f"demo report screenshot: {shot}")
