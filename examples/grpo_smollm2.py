"""The main job: real TRL GRPO on the packaged SmolLM2-135M-Instruct with RelexCallback in halt mode.

It trains on an offline, verifiable task ("What is a + b?"), observes the first ``--observe`` optimizer
steps, writes the RELEX-extrapolated checkpoint for ``--target`` (with ``relex_report.json``, a model card and
the fit's plots), saves every ``--save-every``-th observed step as ``checkpoint-N/`` for ``relex report``, and
prints the greedy held-out accuracy (± binomial SE) of the base model, the last observed step and the
extrapolated model. Runs on CPU in a few minutes; nothing is downloaded.

    python examples/grpo_smollm2.py --observe 8 --target 16 --output-dir runs/smollm2

Run it again and it replaces its own earlier output in the default folder (``runs/smollm2-grpo``); an
``--output-dir`` that is not empty needs ``--overwrite``. Either way the check comes before any work.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

DEFAULT_OUTPUT = Path("runs/smollm2-grpo")
SUMMARY_NAME = "demo.json"
# What this demo writes into its output folder; --overwrite (or a re-run in the default folder) removes only these.
_OWN_ENTRIES = re.compile(r"^(relex-step\d+.*|checkpoint-\d+|runs|report|demo\.json)$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def prepare_output_dir(path: Path | None, overwrite: bool, dry_run: bool = False) -> Path:
    """The run's output folder, checked before any set-up or evaluation.

    The default folder is the demo's own: an earlier run there is replaced, with a message. An explicit
    ``--output-dir`` that is not empty is refused unless ``--overwrite``. Only what the demo writes
    (``relex-step*/``, ``checkpoint-*/``, ``demo.json``, ...) is removed, never other files; ``dry_run`` only
    refuses (it needs nothing but the standard library, so ``scripts/demo.sh`` runs it before the set-up).
    """
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_OUTPUT
    if path.exists() and not path.is_dir():
        sys.exit(f"grpo_smollm2.py: error: --output-dir {path} is a file; choose a folder")
    earlier = sorted(path.iterdir()) if path.is_dir() else []
    if not earlier:
        return path
    if explicit and not overwrite:
        sys.exit(f"grpo_smollm2.py: error: --output-dir {path} is not empty (an earlier run?). Pass --overwrite to "
                 "replace this demo's output there, or choose another --output-dir.")
    own = [p for p in earlier if _OWN_ENTRIES.match(p.name)]
    if dry_run:
        return path
    print(f"{path} holds an earlier run: replacing its {len(own)} demo entries"
          + ("" if explicit else " (pass --output-dir DIR to keep it)"), flush=True)
    for entry in own:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = prepare_output_dir(args.output_dir, args.overwrite, args.check_output)  # before the slow imports
    if args.check_output:
        return
    import logging

    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from relex_callback import RelexCallback
    from relex_callback.demo import addition_reward, cpu_grpo_config, load_smollm2, smollm2_dir, split_train_heldout
    from relex_callback.probe import RewardProbe

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "trl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
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
    report_command = None
    if len(saved_steps) >= 3:  # fit on all but the last saved step, check the fit against it
        report_command = (f"relex report --base {base_dir} --checkpoints {output_dir}/checkpoint-* "
                          f"--fit-steps {saved_steps[-2]} --target-step {args.target} --output {output_dir}/report")
    summary = {"heldout_accuracy": accuracy, "extrapolated_model": str(out_dir), "plots": plots,
               "checkpoints": [str(output_dir / f"checkpoint-{s}") for s in saved_steps], "relex_report_command": report_command,
               "train_seconds": train_seconds, "warnings": report["warnings"]}
    (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    bt = report["backtest"] or {}

    def with_se(p: float) -> str:
        return f"{p:.3f} ± {(p * (1 - p) / args.heldout) ** 0.5:.3f}"

    print()
    print(f"RELEX: observed steps 1..{args.observe} ({train_seconds:.0f}s of GRPO), extrapolated to step {args.target}")
    print(f"  explained variance (rank 1): mean {report['explained_variance']['mean']:.3f}, min {report['explained_variance']['min']:.3f}")
    print(f"  backtest distance {bt.get('distance', float('nan')):.3f} at {bt.get('ratio', float('nan')):.1f}x; horizon {report['horizon_ratio']:.1f}x")
    print(f"  window diagnostic: {relex.diagnostic.summary_line()}")
    for warning in report["warnings"]:
        print(f"  warning: {warning}")
    print(f"  held-out accuracy ({args.heldout} prompts, greedy, ± binomial SE):")
    print(f"    base model            {with_se(base_accuracy)}")
    print(f"    real step {args.observe:<4}        {with_se(observed_accuracy)}")
    print(f"    RELEX step {args.target:<4}       {with_se(extrapolated_accuracy)}")
    print(f"  extrapolated model: {out_dir} (model card README.md, relex_report.json)")
    if plots:
        print(f"  plots:              {', '.join(plots)} in {out_dir}")
    if report_command:
        print(f"  checkpoints {', '.join(map(str, saved_steps))} saved; diagnose them with:\n    {report_command}")
    print(f"  summary:            {output_dir / SUMMARY_NAME}; run again to replace this output")


if __name__ == "__main__":
    main()
