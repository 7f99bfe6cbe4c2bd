"""Jump mode end to end with the real TRL GRPOTrainer and transformers Trainer on tiny real models (no mocks).

Every jump is checked against an independent computation from weights captured by separate callbacks in the
same run (torch.linalg.svd of the stacked deltas, an OLS line on the virtual steps, θ_0 + ĉ·v).
"""

import json
import logging
import math
import os
import re

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from trl import GRPOConfig, GRPOTrainer

from _builders import LR, LinearPath, Regress, linear_trainer, on_line, regression_data
from _oracle import CaptureWeights, PoisonAt, max_diff, oracle
from _tiny import tiny_qwen2
from relex_callback import RelexCallback, RelexConfig
from relex_callback.engine import RelexEngine
from relex_callback.math.core import gram_matrix, select_power
from relex_callback.engine.jump import JUMP_LOG_NAME, generation_period, reset_optimizer_state


# -- independent observers --------------------------------------------------------------------------------------


def Observe(with_optimizer=False):
    """Weights right after each optimizer step (``pre``) and after the RelexCallback's on_step_end (``post``: list
    it after the RelexCallback; the callback no longer reorders the trainer's callbacks)."""
    return CaptureWeights(pre=True, with_optimizer=with_optimizer, dtype=None)


def oracle_jump(pre, base_step, steps, virtual, target):
    """θ_0 + ĉ(target)·v per tensor: SVD of the stacked deltas, OLS line of c on the virtual steps."""
    return oracle(pre, base_step, steps, target, x=virtual)


def checksum(model):
    return sum(float(p.detach().double().sum()) * (i + 1) for i, p in enumerate(model.parameters()))


# -- tiny GRPO set-up -----------------------------------------------------------------------------------------


def grpo(tmp_path, tok, callbacks, max_steps, reward=None, model=None, **overrides):
    model = model or tiny_qwen2(tokenizer=tok)
    model.train()
    prompts = Dataset.from_dict({"prompt": [f"{a} + {b} =" for a in range(10) for b in range(10)]})

    def length_reward(completions, **kwargs):
        return [min(len(c), 12) / 12 for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=max_steps, learning_rate=2e-3, lr_scheduler_type="constant", use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        **overrides,
    )
    funcs = [length_reward] + ([reward] if reward is not None else [])
    return GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=prompts, processing_class=tok, callbacks=callbacks)


def test_grpo_jumps_at_the_configured_steps_to_the_independent_prediction(tmp_path, tok):
    generations = []  # (global_step, checksum of the live weights) at every generation

    def spy_reward(completions, trainer_state=None, **kwargs):
        generations.append((trainer_state.global_step, checksum(model)))
        return [0.0] * len(completions)

    model = tiny_qwen2(tokenizer=tok)
    observe = Observe()
    relex = RelexCallback(
        mode="jump", observe=4, jump_every=3, jump_horizon=2, buffer_dtype="float32", max_snapshots=32, auto_horizon=False
    )
    trainer = grpo(tmp_path, tok, [relex, observe], max_steps=11, reward=spy_reward, model=model)
    trainer.train()

    history = relex.jump.history
    assert [r["step"] for r in history] == [4, 7, 10]
    assert all(r["status"] == "accepted" and r["horizon"] == 2 for r in history)
    assert [r["virtual_step"] for r in history] == [4, 9, 14]
    assert relex.jump.offset == 6 and relex.jump.virtual_step(11) == 17
    logged = [json.loads(line) for line in (tmp_path / "out" / JUMP_LOG_NAME).read_text().splitlines()]
    assert [(r["step"], r["virtual_step_after"]) for r in logged] == [(4, 6), (7, 11), (10, 16)]
    assert any(e.get("relex/jump_step") == 7.0 and e.get("relex/virtual_step") == 11.0 for e in trainer.state.log_history)
    assert [e["relex/virtual_step"] for e in observe.logs if "loss" in e] == [1, 2, 3, 6, 7, 8, 11, 12, 13, 16, 17]

    # the live weights right after each jump equal the independent prediction on the virtual axis
    offset_at = lambda s: sum(r["horizon"] for r in history if r["step"] < s)  # noqa: E731
    for record in history:
        s = record["step"]
        steps = list(range(1, s + 1))
        virtual = [t + offset_at(t) for t in steps]
        expected = oracle_jump(observe.pre, 0, steps, virtual, virtual[-1] + 2)
        assert max_diff(observe.post[s], expected) < 2e-5, s
        assert max_diff(observe.post[s], observe.pre[s]) > 1e-3  # a real move
    for s in (5, 6, 8):  # no jump: untouched
        assert all(torch.equal(observe.post[s][n], observe.pre[s][n]) for n in observe.pre[s])

    # the next generation after each jump (TRL's own generation) used the jumped weights; global_step had changed
    # since the previous generation, which is TRL's vLLM re-sync condition (global_step != _last_loaded_step)
    by_step = dict(generations)
    assert [g for g, _ in generations] == list(range(11))
    for s in (4, 7, 10):
        assert by_step[s] == checksum_of(observe.post[s], model)
        assert by_step[s] != checksum_of(observe.pre[s], model)


