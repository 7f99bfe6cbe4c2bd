"""Halt mode end to end with the real TRL GRPOTrainer and transformers Trainer on tiny real models.

Every prediction is checked against an independent RELEX computed in the test from weights captured by a
separate callback during the same run (torch.linalg.svd of the stacked deltas, numpy polyfit).
"""

import json
import logging
import os
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from _builders import assert_close_state, grpo_trainer
from _oracle import CaptureWeights, PoisonAt, max_diff, oracle
from _tiny import StopAt, lm_trainer, tiny_llama, tiny_qwen2
from relex_callback import RelexCallback
from relex_callback.trainers.transformers import STATE_FILE_NAME


@pytest.mark.parametrize("tie", [False, True])
def test_grpo_halt_writes_the_independent_prediction(tmp_path, tok, tie):
    model = (tiny_llama if tie else tiny_qwen2)(tie=tie, tokenizer=tok)
    capture = CaptureWeights()
    relex = RelexCallback(observe=6, extrapolate_to=[15, 40], buffer_dtype="float32")
    trainer = grpo_trainer(tmp_path, model, tok, [capture, relex])
    trainer.train()

    assert trainer.state.global_step == 6  # stopped at the end of the window
    assert sorted(capture.weights) == list(range(0, 7))
    for target in (15, 40):
        expected = oracle(capture.weights, 0, list(range(1, 7)), target)
        assert max_diff(capture.weights[6], capture.weights[0]) > 1e-3  # training moved the weights ...
        assert max_diff(expected, capture.weights[6]) > 1e-3  # ... and the prediction is not the last snapshot
        out_dir = tmp_path / "out" / f"relex-step{target}"
        loaded = AutoModelForCausalLM.from_pretrained(out_dir)
        state = {n: p for n, p in loaded.named_parameters()}
        assert_close_state(state, expected, atol=2e-5)
        if tie:
            assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        report = json.loads((out_dir / "relex_report.json").read_text())
        assert report["target_step"] == target
        assert report["observed_steps"] == [1, 2, 3, 4, 5, 6]
        assert report["horizon_ratio"] == pytest.approx(target / 6)
        assert report["settings"]["observe"] == 6
        assert report["buffer"]["bytes"] > 0
        assert report["format"] == "relex-report/2" and report["producer"] == "halt"
        assert set(report["tensors"]) == set(expected)
        for name, entry in report["tensors"].items():  # explained variance agrees with an independent SVD
            m = torch.stack([(capture.weights[s][name] - capture.weights[0][name]).reshape(-1) for s in range(1, 7)]).double()
            s_vals = torch.linalg.svdvals(m)
            ev = float(s_vals[0] ** 2 / (s_vals**2).sum()) if s_vals[0] > 0 else 0.0
            assert entry["explained_variance"] == pytest.approx(ev, abs=1e-6)
        assert (out_dir / "README.md").is_file()
        assert (out_dir / "tokenizer.json").is_file() and (out_dir / "generation_config.json").is_file()
    # the live model holds the last target's weights when train() returns
    live = {n: p for n, p in trainer.model.named_parameters()}
    assert_close_state(live, oracle(capture.weights, 0, list(range(1, 7)), 40), atol=2e-5)
    # metrics reached the trainer's log history
    assert any("relex/backtest_distance" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize(
    "options",
    [dict(rank=2), dict(fit="poly2"), dict(fit="power", power=0.5), dict(fit="power", power="auto"), dict(window=4),
     dict(shrink=0.5)],
    ids=["rank2", "poly2", "power0.5", "power-auto", "window4", "shrink0.5"],
)
def test_halt_options_end_to_end_match_the_oracle(tmp_path, tok, options):
    capture = CaptureWeights()
    relex = RelexCallback(observe=6, extrapolate_to=15, buffer_dtype="float32", save_model=False, **options)
    trainer = grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [capture, relex])
    trainer.train()
    assert trainer.state.global_step == 6
    weights, last = capture.weights, capture.weights[6]
    steps = list(range(1, 7))
    power = options.get("power")
    if power == "auto":
        power = relex.reports[15]["candidate"]["trend"]["power"]  # the exponent the backtest chose
        assert power > 0 and power != 1.0, power  # on this run a line is not the best backtest
    expected = oracle(weights, 0, steps[-options.get("window", 6):], 15, rank=options.get("rank", 1),
                      degree=2 if options.get("fit") == "poly2" else 1, power=power if options.get("fit") == "power" else None)
    if "shrink" in options:
        expected = {n: last[n].double() + options["shrink"] * (expected[n] - last[n].double()) for n in expected}
    live = {n: p for n, p in trainer.model.named_parameters()}
    assert_close_state(live, expected, atol=2e-5)
    plain = oracle(weights, 0, steps, 15)  # negative control: the option changed the prediction
    assert max_diff(expected, plain) > 1e-4, max_diff(expected, plain)
    assert max_diff(last, weights[0]) > 1e-3


