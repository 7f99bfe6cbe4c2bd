"""The window diagnostic: how far can this observation window be extrapolated? Framework-free (torch only).

Everything is computed from the per-tensor Gram matrices ``G = M Mᵀ`` of the observed deltas (rows Δ_t at
steps ``x_t``, measured from the origin x_0 where Δ = 0), so it costs no pass over the weights and works
on sharded tensors after the all-reduce of ``G``.

Descriptive statistics of the window (``WindowDiagnostic``):

* ``growth_exponent`` α: slope of log ||Δ_t|| on log (x_t − x_0). α ≈ 1 is drift (a straight path),
  α ≈ 0.5 is diffusion (a random walk), and a line fitted to a diffusing window overshoots.
* ``direction_stability``: |cos| between the top direction of the first half of the window and of the
  whole window, per tensor (Gram-only: v_h·v = u_hᵀ G[:h, :] u / (σ_h σ)), averaged with weights numel.
* ``noise_share``: 1 − the energy-weighted rank-r explained variance.
* ``backtests``: refit on the first m snapshots and predict the last one, for m ≈ T/4, T/3, T/2.
* ``still_steps``: snapshots that did not move from the previous one (zero-gradient or skipped updates).

The supported horizon ``K_max`` comes from a two-part model of each tensor's per-step update,
δ_i = drift_i + noise_i: independent noise of squared norm s² per step, and a drift whose steps relate as
E[drift_i · drift_j] = a² i^−β j^−β k(|i−j|) (β: the drift slows down; k: its direction wanders off,
e^{−lag/τ}, or turns away, e^{−lag²/2τ²}; τ = ∞ is a straight path; see :class:`DriftShape`). Its Gram is

    E[Δ_a · Δ_b] = a² C(a, b) + s² min(a, b),   C(a, b) = Σ_{i ≤ a} Σ_{j ≤ b} i^−β j^−β k(|i−j|),

fitted per tensor through the increments between consecutive snapshots, δ_a = Δ_a − Δ_{a−1}: their products
D = L G Lᵀ (L the difference operator) against the model's L E[G] Lᵀ, the shape on a grid, a² and s² by
non-negative least squares on the normalised entries D_ab / √(D_aa D_bb). (Fitting G itself weights the
accumulated noise so heavily that a slow turn or slowdown of the drift does not show.) A predictor that is a
weighted sum of the stored deltas,
Δ̂(K) = Σ_t w_t Δ_t (every trend of :mod:`.core`, and θ_0 + α(θ_N − θ_0)), then has the expected error

    ||Δ̂(K) − Δ_K||² = wᵀ G w − 2 wᵀ E[M Δ_K] + E||Δ_K||²,

with the first term exact and the other two from the model. ``K_max`` is the last K (on a grid of ratios
of the window's span) before the whole-model relative distance sqrt(Σ err² / Σ E||Δ_K||²) exceeds the
tolerance. A reader can check it by hand from the reported drift, noise, β and τ and the distance curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..options import DEFAULT_BACKTEST_TOLERANCE
from .core import backtest, fit_trajectory, subspace_from_gram

__all__ = [
    "DriftShape",
    "SHAPES",
    "TURNING_SHAPES",
    "MAX_RATIO",
    "MIN_SNAPSHOTS",
    "TrajectoryModel",
    "WindowDiagnostic",
    "diagnose_window",
    "fit_trajectory_model",
    "trend_predictor",
    "model_cross_gram",
    "predicted_distances",
    "ratio_grid",
    "supported_target",
]

MAX_RATIO = 20.0
"""Largest horizon the estimator reports, as a multiple of the window's span (larger answers are capped)."""
MIN_SNAPSHOTS = 4
"""Fewest distinct snapshots from which the diagnostic estimates a horizon; below it K_max = N."""
_MODEL_STEPS = 200  # the model's time unit is ceil(span / 200) optimizer steps, so its matrices stay small
_DECAY_GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_TAU_GRID = tuple(2.0 ** (k / 2) for k in range(0, 25))  # 1 ... 4096 model steps
NEAR_BEST = 0.0
"""Shapes whose fit residual is within this fraction of the best one count as equally good fits."""
_STILL_RTOL = 1e-10
_FIT_ROWS = 24  # snapshots the model is fitted on (evenly spaced): 300 Gram entries per tensor


