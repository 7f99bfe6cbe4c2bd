"""The reward-guided horizon: with a probe, the target K is chosen by the probe's score, not by weight distance.

The window diagnostic's K_max (:mod:`relex_callback.math.diagnostic`) says where the prediction stops being
*close* to real training; the reward often keeps rising well past it (measured on SmolLM2 GRPO at 64 completions
per step: K_max ≈ 2N, while the line at 5N still scored above real training at 2.5N). With a probe,
``extrapolate_to="auto"`` therefore climbs a ladder of targets N < K_1 < K_2 < ... ≤ ``max_horizon`` for every
candidate family, scores each prediction, and stops a family once its score falls below the best score seen so
far (the trained weights θ_N included) by more than a margin: by default one standard error of the probe's own
per-prompt scores. The best prediction is kept, never one below θ_N unless asked for.

This module is the pure part of that search (no torch, no framework): the ladder and the early-stopping walk
over a caller's ``evaluate(family, K) -> (score, standard_error)``. The engine supplies ``evaluate`` (predict,
load, probe) and restores the live weights; the regime-map benchmark supplies its own scorer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["LADDER_RATIOS", "ProbeCall", "ProbeFailed", "HorizonSearch", "horizon_ladder", "search_horizon",
           "standard_error"]

LADDER_RATIOS = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)
"""Rungs of the ladder as multiples of the window's span (K − x_0) / (x_N − x_0), up to the cap."""


def horizon_ladder(origin: float, last: float, cap: float, extra: Sequence[float] = ()) -> list[float]:
    """Integer targets of the search: x_0 + r·(x_N − x_0) for r in :data:`LADDER_RATIOS`, rounded down, strictly
    after the window end ``last`` and at most ``cap``; ``cap`` itself and ``extra`` targets (e.g. K_max) in that
    range are added. Ascending, without duplicates."""
    span = float(last) - float(origin)
    if span <= 0 or cap <= last:
        return []
    rungs = {float(math.floor(origin + r * span)) for r in LADDER_RATIOS}
    rungs |= {float(math.floor(cap))} | {float(math.floor(k)) for k in extra}
    return sorted(k for k in rungs if last < k <= cap)


def standard_error(scores: Sequence[float] | None) -> float | None:
    """Standard error of the mean of per-prompt ``scores`` (``None`` with fewer than 2 finite scores)."""
    values = [float(s) for s in scores or () if math.isfinite(float(s))]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var / len(values))


class ProbeFailed(Exception):
    """Raised by an ``evaluate`` when the probe itself failed (raised or gave no finite score): the search ends and
    reports it; any other exception (e.g. a non-finite prediction) propagates."""


@dataclass
class ProbeCall:
    """One probe call of the search: the candidate ``family`` at ``target``, its ``score`` (and the standard error
    of the probe's per-prompt scores, if known) and its wall time."""

    family: str
    target: float
    score: float
    standard_error: float | None
    seconds: float

    def as_dict(self, step_seconds: float | None = None) -> dict[str, Any]:
        out = {"family": self.family, "target_step": self.target, "score": self.score,
               "standard_error": self.standard_error, "seconds": self.seconds}
        out["step_equivalents"] = self.seconds / step_seconds if step_seconds else None
        return out


@dataclass
class HorizonSearch:
    """The outcome of :func:`search_horizon`: every call in order, the margin used, why each family stopped,
    the chosen call (``None``: keep the trained weights) and, when the probe failed, why the search ended."""

    current: float
    current_standard_error: float | None
    margin: float
    margin_source: str
    ladder: list[float]
    calls: list[ProbeCall] = field(default_factory=list)
    stopped: dict[str, str] = field(default_factory=dict)
    chosen: ProbeCall | None = None
    failure: str | None = None
    allow_worse: bool = False

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.calls)

    def as_dict(self, step_seconds: float | None = None) -> dict[str, Any]:
        """The report's ``search`` section (``step_seconds``: mean wall time of one training step, for the
        probe's cost in step equivalents)."""
        return {
            "current_weights_score": self.current,
            "current_weights_standard_error": self.current_standard_error,
            "margin": self.margin,
            "margin_source": self.margin_source,
            "ladder": list(self.ladder),
            "calls": [c.as_dict(step_seconds) for c in self.calls],
            "probe_calls": len(self.calls) + 1,  # the trained weights were scored too
            "probe_seconds": self.seconds,
            "step_seconds": step_seconds,
            "step_equivalents": self.seconds / step_seconds if step_seconds else None,
            "stopped": dict(self.stopped),
            "chosen": None if self.chosen is None else self.chosen.as_dict(step_seconds),
            "failure": self.failure,
            "allow_worse": self.allow_worse,
        }


def search_horizon(
    families: Sequence[str],
    ladder: Sequence[float],
    evaluate: Callable[[str, float], tuple[float, float | None]],
    current: float,
    current_standard_error: float | None = None,
    margin: float | None = None,
    allow_worse: bool = False,
) -> HorizonSearch:
    """Climb ``ladder`` for every family in turn; stop a family at the first score below its best so far (the
    trained weights' ``current`` score included) by more than the margin.

    ``margin`` ``None`` takes the standard error of the trained weights' per-prompt scores (0 when unknown).
    A probe that fails (``evaluate`` raises :class:`ProbeFailed`) or returns a non-finite score ends the whole
    search with ``failure`` set and nothing chosen. Otherwise the best finite call is chosen (ties: the nearer target, then the earlier family), or
    ``None`` when it scores below ``current`` and not ``allow_worse``.
    """
    if margin is None:
        source = "standard error of the probe's per-prompt scores" if current_standard_error is not None else "0 (the probe reports no per-prompt scores)"
        margin = current_standard_error or 0.0
    else:
        source = "probe_margin"
    search = HorizonSearch(current=float(current), current_standard_error=current_standard_error, margin=float(margin),
                           margin_source=source, ladder=[float(k) for k in ladder], allow_worse=allow_worse)
    if not math.isfinite(current):
        search.failure = f"the probe scored the trained weights {current!r}: not a finite number"
        return search
    for family in families:
        best = float(current)
        search.stopped[family] = f"reached the cap (step {ladder[-1]:g})" if ladder else "empty ladder"
        for target in ladder:
            started = time.perf_counter()
            try:
                score, se = evaluate(family, float(target))
            except ProbeFailed as err:  # the caller restores the weights; the search reports why it ended
                search.failure = f"{err} (family {family!r}, step {target:g})"
                search.stopped[family] = "probe failed"
                return search
            call = ProbeCall(family, float(target), float(score), se, time.perf_counter() - started)
            search.calls.append(call)
            if not math.isfinite(call.score):
                search.failure = f"the probe returned {score!r} for family {family!r} at step {target:g}"
                search.stopped[family] = "probe failed"
                return search
            if call.score < best - search.margin:
                search.stopped[family] = (f"score {call.score:.4g} at step {target:g} fell below the best so far "
                                          f"{best:.4g} by more than the margin {search.margin:.4g}")
                break
            best = max(best, call.score)
    ranked = sorted(search.calls, key=lambda c: (-c.score, c.target, list(families).index(c.family)))
    if ranked and (ranked[0].score >= current or allow_worse):
        search.chosen = ranked[0]
    return search