def checksum_of(weights, model):
    names = [n for n, _ in model.named_parameters()]
    return sum(float(weights[n].double().sum()) * (i + 1) for i, n in enumerate(names))


def test_grpo_jump_waits_for_the_generation_boundary_and_bad_periods_are_refused(tmp_path, tok):
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, steps_per_generation=2,
                      use_cpu=True, bf16=False, report_to=[])
    assert generation_period(args) == 2
    assert generation_period(TrainingArguments(output_dir=str(tmp_path), report_to=[])) == 1
    with pytest.raises(ValueError, match=r"jump_every=3 is not a multiple of the trainer's generation period of 2 .* Use jump_every="):
        grpo(tmp_path, tok, [RelexCallback(mode="jump", observe=4, jump_every=3)], max_steps=8, steps_per_generation=2).train()
    with pytest.raises(ValueError, match=r"first jump at step 3 .* is not a generation boundary .* Use observe=4\."):
        grpo(tmp_path, tok, [RelexCallback(mode="jump", observe=3, jump_every=2)], max_steps=8, steps_per_generation=2).train()

    generations = []

    def spy_reward(completions, trainer_state=None, **kwargs):
        generations.append((trainer_state.global_step, checksum(model)))
        return [0.0] * len(completions)

    model = tiny_qwen2(tokenizer=tok)
    observe = Observe()
    relex = RelexCallback(mode="jump", observe=4, jump_every=2, jump_horizon=2, buffer_dtype="float32", auto_horizon=False)
    grpo(tmp_path, tok, [relex, observe], max_steps=8, reward=spy_reward, model=model, steps_per_generation=2).train()
    assert [r["step"] for r in relex.jump.history] == [4, 6, 8]
    assert [g for g, _ in generations] == [0, 2, 4, 6]  # one generation every 2 optimizer steps
    for s in (4, 6):
        assert dict(generations)[s] == checksum_of(observe.post[s], model)


def test_probe_rejection_restores_the_exact_weights_and_shrinks_the_horizon(tmp_path, tok):
    calls = []

    def worse_after_jump(model):  # before: 1.0, after: 0.0
        calls.append(model.training)
        return 1.0 if len(calls) % 2 else 0.0

    observe = Observe()
    relex = RelexCallback(mode="jump", observe=3, jump_every=2, jump_horizon=4, probe=worse_after_jump, auto_horizon=False)
    grpo(tmp_path, tok, [relex, observe], max_steps=7).train()
    history = relex.jump.history
    assert [r["step"] for r in history] == [3, 5, 7]
    assert [r["status"] for r in history] == ["rejected"] * 3
    assert [r["horizon"] for r in history] == [4, 2, 1]
    assert [(r["probe_before"], r["probe_after"]) for r in history] == [(1.0, 0.0)] * 3
    assert relex.jump.offset == 0 and relex.jump.next_horizon == 1
    for s in (3, 5, 7):
        assert all(torch.equal(observe.post[s][n], observe.pre[s][n]) for n in observe.pre[s]), s
    assert len(calls) == 6

    # a tolerant probe accepts the same drop
    relex = RelexCallback(mode="jump", observe=3, jump_every=2, jump_horizon=4, probe=worse_after_jump,
                          probe_tolerance=1.5, auto_horizon=False)
    grpo(tmp_path / "b", tok, [relex], max_steps=3).train()
    assert [r["status"] for r in relex.jump.history] == ["accepted"]
    assert relex.jump.offset == 4


def test_backtest_cap_skips_a_jump_it_does_not_support(tmp_path, tok):
    observe = Observe()
    relex = RelexCallback(mode="jump", observe=4, jump_every=2, jump_horizon=4, backtest_tolerance=1e-9)
    grpo(tmp_path, tok, [relex, observe], max_steps=6).train()
    assert [(r["status"], r["horizon_cap"]) for r in relex.jump.history] == [("skipped", 0), ("skipped", 0)]
    assert relex.jump.history[0]["backtest"]["distance"] > 0 and relex.jump.offset == 0
    for s in (4, 6):
        assert all(torch.equal(observe.post[s][n], observe.pre[s][n]) for n in observe.pre[s])


# -- a plain transformers Trainer on exactly linear trajectories ----------------------------------------------


