"""The main job: real TRL GRPO on the packaged SmolLM2-135M-Instruct with RelexCallback in halt mode.

It trains on an offline, verifiable task ("What is a + b?"), observes the first ``--observe`` optimizer
steps, writes the RELEX-extrapolated checkpoint for ``--target`` (with ``relex_report.json``, a model card and
the fit's plots), saves every ``--save-every``-th observed step as ``checkpoint-N/`` for ``relex report``, and
prints the greedy held-out accuracy (± binomial SE) of the base model, the last observed step and the
extrapolated model. Runs on CPU in a few minutes; nothing is downloaded.

    python examples/grpo_smollm2.py --observe 8 --target 16 --output-dir runs/smollm2

Run it again and it replaces its own earlier output in the default folder (``runs/smollm2-grpo``); an
``--output-dir`` that is not empty needs ``--overwrite``. Every option is checked before any folder is touched,
and an earlier run is only set aside (``.earlier-run/``) until the new one has written its summary: a run that
fails puts it back, and the next run restores what a killed run left aside.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

DEFAULT_OUTPUT = Path("runs/smollm2-grpo")
SUMMARY_NAME = "demo.json"
# What this demo writes into its output folder; --overwrite (or a re-run in the default folder) removes only these.
_OWN_ENTRIES = re.compile(r"^(relex-step\d+.*|checkpoint-\d+|runs|report|demo\.json)$")
# An earlier run waits here until the new one has written its summary (then it is deleted; on failure, restored).
ASIDE_NAME = ".earlier-run"
DOCS_HORIZON = "docs/choosing-a-horizon.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options, every one checked here (standard library only, before any folder is touched)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observe", type=int, default=8, help="observation window N in optimizer steps")
    parser.add_argument("--target", type=int, default=16, help="global step K to extrapolate to")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"output folder (default: {DEFAULT_OUTPUT}, replaced on every run)")
    parser.add_argument("--heldout", type=int, default=100, help="held-out prompts for the accuracy check")
    parser.add_argument("--max-operand", type=int, default=50, help="largest a and b in a + b")
    parser.add_argument("--lr", type=float, default=5e-6, help="constant learning rate")
    parser.add_argument("--prompts-per-step", type=int, default=2, help="prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--save-every", type=int, default=2,
                        help="save every n-th observed step as checkpoint-N/ for `relex report` (0: none; ~0.5 GB each)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a local causal-LM directory with a chat template (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace this demo's earlier output in --output-dir")
    parser.add_argument("--check-output", action="store_true", help=argparse.SUPPRESS)  # scripts/demo.sh, before set-up
    args = parser.parse_args(argv)
    problem = argument_error(args)
    if problem:
        parser.error(problem)
    return args


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def argument_error(args: argparse.Namespace) -> str | None:
    """The first bad option, as a message naming it and the fix; ``None`` when all are usable."""
    if args.observe < 1:
        return f"--observe {args.observe} must be >= 1 (the number of GRPO steps to observe), e.g. --observe 8"
    if args.target <= args.observe:
        return (f"--target {args.target} must be after the observed steps (> --observe {args.observe}): RELEX "
                f"extrapolates beyond the window, e.g. --target {2 * args.observe}")
    if args.heldout < 1:
        return f"--heldout {args.heldout} must be >= 1 (prompts for the accuracy check), e.g. --heldout 100"
    if args.max_operand < 1:
        return f"--max-operand {args.max_operand} must be >= 1, e.g. --max-operand 50"
    pairs = (args.max_operand + 1) * (args.max_operand + 2) // 2  # distinct unordered {a, b}
    if pairs - args.heldout < args.prompts_per_step:
        return (f"--heldout {args.heldout} leaves {max(pairs - args.heldout, 0)} of the {pairs} problems with "
                f"--max-operand {args.max_operand} for training, fewer than --prompts-per-step {args.prompts_per_step}; "
                "lower --heldout or raise --max-operand")
    if not (math.isfinite(args.lr) and args.lr > 0):
        return f"--lr {args.lr} must be a number > 0, e.g. --lr 5e-6"
    if args.prompts_per_step < 1:
        return f"--prompts-per-step {args.prompts_per_step} must be >= 1, e.g. --prompts-per-step 2"
    if args.generations < 2:
        return (f"--generations {args.generations} must be >= 2: GRPO scores each completion against the others "
                "of its prompt, e.g. --generations 8")
    if args.save_every < 0:
        return f"--save-every {args.save_every} must be >= 0 (0 saves no checkpoints), e.g. --save-every 2"
    if args.model is not None:
        if not (args.model / "config.json").is_file():
            return (f"--model {args.model} is not a local model directory (no config.json there); give a folder "
                    "written by save_pretrained, or leave --model out for the packaged SmolLM2-135M-Instruct")
        if not _has_chat_template(args.model):
            return (f"--model {args.model} has no chat template (the demo's prompts are chat messages); use an "
                    "instruct model, or integrations/trl/grpo_relex.py, which takes plain prompts")
    return None


def check_output_dir(path: Path | None, overwrite: bool) -> Path:
    """The run's output folder; refuses (exit 2, nothing touched) a file, or an explicit non-empty
    ``--output-dir`` without ``--overwrite``.

    The default folder is the demo's own: an earlier run there is replaced. Only what the demo writes
    (``relex-step*/``, ``checkpoint-*/``, ``demo.json``, ...) is replaced, never other files. It needs nothing but
    the standard library, so ``scripts/demo.sh`` runs it before the set-up.
    """
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_OUTPUT
    if path.exists() and not path.is_dir():
        _refuse(f"--output-dir {path} is a file; choose a folder")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        _refuse(f"--output-dir {path} is under a file; choose a folder")
    earlier = sorted(path.iterdir()) if path.is_dir() else []
    if earlier and explicit and not overwrite:
        _refuse(f"--output-dir {path} is not empty (an earlier run?). Pass --overwrite to replace this demo's output "
                "there, or choose another --output-dir.")
    return path


def _refuse(message: str) -> None:
    print(f"usage: grpo_smollm2.py [-h] [options]\ngrpo_smollm2.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _remove(entry: Path) -> None:
    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _own_entries(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if _OWN_ENTRIES.match(p.name))


def _put_back(path: Path, aside: Path) -> None:
    """Remove this demo's entries from ``path`` and move those in ``aside`` back."""
    for entry in _own_entries(path):
        _remove(entry)
    for entry in aside.iterdir():
        entry.rename(path / entry.name)
    aside.rmdir()


