"""Quality benchmark: does RELEX extrapolation match real TRL GRPO training on SmolLM2-135M-Instruct?

One real GRPO run per seed trains to ``K_max`` = the largest horizon. On the way it keeps θ_0 and the
observed deltas Δ_1..Δ_N in the buffer of a :class:`relex_callback.engine.RelexEngine` (bf16, recorded as the callback records them),
keeps the real delta θ(K) − θ_0 at every horizon K (bf16, for distances) and scores the real weights at N and
at every K with the greedy held-out :class:`relex_callback.probe.RewardProbe`. After training, every method
predicts θ̂(K) from the same observed window, and we compare at K = 2N, 5N, 10N (and 20N as an
extrapolation with no real counterpart):

* ``relex``: the paper's per-tensor rank-1 direction + straight line in the real step (``RelexEngine.fit``);
* ``perparam``: a least-squares line per parameter over steps 1..N, no projection;
* ``first``: first-update scaling θ_0 + K(θ_1 − θ_0);
* ``rank2`` / ``rank3``: the paper's line on the top 2 / 3 directions per tensor;
* ``poly2``: rank 1 with a quadratic trend of the coefficient;
* ``power0.5``: rank 1 with c = a + b·t^0.5 (the √t time axis);
* ``powerauto``: rank 1 with the exponent chosen by the Gram-only backtest over core.POWER_GRID.

Every method is a weighted sum of the stored deltas: the subspace methods are the engine's own fits and candidates
(``_candidates.fit_as``, the settings ``rank`` / ``fit`` / ``power`` of a callback), the two baselines weigh the same
rows with weights of their own, and every prediction is written by ``RelexEngine.predict`` and ``load``. Distances
||θ̂(K) − θ(K)|| / ||θ(K) − θ_0||, norm ratios and cosines are computed for every method at every horizon
(cheap); accuracy is evaluated (≈0.5-3 min per evaluation on a shared 2-core CPU) in a priority order, optionally
under a per-seed time budget, and every skipped evaluation is recorded.

    python benchmarks/bench_quality.py --quick            # CI smoke run, a few minutes
    python benchmarks/bench_quality.py                    # full: 3 seeds, N=10, K ∈ {20, 50, 100} (+200 extrapolated)

Results: ``benchmarks/results/quality[-quick]/`` (results.json, summary.csv, evals.csv, distances.csv, PNG plots).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_ROOT,
    binomial_se,
    load_average,
    log,
    machine_info,
    mean_ci,
    set_threads,
    setup_logging,
    write_csv,
    write_json,
)

from _candidates import fit_as, load, load_observed, window_engine  # noqa: E402

from relex_callback.engine import Candidate, RelexEngine, TrendSpec  # noqa: E402
from relex_callback.math.core import backtest, combine, select_power  # noqa: E402
from relex_callback.probe import choose_candidate  # noqa: E402

METHODS = ("relex", "perparam", "first", "rank2", "rank3", "poly2", "power0.5", "powerauto")
METHOD_LABELS = {
    "relex": "RELEX (rank 1, line)",
    "perparam": "per-parameter line",
    "first": "first-update ×K",
    "rank2": "rank 2, line",
    "rank3": "rank 3, line",
    "poly2": "rank 1, quadratic",
    "power0.5": "rank 1, √t (p=0.5)",
    "powerauto": "rank 1, backtest-chosen p",
}


def method_label(method: str) -> str:
    if method == "real":
        return "real GRPO"
    if method.startswith("select-"):
        return f"halt + probe over {METHOD_LABELS[method[7:]]}"
    return METHOD_LABELS[method]


def method_order(method: str) -> int:
    names = ("real",) + METHODS + tuple(f"select-{m}" for m in METHODS)
    return names.index(method)


FIT_SPECS = {  # rank-r subspace methods: (rank, trend kind, power)
    "relex": (1, "linear", 1.0),
    "rank2": (2, "linear", 1.0),
    "rank3": (3, "linear", 1.0),
    "poly2": (1, "poly2", 1.0),
    "power0.5": (1, "power", 0.5),
    "powerauto": (1, "power", "auto"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 1 seed, N=4, K=8, 24 held-out prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    parser.add_argument("--observe", type=int, default=None, help="observation window N (default 10)")
    parser.add_argument("--horizons", type=int, nargs="+", default=None,
                        help="horizons K with real counterparts; training runs to the largest (default 20 50 100)")
    parser.add_argument("--extrapolate-only", type=int, nargs="*", default=None,
                        help="horizons without a real counterpart (default 20N = 200)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out prompts (default 200)")
    parser.add_argument("--heldout-seed", type=int, default=0, help="seed of the fixed held-out set (shared by all seeds)")
    parser.add_argument("--max-operand", type=int, default=50)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--buffer-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--eval-plan", default=None,
                        help="evaluations after training, in priority order: 'all', or a spec such as "
                             "'relex:2,5,10;perparam:2' (horizons as multiples of N). Default: all (quick: a few)")
    parser.add_argument("--eval-budget-min", type=float, default=None,
                        help="per-seed wall-clock budget (minutes) for the post-training evaluations; the rest "
                             "are skipped and listed")
    parser.add_argument("--select", default=None,
                        help="halt mode with a probe: candidate sets 'method:multiples;...' (default 'relex:2,3,5;power0.5:2,3,5'); "
                             "each set is scored with the selection probe and the package's rule (probe.choose_candidate) "
                             "picks one or keeps θ_N; 'none' turns it off")
    parser.add_argument("--select-prompts", type=int, default=None,
                        help="prompts of the selection probe, disjoint from training and held-out prompts (default 64)")
    parser.add_argument("--probe-batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; 1 is faster on an oversubscribed shared CPU)")
    parser.add_argument("--anchor-real", default=None,
                        help="plot real accuracies measured elsewhere as a dashed reference, e.g. '50:0.69,0.68;100:0.735,0.71'")
    parser.add_argument("--replot", action="store_true", help="only redo tables and plots from an existing results.json")
    parser.add_argument("--output", default=None, help="results folder (default benchmarks/results/quality[-quick])")
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    args.observe = args.observe or (4 if quick else 10)
    args.horizons = sorted(args.horizons or ([2 * args.observe] if quick else [2 * args.observe, 5 * args.observe, 10 * args.observe]))
    if args.extrapolate_only is None:
        args.extrapolate_only = [5 * args.observe] if quick else [20 * args.observe]
    args.heldout = args.heldout or (24 if quick else 200)
    args.select_prompts = args.select_prompts or (8 if quick else 64)
    if args.select is None:
        args.select = "relex:2;power0.5:5" if quick else "relex:2,3,5;power0.5:2,3,5"
    if args.eval_plan is None:
        args.eval_plan = "relex:2,5;perparam:2" if quick else "all"
    args.output = Path(args.output) if args.output else RESULTS_ROOT / ("quality-quick" if quick else "quality")
    if min(args.horizons) <= args.observe:
        parser.error("every horizon must lie beyond the observation window")
    return args


# ---------------------------------------------------------------------------------------------------------
# evaluation plan


def default_priority(observe: int, horizons: list[int], extra: list[int]) -> list[tuple[str, int]]:
    """All (method, K) evaluations, most informative first (used by --eval-plan all with a budget)."""
    h = sorted(horizons)
    two, mid = h[0], h[len(h) // 2]
    order: list[tuple[str, int]] = []

    def add(method: str, ks: list[int]) -> None:
        for k in ks:
            if (method, k) not in order:
                order.append((method, k))

    add("relex", h)
    add("power0.5", h)
    add("perparam", [two, mid])
    add("first", [two])
    add("rank2", [mid])
    add("poly2", [mid])
    add("rank3", [mid])
    add("powerauto", [mid])
    add("relex", extra)
    add("power0.5", extra)
    for method in METHODS:
        add(method, h)
    for method in METHODS:
        add(method, extra)
    return order


def parse_plan(spec: str, observe: int, horizons: list[int], extra: list[int], option: str = "--eval-plan") -> list[tuple[str, int]]:
    """``'relex:2,5;perparam:2'`` -> ``[("relex", 20), ("relex", 50), ("perparam", 20)]`` for N = 10."""
    if spec == "all":
        return default_priority(observe, horizons, extra)
    plan = []
    for part in spec.split(";"):
        if not part.strip():
            continue
        method, _, multiples = part.partition(":")
        method = method.strip()
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r} in {option}; choose from {METHODS}")
        for m in multiples.split(","):
            k = int(round(float(m) * observe))
            if k not in horizons and k not in extra:
                raise SystemExit(f"{option} asks for K={k} ({m}N), which is not among the horizons {horizons + extra}")
            plan.append((method, k))
    return plan


# ---------------------------------------------------------------------------------------------------------
# training with recording


def make_recorder(engine: RelexEngine, observe: int, keep_steps: list[int], eval_steps: list[int], probe, state: dict):
    """A TrainerCallback recording Δ_1..Δ_N into ``engine``, the real deltas at ``keep_steps`` and the accuracy at
    ``eval_steps``."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, tr_state, control, **kwargs):
            engine.capture_base(0)
            state["t_start"] = time.perf_counter()
            state["eval_seconds"] = 0.0
            state["step_end_times"] = {}
            return control

        def on_step_end(self, args, tr_state, control, model=None, **kwargs):
            step = tr_state.global_step
            state["step_end_times"][step] = time.perf_counter() - state["t_start"] - state["eval_seconds"]
            started = time.perf_counter()
            with torch.no_grad():
                if step <= observe:
                    engine.record(step)
                if step in keep_steps:
                    buffer = engine.buffer
                    state["real_deltas"][step] = {
                        item.name: item.view().to(torch.float32).sub(buffer.theta0[item.name]).to(torch.bfloat16)
                        for item in buffer.tracked
                    }
            if step in eval_steps:
                t0 = time.perf_counter()
                acc = probe(model)
                state["real_acc"][step] = acc
                log.info("  real step %d: held-out accuracy %.3f (eval %.0fs, load %s)", step, acc,
                         time.perf_counter() - t0, load_average())
            state["eval_seconds"] += time.perf_counter() - started
            return control

    return Recorder()