@pytest.mark.parametrize("buffer", ["thinned", "window"])
def test_later_fits_are_unbiased_by_earlier_jumps(tmp_path, buffer):
    opts = dict(max_snapshots=6) if buffer == "thinned" else dict(window=6)
    relex = RelexCallback(mode="jump", observe=4, jump_every=4, jump_horizon=6, buffer_dtype="float32", **opts)
    trainer = linear_trainer(tmp_path, [relex], max_steps=12)
    truth0 = LinearPath()
    trainer.train()
    history = relex.jump.history
    assert [(r["step"], r["virtual_step"], r["status"]) for r in history] == [(4, 4, "accepted"), (8, 14, "accepted"), (12, 24, "accepted")]
    # after three jumps the live weights sit exactly on the true line at virtual step 12 + 18
    live = dict(trainer.model.named_parameters())
    assert max_diff(live, on_line(truth0, 30)) < 1e-6
    # the later fits used virtual steps; on real steps the same snapshots (which span a jump) give a biased line
    steps = relex.buffer.steps  # the snapshots of the last fit
    assert steps[-1] == 24 and all(s == int(s) for s in steps)
    real = [s - (0 if s <= 4 else 6 if s <= 14 else 12) for s in steps]
    assert len({s - r for s, r in zip(steps, real)}) > 1
    deltas = relex.buffer.stack("a").double()
    coeff = deltas @ (truth0.ga / truth0.ga.norm()).double()
    slope_virtual = torch.linalg.lstsq(torch.stack([torch.ones(len(steps)), torch.tensor(steps)], 1).double(), coeff[:, None]).solution[1]
    slope_real = torch.linalg.lstsq(torch.stack([torch.ones(len(real)), torch.tensor(real)], 1).double(), coeff[:, None]).solution[1]
    true_slope = -LR * float(truth0.ga.norm())
    assert float(slope_virtual) == pytest.approx(true_slope, rel=1e-6)
    assert abs(float(slope_real) / true_slope - 1) > 0.3
    if buffer == "thinned":
        assert len(steps) <= 6 and relex.jump.record_every > 1 and steps[0] <= 4  # still reaches back to the first window
    else:
        assert len(steps) == 6


@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_optimizer_policy_touches_exactly_the_jumped_parameters(tmp_path, policy):
    data = regression_data()
    observe = Observe(with_optimizer=True)
    relex = RelexCallback(mode="jump", observe=4, jump_every=3, jump_horizon=3, include=[r"^first\."],
                          optimizer_policy=policy, auto_horizon=False, buffer_dtype="float32")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=7, learning_rate=1e-2,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    Trainer(model=Regress(), args=args, train_dataset=data, callbacks=[relex, observe]).train()
    assert [(r["step"], r["status"]) for r in relex.jump.history] == [(4, "accepted"), (7, "accepted")]
    for s in (4, 7):
        before, after = observe.opt_pre[s], observe.opt_post[s]
        assert set(before) == {"first.weight", "first.bias", "second.weight", "second.bias"}
        for name, entries in after.items():
            jumped = name.startswith("first.")
            assert set(entries) == {"step", "exp_avg", "exp_avg_sq"}
            for key, value in entries.items():
                if jumped and policy == "reset":
                    assert not torch.count_nonzero(value), (name, key)
                else:
                    assert torch.equal(value, before[name][key]), (name, key)
                    assert torch.count_nonzero(value)
        assert relex.jump.history[(s - 4) // 3]["optimizer_params_reset"] == (2 if policy == "reset" else 0)
        # the parameters that were not tracked did not move at the jump
        assert torch.equal(observe.post[s]["second.weight"], observe.pre[s]["second.weight"])
        assert not torch.equal(observe.post[s]["first.weight"], observe.pre[s]["first.weight"])


def test_a_reset_that_finds_no_state_for_the_jumped_parameters_says_so(caplog):
    model = Regress()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]  # a wrapper's own copies
    optimizer = torch.optim.Adam(copies, lr=1e-2)
    sum(c.square().sum() for c in copies).backward()
    optimizer.step()
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        assert reset_optimizer_state(optimizer, model.parameters()) == 0
    assert "optimizer_policy='reset' reset nothing" in caplog.text and "none of the 4 jumped parameters" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="relex_callback"):  # control: keyed by the given tensors
        assert reset_optimizer_state(optimizer, copies) == 4
    assert "reset nothing" not in caplog.text
    assert all(not torch.count_nonzero(v) for c in copies for v in optimizer.state[c].values())


