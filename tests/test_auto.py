"""The window diagnostic in halt mode and ``extrapolate_to="auto"``, end to end with the real TRL GRPOTrainer and
transformers Trainer on tiny models. Written weights are checked against independent computations from weights
captured by a separate callback."""

import json
import logging
import math

import pytest
from transformers import AutoModelForCausalLM, TrainerCallback

from _builders import assert_close_state, grpo_trainer
from _oracle import CaptureWeights, oracle, oracle_k_max
from _tiny import lm_trainer, tiny_qwen2
from relex_callback import RelexCallback


def loaded_state(path):
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


def test_auto_writes_the_line_at_the_supported_horizon(tmp_path, tok):
    capture = CaptureWeights()
    # backtest_tolerance 0.5: at the default 0.75 this window supports the whole 20x cap, which would not test K_max
    relex = RelexCallback(observe=8, extrapolate_to="auto", buffer_dtype="float32", backtest_tolerance=0.5)
    trainer = lm_trainer(tmp_path, tok, [capture, relex])  # full-batch-like LM training: a smooth trajectory
    trainer.train()

    diagnostic = relex.diagnostic
    # K_max recomputed from its definition on the captured weights (tests/_oracle.py, no relex_callback code)
    k, curve = oracle_k_max(capture.weights, 0, list(range(1, 9)), tolerance=0.5, with_curve=True)
    assert 8 < k < 160, curve  # this run supports extrapolation, short of the 20x cap (else K_max would not be tested)
    assert diagnostic.k_max == k and list(relex.written_dirs) == [k]
    report = json.loads((relex.written_dirs[k] / "relex_report.json").read_text())
    assert report["target_step"] == k and report["targets"] == "auto"
    assert report["diagnostic"]["k_max"] == k and report["diagnostic"]["tolerance"] == 0.5
    reported = report["diagnostic"]["distance_curve"]  # the curve K_max was read from, against the recomputed one
    assert sorted(reported) == sorted(f"{r:.4g}" for r in curve)
    for r, distance in curve.items():
        assert reported[f"{r:.4g}"] == pytest.approx(distance, rel=1e-4, abs=1e-7), r
    # negative control: the recomputation tells tolerances apart, so a horizon read at another one would fail
    assert oracle_k_max(capture.weights, 0, list(range(1, 9)), tolerance=0.4) < k
    expected = oracle(capture.weights, 0, list(range(1, 9)), k)
    assert_close_state(loaded_state(relex.written_dirs[k]), expected, atol=2e-5)
    assert_close_state(dict(trainer.model.named_parameters()), expected, atol=2e-5)  # and the live model holds it
    logged = {k2: v for h in trainer.state.log_history for k2, v in h.items()}
    assert math.floor(logged["relex/supported_step"] + 1e-9) == k
    assert "relex/growth_exponent" in logged and "relex/direction_stability" in logged


def test_auto_on_a_window_that_never_moved_writes_the_observed_weights(tmp_path, tok, caplog):
    capture = CaptureWeights()
    relex = RelexCallback(observe=8, extrapolate_to="auto", buffer_dtype="float32")
    trainer = lm_trainer(tmp_path, tok, [capture, relex])
    trainer.args.learning_rate = 0.0  # no step moves the weights
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        trainer.train()
    assert relex.diagnostic.supported_ratio == 1.0 and relex.diagnostic.distinct_snapshots == 0
    assert list(relex.written_dirs) == [8]
    report = json.loads((relex.written_dirs[8] / "relex_report.json").read_text())
    assert report["candidate"]["trend"]["kind"] == "observed"
    assert any("distinct snapshot" in w for w in report["warnings"])
    assert "supports no extrapolation" in caplog.text and "distinct snapshot" in caplog.text
    assert_close_state(loaded_state(relex.written_dirs[8]), capture.weights[8], atol=0.0)


