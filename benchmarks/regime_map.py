"""Regime map: in which RLVR regimes does extrapolation save training steps? (real TRL GRPO, SmolLM2-135M)

Each (regime, seed) is one real GRPO run, made resumable so that hours of CPU can span several sessions:

    python benchmarks/regime_map.py train --regime large-batch --seed 0     # run again to resume
    python benchmarks/regime_map.py evaluate --regime large-batch --seed 0  # every method, from disk
    python benchmarks/regime_map.py summary                                 # tables, steps saved, plot

``train`` runs GRPO to the regime's last step. Under ``--state-dir`` (default ``runs/regime-map``, not in git)
it writes the observation window (Δ_t = θ_t − θ_0 for t ≤ N, bf16 as the callback stores it) and the real
delta at every evaluated step, one safetensors file each, so every method can be evaluated later without
training; a Trainer checkpoint (weights, optimizer, scheduler, RNG states, data position) every
``save_every`` steps makes the run resume where it stopped. Every result is appended as one JSON line to
``benchmarks/results/regime-map/<regime>/seed<s>.jsonl`` (in git): the training log of each step (reward,
``frac_reward_zero_std``, seconds) and the held-out accuracy of the real weights every ``eval_every`` steps.
A resumed run recomputes the steps after its checkpoint exactly (same RNG states), and readers keep the last
record of each step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, RESULTS_ROOT, load_average, log, machine_info, set_threads, setup_logging  # noqa: E402

REGIMES: dict[str, dict[str, Any]] = {
    # The regime of the earlier quality benchmark (docs/benchmarks.md): 16 completions per step, lr 5e-6.
    "small-batch": dict(learning_rate=5e-6, prompts_per_step=2, generations=8, observe=10, last_step=50,
                        eval_every=5, max_operand=50, temperature=0.7, n_train=1000),
    # The paper's lr with 64 completions per step (the GPU run that gained about 3x at 5N, one seed).
    "large-batch": dict(learning_rate=1e-6, prompts_per_step=8, generations=8, observe=20, last_step=100,
                        eval_every=10, max_operand=99, temperature=0.7, n_train=2000),
}
HELDOUT = 200
SELECTION = 64
HELDOUT_SEED = 0
SAVE_EVERY = 5
RESULTS = RESULTS_ROOT / "regime-map"


def run_paths(state_dir: Path, regime: str, seed: int, results_root: Path = RESULTS) -> dict[str, Path]:
    root = state_dir / regime / f"seed{seed}"
    return {
        "root": root,
        "trainer": root / "trainer",
        "deltas": root / "deltas",
        "results": results_root / regime / f"seed{seed}.jsonl",
    }


def delta_path(paths: dict[str, Path], step: int) -> Path:
    return paths["deltas"] / f"delta-{step:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------------
# results file: append-only JSON lines, the last record of a (kind, step) wins


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a results file; a torn last line (the process was killed mid-write) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def latest_by_step(records: list[dict[str, Any]], kind: str) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for record in records:
        if record.get("kind") == kind:
            out[int(record["step"])] = record
    return out


# ---------------------------------------------------------------------------------------------------------
# the task


def prompt_sets(regime: dict[str, Any]):
    """Training, held-out and selection-probe prompts, pairwise disjoint on the unordered pair {a, b}."""
    from relex_callback.demo import split_train_heldout
    from relex_callback.demo.arithmetic import make_addition_dataset, prompt_pair

    train, heldout = split_train_heldout(n_train=regime["n_train"], n_heldout=HELDOUT, seed=HELDOUT_SEED,
                                         max_operand=regime["max_operand"])
    used = [prompt_pair(p) for p in train["prompt"]] + [prompt_pair(p) for p in heldout["prompt"]]
    selection = make_addition_dataset(SELECTION, seed=HELDOUT_SEED + 1, max_operand=regime["max_operand"], exclude_pairs=used)
    return train, heldout, selection


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_delta(path: Path, model, theta0: dict[str, torch.Tensor]) -> None:
    """Write Δ = θ − θ_0 (bf16) atomically: a file that exists is complete."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        tensors = {name: (p.detach().to(torch.float32) - theta0[name]).to(torch.bfloat16).contiguous()
                   for name, p in model.named_parameters()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"kind": "delta-bf16"})
    os.replace(tmp, path)