def test_current_anchor_adds_the_predicted_progress_to_the_current_weights(tmp_path):
    observe = Observe()
    relex = RelexCallback(mode="jump", observe=5, jump_every=5, jump_horizon=4, jump_anchor="current", shrink=0.5,
                          auto_horizon=False, buffer_dtype="float32")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=5, learning_rate=1e-2,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    Trainer(model=Regress(), args=args, train_dataset=regression_data(), callbacks=[relex, observe]).train()
    assert relex.jump.history[0]["status"] == "accepted" and relex.jump.history[0]["anchor"] == "current"
    x = torch.arange(1, 6, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    for name, base in observe.pre[0].items():
        m = torch.stack([(observe.pre[s][name].double() - base.double()).reshape(-1) for s in range(1, 6)])
        _, _, vh = torch.linalg.svd(m, full_matrices=False)
        slope = torch.linalg.lstsq(design, (m @ vh[0])[:, None]).solution[1, 0]
        expected = observe.pre[5][name].double() + (0.5 * slope * 4 * vh[0]).reshape(base.shape)
        assert float((observe.post[5][name].double() - expected).abs().max()) < 1e-6, name


@pytest.mark.parametrize("buffer_device", ["auto", "disk"])
def test_virtual_steps_and_history_survive_checkpoint_resume_and_the_probe_is_kept(tmp_path, buffer_device):
    # disk: the thinned rows (keep_rows) are a logical selection of the store's rows; the checkpoint references them
    probe_calls = []

    def probe(model):
        probe_calls.append(1)
        return 0.0

    options = dict(mode="jump", observe=3, jump_every=3, jump_horizon=5, buffer_dtype="float32", max_snapshots=4,
                   buffer_device=buffer_device)
    straight = RelexCallback(probe=probe, **options)
    full = linear_trainer(tmp_path / "a", [straight], max_steps=12)
    full.train()
    # with a probe every accepted jump doubles the next horizon (1 / probe_shrink_on_reject), up to max_horizon = 10N
    assert [r["horizon"] for r in straight.jump.history] == [5, 10, 20, 30]
    assert straight.jump.offset == 65 and len(probe_calls) == 8

    first = RelexCallback(probe=probe, **options)
    linear_trainer(tmp_path / "b", [first], max_steps=12, save_strategy="steps", save_steps=7).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-7"
    assert (checkpoint / "relex_state.safetensors").is_file()

    probe_calls.clear()
    resumed = RelexCallback(probe=probe, **options)
    trainer = linear_trainer(tmp_path / "b", [resumed], max_steps=12, save_strategy="steps", save_steps=7,
                             restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    live_cb = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RelexCallback))
    assert live_cb is not resumed  # transformers rebuilt it from trainer_state.json ...
    assert live_cb.probe is probe  # ... and it kept the probe
    assert len(probe_calls) == 4  # jumps at 9 and 12, two probe calls each
    assert live_cb.jump.offset == straight.jump.offset
    assert live_cb.jump.history == [{**r, "fit_seconds": h["fit_seconds"], "probe_seconds": h["probe_seconds"]}
                                    for r, h in zip(straight.jump.history, live_cb.jump.history)]
    assert live_cb.buffer.steps == straight.buffer.steps
    assert max_diff(dict(trainer.model.named_parameters()), dict(full.model.named_parameters())) == 0.0
    logged = [json.loads(line) for line in (tmp_path / "b" / "out" / JUMP_LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in logged] == [3, 6, 9, 12]

    # without restore_callback_states_from_checkpoint the sidecar alone restores the bookkeeping
    plain = RelexCallback(probe=probe, **options)
    trainer = linear_trainer(tmp_path / "b", [plain], max_steps=12, save_strategy="no")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert plain.jump.offset == straight.jump.offset and plain.buffer.steps == straight.buffer.steps
    assert max_diff(dict(trainer.model.named_parameters()), dict(full.model.named_parameters())) == 0.0


# -- faults: non-finite values, overflow, failing probes, a partial horizon cap ---------------------------------


def bits(weights):
    """The raw bytes of every tensor: a bit-exact comparison that also holds for NaN."""
    return {n: w.detach().contiguous().reshape(-1).view(torch.uint8).clone() for n, w in weights.items()}


def assert_bit_equal(actual, expected, what):
    actual, expected = bits(actual), bits(expected)
    assert set(actual) == set(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{what}: {name} changed"


def test_nan_delta_at_a_jump_stops_training_and_leaves_the_live_weights_untouched(tmp_path):
    observe = Observe()
    relex = RelexCallback(mode="jump", observe=4, jump_every=2, jump_horizon=4, buffer_dtype="float32", auto_horizon=False)
    trainer = linear_trainer(tmp_path, [PoisonAt(6, "a"), relex, observe], max_steps=10)
    with pytest.raises(FloatingPointError, match=r"non-finite deltas in \['a'\]\. Live weights .* left untouched"):
        trainer.train()
    assert trainer.state.global_step == 6  # stopped at the poisoned jump, not later
    assert [(r["step"], r["status"]) for r in relex.jump.history] == [(4, "accepted")]
    assert torch.isnan(observe.pre[6]["a"]).sum() == 1
    assert_bit_equal(dict(trainer.model.named_parameters()), observe.pre[6], "step 6")  # NaN included, nothing jumped
    logged = [json.loads(line) for line in (tmp_path / "out" / JUMP_LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in logged] == [4]


class HalfPath(LinearPath):
    """LinearPath in float16 near the top of its range: a = 2^15 + 2^11·t and b = −2^11·t·g_b, exact in fp16 to
    |x| = 65504; a prediction at virtual step 20 is finite in fp32 (a = 73728) but overflows float16."""

    def __init__(self, config=None):
        super().__init__(config)
        self.a = torch.nn.Parameter(torch.full((8,), 2.0**15, dtype=torch.float16))
        self.b = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float16))
        self.ga = -torch.ones(8)

    def forward(self, x, labels=None):
        return {"loss": (self.a.float() * self.ga).sum() + (self.b.float() * self.gb).sum() + 0.0 * x.sum()}


@pytest.mark.parametrize("horizon", [2, 16])
def test_a_prediction_that_overflows_the_parameter_dtype_is_refused_before_it_is_written(tmp_path, horizon):
    observe = Observe()
    relex = RelexCallback(mode="jump", observe=4, jump_every=4, jump_horizon=horizon, buffer_dtype="float32",
                          auto_horizon=False)
    trainer = linear_trainer(tmp_path, [relex, observe], max_steps=4, model=HalfPath(), learning_rate=2048.0)
    if horizon == 2:  # control: in range, the jump lands exactly on the fp16 line at virtual step 6
        trainer.train()
        live = dict(trainer.model.named_parameters())
        assert torch.equal(live["a"], torch.full((8,), 2.0**15 + 2048 * 6, dtype=torch.float16))
        assert torch.equal(live["b"], (-2048.0 * 6 * trainer.model.gb).half())
        return
    # a = 2^15 + 2^11·20 = 73728 and |b| up to 2^11·20·3 = 122880: both beyond float16's 65504
    with pytest.raises(FloatingPointError, match=r"non-finite predictions in \['a \(beyond the float16 range, \|x\| > 65504\)', 'b "):
        trainer.train()
    assert trainer.state.global_step == 4
    live = dict(trainer.model.named_parameters())
    assert all(bool(torch.isfinite(p).all()) for p in live.values())
    assert_bit_equal(live, observe.pre[4], "step 4")


def test_a_probe_that_raises_after_the_jump_restores_the_weights_and_stops_training(tmp_path, caplog):
    calls = []

    def probe(model):
        calls.append(1)
        if len(calls) == 2:  # scoring the jumped weights
            raise RuntimeError("reward server unreachable")
        return 0.0

    observe = Observe()
    relex = RelexCallback(mode="jump", observe=4, jump_every=4, jump_horizon=4, probe=probe, buffer_dtype="float32",
                          auto_horizon=False)
    trainer = linear_trainer(tmp_path, [relex, observe], max_steps=12)
    with caplog.at_level(logging.ERROR, logger="relex_callback"), pytest.raises(RuntimeError, match="reward server unreachable"):
        trainer.train()
    assert len(calls) == 2 and trainer.state.global_step == 4
    assert_bit_equal(dict(trainer.model.named_parameters()), observe.pre[4], "step 4")
    assert "probe raised while scoring jump 0 at step 4" in caplog.text and "restored" in caplog.text
    assert relex.jump.history == [] and relex.jump.offset == 0


def test_a_probe_that_returns_nan_after_the_jump_rejects_it_and_training_continues(tmp_path):
    calls = []

    def probe(model):  # fine before each jump, NaN on the jumped weights
        calls.append(1)
        return float("nan") if len(calls) % 2 == 0 else 1.0

    observe = Observe()
    relex = RelexCallback(mode="jump", observe=4, jump_every=2, jump_horizon=4, probe=probe, buffer_dtype="float32",
                          auto_horizon=False)
    trainer = linear_trainer(tmp_path, [relex, observe], max_steps=9)
    trainer.train()
    assert trainer.state.global_step == 9 and len(calls) == 6
    history = relex.jump.history
    assert [(r["step"], r["status"], r["horizon"]) for r in history] == [(4, "rejected", 4), (6, "rejected", 2), (8, "rejected", 1)]
    assert all(r["probe_before"] == 1.0 and math.isnan(r["probe_after"]) for r in history)
    for s in (4, 6, 8):
        assert_bit_equal(observe.post[s], observe.pre[s], f"step {s}")
    # every jump was undone, so the run ends exactly where plain SGD ends
    assert_bit_equal(dict(trainer.model.named_parameters()), on_line(LinearPath(), 9), "end")
    assert relex.jump.offset == 0


PARTIAL_TOLERANCE = 0.3  # on this run's distance (about 0.36 at 2x) the cap is 5 of the 60 requested steps


def test_a_partial_horizon_cap_jumps_exactly_the_capped_number_of_steps(tmp_path):
    """The backtest supports more than one step but fewer than the requested horizon: the jump goes to v + cap."""
    observe = Observe()
    relex = RelexCallback(mode="jump", observe=6, jump_every=6, jump_horizon=60, buffer_dtype="float32",
                          backtest_tolerance=PARTIAL_TOLERANCE)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=Regress(), args=args, train_dataset=regression_data(), callbacks=[relex, observe])
    trainer.train()
    (record,) = relex.jump.history
    cap = record["horizon_cap"]
    assert 1 <= cap < 60, record  # a partial cap
    assert record["status"] == "accepted" and record["horizon"] == cap and record["virtual_step_after"] == 6 + cap
    # independent backtest: fit snapshots 1-3, predict step 6, whole-model distance ||θ̂_6 − θ_6|| / ||θ_6 − θ_0||;
    # the distance grows linearly beyond the fit (ratio 6/3 = 2), so the cap is floor(tolerance / distance · 6)
    back = oracle_jump(observe.pre, 0, [1, 2, 3], [1, 2, 3], 6)
    error = sum(float((back[n] - observe.pre[6][n].double()).square().sum()) for n in back)
    norm = sum(float((observe.pre[6][n].double() - observe.pre[0][n].double()).square().sum()) for n in back)
    distance = math.sqrt(error / norm)
    assert record["backtest"]["distance"] == pytest.approx(distance, rel=1e-5)
    assert cap == math.floor(PARTIAL_TOLERANCE / distance * 6)
    expected = oracle_jump(observe.pre, 0, list(range(1, 7)), list(range(1, 7)), 6 + cap)
    assert max_diff(observe.post[6], expected) < 1e-5
    uncapped = oracle_jump(observe.pre, 0, list(range(1, 7)), list(range(1, 7)), 66)
    assert max_diff(observe.post[6], uncapped) > 1e-3  # negative control: the requested horizon lands elsewhere
    assert relex.jump.offset == cap


