"""The ``lifeguard_once`` table of exactly-once keys (docs/once.md), the same SQL as
``lifeguard migrate``: ``manage.py migrate lifeguard``."""

from __future__ import annotations

from django.db import migrations

from lifeguard.postgres import once_sql


class Migration(migrations.Migration):  # type: ignore[misc]
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [
        migrations.RunSQL(statement, reverse_sql=reverse)
        for statement, reverse in zip(
            once_sql.MIGRATION,
            [once_sql.DROP_TABLE, migrations.RunSQL.noop],
            strict=True,
        )
    ]
