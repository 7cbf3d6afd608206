"""No password in anything lifeguard prints (issue 11, item 3).

libpq itself is the oracle of what a password IS: ``psycopg.conninfo.conninfo_to_dict``
calls ``PQconninfoParse``. lifeguard's parser must read every string as libpq does, and
no output may hold the password, in any spelling, whatever the URL: good, unreachable,
malformed, or misread by libpq (a raw ``@`` or ``/`` in the password).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL

from lifeguard.cli import main
from lifeguard.demo.postgres import PostgresServer
from lifeguard.errors import ConfigurationError
from lifeguard.monitor.report import Monitor
from lifeguard.monitor.target import from_url, one_line_error
from lifeguard.monitor.thresholds import Thresholds
from lifeguard.postgres.conninfo import (
    ConninfoError,
    ambiguous_userinfo,
    broker_error,
    describe_sqlalchemy_url,
    error_line,
    libpq_url,
    parse_conninfo,
    redact_text,
    redact_url,
    secrets_of,
)
from lifeguard.report import render_html
from lifeguard.report.record import RunRecord
from lifeguard.validate.load import TaskCall
from lifeguard.validate.run import Settings, Validation

UNKNOWN = 3
ROOT = Path(__file__).resolve().parent.parent


def spellings(secret: str) -> list[str]:
    """Every way a password could show up in output."""
    return [secret, quote(secret, safe=""), quote(secret), json.dumps(secret)[1:-1]]


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        for spelling in spellings(secret):
            assert spelling not in text, f"{spelling!r} shown in: {text}"


# --- the parser against libpq ---------------------------------------------------------

# (connection string, the password, text that must still be shown)
ACCEPTED = [
    ("postgresql://app:Zq9Secret#x@db/prod", "Zq9Secret#x", ["app", "@db/prod"]),
    ("postgresql://app:Zq9?Secr#et@db:6432/prod", "Zq9?Secr#et", ["app:", "@db:6432/prod"]),
    ("postgresql://app:pass?x=WoSecret@db/prod", "pass?x=WoSecret", ["app:", "@db/prod"]),
    ("postgres://app:s%2Fe%40c%23r%3Fet@db/prod", "s/e@c#r?et", ["@db/prod"]),
    ("postgresql://app:pw%20with%20blanks@db/prod", "pw with blanks", ["@db/prod"]),
    (
        "postgresql://app:h0st-list-pw@h1:5432,h2:5433,[::1]:5434/prod?sslmode=disable",
        "h0st-list-pw",
        ["@h1:5432,h2:5433,[::1]:5434/prod?sslmode=disable"],
    ),
    ("postgresql://app:v6pass-word@[2001:db8::7]:5433/prod", "v6pass-word", ["[2001:db8::7]"]),
    ("postgresql://app@db/prod?password=query-secret&sslmode=disable", "query-secret", ["@db"]),
    ("postgresql://app@db/prod?pass%77ord=encoded-key-pw", "encoded-key-pw", ["@db/prod"]),
    ("postgresql://db/prod?password=q%26uery%3Dpw", "q&uery=pw", ["db/prod"]),
    (
        "postgresql://app:at-in-app@db/prod?application_name=worker@web-1",
        "at-in-app",
        ["@db/prod", "application_name=worker@web-1"],
    ),
    ("postgresql://app: trimmed-pw @db/prod", "trimmed-pw", ["@db/prod"]),
    ("host=db user=app password=plainpw1 dbname=prod", "plainpw1", ["host=db", "dbname=prod"]),
    ("host=db password = 'a b\\' c#?/@' dbname=prod", "a b' c#?/@", ["host=db", "dbname=prod"]),
    ("host=db password=esc\\ aped\\'pw dbname=prod", "esc aped'pw", ["host=db", "dbname=prod"]),
    ("host=db\tpassword\n=\t'tab bed' port=5433", "tab bed", ["host=db", "port=5433"]),
    ("dbname='postgresql://app:nested-pw@db/prod' host=x", "nested-pw", ["host=x", "@db/prod"]),
]


@pytest.mark.parametrize(("conninfo", "password", "shown"), ACCEPTED)
def test_parser_reads_as_libpq_and_redaction_hides_the_password(
    conninfo: str, password: str, shown: list[str]
) -> None:
    """Same options as PQconninfoParse; the password libpq uses is gone, the rest stays."""
    libpq = conninfo_to_dict(conninfo)
    assert parse_conninfo(conninfo) == libpq
    if "password" in libpq:
        assert libpq["password"] == password
    redacted = redact_url(conninfo)
    assert_hidden(redacted, password)
    for part in shown:
        assert part in redacted, redacted
    assert password in secrets_of(conninfo)


# Strings libpq refuses: the refusal names no value, the display hides every secret.
REFUSED = [
    ("postgresql://app:Ipv6Secret@[::1:5432/prod", "Ipv6Secret"),
    ("postgresql://app:Ipv6Secret@[]:5432/prod", "Ipv6Secret"),
    ("postgresql://app:Ipv6Secret@[::1]x/prod", "Ipv6Secret"),
    ("postgresql://app:bad%zzSecret@db/prod", "bad%zzSecret"),
    ("postgresql://app:nul%00Secret@db/prod", "nul%00Secret"),
    ("postgresql://app:raw blank@db/prod", "raw blank"),
    ("postgresql://app@db/prod?password=a&bSecret&sslmode=disable", "a&bSecret"),
    ("postgresql://app@db/prod?password=a=bSecret", "a=bSecret"),
    ("host=db password='unterminatedSecret", "unterminatedSecret"),
    ("host=db passwordSecret9", "passwordSecret9"),
]


@pytest.mark.parametrize(("conninfo", "password"), REFUSED)
def test_strings_libpq_refuses_are_refused_without_the_password(
    conninfo: str, password: str
) -> None:
    with pytest.raises(psycopg.ProgrammingError):
        conninfo_to_dict(conninfo)
    with pytest.raises(ConninfoError) as refused:
        parse_conninfo(conninfo)
    assert_hidden(str(refused.value), password, password[3:])
    assert_hidden(redact_url(conninfo), password, password[3:])
    with pytest.raises(ConfigurationError) as configured:
        from_url(conninfo, "--database-url")
    assert_hidden(str(configured.value), password, password[3:])


def test_percent_escapes_that_are_not_utf8_are_refused() -> None:
    """psycopg fails on them with a UnicodeDecodeError (a traceback); lifeguard says why."""
    url = "postgresql://app:pw%ffSecret@db/prod"
    with pytest.raises(UnicodeDecodeError):
        conninfo_to_dict(url)
    with pytest.raises(ConninfoError, match="not UTF-8"):
        parse_conninfo(url)
    assert redact_url(url) == "postgresql://app:***@db/prod"


# A raw '/' or '@' in the password: libpq reads part of it as a host, port, database or
# query (and so shows it in its error messages), or refuses the URL with the piece in
# the message. (url, libpq accepts it, pieces of the password)
MISREAD = [
    ("postgresql://app:Zq9/Secret@db/prod", True, ["Zq9", "Secret"]),
    ("postgresql://app:pa@ssWord@db/prod", True, ["pa@ssWord", "ssWord"]),
    ("postgresql://app:pass/Wo?rd@db/prod", False, ["pass", "Wo", "rd"]),
    ("postgresql://app:pa/ss?x=WoSecret@db/prod", False, ["pa", "ss", "WoSecret"]),
    ("postgresql://app:a/b?sslmode=WoSecret@db/prod", True, ["WoSecret"]),
]


@pytest.mark.parametrize(("url", "accepted", "pieces"), MISREAD)
def test_urls_libpq_misreads_are_refused_and_masked(
    url: str, accepted: bool, pieces: list[str]
) -> None:
    """lifeguard refuses such a URL and shows none of its user info."""
    if accepted:
        assert conninfo_to_dict(url).get("password") != url.split(":")[2].rpartition("@")[0]
    else:
        with pytest.raises(psycopg.ProgrammingError):
            conninfo_to_dict(url)
    with pytest.raises(ConninfoError, match="percent-encode"):
        parse_conninfo(url)
    redacted = redact_url(url)
    assert_hidden(redacted, *pieces)
    assert redacted == "postgresql://***@db/prod"
    for piece in pieces:
        assert piece in secrets_of(url)


def test_broker_urls_use_the_same_userinfo_rule() -> None:
    assert redact_url("redis://:Bro#ker?pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("amqp://guest:gu/e@st@rabbit:5672//") == "amqp://***@rabbit:5672//"
    assert redact_url("rediss://u:p%40ss@cache/1?ssl_cert_reqs=none") == (
        "rediss://u:***@cache/1?ssl_cert_reqs=none"
    )
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"


def test_redact_text_scrubs_known_secrets_in_any_spelling_and_any_url() -> None:
    """A driver or server message: the password raw, percent-encoded, quoted for libpq,
    and any connection string in it."""
    secret = "Zq9 'se/c#r?et"
    message = (
        f'invalid dsn: "postgresql://app:{quote(secret, safe="")}@db/prod" '
        f"password='{secret.replace(chr(39), chr(92) + chr(39))}' raw {secret} "
        "host=db sslpassword=keypw123 postgresql://x:other-pw@h/d"
    )
    text = redact_text(message, secret)
    assert_hidden(text, secret, "keypw123", "other-pw")
    assert "@db/prod" in text and "host=db" in text
    assert redact_text("a b c", "a") == "a b c"  # too short to tell from a word


def test_error_line_masks_pgpassword_and_the_password_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq may take the password from the environment: it is masked too."""
    passfile = tmp_path / "pgpass"
    passfile.write_text("db:5432:*:app:file\\:Secret\n# comment\n")
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    monkeypatch.setenv("PGPASSWORD", "EnvSecret9")
    exc = psycopg.OperationalError("echo EnvSecret9 and file:Secret and UrlSecret")
    line = error_line(exc, "postgresql://app:UrlSecret@db/prod")
    assert_hidden(line, "EnvSecret9", "file:Secret", "UrlSecret")
    assert line == "echo *** and *** and ***"