# -- halt mode with a probe -----------------------------------------------------------------------------------


def distance_probe(goal_step):
    goal = on_line(LinearPath(), goal_step)

    def probe(model):
        return -float(sum((p.detach() - goal[n]).norm() for n, p in model.named_parameters()))

    return probe


@pytest.mark.parametrize("goal, allow_worse, loaded", [(16, False, 16), (2, False, None), (2, True, 8)])
def test_halt_probe_loads_the_best_candidate_never_a_worse_one(tmp_path, goal, allow_worse, loaded):
    relex = RelexCallback(observe=4, extrapolate_to=[8, 16, 40], buffer_dtype="float32", probe=distance_probe(goal),
                          allow_worse=allow_worse)
    trainer = linear_trainer(tmp_path, [relex], max_steps=20)
    trainer.train()
    assert trainer.state.global_step == 4
    live = dict(trainer.model.named_parameters())
    assert max_diff(live, on_line(LinearPath(), 4 if loaded is None else loaded)) < 1e-6
    assert relex.loaded_target == loaded
    for target in (8, 16, 40):
        report = json.loads((tmp_path / "out" / f"relex-step{target}" / "relex_report.json").read_text())
        probe = report["probe"]
        assert probe["score"] == pytest.approx(-float(sum((on_line(LinearPath(), target)[n] - on_line(LinearPath(), goal)[n]).norm() for n in ("a", "b"))), abs=1e-5)
        assert probe["current_weights_score"] == pytest.approx(relex.probe_scores["current"])
        assert probe["loaded_into_live_model"] == probe["chosen"] == (target == loaded)


