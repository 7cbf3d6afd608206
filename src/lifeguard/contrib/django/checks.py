"""The doctor's rules as Django system checks.

``lifeguard_check`` runs every rule that needs neither a running worker nor the database:
rules about the worker's pool run only when the pool is in the configuration
(``CELERY_WORKER_POOL``), since ``-P`` on a command line is not visible here, and the
birth-RSS rule is left to ``lifeguard doctor``. ``lifeguard_database_check`` (tag
``database``, so only with ``manage.py check --database ALIAS``) reads the server
through that alias and runs the server rules.

Severities map to Django's levels: critical -> Error, warning -> Warning, info -> Info;
ids are ``lifeguard.LG001`` ..., so ``SILENCED_SYSTEM_CHECKS = ["lifeguard.LG009"]``
silences one.

Which Celery app: ``settings.LIFEGUARD_CELERY_APP`` (``"proj.celery:app"``), else every
Celery app of the process with lifeguard installed, else Celery's current app (the one
``proj/__init__.py`` imports in Celery's Django layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core import checks

from ...doctor.context import DoctorContext, gather, import_task_modules, in_progress, inspecting
from ...doctor.findings import Finding, Level
from ...doctor.runner import all_rules, diagnose
from ...errors import ConfigurationError

_LEVELS = {Level.CRITICAL: checks.Error, Level.WARNING: checks.Warning, Level.INFO: checks.Info}


def lifeguard_check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    if in_progress():
        return []  # Celery runs the checks while the doctor imports the app's tasks
    messages: list[checks.CheckMessage] = []
    for name, context in _contexts(messages):
        diagnosis = diagnose(context)
        messages += [_message(finding, name) for finding in diagnosis.findings]
    return messages


def lifeguard_database_check(
    app_configs: Any = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    if not databases or in_progress():
        return []
    from ...doctor.reading import read_into
    from ...monitor.target import from_django

    messages: list[checks.CheckMessage] = []
    for name, context in _contexts(messages):
        offline = {skipped.id for skipped in diagnose(context).skipped}
        ignore = {rule.id for rule in all_rules()} - offline
        for alias in databases:
            try:
                target = from_django(alias)
            except ConfigurationError:
                continue  # not a PostgreSQL alias
            if target is None:
                continue
            read_into(context, target)
            if context.server is None:
                messages.append(
                    checks.Warning(
                        f"lifeguard cannot read the server settings through {alias!r}: "
                        f"{context.server_skip}",
                        obj=name,
                        id="lifeguard.W001",
                    )
                )
                continue
            findings = diagnose(context, ignore).findings
            messages += [_message(finding, name) for finding in findings]
    return messages


def _contexts(messages: list[checks.CheckMessage]) -> list[tuple[str, DoctorContext]]:
    """A doctor context per Celery app; problems finding them become messages."""
    try:
        apps = _celery_apps()
    except ConfigurationError as exc:
        messages.append(
            checks.Error(str(exc), hint="Check settings.LIFEGUARD_CELERY_APP.", id="lifeguard.E001")
        )
        return []
    if not apps:
        messages.append(
            checks.Info(
                "lifeguard found no Celery app to check",
                hint="Set LIFEGUARD_CELERY_APP = 'proj.celery:app' in the settings.",
                id="lifeguard.I001",
            )
        )
        return []
    contexts = []
    for name, app in apps:
        try:
            with inspecting():
                import_task_modules(app)
                contexts.append((name, gather(app, name, assume_shape=False, measure_rss=False)))
        except ConfigurationError as exc:
            messages.append(checks.Error(str(exc), obj=name, id="lifeguard.E002"))
    return contexts


def _celery_apps() -> list[tuple[str, Any]]:
    from celery import _state
    from django.conf import settings

    from ...cli._database import load_app
    from ...guard import current_guard

    name = getattr(settings, "LIFEGUARD_CELERY_APP", None)
    if name:
        return [(str(name), load_app(str(name)))]
    active = list(_state._get_active_apps())
    guarded = [app for app in active if current_guard(app) is not None]
    if guarded:
        return [(str(app.main or app), app) for app in guarded]
    current = getattr(_state._tls, "current_app", None)
    if current is not None and current in active:
        return [(str(current.main or current), current)]
    return []


def _message(finding: Finding, app_name: str) -> checks.CheckMessage:
    level = _LEVELS[finding.level]
    return level(
        f"{finding.title}. {finding.why}",
        hint=finding.fix,
        obj=finding.subject or app_name,
        id=f"lifeguard.{finding.id}",
    )