def train_seed(args, seed: int, model, tokenizer, train_set, probe) -> dict[str, Any]:
    from trl import GRPOTrainer

    from relex_callback.demo import addition_reward, cpu_grpo_config

    k_max = max(args.horizons)
    engine = window_engine(model, args.observe, args.buffer_dtype)
    state: dict[str, Any] = {"real_deltas": {}, "real_acc": {}}
    eval_steps = sorted({args.observe, *args.horizons})
    recorder = make_recorder(engine, args.observe, sorted(args.horizons), eval_steps, probe, state)
    with tempfile.TemporaryDirectory(prefix="relex-bench-quality-") as tmp:
        config = cpu_grpo_config(tmp, max_steps=k_max, seed=seed, learning_rate=args.lr, prompts_per_step=args.prompts_per_step,
                                 generations=args.generations, temperature=args.temperature)
        model.train()
        trainer = GRPOTrainer(
            model=model, reward_funcs=addition_reward, args=config, train_dataset=train_set,
            processing_class=tokenizer, callbacks=[recorder],
        )
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        history = [
            {k: h.get(k) for k in ("step", "reward", "reward_std", "frac_reward_zero_std", "loss") if k in h}
            for h in trainer.state.log_history
            if "reward" in h
        ]
        del trainer
        gc.collect()
    model.eval()
    return {
        "engine": engine,
        "real_deltas": state["real_deltas"],
        "real_acc": state["real_acc"],
        "train_seconds_at_step": state["step_end_times"],
        "train_wall_seconds_incl_evals": wall,
        "eval_seconds_in_training": state["eval_seconds"],
        "history": history,
    }