def latest_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint (``trainer_state.json`` is written last)."""
    done = [p for p in trainer_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


# ---------------------------------------------------------------------------------------------------------
# train


def make_recorder(regime: dict[str, Any], paths: dict[str, Path], theta0, probe, done_evals: set[int]):
    from transformers import TrainerCallback

    observe, every = regime["observe"], regime["eval_every"]
    results = paths["results"]

    class Recorder(TrainerCallback):
        """Writes Δ_t (t ≤ N and evaluated steps), the per-step log and the real held-out accuracy."""

        def __init__(self) -> None:
            self.step_started = None
            self.last_log: dict[str, Any] = {}

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.last_log = dict(logs)
                keys = ("reward", "reward_std", "frac_reward_zero_std", "loss", "completions/mean_length")
                append_record(results, {"kind": "train", "step": state.global_step, "seconds": self.last_seconds,
                                        **{k: logs[k] for k in keys if k in logs}})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            self.last_seconds = time.perf_counter() - self.step_started
            if step <= observe or step % every == 0:
                save_delta(delta_path(paths, step), model, theta0)
            if step % every == 0 and step not in done_evals:
                started = time.perf_counter()
                accuracy = probe(model)
                append_record(results, {"kind": "real", "step": step, "accuracy": accuracy, "n": HELDOUT,
                                        "eval_seconds": time.perf_counter() - started})
                log.info("step %d: held-out accuracy %.3f (eval %.0fs, load %s)", step, accuracy,
                         time.perf_counter() - started, load_average())

    return Recorder()


def settings_record(name: str, regime: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"kind": "settings", "step": 0, "regime": name, "seed": seed, **regime, "heldout": HELDOUT,
            "selection_prompts": SELECTION, "heldout_seed": HELDOUT_SEED, "save_every": SAVE_EVERY}


def train(args: argparse.Namespace) -> None:
    from relex_callback.demo import load_smollm2

    paths = run_paths(args.state_dir, args.regime, args.seed)
    train_run(args.regime, REGIMES[args.regime], args.seed, paths, load_smollm2)


def train_run(name: str, regime: dict[str, Any], seed: int, paths: dict[str, Path], loader, callbacks=(), reward=None):
    """Train (or resume) one run; returns the trained model, or None when the run was already complete.
    ``loader()`` returns ``(model, tokenizer)`` at θ_0; ``callbacks`` are extra Trainer callbacks; ``reward``
    replaces the addition reward (training and held-out score)."""
    from trl import GRPOTrainer

    from relex_callback.demo import addition_reward, cpu_grpo_config
    from relex_callback.probe import RewardProbe

    reward = reward or addition_reward
    records = read_records(paths["results"])
    wanted = settings_record(name, regime, seed)
    previous = [r for r in records if r.get("kind") == "settings"]
    if previous and {k: v for k, v in previous[-1].items() if k not in ("theta0", "machine")} != wanted:
        raise SystemExit(f"{paths['results']} was written with other settings ({previous[-1]}); move it away to start over")
    done_evals = set(latest_by_step(records, "real"))
    last = regime["last_step"]
    if last in done_evals and len(list(paths["deltas"].glob("delta-*.safetensors"))) >= regime["observe"]:
        log.info("%s seed %d: already trained to step %d", name, seed, last)
        return None

    model, tokenizer = loader()
    digest = weights_digest(model)
    if previous and previous[-1].get("theta0") not in (None, digest):
        raise SystemExit(f"θ_0 differs from the one this run started from ({previous[-1]['theta0']} vs {digest})")
    if not previous:
        append_record(paths["results"], {**wanted, "theta0": digest, "machine": machine_info()})
    theta0 = {name: p.detach().to(torch.float32).clone() for name, p in model.named_parameters()}
    train_set, heldout, _ = prompt_sets(regime)
    probe = RewardProbe(heldout, reward, tokenizer, max_new_tokens=16, batch_size=50)
    if 0 not in done_evals:
        started = time.perf_counter()
        accuracy = probe(model)
        append_record(paths["results"], {"kind": "real", "step": 0, "accuracy": accuracy, "n": HELDOUT,
                                         "eval_seconds": time.perf_counter() - started})
        log.info("base model: held-out accuracy %.3f", accuracy)

    config = cpu_grpo_config(
        paths["trainer"], max_steps=last, seed=seed, learning_rate=regime["learning_rate"],
        prompts_per_step=regime["prompts_per_step"], generations=regime["generations"], temperature=regime["temperature"],
        save_strategy="steps", save_steps=SAVE_EVERY, save_total_limit=1,
    )
    model.train()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=train_set,
                          processing_class=tokenizer,
                          callbacks=[make_recorder(regime, paths, theta0, probe, done_evals), *callbacks])
    resume = latest_checkpoint(paths["trainer"])
    log.info("%s seed %d: training to step %d%s (load %s)", name, seed, last,
             f", resuming from {resume.name}" if resume else "", load_average())
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    log.info("%s seed %d: done", name, seed)
    return model


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train",):
        cmd = sub.add_parser(name)
        cmd.add_argument("--regime", required=True, choices=sorted(REGIMES))
        cmd.add_argument("--seed", type=int, required=True)
        cmd.add_argument("--state-dir", type=Path, default=REPO_ROOT / "runs" / "regime-map",
                         help="window, real deltas and Trainer checkpoints (large; not in git)")
        cmd.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: one core per run)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    set_threads(args.threads)
    {"train": train}[args.command](args)


if __name__ == "__main__":
    main()
