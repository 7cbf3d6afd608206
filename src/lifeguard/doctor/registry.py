"""The doctor's rules: one function per rule, registered with :func:`rule`.

A rule reads the :class:`~lifeguard.doctor.context.DoctorContext` and yields
:class:`~lifeguard.doctor.findings.Finding` objects; it raises :class:`Skip` when what
it needs is missing (no database read, the worker's pool not known), and the runner
reports it as skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .findings import Finding, Skip

if TYPE_CHECKING:
    from .context import DoctorContext

logger = logging.getLogger("lifeguard.doctor")

Check = Callable[["DoctorContext"], Iterable[Finding]]


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


__all__ = ["FAILED", "RULES", "Check", "Rule", "Skip", "rule"]
