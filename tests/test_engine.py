"""The engine and the adapters' decision methods without a Trainer: snapshot schedule, halt step, jump due,
horizon cap, buffer placement and thinning, candidates against the independent oracle, the probe trial's
bit-exact restore, the non-finite refusal and the report schema (old formats read back)."""

import json

import pytest
import torch

from _oracle import oracle_prediction
from relex_callback import RelexCallback, RelexConfig
from relex_callback.engine import Candidate, RelexEngine, TrendSpec, plan_buffer, read_report, register_candidate_family
from relex_callback.engine import engine as engine_module
from relex_callback.math.core import Backtest, TrajectoryFit
from relex_callback.engine.jump import JumpController


class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(6, 5, generator=gen).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(5, generator=gen).to(dtype))


def walk(model, steps, seed=1):
    """Move the weights along a noisy line and return the fp32 weights at every step (step 0 first)."""
    gen = torch.Generator().manual_seed(seed)
    direction = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    seen = {0: start}
    for s in steps:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n] + 0.01 * s * direction[n] + 1e-4 * torch.randn(p.shape, generator=gen))
        seen[s] = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        yield s, seen


def recorded_engine(steps=(1, 2, 3, 4, 5, 6), dtype=torch.float32, **options):
    model = Tiny(dtype)
    config = RelexConfig(**{"observe": len(steps), "extrapolate_to": 20, "buffer_dtype": "float32", **options})
    engine = RelexEngine(config)
    engine.attach(model)
    engine.capture_base(0)
    seen = {}
    for step, seen in walk(model, steps):
        engine.record(step)
    return engine, model, seen


# -- decisions ------------------------------------------------------------------------------------------------


def test_snapshot_schedule_and_halt_step_without_a_trainer():
    cb = RelexCallback(observe=6, snapshot_every=2, start_step=3, extrapolate_to=30, buffer_dtype="float32")
    model = Tiny()
    assert not cb.should_snapshot(5)  # no θ_0 yet
    cb.engine.attach(model)
    cb.engine.capture_base(3)
    assert [s for s in range(0, 12) if cb.should_snapshot(s)] == [5, 7, 9]
    cb.engine.record(5)
    assert not cb.should_snapshot(5)  # already recorded: no double count
    assert cb.should_snapshot(7)
    assert not cb.should_halt(9)  # the last snapshot is not recorded yet
    cb.engine.record(7)
    cb.engine.record(9)
    assert cb.should_halt(9) and not cb.should_halt(7) and not cb.should_halt(10)


def test_jump_due_follows_the_interval_and_the_generation_grid():
    jump = JumpController(RelexConfig(mode="jump", observe=4, jump_every=4, snapshot_every=2))
    assert [s for s in range(0, 13) if jump.jump_due(s)] == [4, 5, 6, 7, 8, 9, 10, 11, 12]  # due from step 4 on
    assert [s for s in range(0, 9) if jump.should_record(s)] == [2, 4, 5, 6, 7, 8]  # due steps are recorded too
    jump.generation_period, jump.generation_origin = 3, 0
    assert [s for s in range(0, 13) if jump.jump_due(s)] == [6, 9, 12]  # only on generation boundaries
    jump.next_jump_step = 8
    assert [s for s in range(0, 13) if jump.jump_due(s)] == [9, 12]


