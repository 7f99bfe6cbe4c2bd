"""`StepDriver`, the step-number adapter verl uses, on a real config-built model in one process.

The weights follow a known straight line θ_t = θ_0 + t·d (written into the live model, no optimizer), so the
RELEX prediction at step K is θ_0 + K·d exactly; a probe with a known best candidate checks the halt-mode pick.
"""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from relex_callback import RelexConfig
from relex_callback.trainers.steps import StepDriver

try:
    from tests._tiny import tiny_qwen2
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from _tiny import tiny_qwen2

OBSERVE, TARGETS, BEST = 4, [8, 16, 40], 16


def _line(base: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    return {n: base[n] + step * direction[n] for n in base}


def test_halt_writes_every_target_on_the_line_and_reports_the_probe_pick_without_loading_it(tmp_path):
    model = tiny_qwen2()
    generator = torch.Generator().manual_seed(1)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    direction = {n: 1e-3 * torch.randn(p.shape, generator=generator) for n, p in base.items()}
    best = _line(base, direction, BEST)

    def probe(live):  # higher when the weights are nearer the step-16 point of the line
        return -sum(float((p.detach() - best[n]).norm()) for n, p in live.named_parameters())

    driver = StepDriver(RelexConfig(observe=OBSERVE, extrapolate_to=TARGETS, buffer_dtype="float32"), probe=probe)
    driver.begin(model, 0, tmp_path)
    outcomes = []
    for step in range(1, OBSERVE + 1):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(_line(base, direction, step)[name])
        outcomes.append(driver.after_step(step))
    driver.close()

    assert [o.halted for o in outcomes] == [False] * (OBSERVE - 1) + [True] and driver.halted
    trained = _line(base, direction, OBSERVE)
    assert all(torch.equal(p.detach(), trained[n]) for n, p in model.named_parameters())  # files only
    assert outcomes[-1].written == [str(tmp_path / f"relex-step{k}") for k in TARGETS]
    for target in TARGETS:
        directory = tmp_path / f"relex-step{target}"
        written = load_file(str(directory / "model.safetensors"))
        expected = _line(base, direction, target)
        assert max(float((written[n] - expected[n]).abs().max()) for n in expected) < 1e-4, target
        assert max(float((written[n] - trained[n]).abs().max()) for n in expected) > 1e-3  # moved past θ_N
        probe_section = json.loads((directory / "relex_report.json").read_text())["probe"]
        card = (directory / "README.md").read_text()
        assert probe_section["chosen"] is (target == BEST) and probe_section["loaded_into_live_model"] is False
        expected_line = ("The probe chose this model (the trainer's live weights were left as trained)."
                         if target == BEST else "The probe did not choose this model.")
        assert expected_line in card
    assert outcomes[-1].metrics["relex/probe_step16"] > outcomes[-1].metrics["relex/probe_current"]


def test_resume_without_saved_state_restarts_the_window_from_the_current_weights(tmp_path, caplog):
    model = tiny_qwen2()
    generator = torch.Generator().manual_seed(2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    direction = {n: 1e-3 * torch.randn(p.shape, generator=generator) for n, p in base.items()}

    def move_to(step):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(_line(base, direction, step)[name])

    move_to(2)  # the run resumes at step 2 from a checkpoint folder without RELEX state
    (tmp_path / "checkpoint-2").mkdir()
    driver = StepDriver(RelexConfig(observe=OBSERVE, extrapolate_to=[16], buffer_dtype="float32"))
    with caplog.at_level("WARNING", logger="relex_callback"):
        driver.begin(model, 2, tmp_path, resume_dir=tmp_path / "checkpoint-2")
    assert "θ_0 is lost" in caplog.text and driver.config.start_step == 2
    at_two = _line(base, direction, 2)
    assert all(torch.equal(driver.engine.buffer.theta0[n].view_as(at_two[n]), at_two[n]) for n in at_two)
    for step in range(3, 2 + OBSERVE + 1):
        move_to(step)
        outcome = driver.after_step(step)
    driver.close()
    assert outcome.halted and driver.engine.buffer.steps == [3.0, 4.0, 5.0, 6.0]  # the window moved with start_step
    written = load_file(str(tmp_path / "relex-step16" / "model.safetensors"))
    expected = _line(base, direction, 16)  # still on the line: a straight path from any origin
    assert max(float((written[n] - expected[n]).abs().max()) for n in expected) < 1e-4


def test_verl_layout_checkpoints_reference_rows_written_once_and_resume_bit_exact(tmp_path):
    """verl saves each window into ``global_step_N/relex/``: the rows go once into ``{output_root}/relex-rows``
    (not into each checkpoint), and a fresh driver resumed from ``global_step_2/relex`` writes the same model."""
    generator = torch.Generator().manual_seed(3)
    model = tiny_qwen2()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    direction = {n: 1e-3 * torch.randn(p.shape, generator=generator) for n, p in base.items()}
    config = RelexConfig(observe=OBSERVE, extrapolate_to=[16], buffer_dtype="float32")

    def run(root, first_step, resume_dir=None):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(_line(base, direction, first_step)[name])
        driver = StepDriver(config)
        driver.begin(model, first_step, root, resume_dir=resume_dir)
        for step in range(first_step + 1, OBSERVE + 1):
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(_line(base, direction, step)[name])
            driver.after_step(step)
            driver.save(root / f"global_step_{step}" / "relex")
        driver.close()
        return driver, load_file(str(root / "relex-step16" / "model.safetensors"))

    driver, expected = run(tmp_path / "a", 0)
    states = list((tmp_path / "a").glob("global_step_*/relex/relex_state.safetensors"))
    rows = list((tmp_path / "a" / "relex-rows").iterdir())
    assert len(states) == OBSERVE and all(p.stat().st_size < 20_000 for p in states)
    total = sum(p.stat().st_size for p in states + rows)
    assert driver.engine.buffer.nbytes <= total <= 1.5 * driver.engine.buffer.nbytes  # format 1: θ_0 and every row so far, each time
    (tmp_path / "b").mkdir()
    for name in ("global_step_2", "relex-rows"):  # a run moved elsewhere: its row file is found beside the checkpoint
        shutil.copytree(tmp_path / "a" / name, tmp_path / "b" / name)
    resumed, written = run(tmp_path / "b", 2, resume_dir=tmp_path / "b" / "global_step_2" / "relex")
    assert resumed.engine.buffer.rows_file.directory == (tmp_path / "b" / "relex-rows").resolve()
    assert written.keys() == expected.keys() and all(torch.equal(written[n], expected[n]) for n in expected)


# -- every feature of the window in this adapter too ---------------------------------------------------------


def _drive(driver: StepDriver, model, base, direction, steps) -> list:
    outcomes = []
    for step in steps:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in base:
                    param.copy_(_line(base, direction, step)[name])
        outcomes.append(driver.after_step(step))
    return outcomes


def _trainable_line(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return base, {n: 1e-3 * torch.randn(p.shape, generator=generator) for n, p in base.items()}


class EvenStepsOnly(StepDriver):
    def should_snapshot(self, step: int) -> bool:
        return super().should_snapshot(step) and step % 2 == 0


def test_an_overridden_should_snapshot_decides_in_halt_and_in_jump_mode(tmp_path):
    settings = dict(observe=4, extrapolate_to=8, buffer_dtype="float32")
    for driver_class, expected in ((StepDriver, [1, 2, 3, 4]), (EvenStepsOnly, [2, 4])):  # default: negative control
        model = tiny_qwen2()
        base, direction = _trainable_line(model, 3)
        driver = driver_class(RelexConfig(**settings))
        driver.begin(model, 0, tmp_path / driver_class.__name__ / "halt")
        outcomes = _drive(driver, model, base, direction, range(1, 5))
        assert driver.engine.buffer.steps == expected and outcomes[-1].halted
    jump = dict(mode="jump", observe=4, jump_every=4, jump_horizon=4, auto_horizon=False, max_snapshots=16,
                buffer_dtype="float32")
    for driver_class, expected in ((StepDriver, [1, 2, 3, 4, 9, 10, 11, 12]), (EvenStepsOnly, [2, 4, 10, 12])):
        model = tiny_qwen2()
        base, direction = _trainable_line(model, 4)
        driver = driver_class(RelexConfig(**jump))
        driver.begin(model, 0, tmp_path / driver_class.__name__ / "jump")
        outcomes = _drive(driver, model, base, direction, range(1, 9))
        # virtual steps: the jump at step 4 (recorded whatever the schedule says) moves them 4 ahead
        assert [o.jump["status"] for o in outcomes if o.jump] == ["accepted", "accepted"]
        assert driver.engine.buffer.steps == expected, driver_class.__name__


def test_existing_output_is_refused_before_theta0_is_captured(tmp_path):
    (tmp_path / "relex-step8").mkdir()
    (tmp_path / "relex-step8" / "model.safetensors").write_bytes(b"earlier run")
    driver = StepDriver(RelexConfig(observe=4, extrapolate_to=8))
    try:
        driver.begin(tiny_qwen2(), 0, tmp_path)
    except FileExistsError as error:
        assert "overwrite" in str(error)
    else:
        raise AssertionError("an existing relex-step8 was not refused")
    assert not driver.engine.ready and (tmp_path / "relex-step8" / "model.safetensors").read_bytes() == b"earlier run"
    StepDriver(RelexConfig(observe=4, extrapolate_to=8, overwrite=True)).begin(tiny_qwen2(), 0, tmp_path)  # allowed


def test_halt_writes_the_merged_lora_model_and_the_plots_through_the_driver(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_qwen2(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], lora_dropout=0.0))
    base, direction = _trainable_line(model, 5)
    assert base and all("lora_" in n for n in base)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    driver = StepDriver(RelexConfig(observe=4, extrapolate_to=12, buffer_dtype="float32", merge_lora=True))
    driver.begin(model, 0, tmp_path)
    assert _drive(driver, model, base, direction, range(1, 5))[-1].halted
    predicted = _line(base, direction, 12)  # the exact line at K = 12, an independent prediction of the factors
    merged = load_file(str(tmp_path / "relex-step12-merged" / "model.safetensors"))
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        lora_term = 4.0 * predicted[f"{prefix}.lora_B.default.weight"] @ predicted[f"{prefix}.lora_A.default.weight"]
        want = frozen[f"{prefix}.base_layer.weight"] + lora_term
        assert float((merged[f"model.layers.{layer}.self_attn.q_proj.weight"] - want).abs().max()) < 1e-5
        assert float(lora_term.abs().max()) > 1e-6  # the merge moved the weight (negative control)
    for directory in ("relex-step12", "relex-step12-merged"):
        report = json.loads((tmp_path / directory / "relex_report.json").read_text())
        assert report["target_step"] == 12
    assert (tmp_path / "relex-step12" / "coefficients.png").stat().st_size > 1000
    assert (tmp_path / "relex-step12" / "explained_variance.png").is_file()
