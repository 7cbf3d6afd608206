"""What the doctor says: findings with a severity, rules it could not run, the verdict.

The verdict follows ``lifeguard check`` (Nagios conventions): 0 OK (no finding, or only
info), 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the doctor could not run, or could not read the
database it was given). A critical finding wins over UNKNOWN, as in ``lifeguard check``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..monitor.thresholds import Severity


class Level(str, enum.Enum):
    """How bad a finding is."""

    INFO = "info"  # worth knowing; nothing breaks
    WARNING = "warning"  # something will go wrong under some load or fault
    CRITICAL = "critical"  # broken now, or at the first fault

    @property
    def status(self) -> Severity:
        return {
            Level.INFO: Severity.OK,
            Level.WARNING: Severity.WARNING,
            Level.CRITICAL: Severity.CRITICAL,
        }[self]

    @property
    def rank(self) -> int:
        return {Level.INFO: 0, Level.WARNING: 1, Level.CRITICAL: 2}[self]


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the app's configuration, and the setting that fixes it.

    Rules build findings without ``id`` and ``rule``; the runner fills them in from the
    rule that produced the finding.
    """

    level: Level
    title: str  # one line: what is wrong
    why: str  # what happens because of it
    fix: str  # what to write, and where
    subject: str | None = None  # what it is about: "DATABASES['default']", "task proj.x", ...
    evidence: Mapping[str, Any] = field(default_factory=dict)  # the figures it is based on
    id: str = ""  # "LG004"
    rule: str = ""  # "memory-limit-below-birth-rss"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "severity": self.level.value,
            "title": self.title,
            "subject": self.subject,
            "why": self.why,
            "fix": self.fix,
            "evidence": dict(self.evidence),
        }


@dataclass(frozen=True)
class Skipped:
    """A rule that could not run, and why (no database read, worker shape unknown, ...)."""

    id: str
    rule: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "rule": self.rule, "reason": self.reason}


@dataclass(frozen=True)
class Diagnosis:
    """Every finding, worst first, and what could not be checked."""

    findings: tuple[Finding, ...]
    skipped: tuple[Skipped, ...]
    incomplete: bool = False  # a database was named but could not be read

    @property
    def status(self) -> Severity:
        severities: Iterable[Severity] = [finding.level.status for finding in self.findings]
        if self.incomplete:
            severities = [*severities, Severity.UNKNOWN]
        return Severity.worst(severities)

    @property
    def exit_code(self) -> int:
        return self.status.exit_code

    def counts(self) -> dict[str, int]:
        return {
            level.value: sum(1 for finding in self.findings if finding.level is level)
            for level in (Level.CRITICAL, Level.WARNING, Level.INFO)
        }


class Skip(Exception):
    """Raised by a rule that cannot run; the message says why."""