def test_one_line_error_of_a_target_built_from_a_password_with_hash() -> None:
    target = from_url("postgresql://app:Zq9Secret#x@db/prod", "--database-url")
    assert target.where == "postgresql://app:***@db/prod"
    exc = psycopg.OperationalError('FATAL:  bad "Zq9Secret#x"\n  in Zq9Secret%23x')
    assert one_line_error(exc, target) == 'FATAL: bad "***" in ***'


def test_sqlalchemy_urls_are_described_from_their_parts_and_given_to_libpq_exactly() -> None:
    """SQLAlchemy renders blanks in passwords unquoted (libpq 17+ refuses them): the
    description and the libpq URL are built from the parts."""
    password = "#?/@ '%+:Secret"
    url = URL.create(
        "postgresql+psycopg",
        username="app",
        password=password,
        host="db",
        port=5433,
        database="prod",
        query={"sslmode": "disable", "prepared_statement_cache_size": "0"},
    )
    assert describe_sqlalchemy_url(url) == (
        "postgresql+psycopg://app:***@db:5433/prod?sslmode=disable&prepared_statement_cache_size=0"
    )
    assert conninfo_to_dict(libpq_url(url)) == {
        "user": "app",
        "password": password,
        "host": "db",
        "port": "5433",
        "dbname": "prod",
        "sslmode": "disable",
    }
    assert_hidden(describe_sqlalchemy_url(str(url)), password)


