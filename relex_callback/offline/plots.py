"""The PNG plots of ``relex report`` and of the callback's halt-mode fit (matplotlib, imported lazily)."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..math.core import Trend

if TYPE_CHECKING:  # pragma: no cover
    from .plan import _Plan

logger = logging.getLogger("relex_callback.offline")


def _figure_class():
    """matplotlib's ``Figure`` (object-oriented, so no global pyplot backend is switched in the user's session),
    or ``None`` with one warning when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'relex-callback[plot]'): no plots written")
        return None
    return Figure


def _floats(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.reshape(-1)]


def trajectory_entry(steps: Sequence[float], coefficients: torch.Tensor, trend: Trend, explained_variance: float,
                     r2_in: list[float], r2_out: list[float | None] | None, last_fit_row: int = -1) -> dict[str, Any]:
    """One tensor's coefficient trajectory for ``coefficients.png`` (the report's ``trajectories`` entry): the
    coefficients c ``[T, r]`` of ``steps`` and the trend, signed so that c of the last fit snapshot is ≥ 0."""
    sign = torch.where(coefficients[last_fit_row] < 0, -1.0, 1.0).to(torch.float64)
    return {
        "steps": list(steps),
        "coefficients": [_floats(col) for col in (coefficients * sign).T],
        "trend": {"kind": trend.kind, "params": [_floats(col) for col in (trend.params * sign).T], "power": trend.power,
                  "origin": trend.origin, "center": trend.center, "scale": trend.scale},
        "explained_variance": explained_variance,
        "r_squared_in_window": r2_in,
        "r_squared_out_of_window": r2_out,
    }


def plot_explained_variance(Figure, directory: Path, values: Sequence[float], summary: dict[str, Any], rank: int) -> str:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(values, bins=40, range=(0.0, 1.0), color="steelblue", edgecolor="white")
    ax.set_xlabel(f"rank-{rank} explained variance σ₁²/Σσ² per tensor" if rank == 1 else f"rank-{rank} explained variance per tensor")
    ax.set_ylabel("tensors")
    ax.set_title(f"{len(values)} tensors: mean {summary.get('mean', 0):.3f}, median {summary.get('median', 0):.3f}")
    fig.tight_layout()
    fig.savefig(directory / "explained_variance.png", dpi=110)
    return "explained_variance.png"


