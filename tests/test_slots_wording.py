"""``lifeguard check`` and ``lifeguard doctor`` say "slots exhausted", with figures.

On a private server with few slots: refused a slot (the role's CONNECTION LIMIT, the
slots ordinary roles may use) both commands still exit 3 (could not run) but say which
limit was hit instead of only "cannot connect"; let in (a superuser through the
reserved slots, or the last session the role may open) they report the condition as
critical with max_connections, the reserved slots, the role's rolconnlimit and the
backends now.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from lifeguard.demo.postgres import PostgresServer
from tests.doctor_support import CRITICAL, UNKNOWN, doctor
from tests.monitor_support import lifeguard
from tests.support import few_slots_server

MAX_CONNECTIONS = 6
RESERVED = 2


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with few_slots_server(MAX_CONNECTIONS, RESERVED) as server:
        with server.admin() as conn:
            conn.execute("CREATE ROLE plain LOGIN")
            conn.execute("CREATE ROLE one LOGIN CONNECTION LIMIT 1")
            conn.execute("CREATE ROLE two LOGIN CONNECTION LIMIT 2")
            conn.execute("GRANT pg_read_all_stats TO plain, one, two")
        yield server


def _hold(server: PostgresServer, user: str, n: int) -> list[Any]:
    return [psycopg.connect(**server.connect_kwargs("postgres", user=user)) for _ in range(n)]


@pytest.fixture
def held(server: PostgresServer) -> Iterator[list[Any]]:
    sessions: list[Any] = []
    yield sessions
    for conn in sessions:
        conn.close()


def check(url: str) -> tuple[int, str, dict[str, Any]]:
    text = lifeguard("check", "--no-state", "--database-url", url)
    data = lifeguard("check", "--no-state", "--json", "--database-url", url)
    assert "Traceback" not in text.stderr + data.stderr
    return text.returncode, text.stdout, json.loads(data.stdout)


def test_refused_by_the_roles_connection_limit(server: PostgresServer, held: list[Any]):
    held += _hold(server, "one", 1)
    url = server.url("postgres", user="one")

    code, out, data = check(url)
    assert code == UNKNOWN == data["exit_code"]
    assert out.startswith(
        "LIFEGUARD UNKNOWN - slots exhausted: the role is at its CONNECTION LIMIT"
    ), out
    assert 'too many connections for role "one"' in out
    assert data["error"].startswith("slots exhausted: the role is at its CONNECTION LIMIT")

    run = doctor("clean", "--database-url", url)
    assert run.exit_code == UNKNOWN
    reason = run.report["context"]["database"]["reason"]
    assert reason.startswith("slots exhausted: the role is at its CONNECTION LIMIT"), reason


def test_refused_by_the_reserved_slots(server: PostgresServer, held: list[Any]):
    held += _hold(server, "plain", MAX_CONNECTIONS - RESERVED)
    url = server.url("postgres", user="plain")

    code, out, _ = check(url)
    assert code == UNKNOWN
    assert out.startswith(
        "LIFEGUARD UNKNOWN - slots exhausted: every slot ordinary roles may use is taken"
    ), out
    text = doctor("clean", "--database-url", url, as_json=False)
    assert text.exit_code == UNKNOWN
    assert "slots exhausted: every slot ordinary roles may use is taken" in text.flat


def test_a_superuser_in_a_reserved_slot_reports_the_server_full(
    server: PostgresServer, held: list[Any]
):
    held += _hold(server, "plain", MAX_CONNECTIONS - RESERVED)
    url = server.url("postgres")  # the superuser: a reserved slot lets it in

    code, out, data = check(url)
    usable = MAX_CONNECTIONS - RESERVED
    expected = (
        f"slots exhausted: {usable + 1} backends fill the {usable} slots ordinary roles may "
        f"use (max_connections {MAX_CONNECTIONS} minus superuser_reserved_connections "
        f"{RESERVED}); only superusers get in"
    )
    assert code == CRITICAL, out
    assert expected in out, out
    assert any(f["check"] == "slots" and f["summary"] == expected for f in data["findings"]), data

    run = doctor("clean", "--database-url", url)
    finding = run.only("LG021")
    assert finding["severity"] == "critical"
    assert finding["title"].startswith(f"slots exhausted: {usable + 1} backends fill the")
    assert finding["evidence"]["max_connections"] == MAX_CONNECTIONS
    assert finding["evidence"]["superuser_reserved_connections"] == RESERVED


def test_the_last_session_a_role_may_open_reports_the_role_full(
    server: PostgresServer, held: list[Any]
):
    held += _hold(server, "two", 1)
    url = server.url("postgres", user="two")  # the second and last session of "two"

    code, out, _ = check(url)
    assert code == CRITICAL, out
    assert (
        'slots exhausted: role "two" is at its CONNECTION LIMIT: 2 sessions of rolconnlimit 2'
        in out
    )
    run = doctor("clean", "--database-url", url)
    finding = run.only("LG021")
    assert finding["evidence"]["role_connection_limit"] == 2
    assert finding["evidence"]["role_backends"] == 2


def test_room_left_reports_no_slot_condition(server: PostgresServer, held: list[Any]):
    """The control: the same roles with slots to spare get no such finding."""
    held += _hold(server, "plain", 1)
    _, out, data = check(server.url("postgres", user="two"))
    assert "slots exhausted" not in out
    assert all(f["check"] != "slots" for f in data["findings"])
    assert "LG021" not in doctor("clean", "--database-url", server.url("postgres")).ids
