"""Hiding passwords in anything lifeguard prints or logs.

Connection strings are read the way libpq reads them (``conninfo_uri_parse_options``,
``conninfo_uri_parse_params``, ``conninfo_uri_decode`` and ``conninfo_parse`` in
fe-connect.c), not with :mod:`urllib.parse`: libpq ends the user info of
``postgresql://`` URLs at the first ``@`` before any ``/``, so ``#`` and ``?`` are
ordinary password characters to it, where ``urlsplit`` ends the netloc and shows the
password as a path or query.

Two readings of each string:

- :func:`parse_conninfo` is exact: what libpq will use, or :class:`ConninfoError`
  (a :class:`ConfigurationError` whose message never holds a value of the string).
- :func:`redact_url` is conservative: whatever could be a secret is masked, also in a
  string libpq rejects or reads other than its author meant (a raw ``@`` or ``/`` in
  the password): there everything up to the last ``@`` is user info.

:func:`redact_text` scrubs known secrets (and any connection string) out of free text
such as a driver's error message; :func:`error_line` makes the one line lifeguard
prints for a driver error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import ConfigurationError

MASK = "***"

#: libpq's URI designators (``uri_prefix_length``: case-sensitive).
URI_PREFIXES = ("postgresql://", "postgres://")

# Any scheme://, for broker URLs (redis://, amqp://) and SQLAlchemy's postgresql+driver://.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# Connection strings inside free text: a URL runs to the next blank or quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>]*")
_KEYWORD_IN_TEXT = re.compile(
    r"\b(\w*(?:pass|secret|token)\w*)(\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE
)
# Options libpq treats as secret (dispchar "*"), and what looks like one elsewhere.
_SECRET_KEYS = frozenset(
    ("password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key")
)
_SECRET_WORDS = ("pass", "secret", "token")
#: Shorter known secrets are not scrubbed out of free text: every "ab" would go.
MIN_SECRET_LENGTH = 4
_SPACE = " \t\n\r\f\v"  # C isspace()
#: libpq's connection options (PQconninfoOptions, libpq 18), and the aliases it accepts.
LIBPQ_KEYWORDS = frozenset(
    (  # noqa: SIM905
        "service user password passfile require_auth channel_binding connect_timeout "
        "dbname host hostaddr port client_encoding options application_name "
        "fallback_application_name keepalives keepalives_idle keepalives_interval "
        "keepalives_count tcp_user_timeout sslmode sslnegotiation sslcompression sslcert "
        "sslkey sslkeylogfile sslcertmode sslpassword sslrootcert sslcrl sslcrldir sslsni "
        "requirepeer ssl_min_protocol_version ssl_max_protocol_version "
        "min_protocol_version max_protocol_version gssencmode krbsrvname gsslib "
        "gssdelegation replication target_session_attrs load_balance_hosts "
        "scram_client_key scram_server_key oauth_issuer oauth_client_id "
        "oauth_client_secret oauth_scope requiressl ssl"
    ).split()
)


class ConninfoError(ConfigurationError):
    """A connection string libpq would refuse; the message names no value of it."""


def is_secret_key(key: str) -> bool:
    """Whether a connection option's value must never be shown."""
    key = key.strip().lower()
    return key in _SECRET_KEYS or any(word in key for word in _SECRET_WORDS)


# --- libpq's exact reading ------------------------------------------------------------


def is_uri(text: str) -> bool:
    """libpq reads ``text`` as a URI (else as ``key=value`` pairs)."""
    return text.startswith(URI_PREFIXES)


def parse_conninfo(text: str) -> dict[str, str]:
    """The options libpq reads from a URI or keyword string (``PQconninfoParse``).

    Raises :class:`ConninfoError` where libpq fails to parse, plus for URIs whose user
    info is ambiguous (see :func:`ambiguous_userinfo`). Unknown option names are left to
    libpq, whose list grows with its version.
    """
    if is_uri(text):
        if ambiguous_userinfo(text):
            raise ConninfoError(
                "the URL has an '@' after its user info: libpq ends the user info at the "
                "first '@' before any '/', so the rest of the password would become the "
                "host or database name; percent-encode '@' as %40 and '/' as %2F"
            )
        return _parse_uri(text)
    options: dict[str, str] = {}
    pairs, error, _ = _keyword_pairs(text)
    if error:
        raise ConninfoError(f"invalid connection string: {error}")
    for key, value, _start, _end in pairs:
        _store(options, key, value)
    return options


