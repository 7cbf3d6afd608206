"""Pure logic: options, names, redaction, counters. No servers needed."""

from __future__ import annotations

import pytest

from lifeguard.errors import ConfigurationError
from lifeguard.hooks import OutcomeKind, PoolKind, TaskOutcome
from lifeguard.options import Options, options_from_conf
from lifeguard.postgres.appname import application_name, parse_application_name
from lifeguard.postgres.conninfo import describe_django_database, redact_url
from lifeguard.stats import Stats


def test_application_name_fits_63_bytes_keeping_prefix_and_pid():
    name = application_name("lifeguard", "h" * 100, 4194304)
    assert len(name.encode()) == 63
    assert name.startswith("lifeguard:hhh") and name.endswith(":4194304")
    parsed = parse_application_name(name, "lifeguard")
    assert parsed is not None and parsed.pid == 4194304
    # The monitor joins a backend to a worker by rebuilding the name from (host, pid):
    # a shortened host still matches its own worker, never a host it is a prefix of.
    assert application_name("lifeguard", "h" * 100, 4194304) == name
    assert application_name("lifeguard", "h" * 10, 4194304) != name


def test_application_name_is_printable_ascii():
    assert application_name("lg", "hôte:1", 7) == "lg:h?te_1:7"


@pytest.mark.parametrize("value", [None, "", "other:host:1", "lifeguard:host:x", "lifeguard"])
def test_foreign_application_names_are_not_ours(value):
    assert parse_application_name(value, "lifeguard") is None


def test_options_from_arguments_and_conf():
    options = Options.resolve({"cancel_timeout": 2}, {"ping_after_idle": "none", "django": "yes"})
    assert options.cancel_timeout == 2.0
    assert options.ping_after_idle is None
    assert options.django is True


def test_arguments_win_over_conf():
    assert Options.resolve({"ping_after_idle": 1}, {"ping_after_idle": 9}).ping_after_idle == 1


def test_unknown_option_names_the_closest():
    with pytest.raises(ConfigurationError, match="Did you mean 'ping_after_idle'"):
        Options.resolve({"ping_afer_idle": 1})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("cancel_timeout", -1, "must not be negative"),
        ("cancel_timeout", "soon", "number of seconds"),
        ("django", "perhaps", "true or false"),
        ("application_name_prefix", "a:b", "must not contain ':'"),
    ],
)
def test_bad_values_say_what_to_change(name, value, message):
    with pytest.raises(ConfigurationError, match=message):
        Options.resolve({name: value})


def test_conf_keys_with_and_without_namespace():
    conf = {"CELERY_LIFEGUARD_PING_AFTER_IDLE": 5, "lifeguard_cancel_timeout": 1, "other": 2}
    assert options_from_conf(conf, "CELERY") == {"ping_after_idle": 5, "cancel_timeout": 1}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        (
            "postgresql+psycopg://u@h/db?password=secret&x=1",
            "postgresql+psycopg://u@h/db?password=***&x=1",
        ),
        ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password='se cret' dbname=d", "host=h password=*** dbname=d"),
    ],
)
def test_passwords_are_masked(url, expected):
    assert redact_url(url) == expected


def test_django_database_description_has_no_password():
    text = describe_django_database(
        "default", {"USER": "u", "PASSWORD": "pw", "HOST": "h", "NAME": "d"}
    )
    assert "pw" not in text and text == "default (u@h/d)"


def test_counters_per_process_and_task():
    stats = Stats()
    stats.incr("connections_discarded", task="t", reason="interrupted")
    stats.incr("connections_reused", task="t")
    stats.incr("connections_reused")
    snapshot = stats.snapshot()
    assert snapshot["process"] == {
        "connections_discarded": {"interrupted": 1},
        "connections_reused": 2,
    }
    assert snapshot["tasks"]["t"]["connections_reused"] == 1
    stats.reset()
    assert stats.snapshot()["process"] == {}


