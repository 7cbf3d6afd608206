"""Running the doctor's rules on a context: every registered rule, a broken one skipped.

Apart from :mod:`.registry` so that the rules, which register themselves there, are
imported by the module that runs them and by nothing they import.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection

from . import rules  # noqa: F401  (registers every rule)
from .context import DoctorContext
from .findings import Diagnosis, Finding, Skip, Skipped
from .registry import FAILED, RULES, Rule

logger = logging.getLogger("lifeguard.doctor")


def all_rules() -> list[Rule]:
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