def ambiguous_userinfo(url: str) -> bool:
    """Whether a raw ``@`` or ``/`` may sit in the URL's password.

    libpq ends the user info at the first ``@`` before any ``/``; another ``@`` after it
    (outside the values of libpq's own query options), or a port that is no number in a
    URL with an ``@``, means part of a password would become a host, port or database
    name, and appear in libpq's error messages. lifeguard refuses such a URL.
    """
    match = _SCHEME.match(url)
    return match is not None and _ambiguous(url[match.end() :])


def _ambiguous(body: str) -> bool:
    at = _libpq_at(body)
    rest = body[at + 1 :] if at is not None else body
    if "@" not in rest:
        return False
    location, _, query = rest.partition("?")
    if "@" in location:
        return True
    for segment in _split_params(query):
        key, equals, value = segment.partition("=")
        if not equals or "=" in value or _loose_decode(key) not in LIBPQ_KEYWORDS:
            return True
    for host in location.split("/", 1)[0].split(","):
        port = host.rsplit("]", 1)[-1].partition(":")[2]
        if port and not port.isdigit():
            return True
    return False


def _libpq_at(body: str) -> int | None:
    """Where libpq's user info ends: the first ``@`` before any ``/``, if any."""
    for i, char in enumerate(body):
        if char == "@":
            return i
        if char == "/":
            return None
    return None