def test_default_bf16_buffer_stays_within_bf16_rounding(tmp_path, tok):
    model = tiny_qwen2(tok and False, tokenizer=tok)
    capture = CaptureWeights()
    trainer = grpo_trainer(tmp_path, model, tok, [capture, RelexCallback(observe=6, extrapolate_to=12)])
    trainer.train()
    exact = oracle(capture.weights, 0, list(range(1, 7)), 12)
    rounded = oracle(capture.weights, 0, list(range(1, 7)), 12, round_to=torch.bfloat16)
    live = {n: p for n, p in trainer.model.named_parameters()}
    assert_close_state(live, rounded, atol=2e-5)  # same math on the bf16-stored deltas
    moved = max(float((exact[n] - capture.weights[0][n].double()).abs().max()) for n in exact)
    assert moved > 1e-3  # a run that did not move would pass both comparisons trivially
    assert_close_state(live, exact, atol=0.02 * moved)  # and close to the fp32 answer


def test_sparse_snapshots_and_start_step(tmp_path, tok):
    model = tiny_qwen2(tokenizer=tok)
    capture = CaptureWeights()
    relex = RelexCallback(observe=8, snapshot_every=2, start_step=2, extrapolate_to=30, buffer_dtype="float32")
    trainer = grpo_trainer(tmp_path, model, tok, [capture, relex])
    trainer.train()
    assert trainer.state.global_step == 10
    assert relex.buffer.steps == [4.0, 6.0, 8.0, 10.0]
    expected = oracle(capture.weights, 2, [4, 6, 8, 10], 30)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "relex-step30")
    assert_close_state(dict(loaded.named_parameters()), expected, atol=2e-5)
    # negative control: the official index axis (one checkpoint per step assumed) puts the target at
    # index T + (K - last step) = 4 + 20 and predicts a different model from the same snapshots
    relabeled = {0: capture.weights[2], 1: capture.weights[4], 2: capture.weights[6], 3: capture.weights[8], 4: capture.weights[10]}
    wrong = oracle(relabeled, 0, [1, 2, 3, 4], 24)
    assert max(float((wrong[n] - expected[n]).abs().max()) for n in expected) > 1e-3