class _App:
    class conf:
        broker_url = "redis://:Bro#kerSecret@cache:6379/0"
        result_backend = "redis://:Back/endSecret@cache:6379/1"


def test_broker_errors_hide_the_broker_passwords() -> None:
    exc = OSError("cannot reach redis://:Bro#kerSecret@cache:6379/0 (Back/endSecret)")
    assert_hidden(broker_error(exc, _App()), "Bro#kerSecret", "Back/endSecret", "endSecret")


def test_validate_report_database_fields_hide_the_password() -> None:
    """``lifeguard validate`` shows the database in its parameters (HTML and JSON)
    and in the summary; both come from the same target description."""
    password = "Zq9Secret#x?/y"
    target = from_url(f"postgresql://app:{quote(password, safe='#?')}@db/prod", "--database-url")
    validation = Validation(
        app=None,
        monitor=Monitor(target, "lifeguard", Thresholds()),
        settings=Settings(call=TaskCall("proj.tasks.add")),
        app_name="proj",
    )
    parameters = validation.parameters()
    assert parameters["database"] == "postgresql://app:***@db/prod"
    record = RunRecord(title="validate", started_at=0.0, parameters=parameters)
    assert_hidden(render_html(record), password, "Zq9Secret")
    assert_hidden(json.dumps(record.to_json()), password, "Zq9Secret")


