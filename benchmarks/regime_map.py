"""Regime map: in which RLVR regimes does extrapolation save training steps? (real TRL GRPO, SmolLM2-135M)

Each (regime, seed) is one real GRPO run, made resumable so that hours of CPU can span several sessions:

    python benchmarks/regime_map.py train --regime large-batch --seed 0     # run again to resume
    python benchmarks/regime_map.py evaluate --regime large-batch --seed 0  # every method, from disk
    python benchmarks/regime_map.py window --regime large-batch --seed 0    # retrain a lost window, checked
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

Memory: a large-batch run (64 completions per step) peaks at 12.4-13.4 GB resident (GNU ``time -v``), so on a
23 GB machine only one runs at a time: a second one started beside it was killed by the kernel at its first step.
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
from _candidates import candidate as family_candidate, fill_window, load, load_observed, window_engine  # noqa: E402

REGIMES: dict[str, dict[str, Any]] = {
    # The regime of the earlier quality benchmark (docs/benchmarks.md): 16 completions per step, lr 5e-6.
    "small-batch": dict(learning_rate=5e-6, prompts_per_step=2, generations=8, observe=10, last_step=50,
                        eval_every=10, max_operand=50, temperature=0.7, n_train=1000),
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
        "grams": results_root / regime / f"seed{seed}-grams.safetensors",
    }


def jump_paths(state_dir: Path, regime: str, seed: int, policy: str, results_root: Path = RESULTS) -> dict[str, Path]:
    """A jump-mode run beside the plain run of the same seed (``optimizer_policy`` = ``policy``)."""
    root = state_dir / regime / f"seed{seed}-jump-{policy}"
    return {"root": root, "trainer": root / "trainer", "deltas": root / "deltas",
            "results": results_root / regime / f"seed{seed}-jump-{policy}.jsonl"}


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


WINDOW_KINDS = ("diagnostic", "distance", "probe", "selection", "search", "eval")
"""Record kinds computed from the saved window."""


def read_records(path: Path, latest_run: bool = True) -> list[dict[str, Any]]:
    """Records of a results file; a torn last line (the process was killed mid-write) is ignored. With
    ``latest_run`` only the window on disk counts: a session that trained from step 0 again wrote a new window, so
    what was computed from the earlier one (its diagnostic, distances, probe scores, evaluations) is dropped. The
    training log and the real evaluations are kept (the newest per step wins): the run is the same run recomputed,
    equal to float tolerance (docs/choosing-a-horizon.md, "Determinism")."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if latest_run:
        starts = [i for i, r in enumerate(records) if is_fresh_start(r)]
        if starts:
            records = [r for r in records[: starts[-1]] if r.get("kind") not in WINDOW_KINDS] + records[starts[-1]:]
    return records


def is_fresh_start(record: dict[str, Any]) -> bool:
    """A session record of training that began at step 0 (no checkpoint to resume)."""
    return record.get("kind") == "session" and record.get("resumed_from") is None and record.get("step") == 0


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


def make_recorder(regime: dict[str, Any], paths: dict[str, Path], theta0, probe, done_evals: set[int],
                  relex=None, stop_at: float | None = None):
    """``relex``: a jump-mode RelexCallback that runs before the recorder (each evaluation then sees the weights after
    that step's jump, and every jump attempt is copied into the results file); ``stop_at``: end training at the first
    evaluation that reaches this accuracy. A jump run writes no deltas."""
    from transformers import TrainerCallback

    observe, every = regime["observe"], regime["eval_every"]
    results = paths["results"]

    class Recorder(TrainerCallback):
        """Writes Δ_t (t ≤ N and evaluated steps), the per-step log and the real held-out accuracy."""

        def __init__(self) -> None:
            self.step_started = None
            self.last_log: dict[str, Any] = {}
            self.jumps_written = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if relex is not None:  # a resumed run restored the jumps written before
                self.jumps_written = len(relex.jump.history)

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
            if relex is None and (step <= observe or step % every == 0):
                save_delta(delta_path(paths, step), model, theta0)
            if relex is not None:
                for attempt in relex.jump.history[self.jumps_written:]:
                    append_record(results, {**json.loads(json.dumps(attempt, default=str)), "kind": "jump"})
                self.jumps_written = len(relex.jump.history)
            if step % every == 0 and step not in done_evals:
                started = time.perf_counter()
                accuracy = probe(model)
                virtual = {} if relex is None else {"virtual_step": relex.jump.virtual_step(step)}
                append_record(results, {"kind": "real", "step": step, "accuracy": accuracy, "n": HELDOUT,
                                        "eval_seconds": time.perf_counter() - started, **virtual})
                log.info("step %d: held-out accuracy %.3f%s (eval %.0fs, load %s)", step, accuracy,
                         f" at virtual step {virtual['virtual_step']}" if virtual else "",
                         time.perf_counter() - started, load_average())
                if stop_at is not None and accuracy >= stop_at:
                    log.info("step %d: reached the target accuracy %.3f; training stops", step, stop_at)
                    control.should_training_stop = True

    return Recorder()


def settings_record(name: str, regime: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"kind": "settings", "step": 0, "regime": name, "seed": seed, **regime, "heldout": HELDOUT,
            "selection_prompts": SELECTION, "heldout_seed": HELDOUT_SEED, "save_every": SAVE_EVERY}


def train(args: argparse.Namespace) -> None:
    from relex_callback.demo import load_smollm2

    paths = run_paths(args.state_dir, args.regime, args.seed)
    train_run(args.regime, REGIMES[args.regime], args.seed, paths, load_smollm2, stop_after=args.stop_after,
              last_step=args.last_step)