def supported_target(supported_step: float) -> int:
    """The whole step K_max of a supported horizon: rounded down (a horizon of step 8.7 supports step 8)."""
    return int(math.floor(supported_step + 1e-9))


def ratio_grid(max_ratio: float = MAX_RATIO, per_octave: int = 8) -> list[float]:
    """Horizon ratios K/N from 1 to ``max_ratio``, ``per_octave`` points per doubling."""
    count = int(math.ceil(math.log2(max_ratio) * per_octave))
    return [min(max_ratio, 2.0 ** (k / per_octave)) for k in range(count + 1)]


@dataclass(frozen=True)
class DriftShape:
    """How the drift of step i relates to that of step j: E[drift_i · drift_j] ∝ i^−β j^−β k(|i−j|), with the
    coherence kernel k = e^{−lag/τ} (``"exp"``: the direction wanders off) or e^{−lag²/2τ²} (``"gauss"``: it
    turns smoothly away); τ = ∞ is a straight path, β > 0 a drift that slows down (front-loaded progress). A
    ``"cos"`` kernel, cos(lag/τ) (turning in a fixed plane, the path bending back), is available but not in
    :data:`SHAPES`: a 16-step window cannot tell it from the Gaussian kernel, and adding it shortened some straight
    windows' horizons without improving the turning ones (``benchmarks/diagnostic_synthetic.py --turning-margin``)."""

    decay: float
    tau: float
    kernel: str

    def coherence(self, lag: torch.Tensor) -> torch.Tensor:
        """k(lag): 1 for a straight path (τ = ∞), else the shape's kernel."""
        if not math.isfinite(self.tau):
            return torch.ones_like(lag)
        if self.kernel == "exp":
            return torch.exp(-lag / self.tau)
        if self.kernel == "cos":
            return torch.cos(lag / self.tau)
        return torch.exp(-0.5 * (lag / self.tau) ** 2)

    def cumulative(self, rows: int, cols: int) -> torch.Tensor:
        """C[a−1, b−1] = Σ_{i ≤ a} Σ_{j ≤ b} i^−β j^−β k(|i−j|), ``[rows, cols]`` fp64."""
        i = torch.arange(1, rows + 1, dtype=torch.float64)[:, None]
        j = torch.arange(1, cols + 1, dtype=torch.float64)[None, :]
        kernel = self.coherence((i - j).abs())
        return (i.pow(-self.decay) * j.pow(-self.decay) * kernel).cumsum_(0).cumsum_(1)

    def diagonal(self, length: int) -> torch.Tensor:
        """C[K−1, K−1] for K = 1..``length`` in O(L log L): with A(m) = Σ_{i<m} i^−β k(m − i) (one FFT
        convolution), C(K, K) = Σ_{m ≤ K} (m^−2β k(0) + 2 m^−β A(m))."""
        f = torch.arange(1, length + 1, dtype=torch.float64).pow(-self.decay)
        kernel = self.coherence(torch.arange(length, dtype=torch.float64))
        shifted = kernel.clone()
        shifted[0] = 0.0  # A(m) excludes i = m
        size = 2 * length
        conv = torch.fft.irfft(torch.fft.rfft(f, size) * torch.fft.rfft(shifted, size), size)[:length]
        return (f * f * kernel[0] + 2.0 * f * conv).cumsum(0)

    def as_dict(self) -> dict[str, float | str]:
        return {"decay": self.decay, "tau": self.tau, "kernel": self.kernel}


SHAPES = tuple(DriftShape(b, math.inf, "exp") for b in _DECAY_GRID) + tuple(
    DriftShape(b, t, k) for b in _DECAY_GRID for k in ("exp", "gauss") for t in _TAU_GRID)
TURNING_SHAPES = SHAPES + tuple(DriftShape(b, t, "cos") for b in _DECAY_GRID for t in _TAU_GRID)
""":data:`SHAPES` and drifts turning in a fixed plane (the ``"cos"`` kernel): for the comparison in
``benchmarks/diagnostic_synthetic.py --turning-margin``, not the default (see :class:`DriftShape`)."""