# -- predictor selection and configuration ---------------------------------------------------------------------


def test_power_auto_picks_the_exponent_of_a_power_law_trajectory():
    """Δ_t = √t·v: each exponent's backtest distance (fit on snapshots 1-10, predict 20) equals the independent
    oracle's, p = 0.5 wins, and an engine configured with power='auto' predicts with p = 0.5 (oracle, not the code)."""
    steps = list(range(1, 21))
    direction = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    path = {0: {"w": torch.zeros(50)}, **{t: {"w": (math.sqrt(t) * direction).float()} for t in steps}}
    deltas = torch.stack([path[t]["w"] for t in steps])
    power, distances = select_power([gram_matrix(deltas)], steps, origin=0.0)
    target = path[20]["w"].double()
    # independent backtest: the oracle's fit on the first half, whole-model relative distance at step 20 (abs 1e-3:
    # the Gram-only distance of fp32 Grams cannot resolve an exact fit below about sqrt(1e-7))
    for p in (0.5, 1.0):
        held_out = oracle(path, 0, steps[:10], 20, power=p)["w"]
        assert distances[p] == pytest.approx(float((held_out - target).norm() / target.norm()), rel=1e-4, abs=1e-3), p
    assert power == 0.5 and distances[1.0] > 0.05  # a line overshoots √t: p = 0.5 wins by far, not by a tie

    class Vector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(50))

    engine = RelexEngine(RelexConfig(mode="jump", observe=20, fit="power", power="auto", buffer_dtype="float32"))
    model = Vector()
    engine.attach(model)
    engine.capture_base(0)
    for t in steps:
        with torch.no_grad():
            model.w.copy_(path[t]["w"])
        engine.record(t)
    (candidate,) = engine.candidates(engine.fit([60.0]))
    (prediction,) = engine.predict([candidate])
    assert candidate.spec.power == 0.5
    expected, line = oracle(path, 0, steps, 60, power=0.5)["w"], oracle(path, 0, steps, 60, power=1.0)["w"]
    assert float((prediction["w"].double() - expected).abs().max()) < 1e-5
    assert float((line - expected).abs().max()) > 0.1  # negative control: p = 1 lands elsewhere


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(mode="jump", observe=10, extrapolate_to=50), ValueError, r"^extrapolate_to=50 is a halt-mode option"),
        (dict(observe=10, extrapolate_to=50, jump_every=5), ValueError, r"^jump_every=5 is a jump-mode option; pass mode='jump'"),
        (dict(mode="jump", observe=10, jump_every=0), ValueError, r"^jump_every=0 must be >= 1\.$"),
        (dict(mode="jump", observe=10, jump_horizon=2.5), TypeError, r"^jump_horizon must be an int, got float"),
        (dict(mode="jump", observe=10, optimizer_policy="extrapolate"), ValueError, r"^optimizer_policy='extrapolate' is not supported; use one of \('keep', 'reset'\)"),
        (dict(mode="jump", observe=10, probe_tolerance=-0.1), ValueError, r"^probe_tolerance=-0\.1 must be a number >= 0"),
        (dict(mode="jump", observe=10, probe_shrink_on_reject=1.0), ValueError, r"^probe_shrink_on_reject=1\.0 must be in \(0, 1\)"),
        (dict(mode="jump", observe=10, auto_horizon="yes"), TypeError, r"^auto_horizon='yes' must be True or False\.$"),
        (dict(mode="jump", observe=10, max_snapshots=1), ValueError, r"^max_snapshots=1 must be >= 2\.$"),
        (dict(mode="jump", observe=10, window=5, max_snapshots=4), ValueError, r"^max_snapshots=4 is smaller than window=5"),
        (dict(mode="jump", observe=10, power="auto"), ValueError, r"^power='auto' selects the exponent of the power trend, but fit='linear'\. Pass fit='power'\.$"),
        (dict(mode="jump", observe=10, power="fast", fit="power"), ValueError, r"^power='fast' must be a number > 0 .* or 'auto'\.$"),
        (dict(mode="jump", observe=10, jump_anchor="origin"), ValueError, r"^jump_anchor='origin' is not supported; use one of \('fit', 'current'\)\.$"),
    ],
)
def test_invalid_jump_settings_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        RelexConfig(**kwargs)
    with pytest.raises(error, match=message):
        RelexCallback(**kwargs)