GRAM_RTOL = 1e-4
"""Largest relative difference between a retrained window's Gram and the committed one that still counts as the
same run (recomputed runs agree to float tolerance, not bit for bit: docs/choosing-a-horizon.md, Determinism)."""


def window(args: argparse.Namespace) -> None:
    """Train a run's window (steps 1..N) again into the state dir, e.g. on a new machine, so that ``evaluate`` can
    score candidates the results lack. Its training log goes to a scratch file beside the deltas, so the committed
    results stay as they are; the new window is kept only if its Gram equals the committed one to
    ``GRAM_RTOL`` (the same trajectory recomputed), else its deltas are moved aside and the command fails."""
    from relex_callback.demo import load_smollm2

    regime = REGIMES[args.regime]
    observe = regime["observe"]
    paths = run_paths(args.state_dir, args.regime, args.seed)
    committed = paths["grams"]
    if not committed.is_file():
        raise SystemExit(f"{committed} is missing: there is no recorded window to check a retrained one against")
    names, grams, steps = load_grams(committed)
    if steps[:observe] != list(range(1, observe + 1)):
        raise SystemExit(f"{committed} does not start with the window's steps 1..{observe}")
    scratch = {**paths, "results": paths["root"] / "window.jsonl"}
    train_run(args.regime, regime, args.seed, scratch, load_smollm2, stop_after=observe)
    window_files(paths, observe)
    again = delta_grams(paths, names, list(range(1, observe + 1)))
    before = grams[:, :observe, :observe].double()
    worst = float(((again - before).abs().amax((1, 2)) / before.abs().amax((1, 2)).clamp_min(1e-300)).max())
    if worst > GRAM_RTOL:
        aside = paths["deltas"].with_name(f"deltas-mismatch-{int(time.time())}")
        paths["deltas"].rename(aside)
        raise SystemExit(f"the retrained window differs from {committed.name} (largest relative Gram difference "
                         f"{worst:.2e} > {GRAM_RTOL:g}): moved to {aside}; it is not the recorded run")
    log.info("%s seed %d: window retrained; its Gram equals %s to %.1e (relative)", args.regime, args.seed,
             committed.name, worst)


# Jump mode as a user with a probe would run it: a jump every N/2 real steps of N virtual steps, the horizon grown
# by the probe after each accepted jump (x2, up to max_horizon = 10N) and halved after a rejection; the backtest cap
# is off (in this regime the weight-distance horizon is far shorter than the reward's: docs/choosing-a-horizon.md).
JUMP_POLICIES = ("keep", "reset")


def jump_settings(regime: dict[str, Any], policy: str) -> dict[str, Any]:
    observe = regime["observe"]
    return dict(jump_every=observe // 2, jump_horizon=observe, auto_horizon=False, probe_tolerance=0.0,
                optimizer_policy=policy)


def jump(args: argparse.Namespace) -> None:
    """Jump mode until the held-out accuracy reaches the plain run's accuracy at the regime's last step."""
    from relex_callback.demo import load_smollm2

    regime = REGIMES[args.regime]
    plain = latest_by_step(read_records(run_paths(args.state_dir, args.regime, args.seed)["results"]), "real")
    last = regime["last_step"]
    if last not in plain:
        raise SystemExit(f"the plain run of seed {args.seed} has no held-out accuracy at step {last} yet: "
                         f"train it first (python benchmarks/regime_map.py train --regime {args.regime} --seed {args.seed})")
    paths = jump_paths(args.state_dir, args.regime, args.seed, args.policy)
    train_run(args.regime, regime, args.seed, paths, load_smollm2, stop_after=args.stop_after,
              jump=jump_settings(regime, args.policy), stop_at=plain[last]["accuracy"])