@dataclass(frozen=True)
class TrajectoryModel:
    """Per-tensor fit of the drift + noise model: ``drift_sq`` a² (drift of the first model step), ``noise_sq``
    s² (per model step), ``shapes`` (index into :data:`SHAPES` per tensor), the relative residual, and ``unit``
    (optimizer steps per model step)."""

    drift_sq: torch.Tensor
    noise_sq: torch.Tensor
    shapes: torch.Tensor
    residual: torch.Tensor
    unit: int
    catalogue: tuple[DriftShape, ...] = ()

    def to_units(self, elapsed: torch.Tensor) -> torch.Tensor:
        return torch.round(elapsed.to(torch.float64) / self.unit).clamp_min(1.0).long()

    def gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """E[Δ_a · Δ_b] ``[n, len(a), len(b)]`` at elapsed optimizer steps ``a`` and ``b``."""
        ua, ub = self.to_units(a), self.to_units(b)
        out = torch.empty(self.drift_sq.numel(), ua.numel(), ub.numel(), dtype=torch.float64)
        for index in torch.unique(self.shapes).tolist():
            rows = self.shapes == index
            c = self.catalogue[index].cumulative(int(ua.max()), int(ub.max()))[ua - 1][:, ub - 1]
            out[rows] = self.drift_sq[rows, None, None] * c
        return out + self.noise_sq[:, None, None] * torch.minimum(ua[:, None], ub[None, :]).to(torch.float64)

    def future(self, targets: torch.Tensor) -> torch.Tensor:
        """E||Δ_K||² ``[n, k]`` at elapsed optimizer steps ``targets`` (the diagonal of :meth:`gram`, computed
        without the ``[K, K]`` matrix)."""
        ut = self.to_units(targets)
        out = torch.empty(self.drift_sq.numel(), ut.numel(), dtype=torch.float64)
        for index in torch.unique(self.shapes).tolist():
            rows = self.shapes == index
            out[rows] = self.drift_sq[rows, None] * self.catalogue[index].diagonal(int(ut.max()))[ut - 1][None, :]
        return out + self.noise_sq[:, None] * ut.to(torch.float64)[None, :]

    def summary(self, weights: torch.Tensor) -> dict[str, Any]:
        """Aggregates over tensors (``weights`` e.g. each tensor's energy): the whole model's drift and noise per
        optimizer step at the start of the window, the drift share a²/(a² + s²), and the weighted medians of the
        drift's decay β and coherence time τ (optimizer steps)."""
        drift, noise = float(self.drift_sq.sum()) / self.unit**2, float(self.noise_sq.sum()) / self.unit
        decay = torch.tensor([self.catalogue[i].decay for i in self.shapes.tolist()], dtype=torch.float64)
        tau = torch.tensor([self.catalogue[i].tau * self.unit for i in self.shapes.tolist()], dtype=torch.float64)
        return {
            "drift_per_step": math.sqrt(drift),
            "noise_per_step": math.sqrt(noise),
            "drift_share": drift / (drift + noise) if drift + noise > 0 else 0.0,
            "drift_decay": _weighted_median(decay, weights),
            "coherence_steps": _weighted_median(tau, weights),
            "model_unit_steps": self.unit,
        }


def _pessimism(shape: DriftShape) -> tuple:
    """Orders shapes from optimistic to pessimistic futures (larger is more pessimistic)."""
    return -math.log2(shape.tau) if math.isfinite(shape.tau) else -1e6, shape.kernel == "cos", shape.decay


def _weighted_median(values: torch.Tensor, weights: torch.Tensor) -> float:
    order = torch.argsort(values)
    cumulative = torch.cumsum(weights.to(torch.float64)[order], 0)
    index = int(torch.searchsorted(cumulative, cumulative[-1] / 2).clamp_max(len(order) - 1))
    return float(values[order][index])