# ---------------------------------------------------------------------------------------------------------
# methods


def method_candidates(method: str, engine: RelexEngine, targets: list[float]) -> tuple[list[Candidate], Any]:
    """One candidate per target (Δ̂(K) = w · M per tensor) and the engine's fit (None for the two baselines): the
    subspace methods are ``RelexEngine.fit`` with a callback's ``rank`` / ``fit`` / ``power`` (``powerauto``:
    ``power="auto"``); ``perparam`` and ``first`` weigh the same rows with their own weights."""
    buffer = engine.buffer
    if method in ("perparam", "first"):
        t = torch.tensor(buffer.steps, dtype=torch.float64)
        k = torch.tensor(targets, dtype=torch.float64)
        if method == "perparam":
            centred = t - t.mean()
            w = 1.0 / len(t) + (k - t.mean())[:, None] * centred[None, :] / centred.pow(2).sum()
        else:
            w = torch.zeros(len(targets), len(t), dtype=torch.float64)
            w[:, 0] = k / t[0]  # θ_0 + (K / x_1)·Δ_1, x_1 = 1
        return [Candidate(target=target, spec=TrendSpec(kind=method), weights={item.name: w[j] for item in buffer.tracked})
                for j, target in enumerate(targets)], None
    rank, kind, power = FIT_SPECS[method]
    fit = fit_as(engine, targets, rank=rank, kind=kind, power=power)
    return engine.candidates(fit, targets), fit


@torch.no_grad()
def distances(buffer, candidates: list[Candidate], targets: list[float], real_deltas: dict[int, dict[str, torch.Tensor]]):
    """Whole-model ||Δ̂ − Δ||, ||Δ̂||, ||Δ|| and Δ̂·Δ at every target with a real delta (row N included)."""
    n = len(targets)
    acc = {key: torch.zeros(n, dtype=torch.float64) for key in ("err", "pred", "real", "dot")}
    pred_only = torch.zeros(n, dtype=torch.float64)
    last = len(buffer.steps) - 1
    for item in buffer.tracked:
        stack = buffer.stack(item.name)
        moved = combine(stack, torch.stack([c.weights[item.name] for c in candidates]))  # [n, d] fp32
        pred_only += moved.double().pow(2).sum(1)
        for j, target in enumerate(targets):
            if int(target) == int(buffer.steps[-1]):
                real = stack[last].to(torch.float32)
            elif int(target) in real_deltas:
                real = real_deltas[int(target)][item.name].to(torch.float32)
            else:
                continue
            diff = moved[j] - real
            acc["err"][j] += float(diff.double().pow(2).sum())
            acc["pred"][j] += float(moved[j].double().pow(2).sum())
            acc["real"][j] += float(real.double().pow(2).sum())
            acc["dot"][j] += float(moved[j].double().dot(real.double()))
        del moved
    out = {}
    for j, target in enumerate(targets):
        real_sq = float(acc["real"][j])
        if real_sq > 0:
            out[int(target)] = {
                "distance": math.sqrt(float(acc["err"][j]) / real_sq),
                "norm_ratio": math.sqrt(float(acc["pred"][j]) / real_sq),
                "cosine": float(acc["dot"][j]) / math.sqrt(max(float(acc["pred"][j]) * real_sq, 1e-300)),
                "pred_norm": math.sqrt(float(acc["pred"][j])),
                "real_norm": math.sqrt(real_sq),
            }
        else:
            out[int(target)] = {"distance": None, "norm_ratio": None, "cosine": None,
                                "pred_norm": math.sqrt(float(pred_only[j])), "real_norm": None}
    return out


