"""The RELEX math (arXiv 2605.21468), framework-free: it imports only torch (and the option names of
:mod:`relex_callback.options`).

Notation (per named parameter tensor, flattened to length d):

* ``M`` ``[T, d]``: the observed deltas Δ_t = θ_t − θ_0, one row per snapshot step ``x_t``.
* ``G = M Mᵀ`` ``[T, T]``: the Gram matrix. Everything except the two passes over ``M``
  (:func:`gram_matrix`, :func:`combine`) works on ``G`` alone, so a tensor split across processes
  only needs an all-reduce (sum) of ``G`` and each process combines its own slice of ``M``.
* ``G = U Λ Uᵀ`` (``eigh``), σ_i = √λ_i: the uncentered SVD ``M = U Σ Vᵀ``. The top-r right singular
  vectors v_i (rows of ``Vᵀ``) are the paper's update directions; ``c_t = U_r Σ_r`` are the
  coefficients c_t = Δ_t · v.
* A trend ĉ(x) is fitted to ``c`` by least squares with a free intercept (the paper's line, or a
  power-law / quadratic time axis), and the prediction is θ̂(K) = θ_0 + Σ_i ĉ_i(K) v_i.

Because ``v_i = Mᵀ u_i / σ_i``, the prediction is a weighted sum of the stored deltas,
``Δ̂(K) = Σ_t w_t Δ_t`` with ``w = U_r (ĉ(K) / σ_r)``: :func:`prediction_weights` computes ``w``
from ``G``; :func:`combine` applies it. ``V`` is never materialised.

Numerical convention: deltas may be stored compactly (bf16/fp16); every pass over them upcasts
chunks to fp32 and accumulates ``G`` in fp64; the eigendecomposition and the regressions run in
fp64; callers cast the result to the parameter dtype. A component is dropped when
σ_i ≤ 1e-6·σ_1, as in the official ``svd_extrapolation.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..options import POWER_GRID, TREND_KINDS

__all__ = [
    "TREND_KINDS",
    "Subspace",
    "Trend",
    "Backtest",
    "gram_matrix",
    "subspace_from_gram",
    "fit_trend",
    "r_squared",
    "prediction_weights",
    "reconstruction_weights",
    "combine",
    "backtest_errors",
    "squared_errors",
    "backtest",
    "select_power",
    "POWER_GRID",
]

SINGULAR_VALUE_RTOL = 1e-6
# fp32 values upcast per chunk. On CPU a 4 MiB chunk is served from the heap and stays in cache; a 64 MiB one
# is a fresh mmap that the kernel page-faults in on every call (2-3x slower passes, measured in
# benchmarks/bench_perf.py). GPUs keep large chunks: the caching allocator reuses them and kernels want size.
_CPU_CHUNK_ELEMENTS = 1 << 20
_GPU_CHUNK_ELEMENTS = 1 << 24


def _chunk_columns(num_rows: int, num_cols: int, chunk_elements: int) -> int:
    return max(1, min(num_cols, chunk_elements // max(num_rows, 1)))


def _resolve_chunk(device: torch.device, chunk_elements: int | None) -> int:
    if chunk_elements is None:
        return _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    return chunk_elements


class _Upcaster:
    """Contiguous fp32 copies of ``[T, w]`` column slices of a delta stack, written into one reused scratch
    buffer (no allocation per chunk).

    fp32 stacks are copied too: matmul kernels may round differently for differently strided inputs, and
    the copy makes every pass independent of how the stack is stored (a slice of a larger in-memory stack,
    or a block read from a disk store), so both give bit-identical results.
    """

    def __init__(self, deltas: torch.Tensor, width: int):
        self.deltas = deltas
        self.scratch = torch.empty(deltas.shape[0] * min(width, deltas.shape[1]), dtype=torch.float32, device=deltas.device)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        piece = self.deltas[:, start:stop]
        return self.scratch[: piece.numel()].view(piece.shape).copy_(piece)


def gram_matrix(deltas: torch.Tensor, chunk_elements: int | None = None, block: int = 4096) -> torch.Tensor:
    """``G = M Mᵀ`` (fp64, ``[T, T]``) of a ``[T, d]`` delta stack, summed in fp64 from fp32 Grams of
    ``block``-column slices, one batched matmul per chunk of about ``chunk_elements`` upcast values
    (default: 1M on CPU, 16M on GPU).

    Each fp32 dot product runs over only ``block`` elements: the relative error of ``G`` stays near 1e-6
    where one fp32 accumulation over millions of columns reaches ~1e-4 (enough to flip bf16 roundings of
    an extrapolated model), and the batched call is also faster than one long, thin matmul.
    """
    if deltas.dim() != 2:
        raise ValueError(f"deltas must be a 2-D [T, d] tensor, got shape {tuple(deltas.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    num_rows, num_cols = deltas.shape
    chunk_elements = _resolve_chunk(deltas.device, chunk_elements)
    gram = torch.zeros(num_rows, num_rows, dtype=torch.float64, device=deltas.device)
    width = max(block, _chunk_columns(num_rows, num_cols, chunk_elements) // block * block)
    upcast = _Upcaster(deltas, width)
    for start in range(0, num_cols, width):
        chunk = upcast(start, start + width)
        whole = chunk.shape[1] // block * block
        if whole:
            blocks = chunk[:, :whole].reshape(num_rows, whole // block, block).transpose(0, 1)  # [n, T, block]
            gram += torch.bmm(blocks, blocks.transpose(1, 2)).sum(0, dtype=torch.float64)
        if whole < chunk.shape[1]:
            rest = chunk[:, whole:]
            gram += (rest @ rest.T).to(torch.float64)
    return gram


@dataclass(frozen=True)
class Subspace:
    """Top-r uncentered SVD of ``M`` recovered from its Gram matrix.

    ``left`` is ``U_r`` ``[T, r]``; ``singular_values`` is σ_1..σ_r (dropped components hold 0);
    ``eigenvalues`` are all T eigenvalues λ = σ² of ``G``, descending, clamped at 0.
    """

    left: torch.Tensor
    singular_values: torch.Tensor
    eigenvalues: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.singular_values.numel())

    @property
    def coefficients(self) -> torch.Tensor:
        """c_t,i = Δ_t · v_i = (U_r Σ_r)_t,i, ``[T, r]`` fp64."""
        return self.left * self.singular_values.unsqueeze(-2)

    @property
    def inverse_singular_values(self) -> torch.Tensor:
        """1/σ_i, 0 for a dropped component."""
        sigma = self.singular_values
        return torch.where(sigma > 0, 1.0 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))

    def project(self, gram_cross: torch.Tensor) -> torch.Tensor:
        """Coefficients Δ_h · v_i = (G[h, fit] u_i) / σ_i of other snapshots h, from their Gram rows against the
        snapshots this subspace was fitted on (``[H, T]`` → ``[H, r]``)."""
        return (gram_cross.to(torch.float64) @ self.left) * self.inverse_singular_values.unsqueeze(-2)

    def __getitem__(self, index: int) -> Subspace:
        """The subspace of one tensor of a batched result."""
        return Subspace(left=self.left[index], singular_values=self.singular_values[index], eigenvalues=self.eigenvalues[index])

    @property
    def explained_variance(self) -> float:
        """Σ_{i≤r} σ_i² / Σ_i σ_i² (0 for a tensor that never moved)."""
        total = float(self.eigenvalues.sum())
        if total <= 0.0:
            return 0.0
        return float(self.eigenvalues[: self.rank].sum()) / total


def subspace_from_gram(gram: torch.Tensor, rank: int) -> Subspace:
    """Eigendecompose ``G`` (fp64) and keep the top ``rank`` components.

    ``gram`` may carry leading batch dimensions (``[n, T, T]``, one batched ``eigh`` for n tensors); the
    fields of the result then carry them too."""
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    gram64 = gram.detach().to(device="cpu", dtype=torch.float64)
    gram64 = 0.5 * (gram64 + gram64.transpose(-1, -2))
    eigenvalues, eigenvectors = torch.linalg.eigh(gram64)
    eigenvalues = eigenvalues.flip(-1).clamp_min(0.0)
    eigenvectors = eigenvectors.flip(-1)
    rank = min(rank, gram.shape[-1])
    singular_values = eigenvalues[..., :rank].sqrt()
    top = singular_values[..., :1]
    threshold = torch.where(top > 0, top * SINGULAR_VALUE_RTOL, torch.full_like(top, 1e-12))
    singular_values = torch.where(singular_values > threshold, singular_values, torch.zeros_like(singular_values))
    return Subspace(left=eigenvectors[..., :rank].contiguous(), singular_values=singular_values, eigenvalues=eigenvalues)


@dataclass(frozen=True)
class Trend:
    """A least-squares trend ĉ(x) per component, with a free intercept.

    * ``linear``: ĉ(x) = a + b·x (the paper's line);
    * ``power``: ĉ(x) = a + b·(x − origin)^p (p = 1 is the line; p = 0.5 follows √t growth);
    * ``poly2``: ĉ(x) = a + b·x + c·x² (on a centred, scaled x).
    """

    kind: str
    params: torch.Tensor  # [num_basis, r] fp64
    power: float = 1.0
    origin: float = 0.0
    center: float = 0.0
    scale: float = 1.0

    def basis(self, steps: torch.Tensor | Sequence[float]) -> torch.Tensor:
        x = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
        ones = torch.ones_like(x)
        if self.kind == "linear":
            return torch.stack([ones, (x - self.center) / self.scale], dim=1)
        if self.kind == "power":
            elapsed = (x - self.origin).clamp_min(0.0)
            return torch.stack([ones, elapsed.pow(self.power) / self.scale], dim=1)
        if self.kind == "poly2":
            u = (x - self.center) / self.scale
            return torch.stack([ones, u, u * u], dim=1)
        raise ValueError(f"unknown trend kind {self.kind!r}; choose one of {TREND_KINDS}")

    def __call__(self, steps: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """ĉ at ``steps``: ``[len(steps), r]`` fp64 (``[n, len(steps), r]`` for batched params)."""
        return self.basis(steps) @ self.params

    def __getitem__(self, index: int) -> Trend:
        """The trend of one tensor of a batched fit."""
        return Trend(kind=self.kind, params=self.params[index], power=self.power, origin=self.origin, center=self.center, scale=self.scale)


def _num_basis(kind: str) -> int:
    return 3 if kind == "poly2" else 2


def fit_trend(
    steps: torch.Tensor | Sequence[float],
    coefficients: torch.Tensor,
    kind: str = "linear",
    power: float = 1.0,
    origin: float = 0.0,
) -> Trend:
    """Ordinary least squares (fp64) of each column of ``coefficients`` ``[T, r]`` on ``steps``.

    ``coefficients`` may be ``[n, T, r]`` (n tensors on the same steps, one batched solve); ``params``
    is then ``[n, num_basis, r]``."""
    if kind not in TREND_KINDS:
        raise ValueError(f"kind must be one of {TREND_KINDS}, got {kind!r}")
    x = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    c = coefficients.detach().to(device="cpu", dtype=torch.float64)
    if c.dim() == 1:
        c = c[:, None]
    if x.numel() != c.shape[-2]:
        raise ValueError(f"got {x.numel()} steps for {c.shape[-2]} coefficient rows")
    if x.numel() < _num_basis(kind):
        raise ValueError(f"a {kind} trend needs at least {_num_basis(kind)} snapshots, got {x.numel()}")
    if kind == "power" and not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    if kind == "power":
        if bool((x <= origin).any()):
            raise ValueError(f"power trend needs every step after the origin {origin}, got {x.tolist()}")
        scale = float((x - origin).pow(power).abs().max())
        center = 0.0
    else:
        center = float(x.mean())
        scale = float((x - center).abs().max()) or 1.0
    trend = Trend(kind=kind, params=torch.empty(0), power=float(power), origin=float(origin), center=center, scale=scale)
    design = trend.basis(x).expand(*c.shape[:-2], -1, -1)
    params = torch.linalg.lstsq(design, c, driver="gelsd").solution
    return Trend(kind=kind, params=params, power=float(power), origin=float(origin), center=center, scale=scale)


def r_squared(steps: torch.Tensor | Sequence[float], coefficients: torch.Tensor, trend: Trend) -> torch.Tensor:
    """Coefficient of determination of ``trend`` on ``coefficients`` ``[T, r]`` per component (1 when constant)."""
    c = coefficients.to(torch.float64)
    if c.dim() == 1:
        c = c[:, None]
    residual = (c - trend(steps)).pow(2).sum(-2)
    total = (c - c.mean(-2, keepdim=True)).pow(2).sum(-2)
    return torch.where(total > 0, 1.0 - residual / total.clamp_min(1e-300), torch.ones_like(total))


def prediction_weights(subspace: Subspace, predicted_coefficients: torch.Tensor) -> torch.Tensor:
    """``w`` ``[n, T]`` with Δ̂ = w M: ``w = ĉ Σ_r⁻¹ U_rᵀ`` (dropped components contribute nothing)."""
    c_hat = predicted_coefficients.to(torch.float64)
    if c_hat.dim() == 1:
        c_hat = c_hat[None, :]
    return (c_hat * subspace.inverse_singular_values.unsqueeze(-2)) @ subspace.left.transpose(-1, -2)


def reconstruction_weights(subspace: Subspace) -> torch.Tensor:
    """``U_r U_rᵀ`` ``[T, T]``: row t projects Δ_t onto the rank-r subspace (the paper's Finding-1 check)."""
    kept = (subspace.singular_values > 0).to(torch.float64)
    return (subspace.left * kept) @ subspace.left.T


def combine(deltas: torch.Tensor, weights: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
    """``weights @ deltas`` in fp32 chunks over d: ``[n, T] × [T, d] → [n, d]`` fp32."""
    if weights.dim() == 1:
        weights = weights[None, :]
    num_rows, num_cols = deltas.shape
    if weights.shape[1] != num_rows:
        raise ValueError(f"weights have {weights.shape[1]} columns for {num_rows} delta rows")
    out = torch.empty(weights.shape[0], num_cols, dtype=torch.float32, device=deltas.device)
    w32 = weights.to(device=deltas.device, dtype=torch.float32)
    width = _chunk_columns(num_rows, num_cols, _resolve_chunk(deltas.device, chunk_elements))
    upcast = _Upcaster(deltas, width)
    for start in range(0, num_cols, width):
        torch.mm(w32, upcast(start, start + width), out=out[:, start : start + width])
    return out


def backtest_errors(
    gram: torch.Tensor,
    steps: torch.Tensor | Sequence[float],
    num_fit: int,
    rank: int = 1,
    kind: str = "linear",
    power: float = 1.0,
    origin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit on the first ``num_fit`` snapshots and predict the rest, from ``G`` alone.

    Returns ``(squared_error, squared_norm)``, each ``[T − num_fit]`` fp64: ||Δ̂_t − Δ_t||² and
    ||Δ_t||² for every held-out snapshot t. With v_i = M_fitᵀ u_i / σ_i orthonormal,
    ||Δ̂_t||² = Σ ĉ_i², Δ̂_t·Δ_t = Σ ĉ_i u_iᵀ G[:fit, t] / σ_i. Sum both over tensors for a
    whole-model relative distance. A batched ``gram`` ``[n, T, T]`` gives ``[n, T − num_fit]`` each.
    """
    x = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    g = gram.detach().to(device="cpu", dtype=torch.float64)
    fit_sub = subspace_from_gram(g[..., :num_fit, :num_fit], rank)
    trend = fit_trend(x[:num_fit], fit_sub.coefficients, kind=kind, power=power, origin=origin)
    c_hat = trend(x[num_fit:])  # [..., H, r]
    weights = prediction_weights(fit_sub, c_hat)  # [..., H, num_fit]: Δ̂_t = w_t M_fit
    return squared_errors(g, weights, num_fit, range(num_fit, g.shape[-1]))


def squared_errors(
    gram: torch.Tensor, weights: torch.Tensor, num_fit: int, rows: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """||Σ_t w_t Δ_t − Δ_h||² and ||Δ_h||² for each snapshot h of ``rows``, from ``G`` alone: ``weights``
    ``[..., len(rows), num_fit]`` weigh the first ``num_fit`` snapshots (one row of weights per h)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    cross = (weights * gram[..., index, :num_fit]).sum(-1)  # Δ̂_h · Δ_h
    predicted = ((weights @ gram[..., :num_fit, :num_fit]) * weights).sum(-1)  # ||Δ̂_h||²
    norm = torch.diagonal(gram, dim1=-2, dim2=-1)[..., index]
    return (predicted - 2.0 * cross + norm).clamp_min(0.0), norm


@dataclass(frozen=True)
class Backtest:
    """Whole-model backtest: fit on the first ``num_fit`` snapshots, predict the last one.

    ``distance`` = ||θ̂ − θ|| / ||θ − θ_0|| at the last observed snapshot; ``ratio`` is how far that
    is beyond the fitted part, (x_last − origin) / (x_fit_last − origin).
    """

    num_fit: int
    ratio: float
    distance: float

    def supported_ratio(self, tolerance: float) -> float:
        """Horizon ratio at which the distance, growing linearly with (ratio − 1), reaches ``tolerance``."""
        if self.distance <= 0.0:
            return math.inf
        return 1.0 + (self.ratio - 1.0) * tolerance / self.distance


def backtest(
    grams: Sequence[torch.Tensor],
    steps: torch.Tensor | Sequence[float],
    rank: int = 1,
    kind: str = "linear",
    power: float = 1.0,
    origin: float = 0.0,
    num_fit: int | None = None,
) -> Backtest | None:
    """Whole-model backtest over several tensors' Gram matrices (``None`` when too few snapshots).

    By default the fit uses the first half of the window, so the held-out last snapshot sits about
    2× as far from ``origin`` as the fitted part ends.
    """
    x = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    num_steps = x.numel()
    if num_fit is None:
        num_fit = max(_num_basis(kind), min(num_steps - 1, (num_steps + 1) // 2))
    if num_fit < max(_num_basis(kind), 1) or num_fit >= num_steps:
        return None
    error = norm = torch.zeros((), dtype=torch.float64)
    if len(grams):
        stacked = torch.stack([g.detach().to(device="cpu", dtype=torch.float64) for g in grams])
        sq_err, sq_norm = backtest_errors(stacked, x, num_fit, rank=rank, kind=kind, power=power, origin=origin)
        error, norm = sq_err[:, -1].sum(), sq_norm[:, -1].sum()
    distance = float(error.sqrt() / norm.sqrt()) if norm > 0 else 0.0
    span_fit = float(x[num_fit - 1] - origin)
    ratio = float(x[-1] - origin) / span_fit if span_fit > 0 else math.inf
    return Backtest(num_fit=num_fit, ratio=ratio, distance=distance)


def select_power(
    grams: Sequence[torch.Tensor],
    steps: torch.Tensor | Sequence[float],
    rank: int = 1,
    origin: float = 0.0,
    grid: Sequence[float] = POWER_GRID,
    num_fit: int | None = None,
) -> tuple[float, dict[float, float]]:
    """The exponent p of the power trend c = a + b·(x − origin)^p with the smallest whole-model backtest
    distance over ``grid`` (Gram-only, so it costs a few small eigendecompositions per tensor).

    Returns ``(p, {p: distance})``. Ties keep the larger p (nearer the paper's line); with too few snapshots
    for a backtest the largest p of the grid is returned.
    """
    if not grid:
        raise ValueError("grid must hold at least one exponent")
    distances: dict[float, float] = {}
    for power in grid:
        result = backtest(grams, steps, rank=rank, kind="power", power=float(power), origin=origin, num_fit=num_fit)
        if result is not None:
            distances[float(power)] = result.distance
    if not distances:
        return float(max(grid)), distances
    best = min(distances.items(), key=lambda item: (item[1], -item[0]))[0]
    return best, distances


@dataclass(frozen=True)
class TensorFit:
    """The fit of one tensor: its subspace, trend, R² per component and prediction weights ``[n, T]``."""

    name: str
    subspace: Subspace
    trend: Trend
    r2: torch.Tensor
    weights: torch.Tensor

    @property
    def explained_variance(self) -> float:
        return self.subspace.explained_variance


@dataclass(frozen=True)
class TrajectoryFit:
    """Fits of every tensor of a model on the same snapshot steps, plus the whole-model backtest, and what they were
    fitted from: ``grams`` the ``[n, T, T]`` fp64 Grams (Mᵢ Mᵢᵀ of each tensor, summed over shards) and ``origin``
    the step x_0 of θ_0."""

    steps: list[float]
    targets: list[float]
    tensors: list[TensorFit]
    backtest: Backtest | None
    grams: torch.Tensor | None = None
    origin: float = 0.0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


def fit_trajectory(
    grams: Sequence[tuple[str, torch.Tensor]],
    steps: Sequence[float],
    targets: Sequence[float],
    rank: int = 1,
    kind: str = "linear",
    power: float = 1.0,
    origin: float = 0.0,
) -> TrajectoryFit:
    """Fit every tensor from its (already summed over shards) Gram matrix and weight each target.

    ``weights[j]`` of a tensor gives Δ̂(targets[j]) = weights[j] · M (apply with :func:`combine`).
    """
    if not grams:
        raise ValueError("fit_trajectory needs at least one tensor's Gram matrix")
    stacked = torch.stack([g.detach().to(device="cpu", dtype=torch.float64) for _, g in grams])  # [n, T, T]
    tensor_fits = fit_tensors([name for name, _ in grams], stacked, steps, targets, rank=rank, kind=kind, power=power,
                              origin=origin)
    result = backtest([g for _, g in grams], steps, rank=rank, kind=kind, power=power, origin=origin)
    return TrajectoryFit(steps=[float(s) for s in steps], targets=[float(t) for t in targets], tensors=tensor_fits,
                         backtest=result, grams=stacked, origin=float(origin))


def fit_tensors(
    names: Sequence[str],
    grams: torch.Tensor,
    steps: Sequence[float] | torch.Tensor,
    targets: Sequence[float] | torch.Tensor,
    rank: int = 1,
    kind: str = "linear",
    power: float = 1.0,
    origin: float = 0.0,
    trend_steps: int | None = None,
) -> list[TensorFit]:
    """Per tensor of ``grams`` ``[n, T, T]``: the rank-r subspace of all T snapshots (one batched ``eigh``), the
    trend ĉ fitted on the coefficients of the last ``trend_steps`` of them (default all, the paper; the official
    script's ``--window`` fits only the trend on the last W), and the weights of ``targets`` (Δ̂ = w M)."""
    subspace = subspace_from_gram(grams, rank)
    coefficients = subspace.coefficients
    used = coefficients.shape[-2] if trend_steps is None else int(trend_steps)
    x = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)[-used:]
    trend = fit_trend(x, coefficients[..., -used:, :], kind=kind, power=power, origin=origin)
    r2 = r_squared(x, coefficients[..., -used:, :], trend)
    weights = prediction_weights(subspace, trend(torch.as_tensor(targets, dtype=torch.float64).reshape(-1)))
    return [TensorFit(name=name, subspace=subspace[i], trend=trend[i], r2=r2[i], weights=weights[i])
            for i, name in enumerate(names)]