def fit_trajectory_model(grams: torch.Tensor, elapsed: torch.Tensor, shapes: Sequence[DriftShape] = SHAPES,
                         near_best: float | None = None) -> TrajectoryModel:
    """Fit a², s² and the drift shape of every tensor to its Gram ``[n, T, T]`` at ``elapsed`` optimizer steps
    (x_t − x_0): for each shape, non-negative least squares of the normalised increment products D_ab / √(D_aa D_bb),
    D = L G Lᵀ with L the difference operator over the fitted snapshots; each
    tensor keeps the most pessimistic shape whose residual is within ``near_best`` (default :data:`NEAR_BEST`)
    of the smallest."""
    near_best = NEAR_BEST if near_best is None else near_best
    g = grams.detach().to(device="cpu", dtype=torch.float64)
    span = float(elapsed.max())
    unit = max(1, int(math.ceil(span / _MODEL_STEPS)))
    # at most _FIT_ROWS snapshots (evenly spaced, the last one kept) and the upper triangle of their Gram
    rows = torch.unique(torch.linspace(0, elapsed.numel() - 1, min(elapsed.numel(), _FIT_ROWS)).round().long())
    g = g[:, rows][:, :, rows]
    x = torch.round(elapsed.to(torch.float64)[rows] / unit).clamp_min(1.0).long()
    # the increments' products D = L G Lᵀ: a slow turn or slowdown shows in how increments decorrelate with the lag
    diff = torch.eye(x.numel(), dtype=torch.float64) - torch.diag(torch.ones(x.numel() - 1, dtype=torch.float64), -1)
    g = diff @ g @ diff.T
    upper = torch.triu_indices(x.numel(), x.numel())
    n = g.shape[0]
    diag = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0.0)
    scale = (diag[:, :, None] * diag[:, None, :]).sqrt()
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-300), torch.zeros_like(scale))[:, upper[0], upper[1]]
    target = g[:, upper[0], upper[1]] * inv
    noise_gram = diff @ torch.minimum(x[:, None], x[None, :]).to(torch.float64) @ diff.T
    noise_basis = noise_gram[upper[0], upper[1]][None] * inv
    residuals, coefs = [], []
    size = int(x.max())
    for shape in shapes:
        drift_gram = diff @ shape.cumulative(size, size)[x - 1][:, x - 1] @ diff.T
        drift_basis = drift_gram[upper[0], upper[1]][None] * inv
        coef = _nnls2(drift_basis, noise_basis, target)
        residuals.append(((coef[:, :1] * drift_basis + coef[:, 1:] * noise_basis - target) ** 2).sum(-1))
        coefs.append(coef)
    res, coef = torch.stack(residuals, 1), torch.stack(coefs, 1)  # [n, S], [n, S, 2]
    # A short window cannot tell apart shapes whose fits are about as good, yet their futures differ: among
    # those within NEAR_BEST of the best residual, take the most pessimistic (shortest coherence, turning before
    # wandering, fastest slowdown), so the horizon is not decided by noise in favour of optimism.
    best_res = res.min(1).values
    near = res <= best_res[:, None] * (1.0 + near_best) + 1e-300
    pessimism = torch.empty(len(shapes), dtype=torch.float64)
    for rank, index in enumerate(sorted(range(len(shapes)), key=lambda i: _pessimism(shapes[i]))):
        pessimism[index] = rank
    chosen = torch.where(near, pessimism[None, :], torch.full_like(res, -math.inf)).argmax(1)
    best_coef = coef[torch.arange(n), chosen]
    best_shape = chosen
    best_res = res[torch.arange(n), chosen]
    count = float(upper.shape[1])
    return TrajectoryModel(drift_sq=best_coef[:, 0], noise_sq=best_coef[:, 1], shapes=best_shape,
                           residual=(best_res / count).sqrt(), unit=unit, catalogue=tuple(shapes))