def test_a_target_beyond_the_supported_horizon_warns_and_writes_the_horizon_model_beside_it(tmp_path, tok, caplog):
    capture = CaptureWeights()
    relex = RelexCallback(observe=6, extrapolate_to=[120], buffer_dtype="float32")
    trainer = grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [capture, relex])
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        trainer.train()
    k, curve = oracle_k_max(capture.weights, 0, list(range(1, 7)), with_curve=True)  # from the definition
    assert 6 < k < 120 and relex.diagnostic.k_max == k, relex.diagnostic.as_dict()
    assert list(relex.diagnostic.distance_curve.values()) == pytest.approx(list(curve.values()), rel=1e-4, abs=1e-7)
    assert "target step 120 is beyond the supported horizon" in caplog.text
    assert sorted(relex.written_dirs) == [k, 120]
    far = json.loads((relex.written_dirs[120] / "relex_report.json").read_text())
    assert any("beyond the supported horizon" in w for w in far["warnings"])
    near = json.loads((relex.written_dirs[k] / "relex_report.json").read_text())
    assert not any("beyond the supported horizon" in w for w in near["warnings"])
    assert_close_state(loaded_state(relex.written_dirs[k]), oracle(capture.weights, 0, list(range(1, 7)), k), atol=2e-5)
    # without a probe the live model holds the user's target, not the horizon model
    assert_close_state(dict(trainer.model.named_parameters()), oracle(capture.weights, 0, list(range(1, 7)), 120), atol=1e-4)


@pytest.mark.parametrize("prefer", ["theta0", "far"])
def test_model_cards_show_the_probe_scores_and_every_warning(tmp_path, tok, prefer):
    """A user who opens relex-stepK/ alone sees from its README how it scored and whether it lost."""
    capture = CaptureWeights()
    sign = -1.0 if prefer == "theta0" else 1.0  # θ_0: the trained weights beat any extrapolation; far: step 120 wins

    def probe(model):
        return sign * float(sum((p.detach().float() - capture.weights[0][n]).norm() for n, p in model.named_parameters()))

    relex = RelexCallback(observe=6, extrapolate_to=[120], buffer_dtype="float32", probe=probe)
    grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [capture, relex]).train()
    k = oracle_k_max(capture.weights, 0, list(range(1, 7)))
    assert sorted(relex.written_dirs) == [k, 120]
    current = relex.probe_scores["current"]
    for target, directory in relex.written_dirs.items():
        report = json.loads((directory / "relex_report.json").read_text())
        card = (directory / "README.md").read_text()
        score = report["probe"]["score"]
        assert f"Probe score (higher is better): {score:.4f}; the trained weights of step 6 scored {current:.4f}." in card
        assert all(f"{t}: {v:.4f}" in card for t, v in report["probe"]["scores_by_target"].items())
        assert report["warnings"] and all(f"**Warning:** {w}" in card for w in report["warnings"])
        assert ("beyond the supported horizon" in card) is (target == 120)
        assert f"K_max = step {report['diagnostic']['k_max']} " in card
        lost = score < current
        assert lost is (prefer == "theta0")  # the probes were built to give these outcomes
        assert ("it lost" in card) is lost
        pick = ("The probe chose this model and it was loaded into the trained model." if target == relex.loaded_target
                else "The probe did not choose this model.")
        assert pick in card
    assert relex.loaded_target == (None if prefer == "theta0" else 120)


def distance_probe(goal):
    """A probe with a known best: minus the squared distance to ``goal()`` (a dict of weights)."""
    def probe(model):
        return -sum(float((p.detach().float() - goal()[n]).pow(2).sum()) for n, p in model.named_parameters())
    return probe


class SetGoal(TrainerCallback):
    """At step ``step``, sets ``self.goal`` to the oracle line prediction of ``target`` from the captured window."""

    def __init__(self, capture, step, target):
        self.capture, self.step, self.target, self.goal = capture, step, target, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.goal = {n: w.detach().clone() for n, w in
                         oracle(self.capture.weights, 0, list(range(1, self.step + 1)), self.target).items()}


def test_auto_with_a_probe_climbs_past_k_max_to_the_probe_best(tmp_path, tok):
    """The reward-guided horizon: the probe prefers the line at 6N; K_max is below it; the search finds it, loads
    it and keeps the trained step-N weights in checkpoint-N."""
    capture = CaptureWeights()
    goal = SetGoal(capture, 6, 36)
    relex = RelexCallback(observe=6, extrapolate_to="auto", buffer_dtype="float32", probe=distance_probe(lambda: goal.goal))
    trainer = grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [capture, goal, relex])
    trainer.train()

    k_max = oracle_k_max(capture.weights, 0, list(range(1, 7)))
    assert 6 < k_max < 36 and relex.diagnostic.k_max == k_max, relex.diagnostic.as_dict()  # the search must go beyond K_max
    assert relex.loaded_target == 36 and list(relex.written_dirs) == [36]
    expected = oracle(capture.weights, 0, list(range(1, 7)), 36)
    assert_close_state(loaded_state(relex.written_dirs[36]), expected, atol=2e-5)
    assert_close_state(dict(trainer.model.named_parameters()), expected, atol=2e-5)
    search = json.loads((relex.written_dirs[36] / "relex_report.json").read_text())["search"]
    assert search == relex.search and search["ladder"][-1] == 60  # max_horizon defaults to 10N
    trend = [c["target_step"] for c in search["calls"] if c["family"] == "trend"]
    assert trend[: trend.index(36) + 2] == trend and trend[-1] > 36  # climbed to 36, stopped at the next rung
    assert search["chosen"]["family"] == "trend" and search["probe_calls"] == len(search["calls"]) + 1
    assert all(c["step_equivalents"] is not None and c["seconds"] >= 0 for c in search["calls"])
    card = (relex.written_dirs[36] / "README.md").read_text()
    assert "Horizon search" in card and "chose trend at step 36" in card and f"K_max = step {k_max} " in card
    # the trained weights of step 6 are kept as the Trainer's own checkpoint-6 (save_strategy="no" here)
    kept = loaded_state(tmp_path / "out" / "checkpoint-6")
    assert_close_state(kept, capture.weights[6], atol=0.0)
    assert "checkpoint-6" in card