def _decode(text: str, what: str) -> str:
    """``conninfo_uri_decode`` (libpq 17+: blanks around a value are dropped)."""
    out = bytearray()
    i, n = 0, len(text)
    while i < n and text[i] == " ":
        i += 1
    while i < n and text[i] != " ":
        if text[i] != "%":
            out += text[i].encode("utf-8", "surrogateescape")
            i += 1
            continue
        digits = text[i + 1 : i + 3]
        if len(digits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise ConninfoError(f"invalid percent-encoded token in the {what} of the URL")
        value = int(digits, 16)
        if value == 0:
            raise ConninfoError(f"forbidden value %00 in the {what} of the URL")
        out.append(value)
        i += 3
    while i < n and text[i] == " ":
        i += 1
    if i < n:
        raise ConninfoError(
            f"unexpected spaces in the {what} of the URL: percent-encode them as %20"
        )
    try:
        return out.decode("utf-8", "surrogateescape" if "%" not in text else "strict")
    except UnicodeDecodeError:  # libpq takes any byte; psycopg fails on such a string
        raise ConninfoError(
            f"the {what} of the URL percent-decodes to bytes that are not UTF-8"
        ) from None


def _store(options: dict[str, str], key: str, value: str) -> None:
    if key == "requiressl":  # conninfo_storeval's backwards compatibility
        key, value = "sslmode", "require" if value.startswith("1") else "prefer"
    options[key] = value


def _parse_uri(uri: str) -> dict[str, str]:
    """``conninfo_uri_parse_options``, step by step."""
    options: dict[str, str] = {}
    s, n = uri, len(uri)
    start = len(next(prefix for prefix in URI_PREFIXES if uri.startswith(prefix)))

    def at(i: int) -> str:
        return s[i] if i < n else ""

    p = start
    credentials = _libpq_at(s[start:])
    if credentials is not None:
        end = start + credentials
        user, colon, password = s[start:end].partition(":")
        if user:
            options["user"] = _decode(user, "user name")
        if colon and password:
            options["password"] = _decode(password, "password")
        p = end + 1
    hosts, ports = "", ""
    while True:
        if at(p) == "[":
            p += 1
            first = p
            while p < n and s[p] != "]":
                p += 1
            if p >= n:
                raise ConninfoError(
                    "end of string reached when looking for the matching ']' of an IPv6 "
                    "host address in the URL"
                )
            if p == first:
                raise ConninfoError("an IPv6 host address in the URL is empty")
            host = s[first:p]
            p += 1
            if at(p) not in ("", ":", "/", "?", ","):
                raise ConninfoError(
                    "unexpected character after an IPv6 host address in the URL "
                    "(expected ':' or '/')"
                )
        else:
            first = p
            while p < n and s[p] not in ":/?,":
                p += 1
            host = s[first:p]
        terminator = at(p)
        hosts += host
        if terminator == ":":
            p += 1
            first = p
            while p < n and s[p] not in "/?,":
                p += 1
            terminator = at(p)
            ports += s[first:p]
        if terminator != ",":
            break
        p += 1
        hosts += ","
        ports += ","
    if hosts:
        options["host"] = _decode(hosts, "host")
    if ports:
        options["port"] = _decode(ports, "port")
    if terminator and terminator != "?":
        p += 1
        first = p
        while p < n and s[p] != "?":
            p += 1
        terminator = at(p)
        if s[first:p]:
            options["dbname"] = _decode(s[first:p], "database name")
    if terminator:
        _parse_params(s[p + 1 :], options)
    return options


def _parse_params(params: str, options: dict[str, str]) -> None:
    """``conninfo_uri_parse_params``: ``key=value`` pairs joined by ``&``."""
    for segment in _split_params(params):
        if "=" not in segment:
            raise ConninfoError("missing key/value separator '=' in a URL query parameter")
        key, _, value = segment.partition("=")
        if "=" in value:
            raise ConninfoError("extra key/value separator '=' in a URL query parameter")
        key, value = _decode(key, "query"), _decode(value, "query")
        if key == "ssl" and value == "true":  # JDBC compatibility
            key, value = "sslmode", "require"
        _store(options, key, value)


def _split_params(params: str) -> list[str]:
    # libpq stops at the string's end; a trailing '&' ends the last pair.
    segments = params.split("&")
    if segments and segments[-1] == "":
        segments.pop()
    return segments


def _keyword_pairs(text: str) -> tuple[list[tuple[str, str, int, int]], str | None, int]:
    """``conninfo_parse``: (key, value, value start, value end) of each pair.

    Returns the pairs read, the error (None when the whole string parses) and where the
    pair that failed starts.
    """
    pairs: list[tuple[str, str, int, int]] = []
    s, n, i = text, len(text), 0
    while i < n:
        if s[i] in _SPACE:
            i += 1
            continue
        token = i
        while i < n and s[i] != "=" and s[i] not in _SPACE:
            i += 1
        key = s[token:i]
        while i < n and s[i] in _SPACE:
            i += 1
        if i >= n or s[i] != "=":
            return pairs, "missing '=' after a keyword", token
        i += 1
        while i < n and s[i] in _SPACE:
            i += 1
        value_start = i
        value: list[str] = []
        if i < n and s[i] == "'":
            i += 1
            while True:
                if i >= n:
                    return pairs, "unterminated quoted string", token
                if s[i] == "\\":
                    i += 1
                    if i < n:
                        value.append(s[i])
                        i += 1
                    continue
                if s[i] == "'":
                    i += 1
                    break
                value.append(s[i])
                i += 1
        else:
            while i < n and s[i] not in _SPACE:
                if s[i] == "\\":
                    i += 1
                    if i < n:
                        value.append(s[i])
                        i += 1
                else:
                    value.append(s[i])
                    i += 1
        pairs.append((key, "".join(value), value_start, i))
    return pairs, None, n


# --- masking ---------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """A database or broker URL, or a libpq keyword string, with every secret masked.

    Never raises: a string libpq cannot parse is masked the conservative way.
    """
    stripped = url.lstrip()
    lead = url[: len(url) - len(stripped)]
    match = _SCHEME.match(stripped)
    if match is None:
        return lead + _redact_keywords(stripped)
    prefix, body = stripped[: match.end()], stripped[match.end() :]
    userinfo, rest = _split_userinfo(body)
    shown = ""
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}:{MASK}@" if colon else f"{user}@"
        if _ambiguous(body):  # libpq would not read this user name: show none of it
            shown = f"{MASK}@"
    location, question, query = rest.partition("?")
    if question:
        query = _redact_query(query)
    return lead + prefix + shown + location + question + query


def _split_userinfo(body: str) -> tuple[str | None, str]:
    """(user info, the rest): libpq's split, or up to the last ``@`` when ambiguous."""
    at = body.rfind("@") if _ambiguous(body) else _libpq_at(body)
    if at is None or at < 0:
        return None, body
    return body[:at], body[at + 1 :]


def _loose_decode(text: str) -> str:
    try:
        return _decode(text, "query")
    except ConninfoError:
        return text


def _redact_query(query: str) -> str:
    """Secret parameters masked; a raw ``&`` inside their value is masked with it."""
    out: list[str] = []
    masking = False
    for segment in query.split("&"):
        key, equals, _ = segment.partition("=")
        if masking and not equals:
            continue  # part of the previous secret value
        masking = bool(equals) and is_secret_key(_loose_decode(key))
        out.append(f"{key}={MASK}" if masking else segment)
    return "&".join(out)


def _redact_keywords(text: str) -> str:
    pairs, error, failed_at = _keyword_pairs(text)
    out, last = [], 0
    for key, value, start, end in pairs:
        if is_secret_key(key):
            replacement = MASK
        elif "=" in value or _SCHEME.match(value):  # dbname holding a connection string
            redacted = redact_url(value)
            replacement = text[start:end] if redacted == value else _quote_keyword(redacted)
        else:
            replacement = text[start:end]
        out.append(text[last:start] + replacement)
        last = end
    if error is None:
        out.append(text[last:])
    else:
        out.append(text[last:failed_at] + MASK)
    return "".join(out)


def _quote_keyword(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- secrets and free text ---------------------------------------------------------------


def secrets_of(conninfo: str) -> tuple[str, ...]:
    """Every string of ``conninfo`` that could be a secret, as written and as read.

    libpq's reading when it parses, plus the conservative reading (a password holding a
    raw ``@`` or ``/``), plus the pieces libpq would make of such a password.
    """
    found: list[str] = []
    try:
        options = parse_conninfo(conninfo)
    except ConninfoError:
        options = {}
    found += [value for key, value in options.items() if is_secret_key(key)]
    text = conninfo.strip()
    match = _SCHEME.match(text)
    if match is None:
        pairs, _, failed_at = _keyword_pairs(text)
        for key, value, start, end in pairs:
            if is_secret_key(key):
                found += [value, text[start:end]]
            elif "=" in value or _SCHEME.match(value):
                found += secrets_of(value)
        tail = text[failed_at:]
        if tail and re.search("|".join(_SECRET_WORDS), tail, re.IGNORECASE):
            value = tail.split("=", 1)[-1]  # an unparseable tail after a secret's name
            found += [value, value.strip().strip("'")]
        return _unique(found)
    userinfo, rest = _split_userinfo(text[match.end() :])
    if userinfo is not None and ":" in userinfo:
        raw = userinfo.split(":", 1)[1]
        found += [raw, _loose_decode(raw)]
        found += re.split(r"[/?@:,&=#\[\]]", raw)  # how libpq would cut it up
    _, question, query = rest.partition("?")
    if question:
        masking = False
        for segment in query.split("&"):
            key, equals, value = segment.partition("=")
            if masking and not equals:
                found += [segment, _loose_decode(segment)]
                continue
            masking = bool(equals) and is_secret_key(_loose_decode(key))
            if masking:
                found += [value, _loose_decode(value)]
    return _unique(found)


def environment_secrets(passfile: str | None = None) -> tuple[str, ...]:
    """Passwords libpq may take from the environment: PGPASSWORD and the password file.

    Every password of the file (``PGPASSFILE`` or ``~/.pgpass``), not only the line
    libpq would match: scrubbing one too many costs nothing.
    """
    found = [os.environ.get("PGPASSWORD", "")]
    path = passfile or os.environ.get("PGPASSFILE") or os.path.expanduser("~/.pgpass")
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            fields = _pgpass_fields(line)
            if len(fields) >= 5:
                found.append(":".join(fields[4:]))
    return _unique(found)


def _pgpass_fields(line: str) -> list[str]:
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for char in line:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(value for value in values if value))


def _spellings(secret: str) -> Iterator[str]:
    """A secret as it may appear in text: raw, percent-encoded, quoted for libpq."""
    yield secret
    yield quote(secret, safe="")
    yield quote(secret)
    yield quote(secret, safe="@:/?#&=+$,;!*'()~")
    yield secret.replace("\\", "\\\\").replace("'", "\\'")
    yield repr(secret)[1:-1]


def redact_text(text: str, *secrets: str) -> str:
    """``text`` with each secret (in any spelling) and every connection string masked.

    Secrets shorter than :data:`MIN_SECRET_LENGTH` are only masked where they sit in a
    connection string: any other occurrence could be an ordinary word.
    """
    spellings = {
        spelling
        for secret in secrets
        if len(secret) >= MIN_SECRET_LENGTH
        for spelling in _spellings(secret)
        if len(spelling) >= MIN_SECRET_LENGTH
    }
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, MASK)
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
    return _KEYWORD_IN_TEXT.sub(lambda match: match.group(1) + match.group(2) + MASK, text)