class StopAfter:
    """A Trainer callback that ends this session's training after ``step`` (the run stays resumable)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True

        return _Stop()


def train_run(name: str, regime: dict[str, Any], seed: int, paths: dict[str, Path], loader, callbacks=(), reward=None,
              stop_after: int | None = None, last_step: int | None = None, jump: dict[str, Any] | None = None,
              stop_at: float | None = None):
    """Train (or resume) one run; returns the trained model, or None when the run was already complete.
    ``loader()`` returns ``(model, tokenizer)`` at θ_0; ``callbacks`` are extra Trainer callbacks; ``reward``
    replaces the addition reward (training and held-out score); ``last_step`` trains beyond the regime's last step
    (the learning rate is constant, so steps up to the regime's last step are the same run). A run that starts from
    step 0 (no checkpoint) evaluates every step again: its records replace earlier ones, which stay in the file as
    the reference of a determinism check. ``jump``: RelexCallback options of a jump-mode run (its probe: the
    selection prompts), which stops at the first evaluation reaching ``stop_at``."""
    from trl import GRPOTrainer

    from relex_callback.demo import addition_reward, cpu_grpo_config
    from relex_callback.probe import RewardProbe

    reward = reward or addition_reward
    records = read_records(paths["results"])
    wanted = settings_record(name, regime, seed)
    if jump is not None:
        wanted = {**wanted, "jump": jump, "stop_at": stop_at}
    previous = [r for r in records if r.get("kind") == "settings"]
    if previous and {k: v for k, v in previous[-1].items() if k not in ("theta0", "machine")} != wanted:
        raise SystemExit(f"{paths['results']} was written with other settings ({previous[-1]}); move it away to start over")
    resume = latest_checkpoint(paths["trainer"])
    done_evals = set(latest_by_step(records, "real")) if resume else set()
    last = last_step or regime["last_step"]
    if last < regime["last_step"]:
        raise SystemExit(f"--last-step {last} is below the regime's last step {regime['last_step']}: use --stop-after")
    goal = min(last, stop_after or last)
    trained = max(latest_by_step(records, "train"), default=0)
    window_saved = jump is not None or len(list(paths["deltas"].glob("delta-*.safetensors"))) >= regime["observe"]
    reached = stop_at is not None and any(r["accuracy"] >= stop_at for r in latest_by_step(records, "real").values()
                                          if r["step"] > 0)
    if ((goal in done_evals or trained >= goal) and window_saved) or reached:
        log.info("%s seed %d: already trained to step %d%s", name, seed, goal, " (target reached)" if reached else "")
        return None
    if stop_after:
        callbacks = (*callbacks, StopAfter(stop_after))

    model, tokenizer = loader()
    digest = weights_digest(model)
    if previous and previous[-1].get("theta0") not in (None, digest):
        raise SystemExit(f"θ_0 differs from the one this run started from ({previous[-1]['theta0']} vs {digest})")
    if not previous:
        append_record(paths["results"], {**wanted, "theta0": digest, "machine": machine_info()})
    theta0 = {name: p.detach().to(torch.float32).clone() for name, p in model.named_parameters()}
    train_set, heldout, selection = prompt_sets(regime)
    probe = RewardProbe(heldout, reward, tokenizer, max_new_tokens=16, batch_size=50)
    relex = None
    if jump is not None:
        from relex_callback import RelexCallback

        selector = RewardProbe(selection, reward, tokenizer, max_new_tokens=16, batch_size=SELECTION)
        relex = RelexCallback(mode="jump", observe=regime["observe"], probe=selector, **jump)
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
                          callbacks=[*([relex] if relex else []),
                                     make_recorder(regime, paths, theta0, probe, done_evals, relex, stop_at), *callbacks])
    # Every start or resume says where it ran (CPU, threads, commit): steps recomputed on another CPU or thread
    # count need not match bit for bit.
    append_record(paths["results"], {"kind": "session", "step": trained if resume else 0, "resumed_from": resume.name if resume else None,
                                     "machine": machine_info()})
    log.info("%s seed %d: training to step %d%s (load %s)", name, seed, last,
             f", resuming from {resume.name}" if resume else "", load_average())
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    log.info("%s seed %d: done", name, seed)
    return model


# ---------------------------------------------------------------------------------------------------------
# evaluate: every method from the saved window, no training

LINE_MULTIPLES = (2, 3, 5, 8)
SCALES = (1.5, 2.0, 3.0, 5.0)


def window_files(paths: dict[str, Path], observe: int) -> list[Path]:
    """The files of Δ_1..Δ_N; exits naming the missing ones when the window is incomplete."""
    files = [delta_path(paths, t) for t in range(1, observe + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"the window is incomplete ({', '.join(missing[:3])} missing): train this run first")
    return files


def saved_window(paths: dict[str, Path], model, theta0: dict[str, torch.Tensor], observe: int):
    """A :class:`RelexEngine` whose buffer holds θ_0 and the saved window Δ_1..Δ_N bit for bit: every method is
    then the package's own fit, candidates and predictions (``benchmarks/_candidates.py``)."""
    from safetensors import safe_open

    engine = window_engine(model, observe)
    fill_window(engine, theta0, [safe_open(str(f), framework="pt") for f in window_files(paths, observe)],
                range(1, observe + 1))
    return engine


def window_candidates(engine, fit, labels: list[str]) -> dict:
    """The engine's candidate for each label ``line@K`` (the paper's rank-1 line, family ``"trend"``), ``sqrt@K``
    (c = a + b·√t, family ``"sqrt"``) and ``scale@α`` (θ_0 + α(θ_N − θ_0), family ``"scale"``)."""
    families = {"line": "trend", "sqrt": "sqrt", "scale": "scale"}
    out = {}
    for label in labels:
        kind, _, value = label.partition("@")
        out[label] = family_candidate(engine, fit, families[kind], float(value))
    return out


@torch.no_grad()
def delta_grams(paths, names, steps: list[int]) -> torch.Tensor:
    """Per tensor the Gram of the saved Δ at ``steps`` (fp64, ``[n, R, R]``), streamed one tensor at a time from the
    delta files (memory: one tensor's rows)."""
    from safetensors import safe_open

    from relex_callback.math.core import gram_matrix

    handles = [safe_open(str(delta_path(paths, s)), framework="pt") for s in steps]
    return torch.stack([gram_matrix(torch.stack([h.get_tensor(name).reshape(-1) for h in handles])) for name in names]).double()


def extended_grams(paths, names, observe: int) -> tuple[torch.Tensor, list[int]]:
    """Per tensor the Gram of [Δ_1..Δ_N, Δ_K for every saved real step K > N] (fp64, ``[n, R, R]``): with it the
    distance of any weighted-sum candidate to every real step is ||w·M − Δ_K||² = wᵀGw − 2wᵀG[:, K] + G[K, K],
    so the methods can be compared again later from this small file alone (it goes into git)."""
    saved = sorted(int(p.stem.split("-")[1]) for p in paths["deltas"].glob("delta-*.safetensors"))
    steps = list(range(1, observe + 1)) + [s for s in saved if s > observe]
    return delta_grams(paths, names, steps), steps


def save_grams(path: Path, names: list[str], grams: torch.Tensor, steps: list[int]) -> bool:
    """Write the Gram file (atomically), unless the one in place covers real steps these ``steps`` lack: a window
    trained again without its real deltas must not erase the committed record of them. Returns whether it wrote."""
    from safetensors.torch import save_file

    if path.is_file():
        missing = sorted(set(load_grams(path)[2]) - set(steps))
        if missing:
            log.info("kept %s: it covers steps %s that the deltas on disk lack", path, missing)
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"grams": grams.contiguous()}, str(tmp), metadata={"names": json.dumps(names), "steps": json.dumps(steps)})
    os.replace(tmp, path)
    return True