@pytest.mark.parametrize(
    "distance, ratio, tolerance, start_step, virtual, auto, expected",
    [
        # cap = floor((supported ratio − 1)·(v − start_step)), supported ratio = 1 + (ratio − 1)·tolerance/d; by hand:
        (0.5, 2.0, 0.75, 0, 10, True, 15),  # 1.5 · 10
        (0.75, 2.0, 0.75, 0, 10, True, 10),  # 1.0 · 10
        (3.0, 2.0, 0.75, 0, 10, True, 2),  # 0.25 · 10 = 2.5, rounded down
        (0.5, 3.0, 0.75, 0, 10, True, 30),  # the backtest reached 3x its fit: (3 − 1)·1.5 · 10
        (0.5, 2.0, 0.75, 4, 10, True, 9),  # counted from start_step: 1.5 · (10 − 4)
        (0.6, 1.5, 0.75, 2, 12, True, 6),  # 0.5 · 1.25 · (12 − 2) = 6.25
        (0.1, 2.0, 0.3, 0, 10, True, 30),  # 3 · 10, although 0.3/0.1 · 10 is 29.999999999999996 in floats
        (10.0, 2.0, 0.75, 0, 10, True, 0),  # 0.075 · 10 = 0.75: no whole step
        (0.0, 2.0, 0.75, 0, 10, True, None),  # an exact backtest supports any horizon: no cap
        (0.5, 2.0, 0.75, 0, 10, False, None),  # auto_horizon=False: no cap
    ],
)
def test_horizon_cap_is_what_the_backtest_supports(distance, ratio, tolerance, start_step, virtual, auto, expected):
    jump = JumpController(RelexConfig(mode="jump", observe=4, auto_horizon=auto, backtest_tolerance=tolerance,
                                      start_step=start_step))
    fit = TrajectoryFit(steps=[1.0, 2.0], targets=[20.0], tensors=[],
                        backtest=Backtest(num_fit=2, ratio=ratio, distance=distance))
    assert jump.horizon_cap(fit, virtual) == expected
    no_backtest = TrajectoryFit(steps=[1.0], targets=[20.0], tensors=[], backtest=None)
    assert jump.horizon_cap(no_backtest, virtual) is None  # too few snapshots for a backtest: no cap either


def test_a_full_buffer_is_thinned_or_rolled():
    engine, _, _ = recorded_engine(steps=(1, 2, 3, 4), mode="jump", max_snapshots=4, extrapolate_to=None)
    assert engine.buffer.steps == [1, 2, 3, 4]
    assert engine.make_room() == "thinned"
    assert engine.buffer.steps == [2, 4]  # every other row, counted from the newest
    assert engine.make_room() is None  # room left: nothing dropped
    rolling, _, _ = recorded_engine(steps=(1, 2, 3, 4), mode="jump", window=4, extrapolate_to=None)
    assert rolling.make_room() == "dropped_oldest" and rolling.buffer.steps == [2, 3, 4]


def test_buffer_placement_rule():
    config = RelexConfig(observe=4, extrapolate_to=8, buffer_dtype="float32")
    needed = 4 * 100 * (4 + 1)  # numel × (T × itemsize + fp32 θ_0)
    cpu = plan_buffer(config, [100], on_gpu=False, gpu_free=None, host_free=needed * 2)
    assert (cpu.device, cpu.where, cpu.needed, cpu.budget, cpu.fits) == ("cpu", "host", needed, int(0.8 * needed * 2), True)
    assert plan_buffer(config, [100], on_gpu=True, gpu_free=4 * needed, host_free=0).device == "param"
    spill = plan_buffer(config, [100], on_gpu=True, gpu_free=needed, host_free=10 * needed)  # half the GPU is too small
    assert (spill.device, spill.where, spill.fits) == ("cpu", "host", True)
    assert not plan_buffer(config, [100], on_gpu=False, gpu_free=None, host_free=needed).fits


# -- candidates, predictions, trials ---------------------------------------------------------------------------


def test_candidates_match_the_independent_oracle():
    engine, _, seen = recorded_engine()
    steps = [1, 2, 3, 4, 5, 6]
    fit = engine.fit([12.0, 20.0])
    candidates = engine.candidates(fit)
    assert [c.target for c in candidates] == [12.0, 20.0] and all(c.spec.kind == "linear" for c in candidates)
    predictions = engine.predict(candidates)
    for cand, prediction in zip(candidates, predictions):
        for name, base in seen[0].items():
            deltas = torch.stack([(seen[s][name] - base).reshape(-1) for s in steps])
            expected = base.double().reshape(-1) + oracle_prediction(deltas, steps, cand.target)
            assert float((prediction[name].double() - expected).abs().max()) < 1e-5
    # negative control: the two targets really differ
    assert not torch.allclose(predictions[0]["w"], predictions[1]["w"])