def test_include_exclude_and_frozen_params(tmp_path, tok):
    model = tiny_qwen2(tokenizer=tok)
    frozen = "model.layers.0.mlp.up_proj.weight"  # matched by the include pattern, kept by the exclude pattern
    model.get_parameter(frozen).requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    relex = RelexCallback(observe=4, extrapolate_to=8, include=[r"layers\.0\."], exclude=[r"bias$"], save_model=False)
    trainer = grpo_trainer(tmp_path, model, tok, [relex])
    trainer.train()
    names = [t.name for t in relex.buffer.tracked]
    expected = [n for n, p in model.named_parameters()
                if p.requires_grad and re.search(r"layers\.0\.", n) and not re.search(r"bias$", n)]
    assert names == expected and len(names) >= 5
    assert frozen not in names and any(n.startswith("model.layers.0.mlp.") for n in names)
    assert any(n.endswith("bias") and "layers.0." in n for n, _ in model.named_parameters())  # the exclude did exclude
    live = dict(model.named_parameters())
    assert torch.equal(live[frozen], before[frozen])  # RELEX did not write the frozen tensor ...
    assert all(not torch.equal(live[n], before[n]) for n in names)  # ... while every tracked one moved
    assert not (tmp_path / "out" / "relex-step8").exists()


def test_existing_output_dir_is_refused_before_training(tmp_path, tok):
    target = tmp_path / "out" / "relex-step20"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("user data")
    model = tiny_qwen2(tokenizer=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = grpo_trainer(tmp_path, model, tok, [RelexCallback(observe=4, extrapolate_to=20)])
    with pytest.raises(FileExistsError, match=r"relex-step20' already exists and is not empty; pass overwrite=True"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert (target / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("own", [True, False])
def test_exported_config_keeps_the_models_own_use_cache(tmp_path, tok, own):
    """Trainer sets config.use_cache = args.use_cache (False) for training; relex-stepK/config.json must not keep it."""
    model = tiny_qwen2(tokenizer=tok)
    model.config.use_cache = own
    trainer = grpo_trainer(tmp_path, model, tok, [RelexCallback(observe=2, extrapolate_to=4)], max_steps=4)
    assert model.config.use_cache is False  # the premise: training runs with the cache off
    trainer.train()
    saved = json.loads((tmp_path / "out" / "relex-step4" / "config.json").read_text())
    assert saved["use_cache"] is own  # own=False is the control: a model without a cache stays without
    assert model.config.use_cache is False  # the live model is left as the trainer set it


PLOTS = {"explained_variance.png", "coefficients.png", "backtest.png"}


@pytest.mark.parametrize("matplotlib", [True, False])
def test_the_fit_plots_are_written_next_to_each_report(tmp_path, tok, monkeypatch, caplog, matplotlib):
    if matplotlib:
        image = pytest.importorskip("matplotlib.image")
    else:  # negative control: without matplotlib the models are written, the plots are not, and it says so
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    relex = RelexCallback(observe=4, extrapolate_to=[8, 12])
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [relex], max_steps=12).train()
    assert {8, 12} <= set(relex.written_dirs)  # (and the K_max model, written beside a target beyond it)
    for directory in relex.written_dirs.values():
        written = {p.name for p in directory.glob("*.png")}
        assert (directory / "relex_report.json").is_file()
        if not matplotlib:
            assert written == set()
            continue
        assert written == PLOTS
        for name in PLOTS:
            pixels = image.imread(directory / name)
            assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0
            assert (directory / name).read_bytes() == (relex.written_dirs[8] / name).read_bytes()  # one fit, one drawing
    assert ("matplotlib is not installed" in caplog.text) is (not matplotlib)


def test_window_longer_than_max_steps_is_refused(tmp_path, tok):
    trainer = grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [RelexCallback(observe=8, extrapolate_to=20)], max_steps=5)
    with pytest.raises(ValueError, match=r"^max_steps=5 ends before the RELEX observation window, which needs step 8"):
        trainer.train()


def test_buffer_budget_is_checked_before_training(tmp_path, tok):
    relex = RelexCallback(observe=10, extrapolate_to=20, buffer_dtype="float32", buffer_max_bytes=3_000_000)
    trainer = grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [relex])
    with pytest.raises(MemoryError, match=r"needs .* but the host budget is 2\.9 MiB .* Use settings that fit: buffer_dtype='bfloat16'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_buffer_budget_message_without_fitting_settings(tmp_path, tok):
    relex = RelexCallback(observe=10, extrapolate_to=20, buffer_max_bytes=1000)
    trainer = grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [relex])
    with pytest.raises(MemoryError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "settings that fit" not in message and " also " not in message  # nothing to refer back to
    assert message.endswith("(buffer_max_bytes=1000). Use fewer tracked tensors (include/exclude); or a larger buffer_max_bytes.")
    assert trainer.state.global_step == 0


def test_non_finite_deltas_leave_weights_and_disk_untouched(tmp_path, tok):
    model = tiny_qwen2(tokenizer=tok)
    name = "model.layers.1.mlp.up_proj.weight"
    poison = PoisonAt(6, name)
    trainer = grpo_trainer(tmp_path, model, tok, [poison, RelexCallback(observe=6, extrapolate_to=20)])
    with pytest.raises(FloatingPointError, match=rf"non-finite deltas in \['{name}'\]"):
        trainer.train()
    assert not (tmp_path / "out" / "relex-step20").exists()
    assert not any(p.name.startswith(".relex") for p in (tmp_path / "out").iterdir())
    live = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert all(torch.equal(live[n], poison.weights[n]) for n in live if n != name)
    assert torch.equal(live[name].nan_to_num(), poison.weights[name].nan_to_num())


def test_crash_while_writing_leaves_no_complete_looking_directory(tmp_path, tok, monkeypatch):
    model = tiny_qwen2(tokenizer=tok)
    trainer = grpo_trainer(tmp_path, model, tok, [RelexCallback(observe=4, extrapolate_to=[10, 20])])
    calls = {"n": 0}
    original = type(model).save_pretrained

    def crash_on_second(self, *args, **kwargs):
        calls["n"] += 1
        original(self, *args, **kwargs)
        if calls["n"] == 2:
            raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    out = tmp_path / "out"
    written = sorted(p.name for p in out.iterdir() if p.name.startswith("relex-step"))
    # the first directory (the supported-horizon model beside the far targets, or step 10) completed; the second
    # crashed mid-write and is absent, and so is the third
    assert len(written) == 1 and (out / written[0] / "relex_report.json").is_file(), written
    assert not (out / "relex-step20").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".relex-step")]