# --- every command, in-process, whatever the password -----------------------------------

PRINTABLE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1)


def _invoke(*args: str) -> Any:
    env = {"LIFEGUARD_DATABASE_URL": None, "PGPASSWORD": None, "PGPASSFILE": None}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=True)


def _outputs(url: str) -> Iterator[tuple[str, int, str]]:
    """(command, exit status, everything it printed) of each command given ``url``."""
    commands = [
        ["check", "--no-state"],
        ["check", "--no-state", "--json"],
        ["monitor", "--count", "1"],
        ["monitor", "--count", "1", "--json"],
        ["doctor", "-A", "tests.doctor_apps.clean"],
        ["doctor", "-A", "tests.doctor_apps.clean", "--json"],
    ]
    for command in commands:
        result = _invoke(*command, "--database-url", url, "--connect-timeout", "2")
        text = result.output + (repr(result.exception) if result.exception else "")
        if result.exc_info and not isinstance(result.exc_info[1], SystemExit):
            import traceback

            text += "Traceback " + "".join(traceback.format_exception(*result.exc_info))
        yield " ".join(command), result.exit_code, text


def result_json(text: str) -> str:
    """The JSON report of ``check --json``: the output up to the exit's repr."""
    return text[: text.rindex("}") + 1]


def _url(shape: str, user: str, password: str, pg: PostgresServer, closed: int) -> str:
    encoded = quote(password, safe="")
    return {
        "good": f"postgresql://{user}:{encoded}@{pg.host}:{pg.port}/postgres",
        "unreachable": f"postgresql://{user}:{encoded}@127.0.0.1:{closed}/postgres",
        "ipv6": f"postgresql://{user}:{encoded}@[::1:{closed}/postgres",
        "percent": f"postgresql://{user}:{encoded}%zz@127.0.0.1:{closed}/postgres",
        "raw-slash": f"postgresql://{user}:{password[:5]}/{password[5:]}@127.0.0.1:{closed}/db",
        "raw-at": f"postgresql://{user}:{password[:5]}@{password[5:]}@127.0.0.1:{closed}/db",
        "keywords": f"host=127.0.0.1 port={closed} user={user} password='"
        + password.replace("\\", "\\\\").replace("'", "\\'")
        + "'",
    }[shape]


@pytest.fixture(scope="module")
def closed_port() -> int:
    """Port 1 of 127.0.0.1: nobody listens there (a free port may be taken meanwhile by
    a server of another test)."""
    return 1