def error_line(
    exc: BaseException,
    conninfo: str = "",
    keywords: Mapping[str, str] | None = None,
    *secrets: str,
) -> str:
    """A driver error as one line with no secret of the connection in it.

    ``conninfo`` and ``keywords`` are what the connection was opened with; the secrets
    libpq may have taken from PGPASSWORD or the password file are masked too.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    known = [*secrets, *secrets_of(conninfo)]
    for key, value in (keywords or {}).items():
        if is_secret_key(key):
            known.append(str(value))
        elif key == "dbname":
            known += secrets_of(str(value))
    known += environment_secrets((keywords or {}).get("passfile"))
    return redact_text(text, *known)


def broker_error(exc: BaseException, app: Any = None) -> str:
    """A broker (kombu) error as one line, with the secrets of the app's broker URLs
    (``broker_url``, ``result_backend``) masked."""
    conf = getattr(app, "conf", None)
    urls: list[str] = []
    for name in ("broker_url", "broker_read_url", "broker_write_url", "result_backend"):
        value = getattr(conf, name, None) if conf is not None else None
        for url in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(url, str):
                urls += url.split(";")
    return error_line(exc, "", None, *(secret for url in urls for secret in secrets_of(url)))


# --- descriptions for log lines -------------------------------------------------------


def describe_django_database(alias: str, settings_dict: Mapping[str, Any]) -> str:
    """``alias (user@host:port/name)`` for log lines; never the password."""
    host = settings_dict.get("HOST") or "localhost"
    port = settings_dict.get("PORT") or ""
    user = settings_dict.get("USER") or ""
    name = settings_dict.get("NAME") or ""
    where = f"{host}:{port}" if port else str(host)
    who = f"{user}@" if user else ""
    return f"{alias} ({who}{where}/{name})"


def describe_sqlalchemy_url(url: Any) -> str:
    """A SQLAlchemy ``URL`` (or URL string) for log lines, password masked.

    Built from the URL's parts, not from SQLAlchemy's rendering, which leaves some
    password characters unquoted.
    """
    if isinstance(url, str) or not hasattr(url, "drivername"):
        return redact_url(str(url))
    user = quote(str(url.username), safe="") if url.username else ""
    auth = f"{user}:{MASK}@" if url.password is not None else f"{user}@" if user else ""
    query = "&".join(
        f"{quote(str(key), safe='')}={MASK if is_secret_key(str(key)) else _query_value(value)}"
        for key, value in dict(url.query or {}).items()
    )
    return f"{url.drivername}://{auth}{_netloc(url)}/{url.database or ''}" + (
        f"?{query}" if query else ""
    )


def libpq_url(url: Any) -> str:
    """A SQLAlchemy ``URL`` as a ``postgresql://`` URL libpq reads back exactly.

    SQLAlchemy's ``render_as_string`` keeps blanks in passwords, which libpq 17+
    refuses; here every part is percent-encoded.
    """
    user = quote(str(url.username), safe="") if url.username else ""
    password = f":{quote(str(url.password), safe='')}" if url.password is not None else ""
    auth = f"{user}{password}@" if user or password else ""
    database = quote(str(url.database), safe="") if url.database else ""
    query = "&".join(
        f"{quote(str(key), safe='')}={quote(_query_value(value), safe=',')}"
        for key, value in dict(url.query or {}).items()
        if key in LIBPQ_KEYWORDS  # driver options (asyncpg's) are no libpq options
    )
    return f"postgresql://{auth}{_netloc(url)}/{database}" + (f"?{query}" if query else "")


def _netloc(url: Any) -> str:
    host = str(url.host or "")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host + (f":{url.port}" if url.port else "")


def _query_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
