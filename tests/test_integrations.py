"""The launch recipes under integrations/trl: the GRPO example runs end to end (one CPU process, tiny model,
full fine-tuning and LoRA) and the accelerate configs name the backends they claim."""

from __future__ import annotations

import importlib.util
import json
import runpy
from pathlib import Path

import pytest
import yaml

try:
    from tests._tiny import tiny_qwen2, tiny_tokenizer
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from _tiny import tiny_qwen2, tiny_tokenizer

RECIPES = Path(__file__).resolve().parents[1] / "integrations" / "trl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    tiny_qwen2(tokenizer=tok).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def run_example(argv: list[str]):
    return runpy.run_path(str(RECIPES / "grpo_relex.py"), run_name="grpo_relex")["main"](argv)


@pytest.mark.parametrize("lora", [False, True])
def test_grpo_example_writes_the_relex_directories(tmp_path, model_dir, lora):
    argv = ["--model", str(model_dir), "--cpu", "--observe", "2", "--target", "4", "6", "--output-dir", str(tmp_path),
            "--generations", "2", "--prompts-per-device", "1", "--max-completion-length", "4", "--lr", "1e-3"]
    if lora:
        argv += ["--lora-r", "2", "--merge-lora"]
    tensorboard = not lora and importlib.util.find_spec("tensorboard") is not None
    if tensorboard:
        argv += ["--report-to", "tensorboard"]
    trainer = run_example(argv)
    assert trainer.state.global_step == 2
    for target in (4, 6):
        out = tmp_path / f"relex-step{target}"
        assert json.loads((out / "relex_report.json").read_text())["target_step"] == target
        assert (out / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
        assert (tmp_path / f"relex-step{target}-merged" / "model.safetensors").is_file() == lora
    if tensorboard:  # the quickstart's --report-to: relex/* scalars in real TensorBoard event files, at the halt step
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        runs = list((tmp_path / "runs").iterdir())
        assert len(runs) == 1
        events = EventAccumulator(str(runs[0]))
        events.Reload()
        (step, target), = [(e.step, e.value) for e in events.Scalars("train/relex/target_step")]
        assert (step, target) == (2, 6)
        (_, ratio), = [(e.step, e.value) for e in events.Scalars("train/relex/horizon_ratio")]
        assert ratio == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("name", "kind", "key"),
    [("ddp.yaml", "MULTI_GPU", None), ("fsdp2.yaml", "FSDP", "fsdp_config"), ("zero3.yaml", "DEEPSPEED", "deepspeed_config")],
)
def test_accelerate_configs_name_their_backend(name, kind, key):
    config = yaml.safe_load((RECIPES / name).read_text())
    assert config["distributed_type"] == kind
    if name == "fsdp2.yaml":
        assert config[key]["fsdp_version"] == 2
    if name == "zero3.yaml":
        assert config[key]["zero_stage"] == 3
    assert (RECIPES / "README.md").is_file()