def test_auto_search_respects_max_horizon_and_a_margin(tmp_path, tok):
    capture = CaptureWeights()
    goal = SetGoal(capture, 6, 36)
    relex = RelexCallback(observe=6, extrapolate_to="auto", buffer_dtype="float32", max_horizon=24, probe_margin=0.0,
                          candidates=["trend"], probe=distance_probe(lambda: goal.goal))
    grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [capture, goal, relex]).train()
    assert relex.loaded_target == 24  # the cap, nearest to the probe's best at 36
    assert [c["target_step"] for c in relex.search["calls"]][-1] == 24 and relex.search["margin"] == 0.0
    assert {c["family"] for c in relex.search["calls"]} == {"trend"}


@pytest.mark.parametrize("bad", ["raise", "nan"])
def test_a_probe_failing_during_the_search_keeps_the_trained_weights(tmp_path, tok, bad):
    capture = CaptureWeights()
    calls = []

    def probe(model):
        calls.append(1)
        if len(calls) == 3:
            if bad == "raise":
                raise RuntimeError("reward server down")
            return math.nan
        return float(len(calls))  # each call better than the last: the search would climb on

    relex = RelexCallback(observe=6, extrapolate_to="auto", buffer_dtype="float32", probe=probe)
    trainer = grpo_trainer(tmp_path, tiny_qwen2(tokenizer=tok), tok, [capture, relex])
    trainer.train()
    assert relex.loaded_target is None and list(relex.written_dirs) == [6]
    assert_close_state(dict(trainer.model.named_parameters()), capture.weights[6], atol=0.0)  # bit for bit
    report = json.loads((relex.written_dirs[6] / "relex_report.json").read_text())
    assert report["candidate"]["trend"]["kind"] == "observed"
    assert ("reward server down" if bad == "raise" else "nan") in report["search"]["failure"]
    card = (relex.written_dirs[6] / "README.md").read_text()
    assert "the horizon search stopped because" in card and "These are the trained weights of step 6" in card


def test_relex_lines_are_silent_by_default_visible_with_the_switch_and_not_doubled():
    """A library's lines reach the application's handlers only (NullHandler); enable_logging() or RELEX_VERBOSITY
    prints them as [relex] lines until the application configures logging, then only its handler prints them."""
    import os
    import subprocess
    import sys

    lines = (
        "logging.getLogger('relex_callback.engine').warning('beyond K_max')\n"
        "logging.getLogger('relex_callback.engine').info('K_max = 15')\n"
        "logging.basicConfig(level=logging.INFO, format='app %(message)s')\n"
        "logging.getLogger('relex_callback.engine').warning('configured')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RELEX_VERBOSITY"}

    def stderr(prefix, extra_env=None):
        code = "import logging, relex_callback\n" + prefix + lines
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**env, **(extra_env or {})}).stderr

    silent = stderr("")  # negative control: nothing before the application configures logging
    assert "K_max" not in silent and "[relex]" not in silent and silent.count("configured") == 1
    err = stderr("relex_callback.enable_logging()\n")
    assert "[relex] WARNING beyond K_max" in err and "[relex] INFO K_max = 15" in err
    assert err.count("configured") == 1 and "app configured" in err  # the application's handler only
    quiet = stderr("", {"RELEX_VERBOSITY": "warning"})
    assert "K_max = 15" not in quiet and "[relex] WARNING beyond K_max" in quiet
    with pytest.raises(ValueError, match="level='loud' is not a logging level"):
        __import__("relex_callback").enable_logging("loud")
