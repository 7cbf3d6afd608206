"""Every rule of the doctor, by concern. Importing this package registers them."""

from __future__ import annotations

from . import database, django, sqlalchemy, worker

__all__ = ["database", "django", "sqlalchemy", "worker"]