@contextlib.contextmanager
def replacing_earlier_run(path: Path, explicit: bool) -> Iterator[Path]:
    """Set this demo's earlier output in ``path`` aside, run the body, then delete it; if the body fails (an
    exception, Ctrl-C), remove the new run's partial output and put the earlier run back. A run killed outright
    leaves it in ``path/.earlier-run``, and the next run restores it before it starts."""
    path.mkdir(parents=True, exist_ok=True)
    aside = path / ASIDE_NAME
    if aside.is_dir():
        _put_back(path, aside)
        print(f"{path}: restored the earlier run that an interrupted run had set aside", flush=True)
    own = _own_entries(path)
    if own:
        print(f"{path} holds an earlier run: its {len(own)} demo entries are set aside and replaced once this run "
              "has written its output" + ("" if explicit else " (pass --output-dir DIR to keep it)"), flush=True)
        aside.mkdir()
        for entry in own:
            entry.rename(aside / entry.name)
    try:
        yield path
    except BaseException:
        if own:
            _put_back(path, aside)
            print(f"{path}: the run failed; the earlier run is back in place", file=sys.stderr, flush=True)
        raise
    if own:
        shutil.rmtree(aside)


def _relex_command() -> str:
    """How to call the ``relex`` command of this interpreter: ``.venv/bin/relex`` (relative when under the current
    folder), else ``python -m relex_callback``."""
    script = Path(sys.executable).parent / "relex"
    if script.is_file():
        return shlex.quote(_short(script))
    return f"{shlex.quote(_short(Path(sys.executable)))} -m relex_callback"


