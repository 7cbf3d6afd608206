"""The AppConfig of ``lifeguard.contrib.django``."""

from __future__ import annotations

from django.apps import AppConfig


class LifeguardConfig(AppConfig):  # type: ignore[misc]
    name = "lifeguard.contrib.django"
    label = "lifeguard"
    verbose_name = "lifeguard"

    def ready(self) -> None:
        from django.core import checks

        from .checks import lifeguard_check, lifeguard_database_check

        checks.register(lifeguard_check, "lifeguard")
        checks.register(lifeguard_database_check, "lifeguard", checks.Tags.database)
