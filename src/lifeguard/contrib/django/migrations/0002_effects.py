"""The columns of an external effect's claim (state, claimed_at, claimed_by, completed_at)
on ``lifeguard_once``, the same SQL as ``lifeguard migrate`` (docs/once.md). Existing keys
keep working: they read as ``done``."""

from __future__ import annotations

from django.db import migrations

from lifeguard.postgres import once_sql


class Migration(migrations.Migration):  # type: ignore[misc]
    dependencies = [("lifeguard", "0001_initial")]
    operations = [
        migrations.RunSQL(statement, reverse_sql=reverse)
        for statement, reverse in zip(
            once_sql.EFFECT_MIGRATION, once_sql.EFFECT_MIGRATION_REVERSE, strict=True
        )
    ]
