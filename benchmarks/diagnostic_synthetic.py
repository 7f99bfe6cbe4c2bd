"""The window diagnostic's supported horizon K_max against the true horizon on synthetic trajectories.

Per-step updates are δ_i = drift_i + noise_i in ``DIM`` dimensions: the drift has norm ``snr`` (noise norm 1)
and its direction decorrelates with coherence time τ (cos(drift_i, drift_j) = e^{−|i−j|/τ}; τ = ∞ is a
straight path). The true horizon is where the paper's predictor (rank-1 line fitted on steps 1..N) crosses the
tolerance against the simulated future; the estimate sees only the first N steps.

    python benchmarks/diagnostic_synthetic.py            # grid of SNR x τ, 3 seeds; prints a table
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_ROOT, write_json  # noqa: E402

from relex_callback.math.core import fit_trajectory, gram_matrix  # noqa: E402
from relex_callback.math.diagnostic import SHAPES, TURNING_SHAPES, diagnose_window, ratio_grid, trend_predictor  # noqa: E402

DIM = 2048


def trajectory(steps: int, drift: float, noise: float, tau: float, seed: int, tensors: int = 2, dim: int = DIM) -> list[torch.Tensor]:
    """Δ_1..Δ_steps ``[steps, dim]`` fp64 per tensor; tensor k drifts (1 + k/2) times faster."""
    gen = torch.Generator().manual_seed(seed)
    rho = math.exp(-1.0 / tau) if math.isfinite(tau) else 1.0
    out = []
    for k in range(tensors):
        u = torch.randn(dim, generator=gen, dtype=torch.float64)
        u /= u.norm()
        fresh = torch.randn(steps, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        noise_steps = noise * torch.randn(steps, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        rows = torch.empty(steps, dim, dtype=torch.float64)
        position = torch.zeros(dim, dtype=torch.float64)
        for i in range(steps):
            if i:
                u = rho * u + math.sqrt(1.0 - rho * rho) * fresh[i]
            position = position + drift * (1.0 + 0.5 * k) * u + noise_steps[i]
            rows[i] = position
        out.append(rows)
    return out


def slowing_trajectory(steps: int, drift: float, decay: float, seed: int, tensors: int = 2, dim: int = DIM) -> list[torch.Tensor]:
    """A straight drift whose step shrinks like i^−decay (front-loaded progress) plus unit noise per step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(tensors):
        u = torch.randn(dim, generator=gen, dtype=torch.float64)
        u /= u.norm()
        noise = torch.randn(steps, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        size = drift * (1.0 + 0.5 * k) * torch.arange(1, steps + 1, dtype=torch.float64).pow(-decay)
        out.append((size[:, None] * u[None, :] + noise).cumsum(0))
    return out


def turning_trajectory(steps: int, drift: float, omega: float, seed: int, tensors: int = 2, dim: int = DIM) -> list[torch.Tensor]:
    """A drift that turns at ``omega`` radians per step in a fixed plane, plus unit noise per step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(tensors):
        plane, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
        angle = omega * torch.arange(steps, dtype=torch.float64)
        directions = torch.cos(angle)[:, None] * plane[:, 0] + torch.sin(angle)[:, None] * plane[:, 1]
        noise = torch.randn(steps, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        out.append((drift * (1.0 + 0.5 * k) * directions + noise).cumsum(0))
    return out


FAMILIES = {  # other families than the wandering drift of `trajectory`: (label, builder(steps, seed))
    "slowing β=0.3, drift 1": lambda steps, seed: slowing_trajectory(steps, 1.0, 0.3, seed),
    "slowing β=0.5, drift 0.5": lambda steps, seed: slowing_trajectory(steps, 0.5, 0.5, seed),
    "slowing β=0.5, drift 2": lambda steps, seed: slowing_trajectory(steps, 2.0, 0.5, seed),
    "slowing β=1, drift 4": lambda steps, seed: slowing_trajectory(steps, 4.0, 1.0, seed),
    "turning ω=0.01, drift 0.5": lambda steps, seed: turning_trajectory(steps, 0.5, 0.01, seed),
    "turning ω=0.02, drift 1": lambda steps, seed: turning_trajectory(steps, 1.0, 0.02, seed),
    "turning ω=0.05, drift 1": lambda steps, seed: turning_trajectory(steps, 1.0, 0.05, seed),
}


def window_grams(traj: list[torch.Tensor], n: int) -> torch.Tensor:
    return torch.stack([gram_matrix(m[:n].float()).double() for m in traj])


def true_distances(traj: list[torch.Tensor], ratios: list[float], n: int) -> list[float]:
    """Whole-model distance of the rank-1 line fitted on steps 1..n to the simulated Δ_K at K = ratio·n."""
    targets = [float(round(r * n)) for r in ratios]
    fit = fit_trajectory([(str(i), g) for i, g in enumerate(window_grams(traj, n))], list(range(1, n + 1)), targets)
    err = torch.zeros(len(targets), dtype=torch.float64)
    norm = torch.zeros(len(targets), dtype=torch.float64)
    for tf, m in zip(fit.tensors, traj):
        pred = tf.weights @ m[:n]
        real = m[[int(k) - 1 for k in targets]]
        err += (pred - real).pow(2).sum(1)
        norm += real.pow(2).sum(1)
    return (err / norm).sqrt().tolist()


def horizon(ratios: list[float], distances: list[float], tolerance: float) -> float:
    """The last ratio before the distance first exceeds ``tolerance`` (1 when the first step beyond does)."""
    supported = 1.0
    for r, d in zip(ratios, distances):
        if r > 1.0 and d > tolerance:
            break
        supported = r
    return supported


def estimate(traj: list[torch.Tensor], n: int, tolerance: float, cap: float, turning_margin: float | None = None):
    """The package's diagnostic of the first ``n`` steps; ``turning_margin``: also allow turning drifts (the cos
    kernel) and keep the most pessimistic shape within that residual margin of the best (an alternative)."""
    grams = window_grams(traj, n)
    steps = list(range(1, n + 1))
    shapes = SHAPES if turning_margin is None else TURNING_SHAPES
    return diagnose_window(grams, steps, 0.0, [m.shape[1] for m in traj], trend_predictor(grams, steps),
                           tolerance=tolerance, max_ratio=cap, shapes=shapes, near_best=turning_margin)


def grid_row(snr: float, tau: float, seed: int, n: int, tolerance: float, cap: float, family: str | None = None,
             turning_margin: float | None = None) -> dict:
    ratios = ratio_grid(cap)
    if family is None:
        traj = trajectory(int(cap * n), drift=snr, noise=1.0, tau=tau, seed=seed)
    else:
        traj = FAMILIES[family](int(cap * n), seed)
    true = true_distances(traj, ratios, n)
    diag = estimate(traj, n, tolerance, cap, turning_margin)
    return {"family": family or "wandering", "snr": snr, "tau": tau, "seed": seed, "estimate": diag.supported_ratio,
            "true": horizon(ratios, true, tolerance),
            "true_low": horizon(ratios, true, 0.9 * tolerance), "true_high": horizon(ratios, true, 1.1 * tolerance),
            "growth_exponent": diag.growth_exponent, "direction_stability": diag.direction_stability,
            "drift_share": diag.model.get("drift_share")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observe", type=int, default=16)
    parser.add_argument("--cap", type=float, default=12.0)
    parser.add_argument("--tolerance", type=float, default=0.75)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--turning-margin", type=float, default=None,
                        help="compare an alternative estimator: turning (cos) drift shapes allowed, and the most "
                             "pessimistic shape within this residual margin of the best kept (e.g. 0.05)")
    args = parser.parse_args(argv)
    margin = args.turning_margin
    rows = [grid_row(snr, tau, seed, args.observe, args.tolerance, args.cap, turning_margin=margin)
            for tau in (8.0, 32.0, 128.0, math.inf) for snr in (0.05, 0.2, 0.5, 1.0) for seed in args.seeds]
    rows += [grid_row(math.nan, math.nan, seed, args.observe, args.tolerance, args.cap, family, margin)
             for family in FAMILIES for seed in args.seeds]
    print("| family | τ | drift/noise | seed | K_max/N estimated | true (tolerance ×0.9 / ×1 / ×1.1) | estimate/true | α | stability |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['tau']:g} | {r['snr']:g} | {r['seed']} | {r['estimate']:.2f} | {r['true_low']:.2f} / "
              f"{r['true']:.2f} / {r['true_high']:.2f} | {r['estimate'] / r['true']:.2f} | {r['growth_exponent']:.2f} | "
              f"{r['direction_stability']:.2f} |")
    within = sum(r["true"] / 1.5 <= r["estimate"] <= 1.5 * r["true"] for r in rows)
    bracket = sum(r["true_low"] / 1.5 <= r["estimate"] <= 1.5 * r["true_high"] for r in rows)
    optimistic = [r for r in rows if r["estimate"] > 1.5 * r["true"]]
    print(f"\nwithin 1.5x of the true horizon: {within}/{len(rows)}; within 1.5x of the ±10% tolerance bracket: "
          f"{bracket}/{len(rows)}; above 1.5x the truth: {len(optimistic)}")
    name = "diagnostic-synthetic" + ("" if margin is None else f"-turning-margin{margin:g}")
    name += "" if args.seeds == parser.get_default("seeds") else f"-seeds{min(args.seeds)}-{max(args.seeds)}"
    name += ".json"
    write_json(RESULTS_ROOT / name, {"settings": vars(args), "rows": rows, "within_1.5x": within, "within_bracket": bracket})


if __name__ == "__main__":
    main()