def load_prediction(engine: RelexEngine, made: Candidate) -> float:
    """Write θ_0 + Δ̂ of ``made`` into the model (``RelexEngine.predict`` and ``load``); returns the seconds."""
    started = time.perf_counter()
    load(engine, made)
    return time.perf_counter() - started


@torch.no_grad()
def restore_base(buffer) -> None:
    for item in buffer.tracked:
        item.view().copy_(buffer.theta0[item.name])


def window_diagnostics(grams, steps: list[float], fit) -> dict[str, Any]:
    evs = [tf.explained_variance for tf in fit.tensors]
    top = sum(float(tf.subspace.eigenvalues[0]) for tf in fit.tensors)
    total = sum(float(tf.subspace.eigenvalues.sum()) for tf in fit.tensors)
    r2 = [float(tf.r2[0]) for tf in fit.tensors if float(tf.subspace.singular_values[0]) > 0]
    out: dict[str, Any] = {
        "explained_variance_mean": sum(evs) / len(evs),
        "explained_variance_min": min(evs),
        "explained_variance_energy_weighted": top / total if total > 0 else math.nan,
        "fraction_tensors_ev_ge_0.9": sum(e >= 0.9 for e in evs) / len(evs),
        "line_r2_mean": sum(r2) / len(r2) if r2 else math.nan,
        "line_r2_min": min(r2) if r2 else math.nan,
    }
    grams_only = [g for _, g in grams]
    for label, kind, power in (("linear", "linear", 1.0), ("power0.5", "power", 0.5)):
        bt = backtest(grams_only, steps, rank=1, kind=kind, power=power, origin=0.0)
        if bt is not None:
            out[f"backtest_{label}"] = {
                "num_fit": bt.num_fit, "ratio": bt.ratio, "distance": bt.distance,
                "supported_ratio_at_0.75": bt.supported_ratio(0.75),
            }
    return out


# ---------------------------------------------------------------------------------------------------------
# one seed


def parse_select(spec: str, observe: int, horizons: list[int], extra: list[int]) -> list[tuple[str, list[int]]]:
    """``'relex:2,3,5;power0.5:2,3'`` -> ``[("relex", [20, 30, 50]), ("power0.5", [20, 30])]`` for N = 10."""
    if spec.strip().lower() == "none":
        return []
    sets: dict[str, list[int]] = {}
    for method, k in parse_plan(spec, observe, horizons, extra, option="--select"):
        sets.setdefault(method, []).append(k)
    return list(sets.items())


def select_with_probe(model, engine: RelexEngine, methods, targets: list[float], selector, sets) -> dict[str, Any]:
    """Halt mode with a probe, as the callback does it: score θ_N and each candidate of a set on the selection
    prompts and keep the one ``probe.choose_candidate`` picks (θ_N when every candidate scores below it)."""
    started = time.perf_counter()
    load_observed(engine)
    current = selector(model)
    out: dict[str, Any] = {"current_score": current, "sets": {}}
    for method, ks in sets:
        scores = []
        for k in ks:
            load_prediction(engine, methods[method]["candidates"][targets.index(float(k))])
            scores.append(selector(model))
        chosen = choose_candidate(current, scores, ks)
        out["sets"][method] = {"candidates": ks, "scores": scores, "chosen_K": None if chosen is None else ks[chosen]}
        log.info("select %-9s scores %s (θ_N %.3f) -> %s", method, dict(zip(ks, [round(v, 3) for v in scores])), current,
                 "keep θ_N" if chosen is None else f"K={ks[chosen]}")
    out["probe_seconds"] = time.perf_counter() - started
    out["probe_evaluations"] = 1 + sum(len(ks) for _, ks in sets)
    return out


