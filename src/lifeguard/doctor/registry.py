"""The doctor's rules: one function per rule, registered with :func:`rule`.

A rule reads the :class:`~lifeguard.doctor.context.DoctorContext` and yields
:class:`~lifeguard.doctor.findings.Finding` objects; it raises :class:`Skip` when what
it needs is missing (no database read, the worker's pool not known), and the runner
reports it as skipped.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .findings import Diagnosis, Finding, Skipped

if TYPE_CHECKING:
    from .context import DoctorContext

logger = logging.getLogger("lifeguard.doctor")

Check = Callable[["DoctorContext"], Iterable[Finding]]


class Skip(Exception):
    """Raised by a rule that cannot run; the message says why."""


@dataclass(frozen=True)
class Rule:
    id: str  # "LG004"
    name: str  # "memory-limit-below-birth-rss"
    title: str  # what it looks for, for docs and --list
    check: Check


RULES: dict[str, Rule] = {}

#: The start of a skip reason given when a rule raised an unexpected error.
FAILED = "the rule failed"


def rule(rule_id: str, name: str, title: str) -> Callable[[Check], Check]:
    """Register a rule function under a stable id."""

    def register(check: Check) -> Check:
        if rule_id in RULES:
            raise RuntimeError(f"doctor rule {rule_id} registered twice")
        RULES[rule_id] = Rule(rule_id, name, title, check)
        return check

    return register


def all_rules() -> list[Rule]:
    from . import rules  # noqa: F401  (registers every rule)

    return [RULES[key] for key in sorted(RULES)]


def diagnose(context: DoctorContext, ignore: Collection[str] = ()) -> Diagnosis:
    """Run every rule (except ``ignore``d ids) on the context."""
    findings: list[Finding] = []
    skipped: list[Skipped] = []
    for entry in all_rules():
        if entry.id in ignore:
            continue
        try:
            found = list(entry.check(context))
        except Skip as reason:
            skipped.append(Skipped(entry.id, entry.name, str(reason)))
            continue
        except Exception as exc:  # a broken rule must not hide the others' findings
            logger.warning("lifeguard doctor: rule %s failed", entry.id, exc_info=True)
            skipped.append(Skipped(entry.id, entry.name, f"{FAILED}: {type(exc).__name__}: {exc}"))
            continue
        findings += [dataclasses.replace(f, id=entry.id, rule=entry.name) for f in found]
    findings.sort(key=lambda finding: (-finding.level.rank, finding.id))
    return Diagnosis(
        findings=tuple(findings),
        skipped=tuple(skipped),
        incomplete=context.server_failed,
    )
