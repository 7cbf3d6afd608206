"""``lifeguard doctor``: an audit of a Celery app's configuration for connection and
memory health, with the setting that fixes each finding.

* :mod:`.context` gathers what the rules look at, once: the app's configuration, how its
  workers are started, its tasks, Django ``DATABASES``, SQLAlchemy engines, an estimate
  of a child's birth RSS, and (:mod:`.server`) the database server's settings;
* :mod:`.rules` holds one function per rule (``LG001`` ...), registered in
  :mod:`.registry`, each yielding :class:`~.findings.Finding` objects;
* :mod:`.render` prints them (rich text or JSON); ``lifeguard.contrib.django`` shows the
  same findings in Django's system checks.
"""

from __future__ import annotations

from .context import DoctorContext, gather
from .findings import Diagnosis, Finding, Level, Skip, Skipped
from .registry import RULES, Rule
from .runner import all_rules, diagnose

__all__ = [
    "RULES",
    "Diagnosis",
    "DoctorContext",
    "Finding",
    "Level",
    "Rule",
    "Skip",
    "Skipped",
    "all_rules",
    "diagnose",
    "gather",
]
