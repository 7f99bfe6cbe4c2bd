"""The ``relex`` command line: every command end to end, its help, and each bad input's message and exit code."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _builders import checkpoint_trajectory
from _oracle import oracle
from relex_callback import offline
from relex_callback.offline.cli import build_parser, main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    return checkpoint_trajectory(tmp_path_factory.mktemp("cli"))


def _load(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_extrapolate_command(run_dirs, tmp_path, capsys):
    base, run = run_dirs
    code = main(["extrapolate", "--base", str(base), "--checkpoints", str(run), "--target-step", "20",
                 "--output", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "step 20 (effective 20, 4.00x the observed window)" in out and str(tmp_path / "out") in out
    # the independent oracle (SVD + least squares, no relex_callback) on the checkpoints' own weights, read with
    # safetensors; the output keeps the checkpoints' bf16, so it is the oracle rounded to bf16
    ours = _load(tmp_path / "out")
    weights = {0: {n: v.float() for n, v in _load(base).items()}}
    weights.update({t: {n: v.float() for n, v in _load(run / f"checkpoint-{t}").items()} for t in (1, 2, 3, 4, 5)})
    expected, elsewhere = oracle(weights, 0, [1, 2, 3, 4, 5], 20), oracle(weights, 0, [1, 2, 3, 4, 5], 19)
    assert set(ours) == set(expected) and all(v.dtype == torch.bfloat16 for v in ours.values())

    def agreement(want):  # (share of elements equal to the oracle rounded to bf16, all within one bf16 spacing)
        exact = sum(int((ours[n] == want[n].to(torch.bfloat16)).sum()) for n in want) / sum(v.numel() for v in want.values())
        near = all(bool(((ours[n].double() - want[n]).abs() <= want[n].abs() * 2.0 ** -7).all()) for n in want)
        return exact, near

    exact, near = agreement(expected)
    assert exact > 0.999 and near, exact
    exact, near = agreement(elsewhere)  # negative control: the oracle one step earlier is not what was written
    assert exact < 0.9 and not near, exact
    report = json.loads((tmp_path / "out" / "relex_report.json").read_text())
    assert report["settings"]["rank"] == 1 and report["bytes"]["intermediate"] == 0
    assert {"config.json", "generation_config.json", "README.md", "model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_extrapolate_options(run_dirs, tmp_path, capsys):
    base, run = run_dirs
    checkpoints = [str(run / f"checkpoint-{t}") for t in (1, 2, 3, 4, 5)]
    code = main(["extrapolate", "--base", str(base), "--checkpoints", *checkpoints, "--steps", "2", "4", "6", "8", "10",
                 "--target-step", "30", "50", "--time-scale", "2", "--rank", "2", "--window", "4", "--fit", "linear",
                 "--shrink", "0.5", "--dtype", "float32", "--max-memory", "128KiB", "--num-workers", "3",
                 "--output", str(tmp_path / "out"), "--no-progress", "-q"])
    assert code == 0
    for target in (30, 50):
        report = json.loads((tmp_path / "out" / f"step{target}" / "relex_report.json").read_text())
        assert report["effective_target_step"] == 2 * target
        assert report["observed_steps"] == [2, 4, 6, 8, 10] and report["window_steps"] == [4, 6, 8, 10]
        assert report["settings"]["shrink"] == 0.5 and report["settings"]["max_memory"] == 128 * 1024
        assert all(v.dtype == torch.float32 for v in _load(tmp_path / "out" / f"step{target}").values())
        assert report["tensors"]["model.embed_tokens.weight"]["chunks"] > 1
    assert "step 50 (effective 100" in capsys.readouterr().out


def test_reconstruct_command(run_dirs, tmp_path, capsys):
    base, run = run_dirs
    code = main(["reconstruct", "--base", str(base), "--checkpoints", str(run), "--fit-steps", "4",
                 "--target-step", "2", "5", "--output", str(tmp_path / "rec"), "--no-progress"])
    assert code == 0
    assert "step 5 -> " in capsys.readouterr().out
    for step in (2, 5):
        report = json.loads((tmp_path / "rec" / f"step{step}" / "relex_report.json").read_text())
        assert report["producer"] == "reconstruct" and report["in_fit"] is (step == 2)
        assert 0 < report["relative_distance"] < 0.2


def test_report_command(run_dirs, tmp_path, capsys):
    base, run = run_dirs
    code = main(["report", "--base", str(base), "--checkpoints", str(run), "--fit-steps", "3", "--target-step", "50",
                 "--top", "2", "--output", str(tmp_path / "rep"), "--no-progress"])
    assert code == 0
    assert "held-out step 5: relative distance" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "rep").iterdir()}
    assert names == {"relex_report.json", "explained_variance.png", "coefficients.png", "r_squared.png", "backtest.png"}
    report = json.loads((tmp_path / "rep" / "relex_report.json").read_text())
    assert report["heldout_steps"] == [4, 5] and len(report["trajectories"]) == 2
    assert main(["report", "--base", str(base), "--checkpoints", str(run), "--no-plots",
                 "--output", str(tmp_path / "json_only"), "--no-progress", "-q"]) == 0
    assert [p.name for p in (tmp_path / "json_only").iterdir()] == ["relex_report.json"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_with_an_example():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and "Example:" in action.help, f"{name} {action.option_strings}"
        assert "examples:" in sub.epilog and f"relex {name}" in sub.epilog


@pytest.mark.parametrize("command", ["extrapolate", "reconstruct", "report"])
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--base", "--checkpoints", "--steps", "--fit-steps", "--rank", "--max-memory", "--allow-pickle",
                   "--overwrite", "--output"):
        assert option in text
    assert "examples:" in text


def test_module_and_console_script():
    result = subprocess.run([sys.executable, "-m", "relex_callback", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "extrapolate" in result.stdout and "report" in result.stdout
    script = shutil.which("relex") or str(Path(sys.executable).parent / "relex")
    if not os.path.exists(script):
        pytest.skip("the relex console script is not installed (pip install -e .)")
    result = subprocess.run([script, "extrapolate", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--time-scale" in result.stdout


def test_parser_and_help_do_not_import_torch():
    """``relex --help`` must not wait for torch (seconds): the parser and its options import none of it."""
    code = (
        "import sys, argparse\n"
        "from relex_callback.offline.cli import build_parser\n"
        "parser = build_parser(); parser.format_help()\n"
        "action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))\n"
        "[sub.format_help() for sub in action.choices.values()]\n"
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))\n"
        "import relex_callback.offline.commands\n"  # negative control: the commands do need torch
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True"]


def test_hub_id_as_base_says_a_local_directory_is_needed(run_dirs, tmp_path, capsys):
    _, run = run_dirs
    err = _error(["extrapolate", "--base", "HuggingFaceTB/SmolLM2-135M", "--checkpoints", str(run), "--target-step", "20",
                  "--output", str(tmp_path / "out"), "--no-progress"], capsys)
    assert "HuggingFaceTB/SmolLM2-135M does not exist: RELEX reads a local model directory and downloads nothing" in err
    assert "hf download HuggingFaceTB/SmolLM2-135M --local-dir DIR" in err


def _error(argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    return captured.err


def _extrapolate(base: Path, checkpoints: list[str], out: Path, *extra: str) -> list[str]:
    return ["extrapolate", "--base", str(base), "--checkpoints", *checkpoints, "--target-step", "20",
            "--output", str(out), "--no-progress", *extra]


def test_bad_input_messages(run_dirs, tmp_path, capsys):
    base, run = run_dirs
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    err = _error(_extrapolate(base, [str(tmp_path / "empty")], out), capsys)
    assert "relex extrapolate: error: no checkpoints found in" in err
    err = _error(_extrapolate(base, [str(run / "checkpoint-1")], out), capsys)
    assert "need at least 2 checkpoints to fit a trend, got 1 (step 1)" in err
    assert "give --checkpoints (checkpoints) two or more checkpoint directories" in err
    err = _error(_extrapolate(base, [str(tmp_path / "missing")], out), capsys)
    assert "does not exist" in err
    err = _error(_extrapolate(base, [str(run)], out, "--steps", "1", "2"), capsys)
    assert "--steps lists 2 step(s) but 5 checkpoint(s) were found" in err
    err = _error(_extrapolate(base, [str(run)], out, "--max-memory", "lots"), capsys)
    assert "cannot read the size 'lots'" in err
    err = _error(_extrapolate(base, [str(run)], out, "--max-memory", "1KB"), capsys)
    assert "too small" in err
    err = _error(_extrapolate(base, [str(run)], out, "--window", "1"), capsys)
    assert "--window 1 must be an int >= 2" in err
    err = _error(_extrapolate(base, [str(run)], out, "--shrink", "2"), capsys)
    assert "--shrink 2.0 must be in (0, 1]" in err
    err = _error(["reconstruct", "--base", str(base), "--checkpoints", str(run), "--target-step", "9",
                  "--output", str(out)], capsys)
    assert "reconstruct needs observed steps; 9 not among the checkpoints" in err
    assert not out.exists()
    # argparse errors: exit status 2 as well, no traceback
    err = _error(["extrapolate", "--checkpoints", str(run), "--target-step", "5", "--output", str(out)], capsys)
    assert err.startswith("usage: relex extrapolate")
    assert err.rstrip().endswith("relex extrapolate: error: the following arguments are required: --base")
    err = _error(_extrapolate(base, [str(run)], out, "--rank", "0"), capsys)
    assert err.rstrip().endswith("relex extrapolate: error: argument --rank: 0 must be >= 1")  # not just the usage
    assert not out.exists()
    err = _error(_extrapolate(base, [str(run)], out, "--base-step", "-1"), capsys)
    assert err.rstrip().endswith("argument --base-step: -1 must be >= 0 (a training step)")
    err = _error(_extrapolate(base, [str(run)], out, "--base-step", "3"), capsys)
    assert "is step 1, before the base's step 3" in err and "--base-step N" in err  # the option, in the CLI's words
    assert not out.exists()


def test_mismatch_and_pickle_messages(tmp_path, capsys):
    base, run = checkpoint_trajectory(tmp_path, steps=(1, 2, 3), tied=False)
    weights = load_file(run / "checkpoint-2" / "model.safetensors")
    weights.pop("model.layers.0.self_attn.q_proj.bias")
    weights["lm_head.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(weights, run / "checkpoint-2" / "model.safetensors", metadata={"format": "pt"})
    err = _error(_extrapolate(base, [str(run)], tmp_path / "out"), capsys)
    assert "the checkpoints do not match the base model (2 problem(s)); nothing was read" in err
    assert "step 2" in err and "missing tensor model.layers.0.self_attn.q_proj.bias" in err
    assert "lm_head.weight has shape [4, 4], the base has [64, 32]" in err
    pickled = tmp_path / "pickled"
    for t in (1, 2):
        (pickled / f"checkpoint-{t}").mkdir(parents=True)
        torch.save(load_file(run / f"checkpoint-{t}" / "model.safetensors"), pickled / f"checkpoint-{t}" / "pytorch_model.bin")
    err = _error(_extrapolate(base, [str(pickled)], tmp_path / "out"), capsys)
    assert "holds only pickled weights (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_and_overwrite(run_dirs, tmp_path, capsys):
    base, run = run_dirs
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    err = _error(_extrapolate(base, [str(run)], out), capsys)
    assert "already exists and is not empty; pass --overwrite" in err
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(_extrapolate(base, [str(run)], out, "--overwrite", "-q")) == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_power_trend_command_matches_an_independent_fit(run_dirs, tmp_path):
    """--fit power --power 0.5: θ_0 + ĉ(K)·v with ĉ = a + b·t^0.5 fitted by least squares (numpy), v from the SVD."""
    import numpy as np

    from _oracle import oracle_prediction

    base, run = run_dirs
    steps = [1, 2, 3, 4, 5]
    assert main(["extrapolate", "--base", str(base), "--checkpoints", str(run), "--target-step", "25", "--fit", "power",
                 "--power", "0.5", "--dtype", "float32", "--output", str(tmp_path / "p"), "--no-progress"]) == 0
    assert main(["extrapolate", "--base", str(base), "--checkpoints", str(run), "--target-step", "25",
                 "--dtype", "float32", "--output", str(tmp_path / "l"), "--no-progress"]) == 0
    power, line = _load(tmp_path / "p"), _load(tmp_path / "l")
    theta0 = {n: v.float() for n, v in _load(base).items()}
    snaps = {s: {n: v.float() for n, v in _load(run / f"checkpoint-{s}").items()} for s in steps}
    name = "model.layers.0.mlp.up_proj.weight"
    deltas = torch.stack([(snaps[s][name] - theta0[name]).reshape(-1) for s in steps])
    # the power trend is a line in u = t^0.5: fit the oracle's line on u and evaluate at 25^0.5
    expected = theta0[name].double().reshape(-1) + oracle_prediction(deltas, np.sqrt(steps), 25 ** 0.5)
    assert float((power[name].double().reshape(-1) - expected).abs().max()) < 1e-5
    # negative control: the straight line lands elsewhere
    assert float((line[name].double().reshape(-1) - expected).abs().max()) > 1e-3
    report = json.loads((tmp_path / "p" / "relex_report.json").read_text())
    assert report["format"] == "relex-report/2" and report["settings"]["power"] == 0.5
    assert report["candidate"]["trend"]["kind"] == "power" and report["candidate"]["trend"]["power"] == 0.5


def test_cli_choices_come_from_the_shared_vocabulary():
    from relex_callback.options import OUTPUT_DTYPES, TREND_KINDS

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices = {a.dest: tuple(a.choices) for a in sub.choices["extrapolate"]._actions if a.choices}
    assert choices["fit"] == TREND_KINDS and "power" in choices["fit"] and choices["dtype"] == OUTPUT_DTYPES


def test_command_on_checkpoints_of_several_shards_matches_the_oracle(tmp_path):
    """Base and every checkpoint in 3+ safetensors shards: ``python -m relex_callback extrapolate``, run as its own
    process, writes θ_0 + ĉ(20)·v of the independent oracle (SVD + least squares) for every tensor of every shard."""
    steps = [1, 2, 3, 4, 5]
    base, run = checkpoint_trajectory(tmp_path, steps=steps, tied=False, shard="20KB")
    for directory in [base, *(run / f"checkpoint-{t}" for t in steps)]:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3, directory
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "relex_callback", "extrapolate", "--base", str(base), "--checkpoints", str(run),
         "--target-step", "20", "--dtype", "float32", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ours = _load(out)
    weights = {0: {n: v.float() for n, v in _load(base).items()}}
    weights.update({t: {n: v.float() for n, v in _load(run / f"checkpoint-{t}").items()} for t in steps})
    expected, elsewhere = oracle(weights, 0, steps, 20), oracle(weights, 0, steps, 19)
    assert set(ours) == set(expected) and len(ours) == len(index["weight_map"])
    for name, want in expected.items():
        assert float((ours[name].double() - want).abs().max()) < 1e-5, name
    # the comparison can fail: the oracle one step earlier differs by far more than the tolerance
    assert max(float((ours[n].double() - elsewhere[n]).abs().max()) for n in expected) > 1e-3


def test_targets_must_be_training_steps(run_dirs, tmp_path, capsys):
    """--target-step 0 or -5 is refused (exit 2, nothing written); a target inside the window still runs, warned."""
    base, run = run_dirs
    out = tmp_path / "out"
    for bad in ("-5", "0"):
        for command in ("extrapolate", "report"):
            err = _error([command, "--base", str(base), "--checkpoints", str(run), "--target-step", bad,
                          "--output", str(out), "--no-progress"], capsys)
            assert f"argument --target-step: {bad} is not a training step: give a step >= 1" in err
            assert f"usage: relex {command}" in err
    assert not out.exists()
    from relex_callback.checkpoints import RelexInputError

    with pytest.raises(RelexInputError, match="target step -5 is not a training step"):
        offline.extrapolate_checkpoints(base, [run], [-5], out, progress=False)
    assert not out.exists()
    # negative control: step 3, inside the observed steps 1..5, is accepted with its warning
    assert main(_extrapolate(base, [str(run)], out, "--target-step", "3", "-q")) == 0
    report = json.loads((out / "relex_report.json").read_text())
    assert report["target_step"] == 3 and any("this interpolates" in w for w in report["warnings"])


def test_output_under_a_file_names_the_option(run_dirs, tmp_path, capsys):
    base, run = run_dirs
    (tmp_path / "file").write_text("not a folder")
    err = _error(_extrapolate(base, [str(run)], tmp_path / "file" / "out"), capsys)
    assert f"output directory {tmp_path / 'file' / 'out'} cannot be made: {tmp_path / 'file'} is a file" in err
    assert "--output" in err and "Errno" not in err
    err = _error(_extrapolate(base, [str(run)], tmp_path / "file"), capsys)
    assert f"{tmp_path / 'file'} is a file" in err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_misspellings_get_a_suggestion_and_the_commands_usage(run_dirs, tmp_path, capsys):
    base, run = run_dirs
    out = str(tmp_path / "out")
    err = _error(["reprot", "--base", str(base)], capsys)
    assert "invalid choice: 'reprot'" in err and err.rstrip().endswith("did you mean report?")
    err = _error(["extrapolate", "--base", str(base), "--checkpoints", str(run), "--tagret-step", "20", "--output", out],
                 capsys)
    assert err.startswith("usage: relex extrapolate")
    assert "(--tagret-step is not an option here: did you mean --target-step?)" in err
    err = _error(_extrapolate(base, [str(run)], Path(out), "--ovewrite"), capsys)
    assert err.startswith("usage: relex extrapolate")  # the command's usage, not the top-level one
    assert "unrecognized arguments: --ovewrite (--ovewrite is not an option here: did you mean --overwrite?)" in err
    err = _error(_extrapolate(base, [str(run)], Path(out), "--fit", "lienar"), capsys)
    assert "did you mean linear?" in err
    # negative control: nothing close, no suggestion
    err = _error(_extrapolate(base, [str(run)], Path(out), "--zzzzzz"), capsys)
    assert "unrecognized arguments: --zzzzzz" in err and "did you mean" not in err
    assert not Path(out).exists()


def test_snapshots_that_are_not_every_step_are_named(run_dirs, tmp_path, capsys):
    """The CLI says which snapshots its K_max comes from, and that a callback seeing every step can differ."""
    base, run = run_dirs
    assert main(["report", "--base", str(base), "--checkpoints", str(run), "--no-plots", "--output",
                 str(tmp_path / "all"), "--no-progress", "-q"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "all" / "relex_report.json").read_text())
    k_max = report["diagnostic"]["k_max"]
    assert f"supported horizon K_max = step {k_max} " in out and "from 5 snapshots at steps 1, 2, 3, 4, 5" in out
    assert "note:" not in out  # every step 1..5: what a callback observing 5 steps sees
    every_other = [str(run / f"checkpoint-{t}") for t in (2, 4, 5)]
    assert main(["report", "--base", str(base), "--checkpoints", *every_other, "--no-plots", "--output",
                 str(tmp_path / "some"), "--no-progress", "-q"]) == 0
    out = capsys.readouterr().out
    assert "from 3 snapshots at steps 2, 4, 5" in out
    assert "note: these are not every step 1..5; a RelexCallback that observed every step" in out