def load_grams(path: Path) -> tuple[list[str], torch.Tensor, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        return json.loads(meta["names"]), handle.get_tensor("grams"), json.loads(meta["steps"])


@torch.no_grad()
def distance_to_real(paths, engine, made, step: int) -> dict[str, float] | None:
    """Relative distance, norm ratio and cosine of the candidate's Δ̂ to the real Δ_step (None: not saved)."""
    from safetensors import safe_open

    from relex_callback.math.core import combine

    file = delta_path(paths, step)
    if not file.is_file():
        return None
    err = pred = real_sq = dot = 0.0
    with safe_open(str(file), framework="pt") as handle:
        for item in engine.buffer.tracked:
            moved = combine(engine.buffer.stack(item.name), made.weights[item.name][None])[0].double()
            real = handle.get_tensor(item.name).reshape(-1).double()
            err += float((moved - real).pow(2).sum())
            pred += float(moved.pow(2).sum())
            real_sq += float(real.pow(2).sum())
            dot += float(moved.dot(real))
    return {"distance": math.sqrt(err / real_sq), "norm_ratio": math.sqrt(pred / real_sq),
            "cosine": dot / math.sqrt(max(pred * real_sq, 1e-300))}


def evaluate(args: argparse.Namespace) -> None:
    from relex_callback.demo import load_smollm2

    paths = run_paths(args.state_dir, args.regime, args.seed)
    evaluate_run(args.regime, REGIMES[args.regime], args.seed, paths, load_smollm2, diagnostic_only=args.diagnostic_only,
                 redo_search=args.redo_search)


def evaluate_run(name: str, regime: dict[str, Any], seed: int, paths: dict[str, Path], loader, reward=None,
                 diagnostic_only: bool = False, redo_search: bool = False) -> None:
    """Diagnose the saved window, record every candidate's distance to the real deltas, score candidates on the
    selection prompts (halt mode with a probe) and on the held-out prompts. Resumable: scores already in the
    results file are reused; ``redo_search`` runs the reward-guided search again (the summary uses the latest)."""
    from relex_callback.demo import addition_reward
    from relex_callback.math.core import select_power
    from relex_callback.probe import RewardProbe, choose_candidate

    reward = reward or addition_reward
    observe = regime["observe"]
    results = paths["results"]
    records = read_records(results)
    model, tokenizer = loader()
    names = [n for n, _ in model.named_parameters()]
    theta0 = {n: p.detach().to(torch.float32).clone() for n, p in model.named_parameters()}
    started = time.perf_counter()
    window_files(paths, observe)
    steps = [float(t) for t in range(1, observe + 1)]
    extended, gram_steps = extended_grams(paths, names, observe)
    save_grams(paths["grams"], names, extended, gram_steps)
    grams = extended[:, :observe, :observe]
    diagnostic = diagnose_from_grams(regime, records, extended, names, [theta0[t].numel() for t in names])
    power_auto, _ = select_power(list(grams), steps)
    append_record(results, {"kind": "diagnostic", "step": observe, **diagnostic.as_dict(), "power_auto": power_auto,
                            "seconds": time.perf_counter() - started})
    log.info("%s seed %d: %s", name, seed, diagnostic.summary_line())
    for warning in diagnostic.warnings:
        log.info("  warning: %s", warning)
    if diagnostic_only:
        return
    _, heldout, selection = prompt_sets(regime)
    selector = RewardProbe(selection, reward, tokenizer, max_new_tokens=16, batch_size=SELECTION)
    probe = RewardProbe(heldout, reward, tokenizer, max_new_tokens=16, batch_size=50)
    engine = saved_window(paths, model, theta0, observe)
    search_auto(regime, paths, model, engine, selector, probe, records, redo=redo_search)

    lines = [f"line@{m * observe}" for m in LINE_MULTIPLES]
    fit = engine.fit([float(m * observe) for m in LINE_MULTIPLES])
    # extrapolate_to="auto" without a probe: the engine's own target (K_max, rounded down to a step)
    auto = engine.auto_targets(fit, engine.diagnose(fit, zero_std_share(records, observe)), with_probe=False)
    k_auto = int(auto[0]) if auto else observe
    candidates = lines + [f"sqrt@{m * observe}" for m in LINE_MULTIPLES] + [f"scale@{a:g}" for a in SCALES]
    if k_auto > observe and f"line@{k_auto}" not in candidates:
        candidates.append(f"line@{k_auto}")
    made = window_candidates(engine, fit, candidates)
    real_steps = sorted(latest_by_step(records, "real"))
    for c, cand in made.items():
        for step in real_steps:
            if step > observe and not any(r.get("kind") == "distance" and r.get("candidate") == c and r["step"] == step for r in records):
                d = distance_to_real(paths, engine, cand, step)
                if d is not None:
                    append_record(results, {"kind": "distance", "candidate": c, "step": step, **d})


    def score(kind: str, candidate: str, scorer) -> float:
        previous = [r for r in read_records(results) if r.get("kind") == kind and r.get("candidate") == candidate]
        if previous:
            return previous[-1]["score" if kind == "probe" else "accuracy"]
        load(engine, made[candidate] if candidate in made else engine.observed_candidate(fit))  # else θ_N
        t0 = time.perf_counter()
        value = scorer(model)
        key = "score" if kind == "probe" else "accuracy"
        append_record(results, {"kind": kind, "candidate": candidate, key: value, "seconds": time.perf_counter() - t0})
        log.info("  %s %-10s %.3f (%.0fs, load %s)", kind, candidate, value, time.perf_counter() - t0, load_average())
        return value

    # halt mode with a probe: the selection prompts score θ_N and every candidate; the package's rule picks
    current = score("probe", "theta_N", selector)
    probe_set = [c for c in candidates if not c.startswith("line@") or int(c[5:]) <= max(k_auto, observe)]
    probe_scores = {c: score("probe", c, selector) for c in probe_set}
    picks = {}
    for label, pool in (("probe-all", probe_set), ("probe-scale", [c for c in probe_set if c.startswith("scale@")]),
                        ("probe-line", [c for c in probe_set if c.startswith("line@")])):
        if pool:
            chosen = choose_candidate(current, [probe_scores[c] for c in pool], list(range(len(pool))))
            picks[label] = "theta_N" if chosen is None else pool[chosen]
    append_record(results, {"kind": "selection", "step": observe, "picks": picks, "k_auto": k_auto,
                            "probe_candidates": probe_set})
    # held-out accuracy, most informative first
    order = lines + ([f"line@{k_auto}"] if k_auto > observe else []) + list(dict.fromkeys(picks.values()))
    order += [c for c in candidates if c not in order]
    for c in dict.fromkeys(order):
        if c != "theta_N":
            score("eval", c, probe)


SEARCH = "search-auto"
"""The name of the reward-guided auto's delivered model in the results (``extrapolate_to="auto"`` with a probe)."""


@torch.no_grad()
def search_auto(regime: dict[str, Any], paths, model, engine, selector, probe, records, redo: bool = False) -> None:
    """``extrapolate_to="auto"`` with a probe, through the package's own halt path:
    :func:`relex_callback.engine.window.fit_and_choose` on the engine that holds the saved window, with the
    selection prompts as the probe. Records the search (every probe call and its seconds, the load average it ran
    under) and the chosen model's held-out accuracy. Skipped when recorded, unless ``redo``: its wall time is a
    cost, so measure it on free cores. (Searches recorded before 2026-12-07 re-recorded θ_0 + Δ_t into the
    buffer, which rounds a few elements of Δ_t a second time; the engine now holds the saved rows exactly.)"""
    from relex_callback.engine.window import fit_and_choose

    results = paths["results"]
    if not redo and any(r.get("kind") == "eval" and r.get("candidate") == SEARCH for r in read_records(results)):
        return
    observe = regime["observe"]
    load_observed(engine)  # the search scores and keeps the live weights θ_N, as at a real halt
    load_before = load_average()
    started = time.perf_counter()
    _, candidates, predictions, chosen, _ = fit_and_choose(
        engine, model, selector, zero_std_fraction=zero_std_share(records, observe), loads_chosen=False)
    search = candidates[0].report["search"]
    picked = search["chosen"]
    append_record(results, {"kind": "search", "step": observe, **{k: v for k, v in search.items() if k != "step_seconds"},
                            "k_max": engine.diagnostic.k_max, "seconds": time.perf_counter() - started,
                            "load_before": load_before, "load_after": load_average(), "threads": torch.get_num_threads()})
    log.info("  search: %d probe calls, %.0fs; chose %s", search["probe_calls"], search["probe_seconds"],
             "theta_N" if picked is None else f"{picked['family']}@{picked['target_step']:g}")
    engine.load(predictions[0])  # the chosen prediction, or θ_N when the search kept the trained weights
    t0 = time.perf_counter()
    accuracy = probe(model)
    append_record(results, {"kind": "eval", "candidate": SEARCH, "accuracy": accuracy, "seconds": time.perf_counter() - t0,
                            "picked": None if picked is None else f"{picked['family']}@{picked['target_step']:g}"})
    log.info("  eval %-10s %.3f", SEARCH, accuracy)


def diagnose_from_grams(regime: dict[str, Any], records: list[dict[str, Any]], grams: torch.Tensor, names: list[str],
                        numels: list[int]):
    """The window diagnostic of the first N rows of a run's extended Gram (what ``evaluate`` records)."""
    from relex_callback.math.diagnostic import diagnose_window, trend_predictor

    observe = regime["observe"]
    window = grams[:, :observe, :observe]
    steps = [float(t) for t in range(1, observe + 1)]
    return diagnose_window(window, steps, 0.0, numels, trend_predictor(window, steps),
                           zero_std_fraction=zero_std_share(records, observe))


def zero_std_share(records: list[dict[str, Any]], observe: int) -> float | None:
    """The window's mean share of prompt groups whose completions all got the same reward (TRL's
    ``frac_reward_zero_std``), as the callback passes it to the diagnostic; None without train records."""
    train_log = latest_by_step(records, "train")
    zero_std = [train_log[t]["frac_reward_zero_std"] for t in range(1, observe + 1) if t in train_log]
    return sum(zero_std) / len(zero_std) if zero_std else None


def rediagnose(args: argparse.Namespace) -> None:
    """Recompute every run's diagnostic from its Gram file in git (no weights needed), e.g. after the estimator
    changed, and append it to the run's results."""
    from relex_callback.demo import load_smollm2

    model, _ = load_smollm2()
    numel = {n: p.numel() for n, p in model.named_parameters()}
    for name, regime in REGIMES.items():
        for path in sorted((RESULTS / name).glob("seed*-grams.safetensors")):
            results = path.with_name(path.name.replace("-grams.safetensors", ".jsonl"))
            names, grams, _ = load_grams(path)
            diagnostic = diagnose_from_grams(regime, read_records(results), grams, names, [numel[n] for n in names])
            append_record(results, {"kind": "diagnostic", "step": regime["observe"], "source": path.name, **diagnostic.as_dict()})
            log.info("%s %s: %s", name, path.stem, diagnostic.summary_line())


# ---------------------------------------------------------------------------------------------------------
# summary: steps saved, the diagnostic against the outcome, a plot

METHOD_LABELS = {
    "line-fixed": "RELEX line at fixed K",
    "auto": "halt + auto (line at K_max)",
    "probe-all": "halt + probe (line ≤ K_max, √t, α-scaling)",
    "probe-scale": "α-scaling, α chosen on the probe set",
    "probe-line": "halt + probe over the line ≤ K_max",
    "search-auto": "halt + auto + probe: reward-guided search to 10N (the package's default)",
}


def steps_to_reach(curve: list[tuple[int, float]], accuracy: float) -> tuple[float, bool]:
    """Steps real training needs to reach ``accuracy``: the first crossing of the linearly interpolated curve
    ``[(step, accuracy)]``; ``(last_step, True)`` when it never does (a lower bound)."""
    for (s0, a0), (s1, a1) in zip(curve, curve[1:]):
        if a1 >= accuracy > a0:
            return s0 + (s1 - s0) * (accuracy - a0) / (a1 - a0), False
        if a0 >= accuracy:
            return float(s0), False
    return float(curve[-1][0]), True


def earlier_benchmark(seed: int) -> dict[str, dict[int, float]]:
    """Accuracies of the earlier quality benchmark (benchmarks/results/quality, same task, settings and seeds as
    the small-batch regime): ``{"real": {step: acc}, "line": {K: acc}}``."""
    import csv

    path = RESULTS_ROOT / "quality" / "evals.csv"
    out: dict[str, dict[int, float]] = {"real": {}, "line": {}}
    if path.is_file():
        with open(path) as handle:
            for row in csv.DictReader(handle):
                if int(row["seed"]) == seed and row["method"] in ("real", "relex"):
                    out["real" if row["method"] == "real" else "line"][int(row["K"])] = float(row["accuracy"])
    return out


def run_summary(records: list[dict[str, Any]], regime: dict[str, Any], earlier: dict[str, dict[int, float]] | None = None) -> dict[str, Any] | None:
    """Steps saved per method and the K_max check for one run. ``earlier`` (the same trajectory measured by an
    earlier benchmark) fills real steps and fixed-K line accuracies this run did not measure, but only when both
    agree on real(N) exactly, which shows they are the same trajectory."""
    from _common import binomial_se

    real = {s: r["accuracy"] for s, r in sorted(latest_by_step(records, "real").items())}
    observe = regime["observe"]
    if observe not in real:
        return None
    evals = {r["candidate"]: r["accuracy"] for r in records if r.get("kind") == "eval"}
    borrowed = []
    if earlier and earlier["real"].get(observe) == real[observe]:
        for step, acc in earlier["real"].items():
            if step not in real:
                real[step] = acc
                borrowed.append(f"real@{step}")
        for k, acc in earlier["line"].items():
            if f"line@{k}" not in evals:
                evals[f"line@{k}"] = acc
                borrowed.append(f"line@{k}")
        real = dict(sorted(real.items()))
    curve = sorted(real.items())
    train = latest_by_step(records, "train")
    step_seconds = [train[s]["seconds"] for s in sorted(train) if "seconds" in train[s]]
    mean_step = sum(step_seconds) / len(step_seconds) if step_seconds else math.nan
    zero_std = [train[s].get("frac_reward_zero_std") for s in sorted(train) if s <= observe]
    probes = [r for r in records if r.get("kind") == "probe"]
    probe_seconds = sum(r.get("seconds", 0.0) for r in {r["candidate"]: r for r in probes}.values())
    diagnostic = next((r for r in reversed(records) if r.get("kind") == "diagnostic"), None)
    selection = next((r for r in reversed(records) if r.get("kind") == "selection"), None)
    distances = {(r["candidate"], r["step"]): r for r in records if r.get("kind") == "distance"}
    n = records[0].get("heldout", HELDOUT) if records else HELDOUT
    floor = real[observe] - binomial_se(real[observe], n)
    out: dict[str, Any] = {"real": real, "real_N": real[observe], "floor": floor, "mean_step_seconds": mean_step,
                           "zero_std_window": sum(z for z in zero_std if z is not None) / max(len(zero_std), 1),
                           "diagnostic": diagnostic, "methods": {}, "distances": distances, "borrowed": borrowed}

    def deliver(label: str, candidate: str, probe_cost: bool) -> None:
        acc = real[observe] if candidate == "theta_N" else evals.get(candidate)
        if acc is None:
            return
        reach, lower = steps_to_reach(curve, acc)
        spent = observe + (probe_seconds / mean_step if probe_cost and math.isfinite(mean_step) else 0.0)
        out["methods"][label] = {"candidate": candidate, "accuracy": acc, "se": binomial_se(acc, n),
                                 "steps_to_reach": reach, "lower_bound": lower, "steps_spent": spent,
                                 "steps_saved": reach / spent, "at_least_floor": acc >= floor}

    for m in LINE_MULTIPLES:
        deliver(f"line@{m}N", f"line@{m * observe}", False)
    if diagnostic is not None:
        k_auto = int(math.floor(diagnostic["supported_step"]))
        deliver("auto", "theta_N" if k_auto <= observe else f"line@{k_auto}", False)
        # validation (b): K_max below every K at which the line scored under real(N) − 1 SE
        measured = [m * observe for m in LINE_MULTIPLES if f"line@{m * observe}" in evals]
        failing = [k for k in measured if evals[f"line@{k}"] < floor]
        out["kmax_check"] = {"k_max": diagnostic["supported_step"], "measured_K": measured, "failing_K": failing,
                             "ok": all(diagnostic["supported_step"] < k for k in failing) if measured else None}
    if selection is not None:
        for label, candidate in selection["picks"].items():
            deliver(label, candidate, True)
    search = next((r for r in reversed(records) if r.get("kind") == "search"), None)
    if search is not None and SEARCH in evals:
        reach, lower = steps_to_reach(curve, evals[SEARCH])
        spent = observe + (search["probe_seconds"] / mean_step if math.isfinite(mean_step) else 0.0)
        picked = search["chosen"]
        out["methods"]["search-auto"] = {
            "candidate": "theta_N" if picked is None else f"{picked['family']}@{picked['target_step']:g}",
            "accuracy": evals[SEARCH], "se": binomial_se(evals[SEARCH], n), "steps_to_reach": reach,
            "lower_bound": lower, "steps_spent": spent, "steps_saved": reach / spent,
            "at_least_floor": evals[SEARCH] >= floor, "probe_calls": search["probe_calls"]}
    return out


def jump_summary(plain: list[dict[str, Any]], records: list[dict[str, Any]], regime: dict[str, Any]) -> dict[str, Any] | None:
    """A jump run against its seed's plain run: the real steps each needs to reach the plain run's accuracy at the
    regime's last step (interpolated), the jump run's fit and probe time counted in its own step equivalents."""
    import statistics

    real = sorted((s, r["accuracy"]) for s, r in latest_by_step(plain, "real").items())
    target = dict(real).get(regime["last_step"])
    curve = sorted((s, r["accuracy"]) for s, r in latest_by_step(records, "real").items())
    if target is None or len(curve) < 2:
        return None
    plain_steps, _ = steps_to_reach(real, target)
    steps, not_reached = steps_to_reach(curve, target)
    jumps = [j for j in latest_by_step(records, "jump").values() if j["step"] <= steps]
    overhead = sum(j.get("fit_seconds", 0.0) + j.get("probe_seconds", 0.0) for j in jumps)
    jumped = {j["step"] for j in jumps}
    plain_seconds = [r["seconds"] for s, r in latest_by_step(records, "train").items() if s not in jumped and r.get("seconds")]
    mean_step = statistics.median(plain_seconds) if plain_seconds else math.inf
    spent = steps + (overhead / mean_step if math.isfinite(mean_step) else 0.0)
    status = [j.get("status") for j in jumps]
    virtual = latest_by_step(records, "real")[curve[-1][0]].get("virtual_step", curve[-1][0])
    return {"target": target, "plain_steps": plain_steps, "steps": steps, "reached": not not_reached,
            "overhead_steps": spent - steps, "steps_saved": plain_steps / spent, "curve": dict(curve),
            "virtual_at_last": virtual, "accepted": status.count("accepted"), "rejected": status.count("rejected"),
            "skipped": status.count("skipped")}


def summary(args: argparse.Namespace) -> None:
    from _common import mean_ci

    lines = ["# Regime map: results so far", "",
             "Generated by `python benchmarks/regime_map.py summary` from the JSONL files beside it.", ""]
    table: dict[str, Any] = {}
    jumps: dict[str, list[tuple[str, int, dict[str, Any]]]] = {}
    for name, regime in REGIMES.items():
        runs = {}
        for path in sorted((RESULTS / name).glob("seed*.jsonl")):
            if not path.stem[4:].isdigit():
                continue  # a jump run (below)
            seed = int(path.stem[4:])
            result = run_summary(read_records(path), regime, earlier_benchmark(seed) if name == "small-batch" else None)
            if result is not None:
                runs[seed] = result
        if not runs:
            continue
        table[name] = runs
        lines += [f"## {name}: lr {regime['learning_rate']:g}, {regime['prompts_per_step']} prompts x "
                  f"{regime['generations']} completions, N = {regime['observe']}", ""]
        lines += ["| seed | real by step | frac_reward_zero_std (window) | K_max (ratio) | α | stability | drift share | K_max check |",
                  "|---|---|---|---|---|---|---|---|"]
        for seed, run in sorted(runs.items()):
            d = run["diagnostic"] or {}
            model = d.get("model", {})
            check = run.get("kmax_check")
            lines.append(
                f"| {seed} | {', '.join(f'{s}: {a:.3f}' for s, a in run['real'].items())} | {run['zero_std_window']:.2f} | "
                + (f"{d['supported_step']:.1f} ({d['supported_ratio']:.2f}x) | {d['growth_exponent']:.2f} | "
                   f"{d['direction_stability']:.2f} | {model.get('drift_share', math.nan):.3f} | " if d else "– | – | – | – | ")
                + ("not measured" if check is None or check["ok"] is None else
                   (f"ok (line below real(N) − SE at K = {check['failing_K'] or 'none of'} {check['measured_K'] if not check['failing_K'] else ''})"
                    if check["ok"] else f"FAILS (line below floor at {check['failing_K']})")) + " |")
        lines += ["", "| method | accuracy ± SE per seed | mean steps saved ± SE | seeds ≥ real(N) − 1 SE |", "|---|---|---|---|"]
        labels = sorted({m for run in runs.values() for m in run["methods"]})
        for label in labels:
            per = [(seed, run["methods"][label]) for seed, run in sorted(runs.items()) if label in run["methods"]]
            saved = mean_ci(m["steps_saved"] for _, m in per)
            accs = ", ".join(f"s{seed} {m['candidate']}: {m['accuracy']:.3f} ± {m['se']:.3f}" + (" (≥)" if m["lower_bound"] else "")
                             for seed, m in per)
            spread = f"{saved['mean']:.2f} ± {saved['se']:.2f}" if len(per) > 1 else f"{saved['mean']:.2f} (one seed)"
            lines.append(f"| {label} | {accs} | {spread} | "
                         f"{sum(m['at_least_floor'] for _, m in per)}/{len(per)} |")
        lines.append("")
        jump_rows = []
        for policy in JUMP_POLICIES:
            for seed in sorted(runs):
                path = jump_paths(Path(), name, seed, policy)["results"]
                result = jump_summary(read_records(run_paths(Path(), name, seed)["results"]), read_records(path), regime) \
                    if path.is_file() else None
                if result is not None:
                    jump_rows.append((policy, seed, result))
        jumps[name] = jump_rows
        if jump_rows:
            lines += [f"Jump mode ({', '.join(f'{k}={v}' for k, v in jump_settings(regime, '<policy>').items())}, probe: "
                      f"the {SELECTION} selection prompts): real steps to reach the plain run's accuracy at step "
                      f"{regime['last_step']}; steps saved = plain steps / (jump steps + fit and probe time in step "
                      "equivalents); '<' while the jump run has not reached it.", "",
                      "| optimizer_policy | seed | target | plain steps | jump run: accuracy by real step (virtual step at the last) "
                      "| jumps acc / rej / skip | jump steps + overhead | steps saved |", "|---|---|---|---|---|---|---|---|"]
            for policy, seed, r in jump_rows:
                curve = ", ".join(f"{s}: {a:.3f}" for s, a in r["curve"].items())
                lines.append(f"| {policy} | {seed} | {r['target']:.3f} | {r['plain_steps']:.1f} | {curve} (v{r['virtual_at_last']}) | "
                             f"{r['accepted']} / {r['rejected']} / {r['skipped']} | {r['steps']:.1f} + {r['overhead_steps']:.1f} | "
                             + (f"{r['steps_saved']:.2f}" if r["reached"] else f"< {r['steps_saved']:.2f} (not reached)") + " |")
            for policy in JUMP_POLICIES:
                done = [r for p_, _, r in jump_rows if p_ == policy and r["reached"]]
                if done:
                    saved = mean_ci(r["steps_saved"] for r in done)
                    spread = f"{saved['mean']:.2f} ± {saved['se']:.2f}" if len(done) > 1 else f"{saved['mean']:.2f} (one seed)"
                    lines.append(f"\n{policy}: {spread} steps saved on {len(done)} seed(s) that reached the target.")
            lines.append("")
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, jumps)