def test_defaults_and_probe_type():
    config = RelexConfig(mode="jump", observe=10)
    assert (config.jump_interval, config.horizon, config.buffer_capacity, config.optimizer_policy) == (10, 10, 10, "keep")
    assert RelexConfig(mode="jump", observe=10, jump_every=4, window=6).buffer_capacity == 6
    with pytest.raises(TypeError, match=r"^probe must be a callable probe\(model\) -> float, got str"):
        RelexCallback(mode="jump", observe=10, probe="reward")


_VISIBLE_JUMPS = """
import sys
from transformers import Trainer, TrainingArguments
import relex_callback
from relex_callback import RelexCallback

schedule, with_probe, out, tests, switch = sys.argv[1:]
if switch == "on":
    relex_callback.enable_logging()
sys.path.insert(0, tests)
from _builders import Regress, regression_data

scores = iter([0.0, 0.0, 0.0, -1.0, 0.0, 0.0])  # before/after of three jumps: the second one loses
probe = (lambda model: next(scores)) if with_probe == "probe" else None
relex = RelexCallback(mode="jump", observe=4, jump_every=3, jump_horizon=3, auto_horizon=False, probe=probe)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=10, learning_rate=1e-2,
                         lr_scheduler_type=schedule, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
Trainer(model=Regress(), args=args, train_dataset=regression_data(), callbacks=[relex]).train()
print([r["status"] for r in relex.jump.history])
"""


