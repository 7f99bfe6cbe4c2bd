"""Tiny real models and tokenizer for fast tests (plain functions, no fixtures; reusable anywhere).

Everything is built in-process: a byte-level BPE tokenizer trained with the ``tokenizers`` library on
arithmetic strings, wrapped in ``PreTrainedTokenizerFast`` (pad, eos and a ChatML-like chat template),
and config-built ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` models with a few ten thousand parameters.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

PAD = "<pad>"
EOS = "<|im_end|>"
BOS = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"What is {a} + {b}? Reply with just the number.")
        lines.append(f"{a} + {b} = {a + b}")
        lines.append(f"user\nWhat is {a} + {b}?\nassistant\n{a + b}")
    return lines


def tiny_tokenizer(vocab_size: int = 320, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on arithmetic text; pad ``<pad>``, eos ``<|im_end|>``.

    Padding side is right (the ``PreTrainedTokenizerFast`` default), so code that needs left padding
    must do it itself. ``chat_template=False`` leaves the chat template unset.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS)
    fast.padding_side = "right"
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _special_ids(tokenizer: PreTrainedTokenizerFast | None) -> dict[str, int]:
    tokenizer = tokenizer or tiny_tokenizer()
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def tiny_llama(
    tie: bool = True, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, hidden: int = 32
) -> LlamaForCausalLM:
    """A 2-layer ``LlamaForCausalLM`` (no biases, RMSNorm) sized to ``tiny_tokenizer()``; eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **_special_ids(tokenizer),
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(
    tie: bool = False, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, hidden: int = 64
) -> Qwen2ForCausalLM:
    """A 2-layer ``Qwen2ForCausalLM`` (q/k/v biases, as Qwen2 has by default) sized to ``tiny_tokenizer()``."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **_special_ids(tokenizer),
    )
    model = Qwen2ForCausalLM(config).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    return model


def lm_trainer(tmp_path, tok, callbacks, seed=0, **overrides):
    """A transformers ``Trainer`` on ``tiny_llama`` (tied) fitting arithmetic lines: 20 steps, a checkpoint every 4
    (``overrides`` replace ``TrainingArguments``)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    texts = [f"{a} + {b} = {a + b}" for a in range(12) for b in range(6)]
    enc = tok(texts, padding="max_length", max_length=12, truncation=True)
    data = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]})
    model = tiny_llama(tie=True, tokenizer=tok, seed=seed)
    model.train()
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=20, learning_rate=5e-3,
                lr_scheduler_type="constant", save_strategy="steps", save_steps=4, use_cpu=True, report_to=[], seed=seed,
                disable_tqdm=True, logging_steps=100)
    return Trainer(model=model, args=TrainingArguments(**{**args, **overrides}), train_dataset=data, callbacks=callbacks)


class StopAt(TrainerCallback):
    """Stops training at the end of step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
