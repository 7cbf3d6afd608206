"""Hiding passwords in anything lifeguard prints or logs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A database or broker URL, or a libpq keyword DSN, with its password masked."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostinfo}"
    query = _QUERY_PASSWORD.sub(r"\1***", "?" + parts.query)[1:] if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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
    """A SQLAlchemy ``URL`` (or URL string) for log lines, password masked."""
    render = getattr(url, "render_as_string", None)
    if render is not None:
        return str(render(hide_password=True))
    return redact_url(str(url))
