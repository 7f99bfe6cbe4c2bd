"""The GRPO settings shared by the demo and the benchmarks (CPU; the settings of `docs/benchmarks.md`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cpu_grpo_config(
    output_dir: str | Path,
    max_steps: int,
    seed: int,
    learning_rate: float = 5e-6,
    prompts_per_step: int = 2,
    generations: int = 8,
    temperature: float = 0.7,
    **overrides: Any,
) -> Any:
    """A TRL ``GRPOConfig`` for the arithmetic task on CPU: ``prompts_per_step`` prompts × ``generations``
    completions of at most 16 tokens per optimizer step, constant learning rate, no KL term (β = 0), loss
    "dapo", fp32, no checkpoints, a log line every step. ``overrides`` replace or add ``GRPOConfig`` fields
    (for example ``save_strategy="steps"`` for a resumable run)."""
    from trl import GRPOConfig

    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=prompts_per_step * generations,
        num_generations=generations,
        max_completion_length=16,
        temperature=temperature,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="dapo",
        max_steps=max_steps,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        seed=seed,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)