def run_seed(args, seed: int, model, tokenizer, train_set, probe, base_acc: float, selector=None) -> dict[str, Any]:
    log.info("seed %d: GRPO to step %d (N=%d), load %s", seed, max(args.horizons), args.observe, load_average())
    trained = train_seed(args, seed, model, tokenizer, train_set, probe)
    engine: RelexEngine = trained["engine"]
    buffer = engine.buffer
    steps = list(buffer.steps)
    targets = [float(k) for k in [args.observe] + args.horizons + args.extrapolate_only]
    times = trained["train_seconds_at_step"]
    log.info("seed %d: trained in %.0fs (+%.0fs of evaluations); real acc %s", seed,
             times[max(times)], trained["eval_seconds_in_training"], trained["real_acc"])

    started = time.perf_counter()
    grams = [(item.name, g) for item, g in buffer.grams()]
    gram_seconds = time.perf_counter() - started
    power_auto, power_grid = select_power([g for _, g in grams], steps, rank=1, origin=0.0)
    log.info("seed %d: Gram pass %.1fs; backtest-chosen p = %.2f (distances %s)", seed, gram_seconds, power_auto,
             {p: round(d, 3) for p, d in power_grid.items()})

    methods: dict[str, Any] = {}
    diagnostics = None
    for method in METHODS:
        started = time.perf_counter()
        candidates, fit = method_candidates(method, engine, targets)
        fit_seconds = time.perf_counter() - started  # the engine's fit includes its own Gram pass
        if method == "relex":
            diagnostics = window_diagnostics(grams, steps, fit)
        if method == "powerauto" and fit.tensors[0].trend.power != power_auto:
            raise RuntimeError(f"the engine chose p = {fit.tensors[0].trend.power}, the benchmark's backtest {power_auto}")
        dist = distances(buffer, candidates, targets, trained["real_deltas"])
        methods[method] = {"candidates": candidates, "fit_seconds": fit_seconds, "distances": dist}
        log.info("seed %d: %-10s distance %s", seed, method,
                 {k: (round(v["distance"], 2) if v["distance"] is not None else None) for k, v in dist.items()})
    diagnostics["power_auto"] = power_auto
    diagnostics["power_backtest_distances"] = power_grid

    # halt mode with a probe on the selection prompts; the chosen candidates' held-out accuracy is evaluated first
    sets = parse_select(args.select, args.observe, args.horizons, args.extrapolate_only) if selector is not None else []
    selection = select_with_probe(model, engine, methods, targets, selector, sets) if sets else None
    chosen = [(m, v["chosen_K"]) for m, v in selection["sets"].items() if v["chosen_K"] is not None] if selection else []

    # accuracy of the predictions, in priority order, under the optional budget
    plan = chosen + [e for e in parse_plan(args.eval_plan, args.observe, args.horizons, args.extrapolate_only) if e not in chosen]
    evals: dict[tuple[str, int], dict[str, Any]] = {}
    skipped = []
    budget = None if args.eval_budget_min is None else args.eval_budget_min * 60
    eval_started = time.perf_counter()
    for method, k in plan:
        if method == "powerauto" and abs(power_auto - 0.5) < 1e-9 and ("power0.5", k) in evals:
            evals[(method, k)] = {**evals[("power0.5", k)], "same_as": "power0.5"}
            continue
        if (method, k) in evals:
            continue
        if budget is not None and time.perf_counter() - eval_started > budget and (method, k) not in chosen:
            skipped.append(f"{method}@{k}")
            continue
        j = targets.index(float(k))
        combine_seconds = load_prediction(engine, methods[method]["candidates"][j])
        t0 = time.perf_counter()
        acc = probe(model)
        evals[(method, k)] = {"accuracy": acc, "combine_seconds": combine_seconds, "eval_seconds": time.perf_counter() - t0}
        log.info("seed %d: %-10s K=%-4d accuracy %.3f (eval %.0fs, load %s)", seed, method, k, acc,
                 evals[(method, k)]["eval_seconds"], load_average())
    restore_base(buffer)
    if skipped:
        log.info("seed %d: skipped for the time budget: %s", seed, ", ".join(skipped))

    result = {
        "seed": seed,
        "steps_observed": steps,
        "real_accuracy": {0: base_acc, **trained["real_acc"]},
        "train_seconds_at_step": {s: times[s] for s in sorted(times) if s in set([1, args.observe] + args.horizons)},
        "train_wall_seconds_incl_evals": trained["train_wall_seconds_incl_evals"],
        "gram_seconds": gram_seconds,
        "window": diagnostics,
        "history": trained["history"],
        "methods": {
            m: {
                "fit_seconds": v["fit_seconds"],
                "distances": v["distances"],
                "accuracy": {k: e["accuracy"] for (mm, k), e in evals.items() if mm == m},
                "combine_seconds": {k: e["combine_seconds"] for (mm, k), e in evals.items() if mm == m and "combine_seconds" in e},
            }
            for m, v in methods.items()
        },
        "skipped_evaluations": skipped,
        "selection": selection,
    }
    del engine, buffer, trained, methods, grams
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------------------
# summary, tables and plots


