"""Faults: SIGKILL during a fit, an output write (callback and ``relex extrapolate``) and a state save; damaged
safetensors (CLI inputs and saved RELEX state); a resume at every step of the window (halt and jump mode); a resume
with another number of processes.

Every run is a real ``Trainer`` on a tiny model writing real files; the kills are real SIGKILLs of a subprocess
(``tests/_fault_worker.py``) at a chosen point. Resumed runs are compared bit for bit with one uninterrupted
reference run, and negative controls show that the comparison sees a run that restarted its window.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _distributed_checks import free_port
from _oracle import max_diff
from _tiny import lm_trainer
from relex_callback import RelexCallback
from relex_callback.offline.cli import main

CONFIG = dict(observe=6, extrapolate_to=24, buffer_dtype="float32")
WORKER = Path(__file__).with_name("_fault_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _worker(out: Path, fault: str, config: dict, nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return subprocess.Popen([*launch, str(WORKER), str(out), fault, json.dumps(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, returncode: int) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == returncode, output[-4000:]


def _extrapolated(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "relex-step24" / "model.safetensors"))


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    """The killed runs (started first, in subprocesses), the uninterrupted reference run (a checkpoint every step;
    in this process meanwhile) and the 2-process run that resumes the reference's checkpoint-4 (left running)."""
    root = tmp_path_factory.mktemp("faults")
    faults = {"state": ("state:4", CONFIG), "output": ("output", CONFIG),
              "fit": ("fit", {**CONFIG, "buffer_device": "disk"})}
    killed = {name: _worker(root / name, fault, config) for name, (fault, config) in faults.items()}
    reference = lm_trainer(root / "reference", tok, [RelexCallback(**CONFIG)], save_steps=1)
    reference.train()
    ddp = _worker(root / "ddp", f"ddp:{root / 'reference' / 'checkpoint-4'}", CONFIG, nproc=2)
    for process in killed.values():
        _finish(process, -9)
    return SimpleNamespace(root=root, reference=_extrapolated(root / "reference"), ddp=ddp)


def test_kill_during_state_save_keeps_the_previous_checkpoint_resumable(runs, tok):
    out = runs.root / "state"
    half = out / "checkpoint-4" / "relex_state.safetensors.tmp"
    assert [p.name for p in (out / "checkpoint-4").iterdir()] == [half.name]  # RELEX saves before the Trainer does
    assert (out / "checkpoint-2" / "relex_state.safetensors").is_file()  # so save_total_limit=1 did not rotate it away
    with pytest.raises(ValueError, match="Can't find a valid checkpoint at .*checkpoint-4"):  # transformers' refusal
        lm_trainer(out, tok, [RelexCallback(**CONFIG)]).train(resume_from_checkpoint=True)
    lm_trainer(out, tok, [RelexCallback(**CONFIG)]).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    _assert_same(_extrapolated(out), runs.reference)


def test_kill_during_output_write_leaves_no_complete_looking_folder(runs, tok):
    out = runs.root / "output"
    staging = list(out.glob(".relex-step24.tmp-*"))
    assert not (out / "relex-step24").exists() and len(staging) == 1
    with pytest.raises(json.JSONDecodeError):  # the kill came in the middle of the report
        json.loads((staging[0] / "relex_report.json").read_text())
    lm_trainer(out, tok, [RelexCallback(**CONFIG)]).train(resume_from_checkpoint=True)  # checkpoint-4
    _assert_same(_extrapolated(out), runs.reference)
    assert not list(out.glob(".relex-step24.*"))  # the killed writer's staging folder is cleaned up


def test_kill_during_fit_loses_no_snapshot_of_the_disk_store(runs, tok):
    out = runs.root / "fit"
    assert not (out / "relex-step24").exists() and not list(out.glob(".relex-step24.*"))
    with safe_open(str(out / "checkpoint-4" / "relex_state.safetensors"), framework="pt") as handle:
        covered = json.loads(handle.metadata()["store"])
    assert covered["steps"] == [1.0, 2.0, 3.0, 4.0]
    callback = RelexCallback(**{**CONFIG, "buffer_device": "disk"})
    lm_trainer(out, tok, [callback]).train(resume_from_checkpoint=True)  # checkpoint-4
    assert callback.buffer.steps == [float(s) for s in range(1, 7)]
    _assert_same(_extrapolated(out), runs.reference)  # the disk store's fit is bit-identical to the in-memory one


def test_resume_at_every_step_of_the_window_gives_the_uninterrupted_result(runs, tok, tmp_path):
    checkpoints = runs.root / "reference"
    with pytest.raises(ValueError, match="records a RELEX state of 5 snapshots, but it is not in .*checkpoint-5.*"
                                         r"TrainingArguments\(resume_from_checkpoint=\.\.\.\) too"):
        lm_trainer(tmp_path / "elsewhere", tok, [RelexCallback(**CONFIG)]).train(
            resume_from_checkpoint=str(checkpoints / "checkpoint-5"))  # a folder outside output_dir, not named to RELEX
    for step in range(1, 6):
        checkpoint = str(checkpoints / f"checkpoint-{step}")
        out = tmp_path / str(step)
        lm_trainer(out, tok, [RelexCallback(**CONFIG)], save_steps=100, resume_from_checkpoint=checkpoint).train(
            resume_from_checkpoint=checkpoint)
        _assert_same(_extrapolated(out), runs.reference)


