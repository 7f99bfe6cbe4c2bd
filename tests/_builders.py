"""The tiny trainers and trajectories that several test modules build (tests import these, never each other).

``grpo_trainer``: the real TRL GRPOTrainer on a tiny model with a length reward; ``linear_trainer``: a transformers
Trainer on ``LinearPath``, whose SGD trajectory is an exact known line; ``Regress``/``regression_data``: a small
regression net with Adam; ``checkpoint_trajectory``: a base model and checkpoint-N folders on a known rank-1 path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from datasets import Dataset
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments
from trl import GRPOConfig, GRPOTrainer


def length_reward(completions, **kwargs):
    return [min(len(c), 12) / 12 for c in completions]


def grpo_trainer(tmp_path, model, tok, callbacks, max_steps=30, **overrides):
    prompts = Dataset.from_dict({"prompt": [f"{a} + {b} =" for a in range(10) for b in range(10)]})
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=max_steps,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        **overrides,
    )
    model.train()
    return GRPOTrainer(
        model=model, reward_funcs=length_reward, args=args, train_dataset=prompts, processing_class=tok, callbacks=callbacks
    )


def assert_close_state(actual, expected, atol):
    worst = max(float((actual[n].double() - expected[n].double()).abs().max()) for n in expected)
    assert worst <= atol, worst


class LinearPathConfig(PretrainedConfig):
    model_type = "relex-linear-path"


class LinearPath(PreTrainedModel):
    """loss = Σ g·w: plain SGD moves every tensor by −lr·g per step, exactly (dyadic numbers), so θ_t is a known line."""

    config_class = LinearPathConfig

    def __init__(self, config=None):
        super().__init__(config or LinearPathConfig())
        self.a = torch.nn.Parameter(torch.arange(8, dtype=torch.float32) / 16)
        self.b = torch.nn.Parameter(torch.ones(3, 2) / 4)
        self.register_buffer("ga", torch.tensor([1.0, -2.0, 3.0, 0.0, 1.0, 1.0, -1.0, 2.0]))
        self.register_buffer("gb", torch.tensor([[2.0, 1.0], [0.0, -1.0], [1.0, 3.0]]))

    def forward(self, x, labels=None):
        return {"loss": (self.a * self.ga).sum() + (self.b * self.gb).sum() + 0.0 * x.sum()}


LR = 2.0**-10


def linear_trainer(tmp_path, callbacks, max_steps, model=None, **overrides):
    data = Dataset.from_dict({"x": [[0.0]] * 64, "labels": [0.0] * 64})
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, max_steps=max_steps, learning_rate=LR,
        optim="sgd", weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **overrides})
    return Trainer(model=model or LinearPath(), args=args, train_dataset=data, callbacks=callbacks)


def on_line(model0, t):
    """The true weights at (virtual) step t: θ_0 − t·lr·g."""
    return {"a": model0.a.detach() - t * LR * model0.ga, "b": model0.b.detach() - t * LR * model0.gb}


class Regress(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(4, 8)
        self.second = torch.nn.Linear(8, 1)

    def forward(self, x, labels=None):
        pred = self.second(torch.tanh(self.first(x))).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(pred, labels)}


def regression_data():
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"x": x.tolist(), "labels": (x @ torch.tensor([1.0, -2.0, 0.5, 3.0])).tolist()})


def checkpoint_trajectory(root: Path, steps=(1, 2, 3, 4, 5), tied: bool = True, shard: str | None = None) -> tuple[Path, Path]:
    """A tiny Llama (tied) or Qwen2 (untied, biases) base and one checkpoint-N per step, θ_t = θ_0 + c_t·v + noise;
    ``shard`` is the ``max_shard_size`` of every save."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    if tied:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=False, **common))
    torch.manual_seed(0)
    model = model.to(torch.bfloat16)
    saved = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(root / "base", **saved)
    theta0 = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    direction = {n: torch.randn(p.shape) for n, p in theta0.items()}
    for t in steps:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(theta0[name] + (0.005 * t + 0.01) * direction[name] + 1e-4 * torch.randn(param.shape))
        model.save_pretrained(root / "run" / f"checkpoint-{t}", **saved)
    return root / "base", root / "run"