@pytest.mark.parametrize(
    ("pool_cls", "kind"),
    [
        ("prefork", PoolKind.PREFORK),
        ("threads", PoolKind.THREADS),
        ("gevent", PoolKind.GEVENT),
        ("solo", PoolKind.SOLO),
        ("celery.concurrency.prefork:TaskPool", PoolKind.PREFORK),
        ("custom.pool:Pool", PoolKind.OTHER),
    ],
)
def test_pool_kinds(pool_cls, kind):
    assert PoolKind.from_pool_cls(pool_cls) is kind


def test_outcome_kinds():
    from celery.exceptions import SoftTimeLimitExceeded

    assert TaskOutcome("FAILURE", SoftTimeLimitExceeded()).kind is OutcomeKind.SOFT_TIME_LIMIT
    assert TaskOutcome("SUCCESS").kind is OutcomeKind.SUCCESS
    assert TaskOutcome("RETRY").kind is OutcomeKind.RETRY


def test_core_imports_without_the_optional_dependencies():
    """Django, SQLAlchemy, the drivers and prometheus_client are extras, never required."""
    import subprocess
    import sys

    script = """
import sys
class Block:
    blocked = ("django", "sqlalchemy", "psycopg", "psycopg2", "psycopg_pool", "asyncpg",
               "prometheus_client", "gevent", "psutil")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
from celery import Celery
import lifeguard
guard = lifeguard.install(Celery("core-only"), memory_growth_limit="300MiB")
print(sorted(guard.options.describe())[:2], guard.stats()["process"])
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "{}" in result.stdout


def test_singleton_database_url_is_described_without_its_password() -> None:
    options = Options.resolve({}, {"singleton_database_url": "postgresql://app:s3cret@db/app"})
    assert options.singleton_database_url == "postgresql://app:s3cret@db/app"
    assert "s3cret" not in str(options.describe())


def test_singleton_lock_statement_names_its_key_for_the_monitor() -> None:
    """Whatever the key holds, the label cannot close its SQL comment, and reads back."""
    from lifeguard.postgres import once_sql

    key = 'tenant:*/ DROP TABLE x; --%s"ü'
    statement = once_sql.labelled(once_sql.TRY_LOCK, key, "proj.tasks.sync")
    assert statement.count("*/") == 1 and statement.endswith("*/")
    shown = statement.replace("%%", "%")  # what the server sees once %s is bound
    assert once_sql.lock_label(shown) == (key, "proj.tasks.sync")
    assert once_sql.lock_label("SELECT 1") is None


def test_a_long_singleton_key_is_cut_to_what_the_monitor_reads() -> None:
    from lifeguard.postgres import once_sql

    statement = once_sql.labelled(once_sql.LOCK, "k" * 500, "proj.tasks." + "t" * 100)
    shown = statement.replace("%s", "-9223372036854775808")
    assert len(shown) <= once_sql.LABEL_STATEMENT_CHARS
    label = once_sql.lock_label(shown)
    assert label is not None and label[0].startswith("kkkk")


def test_result_store_is_wrapped_only_for_backends_a_hook_watches() -> None:
    """Under gevent Celery makes a result backend per greenlet: one that no hook has work
    for (the Django concern only watches django-celery-results) is left as it is, and a
    hook added later that watches every backend gets it wrapped."""
    from celery import Celery

    from lifeguard.guard import Lifeguard
    from lifeguard.hooks import Hook, TaskRun

    app = Celery("units-store", backend="cache+memory://", set_as_current=False)

    @app.task(name="units.store", shared=False)
    def store() -> None: ...

    task = app.tasks["units.store"]
    guard = Lifeguard(app, {})
    guard.lifecycle._watch_result_store(task)
    assert "mark_as_done" not in vars(task.backend)

    seen: list[str] = []

    class WatchesEvery(Hook):
        def before_result_stored(self, run: TaskRun, backend: object) -> None:
            seen.append(run.id)

    guard.add_hook(WatchesEvery())
    guard.lifecycle._watch_result_store(task)
    assert "mark_as_done" in vars(task.backend)