def summarise(args, seeds: list[dict[str, Any]], base_acc: float) -> tuple[list[dict], list[dict], list[dict]]:
    n_held = args.heldout
    eval_rows, dist_rows, summary_rows = [], [], []
    ks = args.horizons + args.extrapolate_only
    for res in seeds:
        seed = res["seed"]
        for k, acc in sorted(res["real_accuracy"].items()):
            eval_rows.append({"seed": seed, "method": "real", "K": k, "accuracy": acc, "binomial_se": binomial_se(acc, n_held),
                              "real_steps": k, "wall_seconds": res["train_seconds_at_step"].get(k, 0.0 if k == 0 else None)})
        for method, m in res["methods"].items():
            steps_used = 1 if method == "first" else args.observe
            fit_seconds = m["fit_seconds"]
            for k, acc in sorted(m["accuracy"].items()):
                wall = res["train_seconds_at_step"].get(steps_used, res["train_seconds_at_step"].get(args.observe))
                eval_rows.append({
                    "seed": seed, "method": method, "K": k, "accuracy": acc, "binomial_se": binomial_se(acc, n_held),
                    "real_accuracy_K": res["real_accuracy"].get(k), "real_steps": steps_used,
                    "wall_seconds": (wall or 0.0) + fit_seconds + m["combine_seconds"].get(k, 0.0),
                    "fit_seconds": fit_seconds + m["combine_seconds"].get(k, 0.0),
                })
            for k, d in sorted(m["distances"].items()):
                dist_rows.append({"seed": seed, "method": method, "K": k, **d})
        selection = res.get("selection") or {"sets": {}}
        for method, chosen in selection["sets"].items():
            candidates, k_pick = chosen["candidates"], chosen["chosen_K"]
            acc = res["real_accuracy"].get(args.observe) if k_pick is None else res["methods"][method]["accuracy"].get(k_pick)
            if acc is None:
                continue
            share = (len(candidates) + 1) / selection["probe_evaluations"]  # θ_N's score is shared by the sets
            m = res["methods"][method]
            fit_seconds = m["fit_seconds"] + m["combine_seconds"].get(k_pick, 0.0)
            eval_rows.append({
                "seed": seed, "method": f"select-{method}", "K": max(candidates), "accuracy": acc, "binomial_se": binomial_se(acc, n_held),
                "real_accuracy_K": res["real_accuracy"].get(max(candidates)), "real_steps": args.observe, "chosen_K": k_pick or args.observe,
                "wall_seconds": res["train_seconds_at_step"].get(args.observe, 0.0) + fit_seconds + share * selection["probe_seconds"],
                "fit_seconds": fit_seconds, "probe_seconds": share * selection["probe_seconds"],
            })
    methods = ["real"] + list(METHODS) + [f"select-{m}" for m in METHODS if any(r["method"] == f"select-{m}" for r in eval_rows)]
    for method in methods:
        for k in [0, args.observe] + ks:
            rows = [r for r in eval_rows if r["method"] == method and r["K"] == k]
            if not rows:
                continue
            acc = mean_ci(r["accuracy"] for r in rows)
            row = {"method": method, "K": k, "n_seeds": acc["n"], "accuracy_mean": acc["mean"], "accuracy_ci95_seeds": acc["ci95"],
                   "accuracy_binomial_se_pooled": binomial_se(acc["mean"], n_held * acc["n"]) if acc["n"] else math.nan,
                   "real_steps": rows[0]["real_steps"],
                   "wall_seconds_mean": mean_ci(r["wall_seconds"] for r in rows if r.get("wall_seconds") is not None)["mean"]}
            if method.startswith("select-"):
                row["chosen_K"] = ",".join(str(r["chosen_K"]) for r in rows)
            if method != "real":
                paired = [r["accuracy"] - r["real_accuracy_K"] for r in rows if r.get("real_accuracy_K") is not None]
                gap = mean_ci(paired)
                row.update({"minus_real_mean": gap["mean"], "minus_real_ci95": gap["ci95"]})
                drows = [d for d in dist_rows if d["method"] == method and d["K"] == k and d["distance"] is not None]
                dd = mean_ci(d["distance"] for d in drows)
                row.update({"distance_mean": dd["mean"], "distance_ci95": dd["ci95"],
                            "norm_ratio_mean": mean_ci(d["norm_ratio"] for d in drows)["mean"],
                            "cosine_mean": mean_ci(d["cosine"] for d in drows)["mean"]})
            summary_rows.append(row)
    # distance-only summary for method/K pairs without accuracy
    for method in METHODS:
        for k in [args.observe] + args.horizons:
            if any(r["method"] == method and r["K"] == k for r in summary_rows):
                continue
            drows = [d for d in dist_rows if d["method"] == method and d["K"] == k and d["distance"] is not None]
            if drows:
                dd = mean_ci(d["distance"] for d in drows)
                summary_rows.append({"method": method, "K": k, "n_seeds": 0, "distance_mean": dd["mean"], "distance_ci95": dd["ci95"],
                                     "norm_ratio_mean": mean_ci(d["norm_ratio"] for d in drows)["mean"],
                                     "cosine_mean": mean_ci(d["cosine"] for d in drows)["mean"]})
    return eval_rows, dist_rows, summary_rows


