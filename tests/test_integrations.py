"""The launch recipes under integrations/trl: the GRPO example runs end to end (one CPU process, tiny model,
full fine-tuning and LoRA) and the accelerate configs name the backends they claim."""

from __future__ import annotations

import importlib.util
import json
import runpy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

try:
    from tests._scripts import run_main
    from tests._tiny import tiny_qwen2, tiny_tokenizer
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from _scripts import run_main
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


def test_plain_prompts_without_a_chat_template_and_target_auto(tmp_path):
    """A tokenizer without a chat template gets plain-text prompts (it used to end in a TRL traceback after the RELEX
    set-up); --target auto writes the window's supported horizon K_max."""
    model = tmp_path / "model"
    tok = tiny_tokenizer(chat_template=False)
    tiny_qwen2(tokenizer=tok).save_pretrained(model)
    tok.save_pretrained(model)
    trainer = run_example(["--model", str(model), "--cpu", "--observe", "3", "--target", "auto", "--output-dir",
                           str(tmp_path / "out"), "--generations", "2", "--prompts-per-device", "1",
                           "--max-completion-length", "4", "--lr", "1e-3"])
    assert trainer.state.global_step == 3
    assert isinstance(trainer.train_dataset[0]["prompt"], str)  # plain text, not chat messages
    # The tiny model answers no sum right: every reward is 0, so every advantage is 0 and no step moves the weights
    # (checked here against the saved model, read with safetensors). A window that never moved supports no
    # extrapolation: K_max = N = 3, and --target auto writes the observed weights as relex-step3.
    initial = load_file(model / "model.safetensors")
    live = dict(trainer.model.named_parameters())
    assert live.keys() == initial.keys() and all(torch.equal(live[n].detach(), initial[n]) for n in live), "it moved"
    assert [p.name for p in (tmp_path / "out").glob("relex-step*")] == ["relex-step3"]
    written = tmp_path / "out" / "relex-step3"
    report = json.loads((written / "relex_report.json").read_text())
    assert report["target_step"] == 3 and report["diagnostic"]["k_max"] == 3
    assert report["diagnostic"]["distinct_snapshots"] == 0 and report["candidate"]["trend"]["kind"] == "observed"
    saved = load_file(written / "model.safetensors")
    assert saved.keys() == initial.keys() and all(torch.equal(saved[n], initial[n]) for n in initial)


def test_help_imports_neither_torch_nor_trl():
    status, seconds, loaded, result = run_main(RECIPES / "grpo_relex.py", ["--help"], timeout=60)
    assert status == 0 and seconds < 1.0 and loaded == []
    assert "--target auto" in result.stdout or "or auto" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--observe", "0"], "--observe 0 must be >= 1"),
        (["--observe", "20", "--target", "10"], "--target 10 must be after the observed steps (> --observe 20)"),
        (["--target", "auto", "100"], "--target auto picks the target itself"),
        (["--target", "soon"], "'soon' is not a step"),
        (["--target", "40", "40"], "--target lists a step twice"),
        (["--generations", "1"], "--generations 1 must be >= 2"),
        (["--lr", "-1"], "--lr -1.0 must be a number > 0"),
        (["--lora-r", "-2"], "--lora-r -2 must be >= 0"),
        (["--merge-lora"], "--merge-lora merges a LoRA adapter: add --lora-r R"),
        (["--max-operand", "10"], "--max-operand 10 gives fewer than 1000 distinct problems"),
        (["--prompts-per-device", "0"], "--prompts-per-device 0 must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_before_anything_loads(tmp_path, capsys, argv, message):
    parse_args = runpy.run_path(str(RECIPES / "grpo_relex.py"))["parse_args"]
    with pytest.raises(SystemExit) as refused:
        parse_args(argv + ["--output-dir", str(tmp_path / "out")])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_dir_checks(tmp_path, capsys):
    parse_args = runpy.run_path(str(RECIPES / "grpo_relex.py"))["parse_args"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", str(tmp_path / "file" / "out")])
    assert "is (or is under) a file" in capsys.readouterr().err
    (tmp_path / "out" / "relex-step100").mkdir(parents=True)
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", str(tmp_path / "out")])
    assert "already holds relex-step100: pass --overwrite" in capsys.readouterr().err
    assert parse_args(["--output-dir", str(tmp_path / "out"), "--overwrite"]).overwrite  # negative control


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