def plot_coefficients(Figure, directory: Path, trajectories: dict[str, dict[str, Any]], fit_steps: Sequence[float],
                      held_steps: Sequence[float], window_start: float, horizon_end: float) -> str | None:
    """c₁ of each tensor in ``trajectories`` against the step: fit and held-out snapshots, the fitted trend and its
    extension to ``horizon_end``."""
    if not trajectories:
        return None
    names = list(trajectories)
    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(6.5 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        data = trajectories[name]
        c = data["coefficients"][0]
        n_fit = len(fit_steps)
        ax.scatter(fit_steps, c[:n_fit], s=12, color="steelblue", label="fit snapshots", zorder=3)
        if held_steps:
            ax.scatter(held_steps, c[n_fit:], s=12, color="darkorange", label="held out", zorder=3)
        params = torch.tensor(data["trend"]["params"], dtype=torch.float64).T  # [basis, r]
        trend_x = torch.linspace(float(window_start), float(fit_steps[-1]), 50, dtype=torch.float64)
        ext_x = torch.linspace(float(fit_steps[-1]), float(horizon_end), 50, dtype=torch.float64)
        for xs, style, label in ((trend_x, "-", "fitted trend"), (ext_x, "--", "extension")):
            line = _evaluate_trend(data["trend"], params, xs)
            ax.plot(xs.tolist(), line[:, 0].tolist(), style, color="crimson", linewidth=1.2, label=label)
        ax.axvline(float(fit_steps[-1]), color="gray", linestyle=":", linewidth=1)
        r2_out = data["r_squared_out_of_window"]
        subtitle = f"EV {data['explained_variance']:.3f}, R² {data['r_squared_in_window'][0]:.3f}"
        if r2_out and r2_out[0] is not None:
            subtitle += f", out-of-window R² {r2_out[0]:.3f}"
        ax.set_title(f"{name}\n{subtitle}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("c₁ = Δ·v₁")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(directory / "coefficients.png", dpi=110)
    return "coefficients.png"


def plot_r_squared(Figure, directory: Path, r2_in: Sequence[float], r2_out: Sequence[float]) -> str:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(_clip(r2_in), bins=40, range=(-1.0, 1.0), color="steelblue", alpha=0.7, label="in window")
    if r2_out:
        ax.hist(_clip(r2_out), bins=40, range=(-1.0, 1.0), color="darkorange", alpha=0.7, label="out of window")
    ax.set_xlabel("R² of the trend of c₁ per tensor (clipped at −1)")
    ax.set_ylabel("tensors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "r_squared.png", dpi=110)
    return "r_squared.png"


def plot_backtest(Figure, directory: Path, diagnostic: dict[str, Any] | None, backtest: dict[str, Any] | None) -> str | None:
    """The window diagnostic's expected distance ||θ̂ − θ|| / ||θ − θ_0|| against the horizon ratio, the tolerance,
    K_max, and the measured backtest point (fit the first snapshots, predict the last)."""
    diagnostic = diagnostic or {}
    curve = diagnostic.get("distance_curve") or {}
    points = sorted((float(r), d) for r, d in curve.items() if d is not None and math.isfinite(d))
    measured = bool(backtest) and backtest.get("distance") is not None and math.isfinite(backtest["distance"])
    if not points and not measured:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if points:
        ax.plot([r for r, _ in points], [d for _, d in points], "-o", markersize=3, color="steelblue",
                label="expected distance (window diagnostic)")
    tolerance = diagnostic.get("tolerance")
    if tolerance is not None:
        ax.axhline(float(tolerance), color="gray", linestyle=":", linewidth=1, label=f"tolerance {tolerance:g}")
    supported = diagnostic.get("supported_ratio")
    if supported is not None and math.isfinite(supported):
        ax.axvline(float(supported), color="crimson", linestyle="--", linewidth=1.2,
                   label=f"K_max: {supported:.2f}× the window (step {diagnostic['supported_step']:.0f})")
    if measured:
        ax.scatter([backtest["ratio"]], [backtest["distance"]], color="darkorange", zorder=3,
                   label=f"backtest: first {backtest['num_fit']} snapshots → last")
    ax.set_xlabel("horizon (target span / window span)")
    ax.set_ylabel("relative distance to real training")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(directory / "backtest.png", dpi=110)
    return "backtest.png"


def write_fit_plots(directories: Sequence[Path], fit: Any, report: dict[str, Any], rank: int, horizon_end: float,
                    top: int = 6) -> list[str]:
    """The callback's plots of a halt-mode fit (a :class:`~relex_callback.math.core.TrajectoryFit` and one of its
    reports), drawn once and copied into every directory in ``directories``, next to ``relex_report.json``."""
    Figure = _figure_class()
    if Figure is None or not directories or not fit.tensors:
        return []
    first = Path(directories[0])
    shapes = {name: entry.get("shape") or [] for name, entry in report["tensors"].items()}
    largest = sorted(fit.tensors, key=lambda t: -math.prod(shapes.get(t.name, [])))[:top]
    trajectories = {t.name: trajectory_entry(fit.steps, t.subspace.coefficients, t.trend, t.explained_variance,
                                             _floats(t.r2), None) for t in largest}
    written = [plot_explained_variance(Figure, first, [t.explained_variance for t in fit.tensors],
                                       report["explained_variance"], rank),
               plot_coefficients(Figure, first, trajectories, fit.steps, [], fit.steps[0], horizon_end),
               plot_backtest(Figure, first, report.get("diagnostic"), report.get("backtest"))]
    written = [name for name in written if name]
    for directory in directories[1:]:
        for name in written:
            shutil.copyfile(first / name, Path(directory) / name)
    return written


def _write_plots(directory: Path, report: dict[str, Any], plan: _Plan, rank: int, horizon_end: float) -> list[str]:
    """explained_variance.png, coefficients.png, r_squared.png and backtest.png of ``relex report``."""
    Figure = _figure_class()
    if Figure is None:
        return []
    tensors = report["tensors"]
    r2_out = [tensors[n]["r_squared_out_of_window"][0] for n in plan.tracked
              if tensors[n]["r_squared_out_of_window"] and tensors[n]["r_squared_out_of_window"][0] is not None]
    written = [
        plot_explained_variance(Figure, directory, [tensors[n]["explained_variance"] for n in plan.tracked],
                                report["explained_variance"], rank),
        plot_coefficients(Figure, directory, report["trajectories"], report["fit_steps"], report["heldout_steps"],
                          report["window_steps"][0], horizon_end),
        plot_r_squared(Figure, directory, [tensors[n]["r_squared_in_window"][0] for n in plan.tracked], r2_out),
        plot_backtest(Figure, directory, report.get("diagnostic"), report.get("backtest")),
    ]
    return [name for name in written if name]


def _clip(values: Sequence[float]) -> list[float]:
    return [max(-1.0, min(1.0, v)) for v in values]


def _evaluate_trend(trend: dict[str, Any], params: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    return Trend(kind=trend["kind"], params=params, power=trend.get("power", 1.0), origin=trend.get("origin", 0.0),
                 center=trend["center"], scale=trend["scale"])(xs)
