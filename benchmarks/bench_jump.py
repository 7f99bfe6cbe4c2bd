"""Plain TRL GRPO vs RELEX jump mode on the packaged SmolLM2-135M-Instruct, same seed and step budget.

Task: "What is a + b? Reply with just the number." (a, b ≤ 50), exact-match reward, the CPU settings of
the quality benchmark's settings (2 prompts × 8 generations per step, temperature 0.7, lr 5e-6 constant, AdamW, beta 0,
loss "dapo", 16 new tokens). Held-out accuracy is the greedy exact-match rate on prompts disjoint from training
(``RewardProbe``). The jump arms guard each jump with a second, disjoint held-out probe set. Accuracy is
recorded at fixed *real* optimizer steps, after any jump of that step, together with the training wall time
(the benchmark's own evaluation excluded; the jump's fit and probe time included).

Outputs a JSON file with every point and a Markdown summary: accuracy by real step for every arm and seed, and
the real steps (and seconds) each arm needed to reach plain GRPO's final accuracy, as a ratio plain / jump.

    python benchmarks/bench_jump.py --quick                  # 2 seeds, 20 steps, about 15-20 min on 2 idle cores
    python benchmarks/bench_jump.py --seeds 0 1 2 --steps 60 --eval-every 10 --heldout 200
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from relex_callback import RelexCallback
from relex_callback.demo import addition_reward, cpu_grpo_config, load_smollm2, split_train_heldout
from relex_callback.probe import RewardProbe

logger = logging.getLogger("bench_jump")

ARMS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "jump-line": dict(fit="linear"),
    "jump-power": dict(fit="power", power="auto"),
    "jump-line-current": dict(fit="linear", jump_anchor="current"),
    "jump-power-current": dict(fit="power", power="auto", jump_anchor="current"),
}


class Evaluate(TrainerCallback):
    """Held-out accuracy at the given real steps, after any jump of that step (RelexCallback runs first)."""

    def __init__(self, probe: RewardProbe, steps: list[int], relex: RelexCallback | None) -> None:
        self.probe, self.steps, self.relex = probe, set(steps), relex
        self.points: list[dict[str, Any]] = []
        self.eval_seconds = 0.0
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step not in self.steps:
            return control
        begin = time.perf_counter()
        accuracy = self.probe(model)
        seconds = time.perf_counter() - begin
        virtual = self.relex.jump.virtual_step(step) if self.relex is not None else step
        self.points.append({"step": step, "virtual_step": virtual, "accuracy": accuracy,
                            "train_seconds": begin - self.started - self.eval_seconds, "eval_seconds": seconds})
        self.eval_seconds += seconds
        logger.info("step %d (virtual %d): held-out accuracy %.3f (%.0fs eval)", step, virtual, accuracy, seconds)
        return control


def run_arm(name: str, seed: int, opts: argparse.Namespace, train, eval_probe: RewardProbe, jump_probe_set) -> dict[str, Any]:
    torch.manual_seed(seed)
    model, tokenizer = load_smollm2()
    model.train()
    relex = None
    if ARMS[name] is not None:
        probe = RewardProbe(jump_probe_set, addition_reward, tokenizer, max_new_tokens=16, batch_size=64)
        relex = RelexCallback(
            mode="jump", observe=opts.observe, jump_every=opts.jump_every, jump_horizon=opts.jump_horizon,
            probe=probe, probe_tolerance=opts.probe_tolerance, max_snapshots=opts.max_snapshots, **ARMS[name],
        )
    eval_steps = list(range(opts.eval_every, opts.steps + 1, opts.eval_every))
    evaluate = Evaluate(eval_probe, eval_steps, relex)
    out_dir = Path(opts.output_dir) / f"{name}-seed{seed}"
    args = cpu_grpo_config(out_dir, max_steps=opts.steps, seed=seed, learning_rate=opts.lr,
                           prompts_per_step=opts.prompts_per_step, generations=opts.generations)
    callbacks = [evaluate] if relex is None else [relex, evaluate]
    trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=args, train_dataset=train,
                          processing_class=tokenizer, callbacks=callbacks)
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    live = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RelexCallback)), None)
    result = {
        "arm": name, "seed": seed, "points": evaluate.points, "wall_seconds": total,
        "train_seconds": total - evaluate.eval_seconds,
        "jumps": [] if live is None else live.jump.history,
    }
    del trainer, model, relex, live
    gc.collect()
    return result


def first_reaching(points: list[dict[str, Any]], level: float, key: str) -> float | None:
    for point in points:
        if point["accuracy"] >= level - 1e-12:
            return point[key]
    return None


def summarize(results: list[dict[str, Any]], base: dict[int, float]) -> str:
    """Markdown tables: accuracy by real step; steps and seconds to reach plain's final accuracy."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    by = {(r["arm"], r["seed"]): r for r in results}
    steps = [p["step"] for p in results[0]["points"]]
    lines = ["| arm | seed | base | " + " | ".join(f"step {s}" for s in steps) + " | jumps (acc / rej / skip) | train s |",
             "|---|---|---|" + "---|" * len(steps) + "---|---|"]
    for arm in arms:
        for seed in seeds:
            r = by.get((arm, seed))
            if r is None:
                continue
            cells = []
            for p in r["points"]:
                cells.append(f"{p['accuracy']:.3f}" + (f" (v{p['virtual_step']})" if p["virtual_step"] != p["step"] else ""))
            status = [j["status"] for j in r["jumps"]]
            counts = f"{status.count('accepted')} / {status.count('rejected')} / {status.count('skipped')}" if r["jumps"] else "–"
            lines.append(f"| {arm} | {seed} | {base[seed]:.3f} | " + " | ".join(cells) + f" | {counts} | {r['train_seconds']:.0f} |")
    lines += ["", "Steps (and training seconds) to first reach plain GRPO's final accuracy of the same seed; ratio = plain / arm "
              "(> 1: the arm got there in fewer real steps; 'not reached' within the budget).", "",
              "| arm | seed | target | plain steps | arm steps | step ratio | plain s | arm s | time ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for seed in seeds:
        plain = by.get(("plain", seed))
        if plain is None or not plain["points"]:
            continue
        target = plain["points"][-1]["accuracy"]
        p_steps, p_secs = first_reaching(plain["points"], target, "step"), first_reaching(plain["points"], target, "train_seconds")
        for arm in arms:
            if arm == "plain" or (arm, seed) not in by:
                continue
            r = by[(arm, seed)]
            a_steps, a_secs = first_reaching(r["points"], target, "step"), first_reaching(r["points"], target, "train_seconds")
            if a_steps is None:
                lines.append(f"| {arm} | {seed} | {target:.3f} | {p_steps} | not reached | < {p_steps / steps[-1]:.2f} | {p_secs:.0f} | – | – |")
            else:
                lines.append(f"| {arm} | {seed} | {target:.3f} | {p_steps} | {a_steps} | {p_steps / a_steps:.2f} | {p_secs:.0f} | "
                             f"{a_secs:.0f} | {p_secs / a_secs:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 steps, jumps every 5 from step 10, 100 held-out prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=["plain", "jump-line", "jump-power"], choices=sorted(ARMS))
    parser.add_argument("--steps", type=int, default=60, help="real optimizer steps per run (the budget)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--observe", type=int, default=10, help="W: first jump at this step")
    parser.add_argument("--jump-every", type=int, default=10, help="J")
    parser.add_argument("--jump-horizon", type=int, default=10, help="H (capped by the backtest)")
    parser.add_argument("--max-snapshots", type=int, default=None, help="delta-buffer capacity (default: observe)")
    parser.add_argument("--probe-tolerance", type=float, default=0.0)
    parser.add_argument("--heldout", type=int, default=200, help="held-out prompts for the accuracy curve")
    parser.add_argument("--probe-prompts", type=int, default=64, help="separate held-out prompts for the jump probe")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--output-dir", default="runs/bench_jump")
    parser.add_argument("--results", default="benchmarks/results/bench_jump.json")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.steps, opts.eval_every, opts.observe, opts.jump_every, opts.jump_horizon = 20, 5, 10, 5, 5
        opts.heldout, opts.probe_prompts = 100, 32
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "trl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    train, heldout = split_train_heldout(n_train=1000, n_heldout=opts.heldout + opts.probe_prompts, seed=0, max_operand=50)
    eval_set = heldout.select(range(opts.heldout))
    jump_probe_set = heldout.select(range(opts.heldout, opts.heldout + opts.probe_prompts))
    results, base = [], {}
    started = time.perf_counter()
    for seed in opts.seeds:
        model, tokenizer = load_smollm2()
        eval_probe = RewardProbe(eval_set, addition_reward, tokenizer, max_new_tokens=16, batch_size=100)
        base[seed] = eval_probe(model)  # the same base model for every seed; measured once per seed as a check
        logger.info("seed %d: base held-out accuracy %.3f", seed, base[seed])
        del model
        for arm in opts.arms:
            logger.info("=== %s, seed %d ===", arm, seed)
            results.append(run_arm(arm, seed, opts, train, eval_probe, jump_probe_set))
            Path(opts.results).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.results).write_text(json.dumps({"options": vars(opts), "base": base, "results": results}, indent=1))
    table = summarize(results, base)
    payload = {"options": vars(opts), "base": base, "results": results, "summary_markdown": table,
               "total_seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads(),
               "machine": platform.platform()}
    Path(opts.results).write_text(json.dumps(payload, indent=1))
    logger.info("results in %s (%.0f s)\n%s", opts.results, payload["total_seconds"], table)


if __name__ == "__main__":
    main()
