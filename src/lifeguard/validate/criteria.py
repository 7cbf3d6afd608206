"""The pass/fail criteria of a validation, judged from its samples and outcomes.

=============================  =========================================================
criterion                      passes when
=============================  =========================================================
``idle_back_to_baseline``      the database's idle connections after the run are at most
                               the baseline's plus 10% (the check the guides recommend)
``no_idle_in_transaction``     no backend of the workers is idle in transaction after it
``no_connection_errors``       no session of the database ended abandoned, fatal or
                               killed during the run (``pg_stat_database``, PG 14+)
``peak_within_budget``         the workers never held more connections than the budget
``every_task_succeeded``       every task sent finished with SUCCESS
``memory_slope`` (``--soak``)  no task process kept growing faster than the slope limit
=============================  =========================================================

A criterion that cannot be judged here (no session counters before PostgreSQL 14, RSS
of remote workers without lifeguard) is ``n/a`` with the reason, and does not fail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..monitor.snapshot import IDLE, IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED, SessionRates
from ..report.record import FAIL, NOT_APPLICABLE, PASS, Criterion, Phase
from .load import Outcomes
from .sampler import Sample

IDLE_TOLERANCE = 0.10
MIB = 1024 * 1024
#: The soak is cut into this many windows; the first one is its warm-up.
SOAK_WINDOWS = 4
_MIN_POINTS = 3  # samples a window needs for a slope


def _mib(size: float) -> str:
    return f"{size / MIB:.1f} MiB"


def _holders(sample: Sample, states: Iterable[str], most: int = 3) -> str:
    """``web-1:4242 (12), web-1:4243 (3)``: who holds backends in these states."""
    wanted = set(states)
    counts = {
        label: sum(n for state, n in by_state.items() if state in wanted)
        for label, by_state in sample.by_process.items()
    }
    ranked = sorted((item for item in counts.items() if item[1]), key=lambda item: -item[1])
    return ", ".join(f"{label} ({count})" for label, count in ranked[:most])


def idle_back_to_baseline(
    baseline: Sample, final: Sample, tolerance: float = IDLE_TOLERANCE
) -> Criterion:
    before = baseline.by_state.get(IDLE, 0)
    after = final.by_state.get(IDLE, 0)
    limit = before * (1 + tolerance)
    status = PASS if after <= limit + 1e-9 else FAIL
    detail = (
        f"{before} idle before the load, {after} after it "
        f"(at most {limit:g}: baseline + {tolerance:.0%})"
    )
    if status == FAIL:
        holders = _holders(final, [IDLE])
        detail += f"; held by {holders}" if holders else ""
    return Criterion(
        "idle_back_to_baseline",
        f"Idle connections back to baseline (+{tolerance:.0%})",
        status,
        detail,
        measured=after,
        limit=limit,
    )


def no_idle_in_transaction(final: Sample) -> Criterion:
    states = (IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED)
    stuck = sum(final.workers_by_state.get(state, 0) for state in states)
    if stuck:
        detail = f"{stuck} backends of the workers idle in transaction after the run: "
        detail += _holders(final, states)
    else:
        detail = "none of the workers' backends is idle in transaction after the run"
    return Criterion(
        "no_idle_in_transaction",
        "No idle-in-transaction backend from the workers",
        FAIL if stuck else PASS,
        detail,
        measured=stuck,
        limit=0,
    )


def no_connection_errors(rates: SessionRates | None, reason: str = "") -> Criterion:
    title = "No connection errors"
    if rates is None:
        return Criterion(
            "no_connection_errors",
            title,
            NOT_APPLICABLE,
            reason or "no session counters (PostgreSQL 14+ has them)",
        )
    delta = rates.delta
    detail = (
        f"{delta.errors} sessions ended abnormally in {rates.seconds:.0f}s "
        f"(abandoned {delta.abandoned}, fatal {delta.fatal}, killed {delta.killed}); "
        f"{delta.sessions} sessions opened meanwhile"
    )
    if rates.gone:
        detail += f"; {len(rates.gone)} worker backends gone meanwhile"
    return Criterion(
        "no_connection_errors",
        title,
        FAIL if delta.errors else PASS,
        detail,
        measured=delta.errors,
        limit=0,
    )


def peak_within_budget(samples: Sequence[Sample], budget: int, explained: str) -> Criterion:
    read = [sample for sample in samples if sample.error is None]
    peak = max(read, key=lambda sample: sample.workers, default=None)
    title = "Peak connections within the budget"
    if peak is None:
        return Criterion("peak_within_budget", title, NOT_APPLICABLE, "the database was never read")
    status = PASS if peak.workers <= budget else FAIL
    detail = (
        f"the workers held at most {peak.workers} connections (at {peak.t:.1f}s); "
        f"budget {budget} ({explained})"
    )
    if status == FAIL:
        detail += f"; most held by {_holders(peak, peak.workers_by_state)}"
    return Criterion(
        "peak_within_budget", title, status, detail, measured=peak.workers, limit=budget
    )


def every_task_succeeded(outcomes: Outcomes) -> Criterion:
    ok = outcomes.succeeded == outcomes.sent
    detail = f"{outcomes.succeeded} of {outcomes.sent} tasks succeeded"
    if outcomes.failed:
        top = outcomes.errors.most_common(2)
        detail += f", {outcomes.failed} failed (" + "; ".join(f"{e} x{n}" for e, n in top) + ")"
    if outcomes.unfinished:
        detail += f", {outcomes.unfinished} did not finish in time"
    return Criterion(
        "every_task_succeeded",
        "Every task succeeded",
        PASS if ok else FAIL,
        detail,
        measured=outcomes.succeeded,
        limit=outcomes.sent,
    )


# --- memory under a soak ------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSlope:
    """How one task process's RSS grew over the soak, window by window."""

    label: str  # host:pid
    windows: tuple[float | None, ...]  # bytes per minute; None: too few samples
    growth: int | None  # bytes, first to last sample of the soak

    def judged(self) -> list[float]:
        """Slopes of the windows after the first (the soak's warm-up)."""
        return [slope for slope in self.windows[1:] if slope is not None]

    def keeps_growing(self, limit: float) -> bool:
        """Above the limit in every judged window, and judged in at least two (one when
        the soak has only two windows)."""
        judged = self.judged()
        return len(judged) >= min(2, len(self.windows) - 1) and all(s > limit for s in judged)


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Slope of y over x; None with fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return None
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def soak_windows(soak: Phase, samples: Sequence[Sample]) -> list[tuple[float, float]]:
    """The soak cut into up to SOAK_WINDOWS windows of at least _MIN_POINTS samples."""
    inside = sum(1 for sample in samples if soak.start <= sample.t <= soak.end)
    count = min(SOAK_WINDOWS, inside // _MIN_POINTS)
    if count < 2:
        return []
    width = (soak.end - soak.start) / count
    return [(soak.start + i * width, soak.start + (i + 1) * width) for i in range(count)]


def process_slopes(soak: Phase, samples: Sequence[Sample]) -> list[ProcessSlope]:
    windows = soak_windows(soak, samples)
    series: dict[str, list[tuple[float, float]]] = {}
    for sample in samples:
        if soak.start <= sample.t <= soak.end:
            for process in sample.processes:
                if process.rss is not None:
                    series.setdefault(process.label, []).append((sample.t, float(process.rss)))
    slopes = []
    for label, points in sorted(series.items()):
        per_window: list[float | None] = []
        for start, end in windows:
            inside = [p for p in points if start <= p[0] <= end]
            slope = least_squares_slope(inside) if len(inside) >= _MIN_POINTS else None
            per_window.append(None if slope is None else slope * 60.0)
        growth = int(points[-1][1] - points[0][1]) if len(points) > 1 else None
        slopes.append(ProcessSlope(label, tuple(per_window), growth))
    return slopes


def memory_slope(
    soak: Phase, samples: Sequence[Sample], limit: float, no_rss_reason: str = ""
) -> tuple[Criterion, list[ProcessSlope]]:
    """Fails when a task process's RSS grew faster than ``limit`` bytes per minute in
    every window of the soak after the first."""
    title = f"Memory slope under the soak below {_mib(limit)}/min"
    slopes = process_slopes(soak, samples)
    if not soak_windows(soak, samples):
        reason = f"the soak ({soak.end - soak.start:.0f}s) is too short for the sample interval"
        return Criterion("memory_slope", title, NOT_APPLICABLE, reason), slopes
    if not slopes:
        reason = no_rss_reason or "no RSS of the task processes could be read"
        return Criterion("memory_slope", title, NOT_APPLICABLE, reason), slopes
    growing = [slope for slope in slopes if slope.keeps_growing(limit)]
    steepest = max((max(s.judged(), default=0.0) for s in slopes), default=0.0)
    if growing:
        detail = "; ".join(
            f"{s.label} grew " + ", ".join(f"{_mib(v)}/min" for v in s.judged())
            for s in growing[:3]
        )
        detail += f" after the soak's first window (limit {_mib(limit)}/min)"
    else:
        detail = (
            f"{len(slopes)} task processes; the steepest grew {_mib(steepest)}/min after the "
            f"soak's first window (limit {_mib(limit)}/min, judged per window)"
        )
    criterion = Criterion(
        "memory_slope",
        title,
        FAIL if growing else PASS,
        detail,
        measured=round(steepest),
        limit=limit,
    )
    return criterion, slopes
