"""Scenario: a user runs `lifeguard demo` in a fresh virtual environment, no services given.

The demo must start its own PostgreSQL (here from the pgserver wheel, as on a machine
without PostgreSQL; on Python 3.13, which pgserver has no wheel for, from the binaries
scripts/test lends it or the system's) and Redis, run every scenario on real workers, and
stop them.
"""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

from lifeguard.demo.postgres import find_binaries

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
        [str(fresh_env / "bin" / "lifeguard"), "demo", "--tasks", "100"],
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
    report = (tmp_path / "lifeguard-demo.html").read_text()
    assert 'id="lifeguard-data"' in report and "RSS per task process" in report