def _nnls2(p: torch.Tensor, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Non-negative least squares y ≈ α p + β q per row ``[n, m]``; returns ``[n, 2]`` (α, β ≥ 0)."""
    pp, qq, pq = (p * p).sum(-1), (q * q).sum(-1), (p * q).sum(-1)
    py, qy = (p * y).sum(-1), (q * y).sum(-1)
    det = pp * qq - pq * pq
    safe = det.abs() > 1e-300
    alpha = torch.where(safe, (qq * py - pq * qy) / torch.where(safe, det, torch.ones_like(det)), torch.zeros_like(det))
    beta = torch.where(safe, (pp * qy - pq * py) / torch.where(safe, det, torch.ones_like(det)), torch.zeros_like(det))
    only_p = (py / pp.clamp_min(1e-300)).clamp_min(0.0)
    only_q = (qy / qq.clamp_min(1e-300)).clamp_min(0.0)
    res_p = ((only_p[:, None] * p - y) ** 2).sum(-1)
    res_q = ((only_q[:, None] * q - y) ** 2).sum(-1)
    ok = safe & (alpha >= 0) & (beta >= 0)
    one_p = torch.stack([only_p, torch.zeros_like(only_p)], -1)
    one_q = torch.stack([torch.zeros_like(only_q), only_q], -1)
    fallback = torch.where((res_p <= res_q)[:, None], one_p, one_q)
    return torch.where(ok[:, None], torch.stack([alpha, beta], -1), fallback)


def trend_predictor(grams: torch.Tensor, steps: Sequence[float], rank: int = 1, kind: str = "linear",
                    power: float = 1.0, origin: float = 0.0) -> Callable[[list[float]], torch.Tensor]:
    """The predictor of :func:`.core.fit_trajectory` on these Grams: targets -> weights ``[n, k, T]``."""
    named = [(str(i), g) for i, g in enumerate(grams)]

    def weights(targets: list[float]) -> torch.Tensor:
        fit = fit_trajectory(named, steps, targets, rank=rank, kind=kind, power=power, origin=origin)
        return torch.stack([tf.weights for tf in fit.tensors])

    return weights


def model_cross_gram(model: TrajectoryModel, elapsed: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[M Δ_K] [n, T, k], E||Δ_K||² [n, k])`` for elapsed target steps ``targets``."""
    return model.gram(elapsed, targets), model.future(targets)


def predicted_distances(
    grams: torch.Tensor, elapsed: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, model: TrajectoryModel
) -> torch.Tensor:
    """Whole-model expected relative distance at each target: ``weights`` ``[n, k, T]`` give Δ̂(K_j) = w_j M
    per tensor; returns ``[k]`` fp64."""
    g = grams.detach().to(device="cpu", dtype=torch.float64)
    w = weights.to(torch.float64)
    cross, future = model_cross_gram(model, elapsed, targets)
    pred_sq = ((w @ g) * w).sum(-1)  # [n, k]
    dot = (w * cross.transpose(-1, -2)).sum(-1)  # [n, k]
    err = (pred_sq - 2.0 * dot + future).clamp_min(0.0).sum(0)
    total = future.sum(0)
    return torch.where(total > 0, (err / total.clamp_min(1e-300)).sqrt(), torch.full_like(total, math.inf))


@dataclass
class WindowDiagnostic:
    """What the observation window says about extrapolating it (see the module docstring).

    ``supported_step`` is K_max as a global step; ``supported_ratio`` = (K_max − x_0) / (x_N − x_0).
    ``distance_curve`` maps horizon ratios to the model's expected distance for the configured predictor.
    """

    num_snapshots: int
    distinct_snapshots: int
    still_steps: list[float]
    growth_exponent: float | None
    direction_stability: float | None
    noise_share: float | None
    backtests: list[dict[str, float]]
    model: dict[str, float]
    tolerance: float
    supported_ratio: float
    supported_step: float
    distance_curve: dict[float, float]
    zero_std_fraction: float | None = None
    warnings: list[str] = field(default_factory=list)
    origin: float = 0.0

    def as_dict(self) -> dict:
        return {
            "num_snapshots": self.num_snapshots,
            "distinct_snapshots": self.distinct_snapshots,
            "still_steps": self.still_steps,
            "growth_exponent": self.growth_exponent,
            "direction_stability": self.direction_stability,
            "noise_share": self.noise_share,
            "backtests": self.backtests,
            "model": self.model,
            "tolerance": self.tolerance,
            "supported_ratio": self.supported_ratio,
            "supported_step": self.supported_step,
            "k_max": self.k_max,
            "k_max_ratio": self.k_max_ratio,
            "origin": self.origin,
            "distance_curve": {f"{r:.4g}": d for r, d in self.distance_curve.items()},
            "zero_std_fraction": self.zero_std_fraction,
            "warnings": list(self.warnings),
        }

    @property
    def k_max(self) -> int:
        """K_max as a whole step: ``supported_step`` rounded down, the one rounding rule of every log, report, card
        and target (``extrapolate_to="auto"`` writes this step)."""
        return supported_target(self.supported_step)

    @property
    def k_max_ratio(self) -> float:
        """(k_max − x_0) / (x_N − x_0): the horizon of the whole step :attr:`k_max` as a multiple of the window."""
        span = (self.supported_step - self.origin) / self.supported_ratio if self.supported_ratio > 0 else 0.0
        return (self.k_max - self.origin) / span if span > 0 else 1.0

    def beyond_warning(self, target: float, advice: str) -> str | None:
        """The warning for a target step beyond :attr:`k_max` (``None`` within it); ``advice``: what the caller can
        do instead (it differs between the callback and the offline commands)."""
        if target <= self.k_max:
            return None
        return (f"target step {target:g} is beyond the supported horizon K_max = step {self.k_max} "
                f"({self.k_max_ratio:.2f}x the window) at backtest_tolerance={self.tolerance:g}: the window diagnostic "
                f"expects the prediction to be farther from real training than that. {advice}")

    def summary_line(self) -> str:
        alpha = "n/a" if self.growth_exponent is None else f"{self.growth_exponent:.2f}"
        stab = "n/a" if self.direction_stability is None else f"{self.direction_stability:.2f}"
        return (f"supported horizon K_max = step {self.k_max} ({self.k_max_ratio:.2f}x the window, "
                f"distance ≤ {self.tolerance:g}); growth exponent {alpha}, direction stability {stab}, "
                f"drift share {self.model.get('drift_share', float('nan')):.2f}")


def _growth_exponent(norms: torch.Tensor, elapsed: torch.Tensor) -> float | None:
    keep = (norms > 0) & (elapsed > 0)
    if int(keep.sum()) < 2:
        return None
    lx, ly = elapsed[keep].log(), norms[keep].log()
    lx = lx - lx.mean()
    denom = float((lx * lx).sum())
    return float((lx * (ly - ly.mean())).sum()) / denom if denom > 0 else None


def _direction_stability(g: torch.Tensor, numels: torch.Tensor) -> float | None:
    t = g.shape[-1]
    half = (t + 1) // 2
    if half < 2:
        return None
    full = subspace_from_gram(g, 1)
    first = subspace_from_gram(g[:, :half, :half], 1)
    s_full, s_half = full.singular_values[:, 0], first.singular_values[:, 0]
    dot = (first.left[:, :, 0][:, None, :] @ g[:, :half, :] @ full.left[:, :, :1])[:, 0, 0]
    moved = (s_full > 0) & (s_half > 0)
    if not bool(moved.any()):
        return None
    cos = (dot / (s_full * s_half).clamp_min(1e-300)).abs().clamp_max(1.0)
    w = numels.to(torch.float64) * moved
    return float((cos * w).sum() / w.sum())


def diagnose_window(
    grams: torch.Tensor,
    steps: Sequence[float],
    origin: float,
    numels: Sequence[int],
    predictor: Callable[[list[float]], torch.Tensor],
    *,
    rank: int = 1,
    tolerance: float = DEFAULT_BACKTEST_TOLERANCE,
    max_ratio: float = MAX_RATIO,
    zero_std_fraction: float | None = None,
    backtest_kind: str = "linear",
    backtest_power: float = 1.0,
    shapes: Sequence[DriftShape] = SHAPES,
    near_best: float | None = None,
) -> WindowDiagnostic:
    """Diagnose a window from the per-tensor Grams ``[n, T, T]`` at global ``steps`` with θ_0 at ``origin``.

    ``predictor(targets)`` returns the weights ``[n, len(targets), T]`` of the predictor whose horizon is
    estimated (for the paper's method: the rank-1 line fitted on this window). ``zero_std_fraction`` is
    the trainer's mean share of prompt groups with zero reward variance over the window (GRPO), if known.
    ``shapes`` and ``near_best``: the drift shapes the model may take and the residual margin within which the
    most pessimistic one is kept (:func:`fit_trajectory_model`).
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    g = grams.detach().to(device="cpu", dtype=torch.float64)
    x = torch.as_tensor(list(steps), dtype=torch.float64)
    elapsed = x - float(origin)
    span = float(elapsed[-1]) if elapsed.numel() else 0.0
    sizes = torch.as_tensor(list(numels), dtype=torch.float64)
    num = int(x.numel())
    warnings: list[str] = []

    diag = torch.diagonal(g, dim1=-2, dim2=-1).sum(0)  # ||Δ_t||², whole model
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), diag[:-1]])
    cross_prev = torch.cat([torch.zeros(1, dtype=torch.float64), torch.diagonal(g.sum(0), offset=1)])
    increment_sq = (diag - 2.0 * cross_prev + prev).clamp_min(0.0)  # ||Δ_t − Δ_{t−1}||²
    scale = float(increment_sq.max()) if num else 0.0
    still = [float(s) for s, inc in zip(x.tolist(), increment_sq.tolist()) if inc <= _STILL_RTOL * max(scale, 1e-300)]
    distinct = num - len(still)
    if still:
        warnings.append(f"{len(still)} of {num} snapshots did not move from the previous one (steps "
                        f"{', '.join(f'{s:g}' for s in still[:8])}{', ...' if len(still) > 8 else ''}): zero-gradient "
                        "or skipped updates; the window is shorter than it looks")
    if zero_std_fraction is not None and zero_std_fraction > 0.5:
        warnings.append(f"{zero_std_fraction:.0%} of prompt groups had zero reward variance in the window: the "
                        "effective batch is small, so the window is noisy; raise the completions per step or the window")

    growth = _growth_exponent(diag.sqrt(), elapsed) if num else None
    stability = _direction_stability(g, sizes) if num >= 4 else None
    total = float(torch.linalg.eigvalsh(g).clamp_min(0).sum()) if num else 0.0
    top = float(subspace_from_gram(g, rank).eigenvalues[:, :rank].sum()) if num else 0.0
    noise_share = 1.0 - top / total if total > 0 else None
    backtests = []
    for m in sorted({max(2, round(num / 4)), max(2, round(num / 3)), max(2, (num + 1) // 2)}):
        if m < num and m >= 2:
            bt = backtest(list(g), x, rank=rank, kind=backtest_kind, power=backtest_power, origin=float(origin), num_fit=m)
            if bt is not None:
                backtests.append({"num_fit": m, "ratio": bt.ratio, "distance": bt.distance})

    ratios = ratio_grid(max_ratio)
    curve: dict[float, float] = {}
    model_summary: dict[str, float] = {}
    supported = 1.0
    if distinct < MIN_SNAPSHOTS or span <= 0 or total <= 0:
        warnings.append(f"only {distinct} distinct snapshot(s); at least {MIN_SNAPSHOTS} are needed to estimate a "
                        "horizon, so none is supported beyond the window (K_max = N)")
    else:
        model = fit_trajectory_model(g, elapsed, shapes, near_best)
        energy = torch.diagonal(g, dim1=-2, dim2=-1)[:, -1]
        model_summary = {**model.summary(energy), "fit_residual": float((model.residual * energy).sum() / energy.sum())}
        targets = [float(origin) + r * span for r in ratios]
        dist = predicted_distances(g, elapsed, torch.tensor(ratios, dtype=torch.float64) * span, predictor(targets), model)
        curve = {r: float(d) for r, d in zip(ratios, dist)}
        for r, d in zip(ratios, dist.tolist()):
            if r > 1.0 and d > tolerance:
                break
            supported = r
        if supported >= max_ratio:
            warnings.append(f"the model supports every horizon up to the cap of {max_ratio:g}x; K_max is capped there")
        if growth is not None and growth < 0.65 and supported > 2.0:
            warnings.append(f"the displacement grows like t^{growth:.2f} (diffusion-like); treat horizons beyond 2x with care")
    return WindowDiagnostic(
        num_snapshots=num, distinct_snapshots=distinct, still_steps=still, growth_exponent=growth,
        direction_stability=stability, noise_share=noise_share, backtests=backtests, model=model_summary,
        tolerance=float(tolerance), supported_ratio=float(supported), supported_step=float(origin) + supported * span,
        distance_curve=curve, zero_std_fraction=zero_std_fraction, warnings=warnings, origin=float(origin),
    )