@settings(
    max_examples=int(os.environ.get("LIFEGUARD_SECRETS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    middle=PRINTABLE,
    shape=st.sampled_from(
        ["good", "unreachable", "ipv6", "percent", "raw-slash", "raw-at", "keywords", "raw"]
    ),
)
def test_no_command_prints_the_password(
    pg: PostgresServer, closed_port: int, middle: str, shape: str
) -> None:
    """Any printable password, each way to write it, through check, monitor and doctor:
    never shown; an unreachable or malformed URL exits 3 without a traceback."""
    head, tail = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    password = f"Q{head}{middle}{tail}Z"
    user = pg.admin_user
    if shape == "raw":
        url = f"postgresql://{user}:{password}@127.0.0.1:{closed_port}/postgres"
        try:
            accepted = conninfo_to_dict(url).get("password") == password
        except (psycopg.ProgrammingError, UnicodeDecodeError):  # '%ff' is no UTF-8
            accepted = False
        if not accepted:  # libpq reads it otherwise: the refusal path is the one to check
            shape = "raw-at"
        else:
            assert parse_conninfo(url)["password"] == password
    if shape != "raw":
        url = _url(shape, user, password, pg, closed_port)
    for command, status, text in _outputs(url):
        for piece in (password, head, tail):
            assert_hidden(text, piece)
        assert "Traceback" not in text, f"{command}: {text}"
        if shape != "good":
            assert status == UNKNOWN, f"{command} exited {status}: {text}"
        elif command == "check --no-state --json":  # it connected and reported
            assert json.loads(result_json(text))["database"]["name"] == "postgres", text


# --- the real CLI, a real role, a real server message -------------------------------------


def _lifeguard(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LIFEGUARD_DATABASE_URL",)}
    return subprocess.run(
        [sys.executable, "-c", "from lifeguard.cli import main; main()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:Zq9Secret#x@127.0.0.1:{port}/prod",
        "postgresql://app:Zq9Secret#x@[::1:{port}/prod",
        "postgresql://app:Zq9/Secret#x@127.0.0.1:{port}/prod",
        "host=127.0.0.1 port={port} user=app password='Zq9 Secret#x'",
    ],
)
def test_the_real_cli_never_shows_the_reported_passwords(url: str, closed_port: int) -> None:
    """The URLs of the report, through the installed entry point: exit 3, one clear line."""
    url = url.format(port=closed_port)
    commands = (
        ["check", "--no-state"],
        ["check", "--no-state", "--json"],
        ["monitor", "--count", "1"],
    )
    for command in commands:
        result = _lifeguard(*command, "--database-url", url)
        output = result.stdout + result.stderr
        assert result.returncode == UNKNOWN, output
        assert "Traceback" not in output
        assert_hidden(output, "Zq9Secret#x", "Zq9 Secret#x", "Secret#x", "Zq9")


@pytest.fixture
def weird_role(pg: PostgresServer) -> Iterator[tuple[str, str]]:
    """A login role whose password holds every character URLs and keyword strings use."""
    name = f"lgsec_{uuid.uuid4().hex[:8]}"
    password = f"Pw{uuid.uuid4().hex[:8]}#?/@ '\\:%&=x"
    with pg.admin() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
    try:
        yield name, password
    finally:
        with pg.admin() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_a_real_role_with_a_weird_password(pg: PostgresServer, weird_role: tuple[str, str]) -> None:
    """The good URL connects (the local server trusts), commands report, the password
    is nowhere; a wrong database name is echoed by the server, the password is not."""
    name, password = weird_role
    good = f"postgresql://{name}:{quote(password, safe='')}@{pg.host}:{pg.port}/postgres"
    keywords = (
        f"host={pg.host} port={pg.port} user={name} dbname=postgres password='"
        + password.replace("\\", "\\\\").replace("'", "\\'")
        + "'"
    )
    assert conninfo_to_dict(good)["password"] == password == parse_conninfo(keywords)["password"]
    for url in (good, keywords):
        result = _lifeguard("check", "--no-state", "--json", "--database-url", url)
        # UNKNOWN too when the role may not see other roles' sessions; but it connected:
        report = json.loads(result.stdout)
        assert report["database"]["role"] == name, result.stdout + result.stderr
        assert_hidden(result.stdout + result.stderr, password, password[:10])
        doctor = _lifeguard("doctor", "-A", "tests.doctor_apps.clean", "--database-url", url)
        assert "Traceback" not in doctor.stderr
        assert_hidden(doctor.stdout + doctor.stderr, password, password[:10])

    missing = f"nodb_{uuid.uuid4().hex[:8]}"
    wrong = good.replace("/postgres", f"/{missing}")
    for command in (["check", "--no-state"], ["monitor", "--count", "1", "--json"]):
        result = _lifeguard(*command, "--database-url", wrong)
        output = result.stdout + result.stderr
        assert result.returncode == UNKNOWN, output
        assert missing in output  # the server's message is shown...
        assert_hidden(output, password, password[:10])  # ...without the password


def test_doctor_reads_host_port_and_database_as_libpq_does() -> None:
    """The doctor matches the server it read to the app's connections by endpoint, and
    asks PgBouncer's console about the target's database: both from libpq's reading
    (urlsplit saw no host in a URL whose password holds '#')."""
    from lifeguard.doctor.server import _console_target, _target_dbname, target_endpoint

    target = from_url("postgresql://app:Zq9Secret#x@DB:6432,h2:6433/prod", "--database-url")
    assert target_endpoint(target) == "db:6432"
    assert _target_dbname(target) == "prod"
    console = _console_target(target)
    assert console.keywords["dbname"] == "pgbouncer" and console.where == target.where


PIECE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


@settings(max_examples=int(os.environ.get("LIFEGUARD_PARSER_EXAMPLES", "300")), deadline=None)
@given(user=PIECE, password=PIECE, hosts=PIECE, dbname=PIECE, query=PIECE)
def test_any_url_is_read_as_libpq_reads_it(
    user: str, password: str, hosts: str, dbname: str, query: str
) -> None:
    """Random printable parts: lifeguard's reading is libpq's, except that it refuses
    what libpq would misread; never is libpq's password shown."""
    url = f"postgresql://{user}:{password}@{hosts}/{dbname}?{query}"
    try:
        libpq: dict[str, str] | None = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        libpq, reason = None, str(exc)
    except UnicodeDecodeError:
        libpq, reason = None, "not UTF-8"
    try:
        mine: dict[str, str] | None = parse_conninfo(url)
    except ConninfoError:
        mine = None
    if mine is None and libpq is not None:
        assert ambiguous_userinfo(url), url
    elif mine is not None and libpq is None:
        assert "invalid URI query parameter" in reason, (url, reason)  # names left to libpq
    else:
        assert mine == libpq, url
    secret = (libpq or {}).get("password", "")
    if len(secret) >= 4 and secret not in "postgresql://":
        shown = redact_url(url).replace(f"//{user}:", "//", 1)
        assert secret not in shown.replace(hosts, "").replace(dbname, ""), url


@settings(max_examples=int(os.environ.get("LIFEGUARD_PARSER_EXAMPLES", "300")), deadline=None)
@given(password=PRINTABLE, tail=PIECE)
def test_any_keyword_string_is_read_as_libpq_reads_it(password: str, tail: str) -> None:
    """A quoted password with anything in it, then random text: libpq's reading, and
    the password (quoted or not) never shown."""
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    conninfo = f"host=db password = {quoted} {tail}"
    try:
        libpq: dict[str, str] | None = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        libpq, reason = None, str(exc)
    try:
        mine: dict[str, str] | None = parse_conninfo(conninfo)
    except ConninfoError:
        mine = None
    if mine is not None and libpq is None:
        assert "invalid connection option" in reason, (conninfo, reason)
    else:
        assert mine == libpq, conninfo
    shown = redact_url(conninfo).replace(tail, "")
    if len(password) >= 4 and password not in "host=db password = ":
        assert password not in shown, conninfo
