"""One candidate record: a target, the trend that predicts it, its per-tensor weights, report and probe score.

A candidate's prediction is, for every tracked tensor, a weight vector ``w`` over the stored delta rows of the
fit window (:func:`relex_callback.math.core.combine`): θ̂ = θ_0 + w·M, optionally moved from the live weights
θ by ``anchor``/``shrink``:

* ``anchor="fit"``: θ̂ = θ_0 + w·M (the paper), then θ + λ(θ̂ − θ) when ``shrink`` λ < 1;
* ``anchor="current"``: θ + λ·w·M (``w`` then weighs a predicted *increment*, e.g. ĉ(K) − ĉ(s)).

An SVD trend (``TrendSpec.kind`` one of ``TREND_KINDS``) gives ``w = U_r Σ_r⁻¹ ĉ(K)``; any other family
(for instance magnitude scaling θ_0 + α(θ_N − θ_0): weight α on the last row) only has to fill ``weights``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..options import TREND_KINDS

__all__ = ["TrendSpec", "Candidate"]


@dataclass(frozen=True)
class TrendSpec:
    """How a candidate was predicted.

    ``kind``: an SVD trend kind (``"linear"``, ``"power"``, ``"poly2"``) or the name of another candidate
    family; ``rank``, ``power``, ``origin`` and ``window`` are the fit settings; ``params`` holds
    family-specific settings (JSON scalars, e.g. ``{"alpha": 0.5}``).
    """

    kind: str
    rank: int = 1
    power: float = 1.0
    origin: float = 0.0
    window: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "power": self.power, "origin": self.origin,
                "window": self.window, "params": dict(self.params)}


@dataclass
class Candidate:
    """A prediction the engine can materialise, load, trial and report.

    ``weights`` maps each tracked tensor's name to its ``[T]`` weights over the stored delta rows of
    ``spec.window``; ``report`` and ``score`` are filled in by the engine and the probe.
    """

    target: float
    spec: TrendSpec
    weights: dict[str, torch.Tensor]
    anchor: str = "fit"
    shrink: float = 1.0
    start: float | None = None  # anchor="current": the (virtual) step the increment starts from
    report: dict[str, Any] | None = None
    score: float | None = None

    @property
    def family(self) -> str:
        """The candidate family (``CANDIDATE_FAMILIES``, ``"observed"`` or a registered one): ``"trend"`` for the
        SVD trend, whose fit kind (``"linear"``, ``"power"``, ``"poly2"``) is ``spec.kind``."""
        return "trend" if self.spec.kind in TREND_KINDS else self.spec.kind

    @property
    def label(self) -> str:
        """A short name for logs and metrics: the target step, with the family when it is not an SVD trend."""
        target = f"{self.target:g}"
        return target if self.family == "trend" else f"{self.family}@{target}"

    def describe(self) -> dict[str, Any]:
        """The JSON section of the report that names this candidate."""
        return {"target_step": self.target, "trend": self.spec.to_dict(), "anchor": self.anchor, "shrink": self.shrink,
                "start_step": self.start, "probe_score": self.score}
