"""The one independent RELEX oracle, the one weight-capture callback and the NaN-injecting callback of the test suite.

Nothing here imports ``relex_callback``: predictions come from ``torch.linalg.svd`` of the stacked deltas and a
least-squares polynomial (``numpy.polyfit``) of the coefficients c = M v on the given step axis; the supported
horizon K_max (:func:`oracle_k_max`) is recomputed from the definition in ``relex_callback/math/diagnostic.py``'s
docstring with plain torch loops.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from transformers import TrainerCallback


def oracle_prediction(deltas: torch.Tensor, steps: Sequence[float], target: float, rank: int = 1, degree: int = 1) -> torch.Tensor:
    """Δ̂(target) = Σ_i ĉ_i(target) v_i of a ``[T, d]`` delta stack (fp64; σ_i ≤ 1e-6·σ_1 dropped)."""
    m = deltas.double()
    out = torch.zeros(m.shape[1], dtype=torch.float64)
    if not torch.count_nonzero(m):
        return out
    _, s_vals, vh = torch.linalg.svd(m, full_matrices=False)
    for i in range(min(rank, vh.shape[0])):
        if s_vals[i] <= 1e-6 * s_vals[0]:
            continue
        c = (m @ vh[i]).numpy()
        out += float(np.polyval(np.polyfit(np.asarray(steps, dtype=np.float64), c, degree), target)) * vh[i]
    return out


def oracle(weights, base_step, steps, target, rank=1, round_to=None, x=None, degree=1, power=None):
    """θ_0 + Σ ĉ_i(K) v_i per tensor of ``weights[step][name]``; the trend is fitted on ``x`` (default: ``steps``).

    ``round_to`` rounds the deltas to a storage dtype first (as a compact delta buffer does); ``power`` fits the
    line on (x − base_step)^power instead of x (the trend c = a + b·t^p)."""
    x = list(steps if x is None else x)
    if power is not None:
        x, target = [(s - base_step) ** power for s in x], (target - base_step) ** power
    out = {}
    for name, base in weights[base_step].items():
        m = torch.stack([(weights[s][name] - base).reshape(-1) for s in steps])
        m = (m.to(round_to) if round_to is not None else m).double()
        pred = oracle_prediction(m, x, target, rank=rank, degree=degree)
        out[name] = (base.double().reshape(-1) + pred).reshape(base.shape)
    return out


# The drift shapes of the horizon model (diagnostic.py: decay β in 0..1 by 0.2; coherence τ = 2^(k/2), k = 0..24
# model steps, kernels e^{−lag/τ} and e^{−lag²/2τ²}; τ = ∞ is a straight path), its time unit, the snapshots it is
# fitted on and the ratio grid of K_max: the definition's parameters, restated here.
K_MAX_DECAYS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
K_MAX_TAUS = tuple(2.0 ** (k / 2) for k in range(25))
K_MAX_MODEL_STEPS, K_MAX_FIT_ROWS, K_MAX_CAP = 200, 24, 20.0


def _cumulative(decay: float, tau: float, kernel: str, size: int) -> torch.Tensor:
    """C[a − 1, b − 1] = Σ_{i ≤ a} Σ_{j ≤ b} i^−β j^−β k(|i − j|) for a, b = 1..size (the double partial sums)."""
    i = torch.arange(1, size + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, size + 1, dtype=torch.float64)[None, :]
    lag = (i - j).abs()
    if math.isinf(tau):
        k = torch.ones_like(lag)
    else:
        k = torch.exp(-lag / tau) if kernel == "exp" else torch.exp(-0.5 * (lag / tau) ** 2)
    return (i ** -decay * j ** -decay * k).cumsum(0).cumsum(1)


def _nnls(p: torch.Tensor, q: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """min ||α p + β q − y||² over α, β ≥ 0: the best of the unconstrained solution (when feasible) and the optima
    on the faces α = 0 and β = 0; returns (α, β, residual)."""
    options = [(0.0, 0.0)]
    if float(p @ p) > 0:
        options.append((max(0.0, float(p @ y) / float(p @ p)), 0.0))
    if float(q @ q) > 0:
        options.append((0.0, max(0.0, float(q @ y) / float(q @ q))))
    design = torch.stack([p, q], 1)
    if int(torch.linalg.matrix_rank(design)) == 2:
        a, b = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
        if a >= 0 and b >= 0:
            options.append((a, b))
    scored = [(float(((a * p + b * q - y) ** 2).sum()), a, b) for a, b in options]
    residual, a, b = min(scored)
    return a, b, residual


def oracle_k_max(weights, base_step, steps, tolerance: float = 0.75, with_curve: bool = False):
    """K_max of the rank-1 line fitted on the deltas ``weights[s] − weights[base_step]``, ``s`` in ``steps``, from
    the definition: per tensor, with E[Δ_a·Δ_b] = a² C(a, b) + s² min(a, b), fit the expected products of the
    increments δ_r = Δ_{x_r} − Δ_{x_{r−1}} between consecutive fit rows (Δ_{x_0} = 0) to their observed products,
    normalised as D_ab / √(D_aa D_bb) on the upper triangle (each shape by non-negative least squares; the smallest
    residual wins); the line predicts
    Δ̂(K) = Σ_t w_t Δ_t with w = (ℓ(K)·u) u (u: the top left singular vector of the deltas, ℓ(K): the OLS weights
    of the line's value at K); K_max is the last ratio r = (K − x_0)/span of the grid 2^(k/8), capped at 20, before
    the whole-model sqrt(Σ E||Δ̂(K) − Δ_K||² / Σ E||Δ_K||²) exceeds ``tolerance``. Returns the whole step
    ⌊x_0 + r·span⌋ (and the curve {r: distance} with ``with_curve``)."""
    steps = [float(s) for s in steps]
    elapsed = torch.tensor([s - base_step for s in steps], dtype=torch.float64)
    span = float(elapsed[-1])
    unit = max(1, math.ceil(span / K_MAX_MODEL_STEPS))
    ratios = [min(K_MAX_CAP, 2.0 ** (k / 8)) for k in range(math.ceil(math.log2(K_MAX_CAP) * 8) + 1)]
    x = torch.round(elapsed / unit).clamp_min(1).long()  # model steps
    kx = torch.round(torch.tensor(ratios, dtype=torch.float64) * span / unit).clamp_min(1).long()
    rows = torch.tensor(sorted(set(torch.linspace(0, len(steps) - 1, min(len(steps), K_MAX_FIT_ROWS)).round().long().tolist())))
    ua, ub = torch.triu_indices(len(rows), len(rows))
    ends = x[rows]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])  # the increment of row r spans (starts, ends]

    def increment_products(cum):
        """E[δ_a·δ_b] on the upper triangle from a cumulative E[Δ_i·Δ_j] (index 0: Δ = 0)."""
        padded = torch.zeros(cum.shape[0] + 1, cum.shape[1] + 1, dtype=torch.float64)
        padded[1:, 1:] = cum
        a1, a0, b1, b0 = ends[ua], starts[ua], ends[ub], starts[ub]
        return padded[a1, b1] - padded[a0, b1] - padded[a1, b0] + padded[a0, b0]

    size = int(max(kx.max(), x.max()))
    steps_grid = torch.arange(1, size + 1)
    noise_products = increment_products(torch.minimum(steps_grid[:, None], steps_grid[None, :]).double())
    shapes = [(d, math.inf, "exp") for d in K_MAX_DECAYS] + [
        (d, t, k) for d in K_MAX_DECAYS for k in ("exp", "gauss") for t in K_MAX_TAUS]
    cumulative = {shape: _cumulative(*shape, size) for shape in shapes}
    drift_products = {shape: increment_products(c) for shape, c in cumulative.items()}
    design = np.stack([np.ones(len(steps)), np.asarray(steps)], 1)
    ell = torch.from_numpy(np.stack([np.array([1.0, base_step + r * span]) for r in ratios]) @ np.linalg.pinv(design))
    err = torch.zeros(len(ratios), dtype=torch.float64)
    total = torch.zeros(len(ratios), dtype=torch.float64)
    for name, base in weights[base_step].items():
        m = torch.stack([(weights[s][name].double() - base.double()).reshape(-1) for s in steps])
        g = m @ m.T
        if not bool((g.diagonal() > 0).any()):
            continue  # a tensor that never moved adds nothing to either sum
        increments = torch.diff(m[rows], dim=0, prepend=torch.zeros(1, m.shape[1], dtype=torch.float64))
        d = increments @ increments.T
        scale = (d.diagonal()[ua] * d.diagonal()[ub]).sqrt()
        inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-300), torch.zeros_like(scale))
        y, q = d[ua, ub] * inv, noise_products * inv
        fits = [(*_nnls(drift_products[shape] * inv, q, y), shape) for shape in shapes]
        drift, noise, _, shape = min(fits, key=lambda fit: fit[2])
        c = cumulative[shape]
        u = torch.linalg.svd(m, full_matrices=False).U[:, 0]
        w = (ell @ u)[:, None] * u[None, :]  # [ratios, T]
        cross = drift * c[x - 1][:, kx - 1] + noise * torch.minimum(x[:, None], kx[None, :]).double()  # E[Δ_t·Δ_K]
        future = drift * c[kx - 1, kx - 1] + noise * kx.double()  # E||Δ_K||²
        err += (((w @ g) * w).sum(1) - 2.0 * (w * cross.T).sum(1) + future).clamp_min(0.0)
        total += future
    distances = (err / total).sqrt().tolist()
    supported = 1.0
    for r, d in zip(ratios, distances):
        if r > 1.0 and d > tolerance:
            break
        supported = r
    k_max = math.floor(base_step + supported * span + 1e-9)
    return (k_max, dict(zip(ratios, distances))) if with_curve else k_max


def max_diff(actual, expected) -> float:
    return max(float((actual[n].double() - expected[n].double()).abs().max()) for n in expected)


class CaptureWeights(TrainerCallback):
    """Independent record of trainable tensors (clones), keyed by global step.

    ``weights`` (also ``post``): at ``on_train_begin`` and at every ``on_step_end``, i.e. after the
    ``on_step_end`` of the callbacks listed before this one; with ``pre=True`` also ``pre``: right after every
    optimizer step, before any ``on_step_end``; ``logs``: every ``on_log``; with ``with_optimizer`` the optimizer
    state at both points (``opt_pre``, ``opt_post``). ``dtype`` casts the clones (``None`` keeps the parameter
    dtype); ``names`` limits the tensors.
    """

    def __init__(self, pre: bool = False, with_optimizer: bool = False, dtype: torch.dtype | None = torch.float32, names=None):
        self.weights, self.pre, self.opt_pre, self.opt_post, self.logs = {}, {}, {}, {}, []
        self.post = self.weights
        self.with_pre, self.with_optimizer, self.dtype, self.names = pre, with_optimizer, dtype, names

    def grab(self, model):
        chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (self.names is None or n in self.names)]
        if self.dtype is None:
            return {n: p.detach().clone() for n, p in chosen}
        return {n: p.detach().to(self.dtype).clone() for n, p in chosen}

    @staticmethod
    def grab_optimizer(model, optimizer):
        state = getattr(optimizer, "optimizer", optimizer).state
        return {n: {k: v.detach().clone() for k, v in state[p].items()} for n, p in model.named_parameters() if p in state}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = self.grab(model)
        if self.with_pre:
            self.pre.setdefault(state.global_step, self.weights[state.global_step])

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.with_pre:
            self.pre[state.global_step + 1] = self.grab(model)
            if self.with_optimizer:
                self.opt_pre[state.global_step + 1] = self.grab_optimizer(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights[state.global_step] = self.grab(model)
        if self.with_optimizer:
            self.opt_post[state.global_step] = self.grab_optimizer(model, optimizer)


class PoisonAt(TrainerCallback):
    """Writes a NaN into one weight right after the optimizer step that ends at global step ``step``."""

    def __init__(self, step, name):
        self.step, self.name = step, name

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                dict(model.named_parameters())[self.name].view(-1)[0] = float("nan")
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}
