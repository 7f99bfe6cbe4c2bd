"""The benchmarks' one path to a prediction: the package's own :class:`~relex_callback.engine.RelexEngine`.

Every quality benchmark keeps its window in an engine buffer (recorded as the callback records it, or filled with
saved rows bit for bit), fits it with ``RelexEngine.fit``, builds candidates with ``RelexEngine.candidates`` (the
families users select with ``candidates=[...]``) and writes them with ``RelexEngine.predict`` / ``load``: the
published numbers come from the code users run. Baselines that are not package features (a per-parameter line,
first-update scaling) weigh the same buffer rows with weights of their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from relex_callback import RelexConfig
from relex_callback.engine import Candidate, RelexEngine
from relex_callback.math.core import TrajectoryFit


def window_engine(model: torch.nn.Module, observe: int, buffer_dtype: str = "bfloat16") -> RelexEngine:
    """An engine over every trainable tensor of ``model`` with room for an ``observe``-step window (CPU buffer)."""
    engine = RelexEngine(RelexConfig(observe=observe, extrapolate_to="auto", buffer_device="cpu",
                                     buffer_dtype=buffer_dtype, save_model=False))
    engine.attach(model)
    return engine


class _SavedRows(Mapping):
    """``theta0/<name>`` and ``deltas/<name>`` read on demand, one tensor at a time (the buffer's state layout)."""

    def __init__(self, theta0: Mapping[str, torch.Tensor], rows: Sequence[Any]) -> None:
        self.theta0, self.rows = theta0, rows

    def __getitem__(self, key: str) -> torch.Tensor:
        part, _, name = key.partition("/")
        if part == "theta0" and name in self.theta0:
            return self.theta0[name].reshape(-1)
        if part == "deltas" and name in self.theta0:
            return torch.stack([row.get_tensor(name).reshape(-1) for row in self.rows])
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        for name in self.theta0:
            yield f"theta0/{name}"
            yield f"deltas/{name}"

    def __len__(self) -> int:
        return 2 * len(self.theta0)


def fill_window(engine: RelexEngine, theta0: Mapping[str, torch.Tensor], rows: Sequence[Any], steps: Sequence[float]) -> None:
    """Put θ_0 and saved rows Δ_t into ``engine``'s buffer exactly, as a resumed run restores them (recording
    θ_0 + Δ_t again would round Δ_t a second time). ``rows[i].get_tensor(name)``: Δ at ``steps[i]`` in the
    buffer dtype (e.g. an open safetensors file)."""
    engine.buffer.load_state_tensors(_SavedRows(theta0, rows), [float(s) for s in steps])


@torch.no_grad()
def load_observed(engine: RelexEngine) -> None:
    """Live weights ← θ_0 + Δ_N, the last recorded row: what the trainer holds when a halt-mode window ends."""
    for item in engine.buffer.tracked:
        last = engine.buffer.stack(item.name)[-1].to(torch.float32)
        item.view().copy_(last.add_(engine.buffer.theta0[item.name]))


def fit_as(engine: RelexEngine, targets: Sequence[float], rank: int = 1, kind: str = "linear",
           power: float | str = 1.0) -> TrajectoryFit:
    """``RelexEngine.fit`` of the recorded window with the trend settings of a method (``rank``, ``fit=kind``,
    ``power``; ``"auto"``: the backtest-chosen exponent), as a callback configured that way fits it."""
    engine.config = dataclasses.replace(engine.config, rank=rank, fit=kind, power=power)
    return engine.fit([float(t) for t in targets])


def scale_target(alpha: float, fit: TrajectoryFit) -> float:
    """The target K at which the ``"scale"`` family gives θ_0 + α(θ_N − θ_0): α = √((K − x_0)/(x_N − x_0))."""
    return fit.origin + alpha * alpha * (fit.steps[-1] - fit.origin)


def candidate(engine: RelexEngine, fit: TrajectoryFit, family: str, value: float) -> Candidate:
    """One candidate of ``family`` (``"trend"``, ``"sqrt"``, ``"scale"``): at target ``value``, or for
    ``"scale"`` with factor α = ``value``."""
    target = scale_target(value, fit) if family == "scale" else float(value)
    (made,) = engine.candidates(fit, [target], families=(family,))
    if family == "scale" and made.spec.params["alpha"] != float(value):
        raise ValueError(f"scale target {target} gives alpha {made.spec.params['alpha']}, not {value}")
    return made


def weight_matrix(made: Candidate, names: Sequence[str]) -> torch.Tensor:
    """The candidate's weights over the window rows as ``[n, T]`` (fp64), tensors in ``names`` order."""
    return torch.stack([made.weights[name].to(torch.float64) for name in names])


@torch.no_grad()
def load(engine: RelexEngine, made: Candidate) -> None:
    """Write the candidate's θ̂ into the live weights, through ``RelexEngine.predict`` and ``load``."""
    (prediction,) = engine.predict([made])
    engine.load(prediction)