@pytest.mark.slow  # about 15 s: a fresh interpreter runs a whole jump-mode training
def test_jumps_and_risky_settings_are_visible_with_enable_logging(tmp_path):
    """With relex_callback.enable_logging() a user who sets up no logging sees one [relex] line per jump and a warning
    for each risky setting; without it the library prints nothing (NullHandler)."""
    import subprocess
    import sys

    def run(schedule, with_probe, switch="on"):
        argv = [schedule, with_probe, str(tmp_path / f"{schedule}-{switch}"), os.path.dirname(__file__), switch]
        result = subprocess.run([sys.executable, "-c", _VISIBLE_JUMPS, *argv],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()[-1], [line for line in result.stderr.splitlines() if line.startswith("[relex]")]

    out, lines = run("linear", "none")  # TRL's and transformers' default schedule, no probe
    assert out == "['accepted', 'accepted', 'accepted']"
    warnings = [line for line in lines if line.startswith("[relex] WARNING")]
    assert len(warnings) == 2
    assert warnings[0].startswith("[relex] WARNING RELEX: jump mode runs without a probe: every jump the backtest allows is kept")
    assert warnings[1].startswith("[relex] WARNING RELEX: lr_scheduler_type='linear' (the transformers/TRL default) decays")
    assert "Use lr_scheduler_type='constant'" in warnings[1]
    jumps = [line for line in lines if re.search(r" RELEX: jump \d", line)]
    assert [line.split(": virtual")[0] for line in jumps] == [
        f"[relex] INFO RELEX: jump {i} at step {s} accepted" for i, s in enumerate((4, 7, 10))]
    assert jumps[0].endswith("virtual step 4 -> 7 (H=3, cap None)")

    out, silent = run("linear", "none", switch="off")  # negative control: the library alone prints nothing
    assert out == "['accepted', 'accepted', 'accepted']" and silent == []

    out, lines = run("constant", "probe")  # negative control: nothing risky; a rejected jump says why
    assert out == "['accepted', 'rejected', 'accepted']"
    assert not any("without a probe" in line or "lr_scheduler_type" in line for line in lines)
    jumps = [line for line in lines if re.search(r" RELEX: jump \d", line)]
    assert len(jumps) == 3
    assert jumps[0] == "[relex] INFO RELEX: jump 0 at step 4 accepted: virtual step 4 -> 7 (H=3, cap None, probe 0.0000 -> 0.0000)"
    assert jumps[1] == ("[relex] WARNING RELEX: jump 1 at step 7 rejected: probe score fell from 0.0000 to -1.0000 "
                        "(probe_tolerance=0.0)")


@pytest.mark.parametrize("max_horizon, rejected, expected", [(12, False, [5, 10, 12, 12]), (30, True, [5, 2, 1, 1])])
def test_a_probe_grows_the_horizon_up_to_max_horizon_and_shrinks_it_on_rejection(tmp_path, max_horizon, rejected, expected):
    """Accepted jumps double the next horizon up to max_horizon − start_step; rejected ones halve it (never below 1)."""
    scores = iter(range(100, 0, -1) if rejected else range(100))  # falling scores: every jump is rejected

    relex = RelexCallback(mode="jump", observe=3, jump_every=3, jump_horizon=5, buffer_dtype="float32", max_snapshots=4,
                          max_horizon=max_horizon, probe=lambda model: float(next(scores)))
    linear_trainer(tmp_path, [relex], max_steps=12).train()
    assert [r["horizon"] for r in relex.jump.history] == expected
    assert {r["status"] for r in relex.jump.history} == {"rejected" if rejected else "accepted"}
    assert relex.jump.offset == (0 if rejected else sum(expected))


class EvenSnapshots(RelexCallback):
    def should_snapshot(self, step: int) -> bool:
        return super().should_snapshot(step) and step % 2 == 0


@pytest.mark.parametrize("callback_class", [RelexCallback, EvenSnapshots])
def test_an_overridden_should_snapshot_decides_in_jump_mode_and_jump_steps_always_record(tmp_path, callback_class):
    relex = callback_class(mode="jump", observe=3, jump_every=3, jump_horizon=3, buffer_dtype="float32", max_snapshots=16)
    trainer = linear_trainer(tmp_path, [relex], max_steps=6)
    truth0 = LinearPath()
    trainer.train()
    assert [(r["step"], r["status"]) for r in relex.jump.history] == [(3, "accepted"), (6, "accepted")]
    # virtual steps: real 4, 5, 6 after the jump at 3 are 7, 8, 9; the jumps at 3 and 6 record whatever the hook says
    expected = [1, 2, 3, 7, 8, 9] if callback_class is RelexCallback else [2, 3, 7, 9]
    assert relex.buffer.steps == expected
    assert max_diff(dict(trainer.model.named_parameters()), on_line(truth0, 12)) < 1e-6  # both fits exact on the line
