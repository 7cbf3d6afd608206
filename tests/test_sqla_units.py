"""Pure logic of the SQLAlchemy and async-task integration, without a worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from celery import Celery
from sqlalchemy import create_engine

import lifeguard
from lifeguard.concerns.sqlalchemy import _application_name_given
from lifeguard.errors import ConfigurationError, LifeguardError
from lifeguard.options import Options
from lifeguard.postgres.conninfo import describe_sqlalchemy_url
from lifeguard.postgres.pgbouncer import transaction_mode_connect_args


@pytest.fixture
def guard() -> Iterator[lifeguard.Lifeguard]:
    app = Celery("units")
    guard = lifeguard.install(app)
    yield guard
    guard.event_loop.close()
    guard.lifecycle.disconnect()


def test_pgbouncer_profile_per_driver() -> None:
    assert transaction_mode_connect_args("asyncpg") == {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
    }
    assert transaction_mode_connect_args("psycopg") == {"prepare_threshold": None}
    assert transaction_mode_connect_args("psycopg_async") == {"prepare_threshold": None}
    assert transaction_mode_connect_args("psycopg2") == {}
    assert Options.resolve({}, {"pgbouncer_transaction_mode": "yes"}).pgbouncer_transaction_mode
    with pytest.raises(ConfigurationError, match="true or false"):
        Options.resolve({"pgbouncer_transaction_mode": "sometimes"})


@pytest.mark.parametrize(
    ("cargs", "cparams", "given"),
    [
        ((), {"host": "db"}, False),
        ((), {"application_name": "mine"}, True),
        ((), {"server_settings": {"application_name": "mine"}}, True),
        ((), {"dsn": "host=db application_name=mine"}, True),
        (("host=db application_name=mine",), {}, True),
        ((), {"server_settings": {"jit": "off"}}, False),
    ],
)
def test_application_name_set_by_the_user(cargs, cparams, given, monkeypatch) -> None:
    monkeypatch.delenv("PGAPPNAME", raising=False)
    assert _application_name_given(cargs, cparams) is given


def test_pgappname_counts_as_set(monkeypatch) -> None:
    monkeypatch.setenv("PGAPPNAME", "mine")
    assert _application_name_given((), {})


def test_engine_urls_are_logged_without_password() -> None:
    engine = create_engine("postgresql+psycopg://app:s3cret@db:5432/prod")
    assert describe_sqlalchemy_url(engine.url) == "postgresql+psycopg://app:***@db:5432/prod"


def test_add_engine_accepts_engines_and_factories(guard: lifeguard.Lifeguard) -> None:
    engine = create_engine("postgresql+psycopg://app@db/prod")
    assert guard.add_engine(engine) is engine
    assert guard.add_engine(engine) is engine  # registering twice is harmless
    built: list[object] = []

    def make() -> object:
        built.append(create_engine("postgresql+psycopg://app@db/other"))
        return built[-1]

    lazy = guard.add_engine(make)
    assert built == []
    assert lazy() is lazy() is built[0]
    assert [m.label for m in guard.sqlalchemy.engines] == [
        "postgresql+psycopg://app@db/prod",
        "postgresql+psycopg://app@db/other",
    ]
    with pytest.raises(ConfigurationError, match="Engine, an AsyncEngine"):
        guard.add_engine("postgresql://app@db/prod")
    with pytest.raises(ConfigurationError, match="expected a SQLAlchemy Engine or AsyncEngine"):
        guard.add_engine(lambda: "not an engine")()


def test_async_task_outside_a_worker(guard: lifeguard.Lifeguard) -> None:
    """Eager and direct calls run the coroutine on the process's loop thread."""

    @lifeguard.async_task(guard.app, bind=True, shared=False)  # not on other tests' apps
    async def add(self, a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    assert add.apply((2, 3)).get() == 5
    assert add(1, 1) == 2
    assert guard.stats()["event_loop"] == {"mode": "thread", "running": True}


def test_run_async_refuses_a_running_loop(guard: lifeguard.Lifeguard) -> None:
    async def nested() -> None:
        guard.run_async(asyncio.sleep(0))

    with pytest.raises(LifeguardError, match="inside a running event loop"):
        asyncio.run(nested())


def test_async_task_needs_lifeguard() -> None:
    app = Celery("no-lifeguard")

    @app.task(base=lifeguard.AsyncTask, shared=False)
    async def t() -> int:
        return 1

    with pytest.raises(LifeguardError, match=r"lifeguard.install\(app\)"):
        t()