def test_jump_mode_resume_at_every_step_gives_the_uninterrupted_weights(tmp_path):
    from _builders import linear_trainer

    options = dict(mode="jump", observe=3, jump_every=3, jump_horizon=5, buffer_dtype="float32", max_snapshots=4)
    straight = RelexCallback(**options)
    full = linear_trainer(tmp_path / "reference", [straight], max_steps=9, save_strategy="steps", save_steps=1)
    full.train()
    assert [(r["step"], r["status"]) for r in straight.jump.history] == [(3, "accepted"), (6, "accepted"), (9, "accepted")]
    expected = {n: p.detach().clone() for n, p in full.model.named_parameters()}

    def resume(step, **extra):
        checkpoint = str(tmp_path / "reference" / "out" / f"checkpoint-{step}")
        trainer = linear_trainer(tmp_path / f"{step}{extra}", [RelexCallback(**options, **extra)], max_steps=9,
                                 resume_from_checkpoint=checkpoint)
        trainer.train(resume_from_checkpoint=checkpoint)
        return max_diff(dict(trainer.model.named_parameters()), expected)

    for step in range(1, 9):  # before, at and between the jumps
        assert resume(step) == 0.0, step
    assert resume(4, start_step=4) > 1e-3  # negative control: a restart of the window at step 4 ends elsewhere


def test_negative_control_a_resume_without_the_state_is_refused_and_a_restart_differs(runs, tok, tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(runs.root / "reference" / "checkpoint-4", checkpoint)
    (checkpoint / "relex_state.safetensors").unlink()
    with pytest.raises(ValueError, match="records a RELEX state of 4 snapshots.*set start_step=4"):
        lm_trainer(tmp_path, tok, [RelexCallback(**CONFIG)]).train(resume_from_checkpoint=str(checkpoint))
    lm_trainer(tmp_path, tok, [RelexCallback(**CONFIG, start_step=4)]).train(resume_from_checkpoint=str(checkpoint))
    lost = _extrapolated(tmp_path)
    assert max(float((lost[n] - v).abs().max()) for n, v in runs.reference.items()) > 1e-4


def _damage(path: Path, how: str) -> None:
    if how == "half-written":  # what a kill while saving leaves (the kills above show it)
        path.rename(path.with_name(path.name + ".tmp"))
        return
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) - 1000)
        return
    with open(path, "r+b") as handle:
        handle.seek(8 if how == "header" else os.path.getsize(path) - 1000)  # the header's '{', or a data byte
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("how", ["half-written", "truncate", "header", "data"])
def test_damaged_saved_state_is_refused_with_the_file_and_the_fix(runs, tok, tmp_path, how):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(runs.root / "reference" / "checkpoint-4", checkpoint)
    _damage(checkpoint / "relex_state.safetensors", how)
    with pytest.raises(ValueError, match="Resume from an earlier checkpoint, or set start_step to this checkpoint's step") as info:
        lm_trainer(tmp_path, tok, [RelexCallback(**CONFIG)]).train(resume_from_checkpoint=str(checkpoint))
    assert str(checkpoint / "relex_state.safetensors") in str(info.value)
    assert not (tmp_path / "relex-step24").exists() and not (tmp_path / "checkpoint-6").exists()


def test_resume_with_another_number_of_processes_is_refused(runs, tok):
    _finish(runs.ddp, 0)
    for rank in (0, 1):  # 1-process state resumed by 2 processes
        message = (runs.root / "ddp" / f"refusal-rank{rank}.txt").read_text()
        assert "saved by 1 process(es) (relex_state.safetensors), but this run has 2" in message
        assert "Resume with 1 process(es), or set start_step" in message
    checkpoint = runs.root / "ddp" / "checkpoint-4"  # 2-process state resumed by 1 process
    assert sorted(p.name for p in checkpoint.glob("relex_state*")) == [
        "relex_state-rank00000-of-00002.safetensors", "relex_state-rank00001-of-00002.safetensors"]
    with pytest.raises(ValueError, match="saved by 2 process.*but this run has 1.*Resume with 2 process"):
        lm_trainer(runs.root / "ddp", tok, [RelexCallback(**CONFIG)]).train(resume_from_checkpoint=str(checkpoint))


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    from _builders import checkpoint_trajectory as _trajectory

    return _trajectory(tmp_path_factory.mktemp("cli"))


@pytest.mark.parametrize("how", ["truncate", "header"])
def test_damaged_cli_input_is_refused_before_any_output(trajectory, tmp_path, capsys, how):
    base, run = trajectory
    shutil.copytree(run, tmp_path / "run")
    shard = tmp_path / "run" / "checkpoint-3" / "model.safetensors"
    _damage(shard, how)
    code = main(["extrapolate", "--base", str(base), "--checkpoints", str(tmp_path / "run"), "--target-step", "20",
                 "--output", str(tmp_path / "out"), "--no-progress"])
    message = capsys.readouterr().err
    assert code == 2, message
    assert str(shard) in message and "Re-save or re-copy this checkpoint" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_kill_during_cli_output_write_leaves_no_output_and_a_rerun_cleans_up(trajectory, tmp_path):
    base, run = trajectory
    argv = ["extrapolate", "--base", str(base), "--checkpoints", str(run), "--target-step", "20", "--output",
            str(tmp_path / "out"), "--no-progress"]
    _finish(_worker(tmp_path, "cli", argv), -9)
    staging = list(tmp_path.glob(".out.tmp-*"))
    assert not (tmp_path / "out").exists() and len(staging) == 1
    with pytest.raises(json.JSONDecodeError):  # the kill came in the middle of the report
        json.loads((staging[0] / "relex_report.json").read_text())
    assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "relex_report.json").read_text())
    assert not list(tmp_path.glob(".out.*"))
