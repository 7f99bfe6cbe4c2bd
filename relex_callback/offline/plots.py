"""The PNG plots of ``relex report`` (matplotlib, Agg, imported lazily)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..math.core import Trend
from .plan import _Plan

logger = logging.getLogger("relex_callback.offline")


def _write_plots(directory: Path, report: dict[str, Any], plan: _Plan, rank: int, horizon_end: float) -> list[str]:
    """explained_variance.png, coefficients.png and r_squared.png (matplotlib, Agg, imported lazily)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'relex-callback[plot]'): no plots written")
        return []
    written = []
    tensors = report["tensors"]

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [tensors[n]["explained_variance"] for n in plan.tracked]
    ax.hist(values, bins=40, range=(0.0, 1.0), color="steelblue", edgecolor="white")
    ax.set_xlabel(f"rank-{rank} explained variance σ₁²/Σσ² per tensor" if rank == 1 else f"rank-{rank} explained variance per tensor")
    ax.set_ylabel("tensors")
    ev = report["explained_variance"]
    ax.set_title(f"{len(values)} tensors: mean {ev.get('mean', 0):.3f}, median {ev.get('median', 0):.3f}")
    fig.tight_layout()
    fig.savefig(directory / "explained_variance.png", dpi=110)
    plt.close(fig)
    written.append("explained_variance.png")

    trajectories = report["trajectories"]
    if trajectories:
        names = list(trajectories)
        cols = 2 if len(names) > 1 else 1
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.2 * rows), squeeze=False)
        fit_steps, held_steps = report["fit_steps"], report["heldout_steps"]
        window_start = report["window_steps"][0]
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
        plt.close(fig)
        written.append("coefficients.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    r2_in = [tensors[n]["r_squared_in_window"][0] for n in plan.tracked]
    ax.hist(_clip(r2_in), bins=40, range=(-1.0, 1.0), color="steelblue", alpha=0.7, label="in window")
    r2_out = [tensors[n]["r_squared_out_of_window"][0] for n in plan.tracked
              if tensors[n]["r_squared_out_of_window"] and tensors[n]["r_squared_out_of_window"][0] is not None]
    if r2_out:
        ax.hist(_clip(r2_out), bins=40, range=(-1.0, 1.0), color="darkorange", alpha=0.7, label="out of window")
    ax.set_xlabel("R² of the trend of c₁ per tensor (clipped at −1)")
    ax.set_ylabel("tensors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "r_squared.png", dpi=110)
    plt.close(fig)
    written.append("r_squared.png")
    return written


def _clip(values: Sequence[float]) -> list[float]:
    return [max(-1.0, min(1.0, v)) for v in values]


def _evaluate_trend(trend: dict[str, Any], params: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    return Trend(kind=trend["kind"], params=params, power=trend.get("power", 1.0), origin=trend.get("origin", 0.0),
                 center=trend["center"], scale=trend["scale"])(xs)
