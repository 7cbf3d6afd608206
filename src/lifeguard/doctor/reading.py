"""Which database the doctor reads, and reading it into the context.

The app's database comes from an explicit URL (``--database-url``,
``$LIFEGUARD_DATABASE_URL``), Django's ``DATABASES``, an engine registered with lifeguard,
or the first PostgreSQL engine alive in the app; :mod:`.server` reads it.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigurationError
from ..monitor.target import (
    ENV_URL,
    DatabaseTarget,
    DatabaseUnreachable,
    from_django,
    from_guard,
    from_url,
)
from ..postgres.appname import DEFAULT_PREFIX
from ..postgres.conninfo import describe_sqlalchemy_url, libpq_url
from .context import DoctorContext, live_engines
from .server import read_server


def app_target(app: Any, alias: str = "default") -> DatabaseTarget | None:
    """The app's database: Django's ``DATABASES[alias]``, else a lifeguard concern's URL
    (a registered engine), else the first PostgreSQL engine alive in the app.

    Raises :class:`ConfigurationError` when Django names a database lifeguard cannot read
    (not PostgreSQL, no such alias) and nothing else offers one.
    """
    problem: ConfigurationError | None = None
    try:
        target = from_django(alias)
    except ConfigurationError as exc:
        target, problem = None, exc
    target = target or from_guard(app) or _engine_target()
    if target is None and problem is not None:
        raise problem
    return target


def _engine_target() -> DatabaseTarget | None:

    for engine, _ in live_engines():
        if str(engine.dialect.name) == "postgresql":
            return from_url(
                libpq_url(engine.url),
                f"the SQLAlchemy engine {describe_sqlalchemy_url(engine.url)}",
            )
    return None


def attach_server(
    ctx: DoctorContext,
    *,
    url: str | None = None,
    alias: str = "default",
    timeout: float = 5.0,
) -> None:
    """Read the database into ``ctx.server``, or say in ``ctx.server_skip`` why not.

    A database given explicitly (``url``, ``$LIFEGUARD_DATABASE_URL``) must be valid:
    a wrong one raises :class:`ConfigurationError`. A database that cannot be read marks
    the context ``server_failed`` (the verdict becomes UNKNOWN unless critical).
    """
    explicit = url or os.environ.get(ENV_URL)
    if explicit:
        source = "--database-url" if url else ENV_URL
        target: DatabaseTarget | None = from_url(explicit, source)
    else:
        try:
            target = app_target(ctx.app, alias)
        except ConfigurationError as exc:
            ctx.server_skip = f"no database to read: {exc}"
            return
        if target is None:
            ctx.server_skip = (
                "no database to read: the app has no PostgreSQL database in Django's "
                f"DATABASES or SQLAlchemy (pass --database-url or set {ENV_URL})"
            )
            return
    assert target is not None
    read_into(ctx, target, timeout)


def read_into(ctx: DoctorContext, target: DatabaseTarget, timeout: float = 5.0) -> None:
    """Read ``target`` into ``ctx.server``; on failure say why and mark the context."""
    ctx.target = str(target)
    ctx.server = None
    ctx.server_failed = False
    prefix = DEFAULT_PREFIX
    if ctx.options is not None and ctx.options.application_name_prefix:
        prefix = ctx.options.application_name_prefix
    try:
        ctx.server = read_server(target, prefix=prefix, timeout=timeout)
    except DatabaseUnreachable as exc:
        ctx.server_failed = True
        ctx.server_skip = str(exc)