# -- resume -------------------------------------------------------------------------------------------------


def test_resume_inside_the_window_gives_the_uninterrupted_result(tmp_path, tok):
    config = dict(observe=10, extrapolate_to=40, save_model=False, buffer_dtype="float32")
    straight = lm_trainer(tmp_path / "a", tok, [RelexCallback(**config)])
    straight.train()
    reference = {n: p.detach().clone() for n, p in straight.model.named_parameters()}

    first = lm_trainer(tmp_path / "b", tok, [RelexCallback(**config), StopAt(4)])
    first.train()
    assert (tmp_path / "b" / "checkpoint-4" / STATE_FILE_NAME).is_file()
    resumed = lm_trainer(tmp_path / "b", tok, [RelexCallback(**config)])
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    assert resumed.state.global_step == 10
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param.detach(), reference[name], rtol=0, atol=1e-6)

    # negative control: without the saved buffer θ_0 is lost; a clear refusal, and with start_step moved a different model
    first = lm_trainer(tmp_path / "c", tok, [RelexCallback(**config), StopAt(4)])
    first.train()
    os.remove(tmp_path / "c" / "checkpoint-4" / STATE_FILE_NAME)
    with pytest.raises(ValueError, match="records a RELEX state of 4 snapshots, but it is not in .*set start_step=4"):
        lm_trainer(tmp_path / "c", tok, [RelexCallback(**config)]).train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-4"))
    lost = lm_trainer(tmp_path / "c", tok, [RelexCallback(**config, start_step=4)])
    lost.train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-4"))
    assert lost.state.global_step == 14
    assert any(not torch.allclose(p.detach(), reference[n], atol=1e-4) for n, p in lost.model.named_parameters())
