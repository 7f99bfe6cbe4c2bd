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
    assert resumed.engine.checkpoint_rows.directory == (tmp_path / "b" / "relex-rows").resolve()
    assert written.keys() == expected.keys() and all(torch.equal(written[n], expected[n]) for n in expected)