def test_a_registered_candidate_family_is_predicted_like_any_other():
    engine, _, seen = recorded_engine()

    def magnitude(engine, fit, target):
        rows = len(fit.steps)
        weights = {t.name: torch.nn.functional.one_hot(torch.tensor(rows - 1), rows).double() * 1.5 for t in fit.tensors}
        return Candidate(target=target, spec=TrendSpec(kind="magnitude", params={"alpha": 1.5}), weights=weights)

    register_candidate_family("magnitude", magnitude)
    try:
        fit = engine.fit([20.0])
        (svd, mag) = engine.candidates(fit, families=("trend", "magnitude"))
        assert mag.label == "magnitude@20" and svd.label == "20"
        prediction = engine.predict([mag])[0]
        for name, base in seen[0].items():  # θ_0 + 1.5 (θ_6 − θ_0)
            expected = base + 1.5 * (seen[6][name] - base)
            assert float((prediction[name] - expected.reshape(-1)).abs().max()) < 1e-6
        report = engine.report(fit, mag, "halt")
        assert report["candidate"]["trend"] == {"kind": "magnitude", "rank": 1, "power": 1.0, "origin": 0.0,
                                                "window": None, "params": {"alpha": 1.5}}
        with pytest.raises(ValueError, match="built-in"):
            register_candidate_family("linear", magnitude)
        with pytest.raises(ValueError, match="unknown candidate family"):
            engine.candidates(fit, families=("nope",))
    finally:
        engine_module._CANDIDATE_FAMILIES.pop("magnitude", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trial_restores_the_live_weights_bit_for_bit(dtype):
    engine, model, _ = recorded_engine(dtype=dtype)
    fit = engine.fit([12.0, 20.0])
    candidates = engine.candidates(fit)
    predictions = engine.predict(candidates)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = lambda m: float(m.w.float().sum())  # noqa: E731
    current, chosen = engine.trial(model, probe, candidates, predictions, lambda cur, scores: None)
    assert chosen is None and current == pytest.approx(float(before["w"].float().sum()))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [c.score for c in candidates] == [pytest.approx(float(p["w"].to(dtype).float().sum()), rel=1e-3) for p in predictions]
    # keep the first one: the live weights are its prediction in the parameters' dtype
    engine.trial(model, probe, candidates, predictions, lambda cur, scores: 0)
    assert torch.equal(model.w.detach(), predictions[0]["w"].view(6, 5).to(dtype))
    engine.load({n: v.reshape(-1) for n, v in before.items()})

    def failing(m):
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        engine.trial(model, failing, candidates, predictions, lambda cur, scores: 0, before=0.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_non_finite_predictions_are_refused_and_leave_the_weights_alone():
    engine, model, _ = recorded_engine()
    fit = engine.fit([20.0])
    (cand,) = engine.candidates(fit)
    cand.weights["b"] = torch.full_like(cand.weights["b"], float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"non-finite predictions in \['b'\]"):
        engine.predict([cand])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- the report schema ------------------------------------------------------------------------------------------


def test_halt_reports_are_relex_report_2_with_room_for_a_diagnostic():
    engine, _, _ = recorded_engine()
    fit = engine.fit([20.0])
    (cand,) = engine.candidates(fit)
    report = engine.report(fit, cand, "halt")
    assert report["format"] == "relex-report/2" and report["producer"] == "halt"
    assert report["diagnostic"] is None and isinstance(report["warnings"], list)
    assert report["candidate"]["target_step"] == 20.0 and report["candidate"]["trend"]["kind"] == "linear"
    assert report["horizon_ratio"] == pytest.approx(20 / 6)
    assert set(report["tensors"]) == {"w", "b"} and report["window_steps"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert report["r_squared"]["tensors"] == 2 and report["backtest"]["tolerance"] == 0.75


def test_a_report_in_another_format_is_refused_naming_the_file_and_the_fix(tmp_path):
    """Only ``relex-report/2`` is read: the callback's unversioned first report and ``relex-offline/1`` are refused."""
    for name, report in (("unversioned.json", {"target_step": 40, "line_r2": {"tensors": 1}}),
                         ("offline1.json", {"format": "relex-offline/1", "command": "report"}),
                         ("future.json", {"format": "relex-report/9"})):
        (tmp_path / name).write_text(json.dumps(report))
        with pytest.raises(ValueError, match=rf"{name} has RELEX report format .*reads relex-report/2 only\. Write it again"):
            read_report(tmp_path / name)
    good = {"format": "relex-report/2", "producer": "halt", "target_step": 40}
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "relex_report.json").write_text(json.dumps(good))
    assert read_report(tmp_path / "good") == good  # negative control: the current format is read unchanged