def plot(args, seeds: list[dict[str, Any]], summary_rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(METHODS, ["C3", "C1", "C5", "C4", "C6", "C8", "C2", "C9"]))
    markers = dict(zip(METHODS, ["o", "s", "v", "^", "<", "D", "P", "X"]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for res in seeds:
        pts = sorted(res["real_accuracy"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.6", lw=1, alpha=0.7)
    real = sorted((r["K"], r["accuracy_mean"], r["accuracy_ci95_seeds"]) for r in summary_rows if r["method"] == "real")
    ax.errorbar([r[0] for r in real], [r[1] for r in real],
                yerr=[1.96 * binomial_se(r[1], args.heldout) if not math.isfinite(r[2]) else r[2] for r in real],
                color="k", lw=2, marker="o", capsize=3,
                label="real GRPO (mean ± 1.96·SE over seeds, binomial with one seed; grey: each seed)")
    single = len(seeds) == 1  # one seed: binomial 95% intervals instead of across-seed ones
    for method in METHODS:
        rows = sorted((r["K"], r["accuracy_mean"], r.get("accuracy_ci95_seeds", math.nan), r["n_seeds"])
                      for r in summary_rows if r["method"] == method and r.get("n_seeds"))
        if not rows:
            continue
        span = max(args.horizons + args.extrapolate_only)
        xs = [k + (METHODS.index(method) - 3.5) * 0.007 * span for k, *_ in rows]
        yerr = [1.96 * binomial_se(r[1], args.heldout) if single or not math.isfinite(r[2]) else r[2] for r in rows]
        ax.errorbar(xs, [r[1] for r in rows], yerr=yerr, ls="-", lw=0.8, alpha=0.9,
                    marker=markers[method], color=colours[method], capsize=2, ms=6,
                    label=f"{METHOD_LABELS[method]} from N={args.observe}")
    for i, method in enumerate(m for m in METHODS if any(r["method"] == f"select-{m}" for r in summary_rows)):
        rows = [r for r in summary_rows if r["method"] == f"select-{method}" and r.get("n_seeds")]
        for r in rows:
            yerr = 1.96 * binomial_se(r["accuracy_mean"], args.heldout) if single or not math.isfinite(r["accuracy_ci95_seeds"]) else r["accuracy_ci95_seeds"]
            ax.errorbar([r["K"] + (i + 1) * 0.012 * max(args.horizons)], [r["accuracy_mean"]], yerr=[yerr], marker="*", ms=13,
                        color=colours[method], mec="k", capsize=3, ls="none",
                        label=f"{method_label('select-' + method)}, {args.observe} real steps + probe (chose K = {r.get('chosen_K')})")
    anchor = getattr(args, "anchor_real", None)
    if anchor:
        pts = []
        for part in anchor.split(";"):
            k, _, vals = part.partition(":")
            vs = [float(v) for v in vals.split(",")]
            pts.append((int(k), sum(vs) / len(vs), min(vs), max(vs)))
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                    color="0.35", ls="--", marker="o", mfc="white", capsize=3,
                    label="real GRPO to step 100, not re-measured here: the project's earlier measurement (2 seeds, same settings, base 0.320; range)")
    ax.axvline(args.observe, color="0.3", ls=":", lw=1)
    ax.text(args.observe, 0.02, " N", va="bottom")
    ax.set_xlabel("optimizer step K")
    ax.set_ylabel(f"held-out accuracy ({args.heldout} prompts, greedy)")
    ax.set_ylim(0, 1)
    ax.set_title(f"SmolLM2-135M-Instruct, TRL GRPO, a+b≤{args.max_operand}: real training vs extrapolation ({len(seeds)} seed(s))")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.1, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_step.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, res in enumerate(seeds):
        hist = [h for h in res.get("history", []) if h.get("reward") is not None]
        if not hist:
            continue
        steps = [h["step"] for h in hist]
        reward = [float(h["reward"]) for h in hist]
        window = 5
        smooth = [sum(reward[max(0, j - window + 1) : j + 1]) / len(reward[max(0, j - window + 1) : j + 1]) for j in range(len(reward))]
        ax.plot(steps, reward, color=f"C{i}", alpha=0.25, lw=1)
        ax.plot(steps, smooth, color=f"C{i}", lw=2, label=f"seed {res['seed']} (5-step mean)")
        zero = [float(h.get("frac_reward_zero_std") or 0.0) for h in hist]
        ax.scatter([s for s, z in zip(steps, zero) if z >= 1.0], [0.0] * sum(z >= 1.0 for z in zero), color=f"C{i}", marker="x", s=20)
    ax.axvline(args.observe, color="0.3", ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean training reward (16 samples, T=0.7)")
    ax.set_title("training reward per step (x: no reward variance in any group: zero gradient)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "train_reward.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        rows = sorted((r["K"], r["distance_mean"], r.get("distance_ci95", math.nan)) for r in summary_rows
                      if r["method"] == method and r.get("distance_mean") is not None and math.isfinite(r["distance_mean"]))
        if rows:
            ax.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[0 if not math.isfinite(r[2]) else r[2] for r in rows],
                        marker=markers[method], color=colours[method], capsize=2, label=METHOD_LABELS[method])
    ax.axhline(1.0, color="0.5", ls="--", lw=1)
    ax.set_xlabel("step K (N included: the in-window fit)")
    ax.set_ylabel("||θ̂(K) − θ(K)|| / ||θ(K) − θ_0||")
    ax.set_yscale("log")
    ax.set_title("relative distance to real training (mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "distance_vs_step.png", dpi=110)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return format(value, spec)


def _pm(mean: Any, half: Any, spec: str) -> str:
    text = _fmt(mean, spec)
    return f"{text} ± {_fmt(half, '.3f')}" if text and _fmt(half, ".3f") else text


def print_markdown(args, summary_rows: list[dict]) -> None:
    """The summary as a Markdown table (for docs/benchmarks.md)."""
    print("| method | K | seeds | held-out accuracy (mean ± 1.96·SE over seeds) | minus real(K), paired | distance | norm ratio | cosine | real steps | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(summary_rows, key=lambda r: (method_order(r["method"]), r["K"])):
        acc = _pm(r.get("accuracy_mean"), r.get("accuracy_ci95_seeds"), ".3f") if r.get("n_seeds") else "–"
        name = method_label(r["method"])
        if r.get("chosen_K"):
            name += f" (chose K = {r['chosen_K']})"
        print(f"| {name} | {r['K']} | {r.get('n_seeds', 0)} | {acc} | {_pm(r.get('minus_real_mean'), r.get('minus_real_ci95'), '+.3f') or '–'} | "
              f"{_fmt(r.get('distance_mean'), '.2f') or '–'} | {_fmt(r.get('norm_ratio_mean'), '.2f') or '–'} | "
              f"{_fmt(r.get('cosine_mean'), '.2f') or '–'} | {_fmt(r.get('real_steps'), 'd') or '–'} | {_fmt(r.get('wall_seconds_mean'), '.0f') or '–'} |")


def print_table(args, summary_rows: list[dict]) -> None:
    print()
    print(f"{'method':<16}{'K':>5}{'seeds':>6}{'accuracy':>18}{'minus real(K)':>18}{'dist':>8}{'norm':>7}{'cos':>7}{'steps':>7}{'wall s':>8}")
    for r in sorted(summary_rows, key=lambda r: (method_order(r["method"]), r["K"])):
        acc = _pm(r.get("accuracy_mean"), r.get("accuracy_ci95_seeds"), ".3f") if r.get("n_seeds") else ""
        gap = _pm(r.get("minus_real_mean"), r.get("minus_real_ci95"), "+.3f")
        print(f"{r['method']:<16}{r['K']:>5}{r.get('n_seeds', 0):>6}{acc:>18}{gap:>18}{_fmt(r.get('distance_mean'), '.2f'):>8}"
              f"{_fmt(r.get('norm_ratio_mean'), '.2f'):>7}{_fmt(r.get('cosine_mean'), '.2f'):>7}"
              f"{_fmt(r.get('real_steps'), 'd'):>7}{_fmt(r.get('wall_seconds_mean'), '.0f'):>8}")


# ---------------------------------------------------------------------------------------------------------


def _int_keys(value: Any) -> Any:
    """JSON turned the int keys (steps) into strings; turn them back."""
    if isinstance(value, dict):
        return {(int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k): _int_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int_keys(v) for v in value]
    return value


def replot(out: Path, anchor_real: str | None = None) -> None:
    import json

    data = json.loads((out / "results.json").read_text())
    settings = argparse.Namespace(**{**data["settings"], "anchor_real": anchor_real})
    seeds = _int_keys(data["seeds"])
    eval_rows, dist_rows, summary_rows = summarise(settings, seeds, data["base_accuracy"])
    write_csv(out / "evals.csv", eval_rows)
    write_csv(out / "distances.csv", dist_rows)
    write_csv(out / "summary.csv", summary_rows)
    data["summary"] = summary_rows
    write_json(out / "results.json", data)
    plot(settings, seeds, summary_rows, out)
    print_table(settings, summary_rows)
    print()
    print_markdown(settings, summary_rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    set_threads(args.threads)
    from relex_callback.demo import addition_reward, load_smollm2, split_train_heldout
    from relex_callback.demo.arithmetic import make_addition_dataset, prompt_pair
    from relex_callback.probe import RewardProbe

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        replot(out, args.anchor_real)
        return
    info = machine_info()
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_set, heldout = split_train_heldout(n_train=1000, n_heldout=args.heldout, seed=args.heldout_seed, max_operand=args.max_operand)
    used = [prompt_pair(p) for p in train_set["prompt"]] + [prompt_pair(p) for p in heldout["prompt"]]
    selection_set = make_addition_dataset(args.select_prompts, seed=args.heldout_seed + 1, max_operand=args.max_operand,
                                          exclude_pairs=used)  # disjoint from training and held-out prompts
    selector = RewardProbe(selection_set, addition_reward, tokenizer, max_new_tokens=16, batch_size=args.probe_batch_size)
    probe = RewardProbe(heldout, addition_reward, tokenizer, max_new_tokens=16, batch_size=args.probe_batch_size)
    t0 = time.perf_counter()
    base_acc = probe(model)
    log.info("base model: held-out accuracy %.3f (%d prompts, eval %.0fs, load %s)", base_acc, args.heldout,
             time.perf_counter() - t0, load_average())

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    seeds: list[dict[str, Any]] = []
    for seed in args.seeds:
        with torch.no_grad():  # every seed starts from the packaged weights
            for name, p in model.named_parameters():
                p.copy_(initial[name])
        torch.manual_seed(seed)
        seeds.append(run_seed(args, seed, model, tokenizer, train_set, probe, base_acc, selector))
        eval_rows, dist_rows, summary_rows = summarise(args, seeds, base_acc)
        info["load_average_at_end"] = load_average()
        info["wall_seconds_total"] = time.perf_counter() - started
        write_json(out / "results.json", {"machine": info, "settings": settings, "base_accuracy": base_acc,
                                          "summary": summary_rows, "seeds": seeds})
        write_csv(out / "evals.csv", eval_rows)
        write_csv(out / "distances.csv", dist_rows)
        write_csv(out / "summary.csv", summary_rows)
        plot(args, seeds, summary_rows, out)
        log.info("seed %d done; results so far in %s (%.0f min total)", seed, out, (time.perf_counter() - started) / 60)
    print_table(args, summary_rows)
    print(f"\nwrote {out}/results.json, summary.csv, evals.csv, distances.csv, accuracy_vs_step.png, distance_vs_step.png, train_reward.png")


if __name__ == "__main__":
    main()