def _short(path: Path) -> str:
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # every option checked: a bad one stops here, before any folder is touched
    output_dir = check_output_dir(args.output_dir, args.overwrite)
    if args.check_output:
        return
    import warnings

    with replacing_earlier_run(output_dir, explicit=args.output_dir is not None), warnings.catch_warnings():
        run(args, output_dir)


def _quiet_third_party() -> None:
    """No third-party noise in the demo's output: their FutureWarnings, and the info lines of their loggers."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!relex_callback)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "trl", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed, when installed, is imported by accelerate and prints which accelerator it found (the demo does not
    # use it); its logger keeps this filter when DeepSpeed sets it up.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.filename != "real_accelerator.py")


def _differs_line(observed: float, extrapolated: float, n: int, observe: int, target: int) -> str:
    """Whether RELEX's accuracy differs measurably from the trained weights': the difference against twice its
    standard error (binomial SEs of two independent proportions over n prompts)."""
    diff = extrapolated - observed
    se = math.sqrt((observed * (1 - observed) + extrapolated * (1 - extrapolated)) / n)
    verdict = "differs measurably" if abs(diff) > 2 * se else "does not differ measurably"
    return (f"RELEX step {target} {verdict} from real step {observe}: {diff:+.3f} ± {se:.3f} (SE of the "
            f"difference; measurable beyond ± {2 * se:.3f})")


def run(args: argparse.Namespace, output_dir: Path) -> None:
    """Train, extrapolate, evaluate and summarise into ``output_dir``; ``demo.json`` is written last."""
    _quiet_third_party()
    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from relex_callback import RelexCallback
    from relex_callback.demo import addition_reward, cpu_grpo_config, load_smollm2, smollm2_dir, split_train_heldout
    from relex_callback.offline import report_checkpoints
    from relex_callback.probe import RewardProbe

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    torch.manual_seed(args.seed)

    if args.model is None:
        model, tokenizer = load_smollm2()
        base_dir = smollm2_dir()  # θ_0 on disk, for `relex report`
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        base_dir = args.model
    pairs = (args.max_operand + 1) * (args.max_operand + 2) // 2  # distinct unordered {a, b}
    train, heldout = split_train_heldout(n_train=min(1000, pairs - args.heldout), n_heldout=args.heldout, seed=args.seed,
                                         max_operand=args.max_operand)
    probe = RewardProbe(heldout, addition_reward, tokenizer, max_new_tokens=16, batch_size=50)

    started = time.perf_counter()
    base_accuracy = probe(model)
    print(f"held-out accuracy, base model: {base_accuracy:.3f} ({time.perf_counter() - started:.0f}s)", flush=True)

    config = cpu_grpo_config(output_dir, max_steps=args.target, seed=args.seed, learning_rate=args.lr,
                             prompts_per_step=args.prompts_per_step, generations=args.generations)
    relex = RelexCallback(observe=args.observe, extrapolate_to=args.target, overwrite=True)  # the folder was checked above
    last_observed = {}
    saved_steps = []

    class KeepObserved(TrainerCallback):
        """Keeps the weights of the last observed step in memory; saves every --save-every-th step for `relex report`."""

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            step = state.global_step
            if step == args.observe:
                last_observed.update({n: p.detach().clone() for n, p in model.named_parameters()})
            if args.save_every and step % args.save_every == 0 and step <= args.observe:
                model.save_pretrained(output_dir / f"checkpoint-{step}")
                saved_steps.append(step)

    model.train()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=addition_reward,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[KeepObserved(), relex],
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    extrapolated_accuracy = probe(trainer.model)
    with torch.no_grad():
        extrapolated = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        for name, param in trainer.model.named_parameters():
            param.copy_(last_observed[name])
    observed_accuracy = probe(trainer.model)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            param.copy_(extrapolated[name])

    out_dir = relex.written_dirs[args.target]
    report = json.loads((out_dir / "relex_report.json").read_text())
    accuracy = {"base": base_accuracy, f"real_step_{args.observe}": observed_accuracy,
                f"relex_step_{args.target}": extrapolated_accuracy, "heldout_prompts": args.heldout}
    plots = sorted(p.name for p in out_dir.glob("*.png"))
    diagnostic = relex.diagnostic
    cli = None
    if len(saved_steps) >= 3:  # the same diagnosis from the saved checkpoints, run here exactly as printed
        report_dir = output_dir / "report"
        command = (f"{_relex_command()} report --base {shlex.quote(_short(Path(base_dir)))} --checkpoints "
                   f"{shlex.quote(_short(output_dir))}/checkpoint-* --target-step {args.target} "
                   f"--output {shlex.quote(_short(report_dir))} --overwrite")
        cli_report = report_checkpoints(base_dir, [output_dir / f"checkpoint-{s}" for s in saved_steps], report_dir,
                                        target_steps=[args.target], overwrite=True, progress=False)
        cli = {"command": command, "steps": saved_steps, "k_max": cli_report["diagnostic"]["k_max"],
               "k_max_ratio": cli_report["diagnostic"]["k_max_ratio"]}
    summary = {"heldout_accuracy": accuracy, "extrapolated_model": str(out_dir), "plots": plots,
               "checkpoints": [str(output_dir / f"checkpoint-{s}") for s in saved_steps],
               "relex_report_command": cli and cli["command"], "relex_report_k_max": cli and cli["k_max"],
               "callback_k_max": diagnostic.k_max, "train_seconds": train_seconds,
               "fit_seconds": report.get("timings", {}).get("fit_seconds"), "warnings": report["warnings"]}
    bt = report["backtest"] or {}

    def with_se(p: float) -> str:
        return f"{p:.3f} ± {(p * (1 - p) / args.heldout) ** 0.5:.3f}"

    print()
    print(f"RELEX: observed steps 1..{args.observe} ({train_seconds:.0f}s of GRPO), extrapolated to step {args.target}"
          + (f" (fit and prediction {summary['fit_seconds']:.1f}s)" if summary["fit_seconds"] is not None else ""))
    print(f"  explained variance (rank 1): mean {report['explained_variance']['mean']:.3f}, min {report['explained_variance']['min']:.3f}")
    print(f"  backtest distance {bt.get('distance', float('nan')):.3f} at {bt.get('ratio', float('nan')):.1f}x; "
          f"target {report['horizon_ratio']:.2f}x the window")
    print(f"  window diagnostic: {diagnostic.summary_line()}")
    for warning in report["warnings"]:
        print(f"  warning: {warning}")
    print(f"  held-out accuracy ({args.heldout} prompts, greedy, ± binomial SE):")
    print(f"    base model            {with_se(base_accuracy)}")
    print(f"    real step {args.observe:<4}        {with_se(observed_accuracy)}")
    print(f"    RELEX step {args.target:<4}       {with_se(extrapolated_accuracy)}")
    print(f"  {_differs_line(observed_accuracy, extrapolated_accuracy, args.heldout, args.observe, args.target)}")
    print("  what the numbers mean (" + DOCS_HORIZON + "):")
    print("    explained variance  share of each tensor's movement on its rank-1 direction (1: a single direction)")
    print("    backtest distance   ||θ̂ − θ|| / ||θ − θ_0|| when the first half of the window predicts its last step "
          "(0: exact, 1: as far off as not moving)")
    print("    drift share         share of each step that moves with the steps around it rather than as independent "
          "noise (read with the drift's coherence time); with K_max, where the window says the prediction stops being "
          "trustworthy")
    print(f"  extrapolated model: {out_dir} (model card README.md, relex_report.json)")
    if plots:
        print(f"  plots:              {', '.join(plots)} in {out_dir}")
    if cli:
        print(f"  checkpoints {', '.join(map(str, saved_steps))} saved; this command diagnoses them (run here, "
              f"its report is in {_short(output_dir / 'report')}):\n    {cli['command']}")
        print(f"    it finds K_max = step {cli['k_max']} ({cli['k_max_ratio']:.2f}x) from the {len(saved_steps)} saved "
              f"checkpoints; the callback saw every step 1..{args.observe} and found step {diagnostic.k_max} "
              f"({diagnostic.k_max_ratio:.2f}x)" + ("" if cli["k_max"] == diagnostic.k_max else
                                                   ": different snapshots, so a different horizon"))
    (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  summary:            {output_dir / SUMMARY_NAME}; run again to replace this output")


if __name__ == "__main__":
    main()
