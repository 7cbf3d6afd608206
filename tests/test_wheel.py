"""Scenario: a user installs the published wheel, not this checkout.

`python -m build` makes the sdist and, from it, the wheel; the wheel is installed into
fresh virtualenvs, bare and with each extra. An editable checkout hides packaging
mistakes (a module left out of the wheel, an optional dependency imported at the top of a
module every command loads, a test helper shipped in the wheel): these catch them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from lifeguard.demo.postgres import PostgresServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints" / "newest.txt"

# Modules that need an optional extra, with the extra and the package they import. Every
# other module in the wheel must import with no extra installed.
NEEDS_EXTRA = {
    "lifeguard.contrib.django.apps": ("django", "django"),
    "lifeguard.contrib.django.checks": ("django", "django"),
    "lifeguard.contrib.django.migrations.0001_initial": ("django", "django"),
    "lifeguard.contrib.django.migrations.0002_effects": ("django", "django"),
    "lifeguard.demo.project.tasks": ("demo", "django"),
    # The pytest plugin's package imports pytest (its worker runs where pytest is).
    "lifeguard.pytest": ("pytest", "pytest"),
    "lifeguard.pytest.recorder": ("pytest", "pytest"),
    "lifeguard.pytest.worker": ("pytest", "pytest"),
    "lifeguard.pytest.worker_app": ("pytest", "pytest"),
}

IMPORT_ALL = """
import importlib, json, sys
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(failed))
"""


def run(
    *command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel built from this checkout, as a release would be."""
    out = tmp_path_factory.mktemp("dist")
    built = run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
    assert len(list(out.glob("*.tar.gz"))) == 1
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    wheels = list(dist.glob("celery_lifeguard-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def wheel_modules(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".py")]
    return sorted(n[: -len(".py")].replace("/", ".").removesuffix(".__init__") for n in names)


@pytest.fixture(scope="module")
def install(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """install(extras) -> a fresh venv holding the wheel (with those extras), not the checkout.

    The venv has no pip of its own (faster): this interpreter's pip installs into it.
    Dependencies come from the index (or pip's cache) under the newest stack's pins.
    """
    made: dict[str, Path] = {}

    def make(extras: str) -> Path:
        if extras not in made:
            env = tmp_path_factory.mktemp("wheel-venv")
            created = run(sys.executable, "-m", "venv", "--without-pip", env)
            assert created.returncode == 0, created.stderr
            requirement = f"{wheel}[{extras}]" if extras else str(wheel)
            installed = run(
                sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install",
                "-q", "--disable-pip-version-check", "-c", CONSTRAINTS, requirement,
            )  # fmt: skip
            assert installed.returncode == 0, installed.stderr[-4000:]
            made[extras] = env
        return made[extras]

    return make


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point the venv back at the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LIFEGUARD_", "DJANGO_", "VIRTUAL_ENV", "PYTHON"))
    }
    env.update(extra)
    return env


def test_wheel_holds_the_package_and_no_test_or_benchmark_harness(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "lifeguard/cli/__init__.py" in names and "lifeguard/py.typed" in names
    outside = [n for n in names if not n.startswith(("lifeguard/", "celery_lifeguard-"))]
    assert outside == []
    leaked = [n for n in names if any(w in n for w in ("tests/", "benchmarks/", "harness"))]
    assert leaked == []
    assert not [n for n in names if Path(n).name in ("conftest.py", "support.py")]


def test_bare_install_runs_the_cli_and_imports_every_module(
    wheel: Path, install: Callable[[str], Path], tmp_path: Path
) -> None:
    env = install("")
    python = env / "bin" / "python"
    helped = run(env / "bin" / "lifeguard", "--help", cwd=tmp_path, env=clean_env())
    assert helped.returncode == 0, helped.stderr
    for command in ("monitor", "check", "doctor", "validate", "demo"):
        assert command in helped.stdout

    # The installed copy, not the checkout, is what gets imported.
    where = run(python, "-c", "import lifeguard; print(lifeguard.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(env)), where.stdout + where.stderr

    modules = wheel_modules(wheel)
    assert set(NEEDS_EXTRA) <= set(modules), "NEEDS_EXTRA names a module the wheel lacks"
    imported = run(python, "-c", IMPORT_ALL, *modules, cwd=tmp_path, env=clean_env())
    assert imported.returncode == 0, imported.stderr
    failed: dict[str, str] = json.loads(imported.stdout.strip().splitlines()[-1])
    assert set(failed) == set(NEEDS_EXTRA), failed
    for module, (_extra, package) in NEEDS_EXTRA.items():
        assert failed[module] == f"ModuleNotFoundError: No module named '{package}'"


def test_pytest_extra_registers_the_plugin(install: Callable[[str], Path], tmp_path: Path) -> None:
    """With the extra, pytest finds the plugin by its entry point: no -p needed."""
    env = install("pytest")
    helped = run(env / "bin" / "python", "-m", "pytest", "--help", cwd=tmp_path, env=clean_env())
    assert helped.returncode == 0, helped.stderr
    assert "--lifeguard" in helped.stdout and "lifeguard_celery_app" in helped.stdout
    listed = run(
        env / "bin" / "python", "-m", "pytest", "--co", "-p", "lifeguard.pytest",
        cwd=tmp_path, env=clean_env(),
    )  # fmt: skip
    assert "already registered" not in listed.stdout + listed.stderr  # -p and entry point


SAMPLE_APPS = {
    "django,psycopg": """
import django
from django.conf import settings

settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "postgres",
                           "HOST": HOST, "PORT": PORT, "USER": USER}},
    INSTALLED_APPS=["lifeguard.contrib.django"],
    USE_TZ=True,
)
django.setup()
""",
    "sqlalchemy,psycopg2": """
from sqlalchemy import create_engine

engine = create_engine(f"postgresql+psycopg2://{USER}@{HOST}:{PORT}/postgres")
""",
    "asyncpg": """
import asyncpg  # noqa: F401
""",
    "prometheus": """
import prometheus_client  # noqa: F401
""",
}


DBAPI_DRIVER = {"django,psycopg", "sqlalchemy,psycopg2"}  # the extras that hold one


@pytest.mark.parametrize("extras", list(SAMPLE_APPS))
def test_install_with_extra_runs_doctor_on_a_sample_app(
    extras: str, install: Callable[[str], Path], pg: PostgresServer, tmp_path: Path
) -> None:
    env = install(extras)
    options = '"300MiB", metrics_port=9999' if extras == "prometheus" else '"300MiB"'
    (tmp_path / "sample.py").write_text(
        f"HOST, PORT, USER = {pg.host!r}, {pg.port!r}, {pg.admin_user!r}\n"
        + SAMPLE_APPS[extras]
        + f"""
from celery import Celery

import lifeguard

app = Celery("sample", broker="memory://")
app.conf.worker_prefetch_multiplier = 1
guard = lifeguard.install(app, memory_growth_limit={options})
"""
        + ("guard.add_engine(engine)\n" if "sqlalchemy" in extras else "")
        + """

@app.task(time_limit=600, soft_time_limit=540)
def export(batch: int) -> int:
    return batch
"""
    )
    lifeguard = env / "bin" / "lifeguard"
    helped = run(lifeguard, "--help", cwd=tmp_path, env=clean_env())
    assert helped.returncode == 0, helped.stderr

    def doctor(*database: str) -> tuple[int, str]:
        done = run(
            lifeguard, "doctor", "-A", "sample:app", *database,
            cwd=tmp_path, env=clean_env(PYTHONPATH=str(tmp_path), COLUMNS="200"),
        )  # fmt: skip
        output = done.stdout + done.stderr
        assert "Traceback" not in output, output[-4000:]
        if pg.admin_password:
            assert pg.admin_password not in output
        return done.returncode, output

    code, output = doctor("--database-url", pg.url("postgres"))
    if extras in DBAPI_DRIVER:
        assert code in (0, 1, 2), output[-4000:]  # 3: could not run
        assert "usable connection slots" in output, output[-4000:]  # the server was read
    else:
        # The server is read through psycopg 3 or psycopg2 only: the doctor says which
        # extra to install and that it could not run; without the server it does run.
        assert code == 3, output[-4000:]
        assert "pip install 'celery-lifeguard[psycopg]'" in output, output
        code, output = doctor("--no-database")
        assert code in (0, 1, 2), output[-4000:]