JUMP_STYLES = {"keep": "--", "reset": ":"}


def plot(table: dict[str, Any], jumps: dict[str, list[tuple[str, int, dict[str, Any]]]] | None = None) -> None:
    """``regime_map.png``: per regime, each seed's real held-out accuracy by step, each delivered model at the
    steps it cost (window + probe), with its binomial SE, and each jump-mode run's accuracy by real step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, axes = plt.subplots(1, max(len(table), 1), figsize=(6.5 * max(len(table), 1), 4.5), squeeze=False)
    markers = {"auto": "s", "probe-all": "D", "probe-scale": "^", "probe-line": "v", SEARCH: "*"}
    for ax, (name, runs) in zip(axes[0], table.items()):
        regime = REGIMES[name]
        colors = {}
        for seed, run in sorted(runs.items()):
            steps, accs = zip(*sorted(run["real"].items()))
            line, = ax.plot(steps, accs, "-o", ms=3, label=f"real GRPO, seed {seed}")
            colors[seed] = line.get_color()
            for label, m in run["methods"].items():
                ax.errorbar([m["steps_spent"]], [m["accuracy"]], yerr=[m["se"]], fmt=markers.get(label, "x"),
                            color=line.get_color(), alpha=0.8, ms=11 if label == SEARCH else 6)
        for policy, seed, r in (jumps or {}).get(name, []):
            steps, accs = zip(*sorted(r["curve"].items()))
            ax.plot(steps, accs, JUMP_STYLES[policy], color=colors.get(seed), lw=1.2, alpha=0.9,
                    label=f"jump mode, {policy!r} (by real step; colour: seed)" if seed == min(colors) else None)
        ax.axvline(regime["observe"], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{name}: lr {regime['learning_rate']:g}, {regime['prompts_per_step']}x{regime['generations']} "
                     f"completions, N = {regime['observe']}", fontsize=9)
        ax.set_xlabel("real GRPO steps spent (+ probe cost in step equivalents)")
        ax.set_ylabel("held-out accuracy (200 prompts)")
        ax.legend(fontsize=7, title="markers: * reward-guided auto, s auto (no probe),\nD probe (all), ^ α-scaling, v probe (line), x fixed-K line", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "regime_map.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("summary")
    sub.add_parser("rediagnose", help="recompute every run's diagnostic from the Gram files in git")
    for name in ("train", "window", "evaluate", "jump"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--regime", required=True, choices=sorted(REGIMES))
        cmd.add_argument("--seed", type=int, required=True)
        cmd.add_argument("--state-dir", type=Path, default=REPO_ROOT / "runs" / "regime-map",
                         help="window, real deltas and Trainer checkpoints (large; not in git)")
        cmd.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: one core per run)")
        if name == "jump":
            cmd.add_argument("--policy", required=True, choices=JUMP_POLICIES, help="optimizer_policy after each accepted jump")
        if name in ("train", "jump"):
            cmd.add_argument("--stop-after", type=int, default=None,
                             help="end this session's training after this step (run the command again to continue)")
        if name == "train":
            cmd.add_argument("--last-step", type=int, default=None,
                             help="train beyond the regime's last step (e.g. 160 = 8N for the large batch)")
        if name == "evaluate":
            cmd.add_argument("--diagnostic-only", action="store_true", help="only the window diagnostic (no evaluations)")
            cmd.add_argument("--redo-search", action="store_true",
                             help="run the reward-guided search again (its wall time is a cost: measure it on free cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    set_threads(getattr(args, "threads", None))
    {"train": train, "window": window, "evaluate": evaluate, "jump": jump, "summary": summary,
     "rediagnose": rediagnose}[args.command](args)


if __name__ == "__main__":
    main()
