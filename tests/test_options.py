"""Options without an end-to-end test elsewhere (issue 22, item 4), each driven through the real callback (a
transformers ``Trainer`` on a tiny real model) or the real ``StepDriver``, and compared with the independent oracle
of ``tests/_oracle.py`` (``torch.linalg.svd`` + ``numpy.polyfit`` of weights captured by a separate callback), an
independent formula or an uninterrupted / in-memory reference run; each with a negative control where cheap.

candidates, merge_lora="factors", probe_shrink_on_reject, overwrite, backtest_tolerance with extrapolate_to="auto",
jump mode with rank / fit / snapshot_every / start_step, jump_anchor="current" with a probe, StepDriver jump-mode
save/resume, store_dir, and extrapolate_to="auto" on the disk store.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from _oracle import CaptureWeights, max_diff, oracle, oracle_k_max
from _tiny import StopAt, lm_trainer, tiny_llama, tiny_qwen2
from relex_callback import RelexCallback, RelexConfig
from relex_callback.trainers.steps import StepDriver

from _builders import LinearPath, Regress, linear_trainer, on_line, regression_data


def Observe():
    """Weights right after each optimizer step (``pre``) and after the RelexCallback's on_step_end (``post``)."""
    return CaptureWeights(pre=True, dtype=None)


def assert_bit_equal(actual, expected, what):
    """Raw bytes of every tensor equal (holds for NaN too)."""
    assert set(actual) == set(expected), what
    for name in expected:
        a, b = (w.detach().contiguous().reshape(-1).view(torch.uint8) for w in (actual[name], expected[name]))
        assert torch.equal(a, b), f"{what}: {name} changed"


def loaded(path) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()}


def live(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in trainer.model.named_parameters()}


def close(actual, expected, atol=2e-5) -> None:
    worst = max_diff(actual, expected)
    assert worst <= atol, worst


def relex_dirs(root) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith("relex-step")}


def regress_trainer(tmp_path, callbacks, max_steps, **overrides) -> Trainer:
    """A plain transformers Trainer (Adam) on ``Regress``: a smooth but not straight trajectory."""
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=max_steps, learning_rate=1e-2,
                    lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    args = TrainingArguments(**{**settings, **overrides})
    return Trainer(model=Regress(), args=args, train_dataset=regression_data(), callbacks=callbacks)


# -- 1. candidates ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("families, with_probe", [(["sqrt", "scale"], False), (["trend", "scale"], True)],
                         ids=["sqrt+scale", "trend+scale-probe"])
def test_candidates_writes_exactly_the_listed_families_each_equal_to_its_independent_prediction(tmp_path, tok, families, with_probe):
    capture = CaptureWeights()
    seen = []

    def probe(model):  # higher the farther the weights moved from θ_0: its best is computable from the oracle
        seen.append(1)
        return float(sum((p.detach().float() - capture.weights[0][n]).square().sum() for n, p in model.named_parameters()))

    relex = RelexCallback(observe=6, extrapolate_to=[12], buffer_dtype="float32", candidates=families,
                          probe=probe if with_probe else None)
    trainer = lm_trainer(tmp_path, tok, [capture, relex])
    trainer.train()
    assert trainer.state.global_step == 6
    assert relex.diagnostic.k_max >= 12  # no supported-horizon model is added beside the target

    weights, steps = capture.weights, list(range(1, 7))
    theta0, last = weights[0], weights[6]
    independent = {  # each family from its definition in config.py, none through relex_callback
        "trend": oracle(weights, 0, steps, 12),
        "sqrt": oracle(weights, 0, steps, 12, power=0.5),  # c = a + b·√(t − start_step)
        "scale": {n: theta0[n].double() + math.sqrt(12 / 6) * (last[n].double() - theta0[n].double()) for n in theta0},
    }
    names = {"trend": "relex-step12", "sqrt": "relex-step12-sqrt", "scale": "relex-step12-scale"}
    assert relex_dirs(tmp_path) == {names[f] for f in families}  # a family not listed is not written
    for family in families:
        directory = tmp_path / names[family]
        close(loaded(directory), independent[family])
        report = json.loads((directory / "relex_report.json").read_text())
        assert report["target_step"] == 12
        assert report["candidate"]["trend"]["kind"] == ("linear" if family == "trend" else family)
    # negative controls: the three families are different models, and none is the trained θ_6
    for a in independent:
        assert max_diff(independent[a], last) > 1e-3
        for b in independent:
            if a < b:
                assert max_diff(independent[a], independent[b]) > 1e-4, (a, b)
    expected_labels = {("12" if f == "trend" else f"{f}@12") for f in families}
    assert set(relex.reports) == {12 if label == "12" else label for label in expected_labels}
    if with_probe:  # only the listed families competed: one probe call each plus the current weights
        assert set(relex.probe_scores) == {"current"} | expected_labels and len(seen) == len(families) + 1
        moved = {f: sum(float((independent[f][n] - theta0[n].double()).square().sum()) for n in theta0) for f in families}
        best = max(families, key=moved.get)
        close(live(trainer), independent[best])  # the probe's best (by the independent distances) is loaded
        assert relex.probe_scores[("12" if best == "trend" else f"{best}@12")] == pytest.approx(moved[best], rel=1e-4)
    else:
        assert relex.probe_scores == {}
        assert any(max_diff(live(trainer), independent[f]) <= 2e-5 for f in families)  # a listed family is loaded
        assert max_diff(live(trainer), independent["trend"]) > 1e-4  # not the unlisted trend


# -- 2. merge_lora="factors" -----------------------------------------------------------------------------------------


def test_merge_lora_factors_writes_the_base_plus_the_product_of_the_extrapolated_factors(tmp_path, tok):
    peft = pytest.importorskip("peft")
    LoraConfig, PeftModel, get_peft_model = peft.LoraConfig, peft.PeftModel, peft.get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(tie=True, tokenizer=tok), lora)
    capture = CaptureWeights()
    relex = RelexCallback(observe=5, extrapolate_to=[15], buffer_dtype="float32", merge_lora="factors")
    template = lm_trainer(tmp_path, tok, [], learning_rate=2e-2)  # its data and arguments, on the LoRA model
    trainer = Trainer(model=model.train(), args=template.args, train_dataset=template.train_dataset,
                      callbacks=[capture, relex])
    trainer.train()
    assert trainer.state.global_step == 5
    assert all(".lora_" in t.name for t in relex.buffer.tracked) and len(relex.buffer.tracked) == 8

    expected = oracle(capture.weights, 0, [1, 2, 3, 4, 5], 15)  # the factors' own line at K = 15
    adapter = PeftModel.from_pretrained(tiny_llama(tie=True, tokenizer=tok), str(tmp_path / "relex-step15"))
    close(dict(adapter.named_parameters()), expected)
    merged_dir = tmp_path / "relex-step15-merged"
    merged = load_file(str(merged_dir / "model.safetensors"))
    assert not any("lora" in n for n in merged)
    base = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    scaling = 8 / 4
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            a, b = expected[f"{prefix}.lora_A.default.weight"], expected[f"{prefix}.lora_B.default.weight"]
            want = base[f"{prefix}.base_layer.weight"].double() + scaling * b @ a  # W + s·B̂Â
            got = merged[f"model.layers.{layer}.self_attn.{proj}.weight"].double()
            assert float((got - want).abs().max()) < 2e-5, prefix
            # negative control: "delta" (extrapolating s·B_t A_t itself) is a different model on this run
            products = {s: {"m": scaling * capture.weights[s][f"{prefix}.lora_B.default.weight"].double()
                            @ capture.weights[s][f"{prefix}.lora_A.default.weight"].double()} for s in range(6)}
            delta_want = base[f"{prefix}.base_layer.weight"].double() + oracle(products, 0, [1, 2, 3, 4, 5], 15)["m"]
            assert float((got - delta_want).abs().max()) > 1e-5, prefix
            assert float((scaling * b @ a).abs().max()) > 1e-4  # the merge moved the weight
    report = json.loads((merged_dir / "relex_report.json").read_text())
    assert report["merged_lora"] == "factors" and report["target_step"] == 15
    unmerged = load_file(str(tmp_path / "relex-step15" / "adapter_model.safetensors"))
    assert all("lora_" in n for n in unmerged)


# -- 3. probe_shrink_on_reject in jump mode --------------------------------------------------------------------------


def documented_horizons(start, factor, verdicts, ceiling):
    """config.py / jump.py: a rejected jump multiplies the next horizon by the factor (floor, at least 1); an
    accepted one divides it by the factor (ceil), up to the ceiling (max_horizon − start_step with a probe)."""
    horizons, h = [], start
    for accepted in verdicts:
        horizons.append(h)
        h = min(ceiling, max(1, math.ceil(h / factor - 1e-9))) if accepted else max(1, math.floor(h * factor))
    return horizons


def test_probe_shrink_on_reject_shrinks_and_regrows_the_horizon_by_its_factor(tmp_path):
    verdicts = [False, False, True, True, True]  # the probe rejects the first two jumps, accepts the rest
    scores = iter([v for ok in verdicts for v in ((0.0, 0.0) if ok else (1.0, 0.0))])
    observe = Observe()
    relex = RelexCallback(mode="jump", observe=3, jump_every=2, jump_horizon=10, probe_shrink_on_reject=0.4,
                          max_horizon=23, probe=lambda model: next(scores), auto_horizon=False, buffer_dtype="float32",
                          max_snapshots=32)
    trainer = linear_trainer(tmp_path, [relex, observe], max_steps=11)
    trainer.train()
    history = relex.jump.history
    assert [r["step"] for r in history] == [3, 5, 7, 9, 11]
    assert [r["status"] for r in history] == ["rejected", "rejected", "accepted", "accepted", "accepted"]
    horizons = [r["horizon"] for r in history]
    assert horizons == documented_horizons(10, 0.4, verdicts, ceiling=23) == [10, 4, 1, 3, 8]
    assert relex.jump.next_horizon == 20  # ceil(8 / 0.4), within max_horizon − start_step = 23
    assert horizons != documented_horizons(10, 0.5, verdicts, ceiling=23)  # negative control: the default factor differs
    offset = 0
    for record in history:  # rejected: restored bit for bit; accepted: exactly on the true line at v + H
        s = record["step"]
        if record["status"] == "rejected":
            assert_bit_equal(observe.post[s], observe.pre[s], f"step {s}")
        else:
            assert max_diff(observe.post[s], on_line(LinearPath(), s + offset + record["horizon"])) < 1e-6, s
            offset += record["horizon"]
    assert relex.jump.offset == offset == 12
    assert max_diff(live(trainer), on_line(LinearPath(), 11 + 12)) < 1e-6


# -- 4. overwrite ----------------------------------------------------------------------------------------------------


def test_overwrite_replaces_an_existing_output_directory_and_without_it_the_run_is_refused(tmp_path, tok):
    target = tmp_path / "relex-step10"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("user data")
    (target / "model.safetensors").write_bytes(b"an earlier run")

    refused = lm_trainer(tmp_path, tok, [RelexCallback(observe=4, extrapolate_to=10)])  # negative control
    before = {n: p.detach().clone() for n, p in refused.model.named_parameters()}
    with pytest.raises(FileExistsError, match=r"relex-step10' already exists and is not empty; pass overwrite=True"):
        refused.train()
    assert refused.state.global_step == 0 and max_diff(live(refused), before) == 0.0  # refused before training
    assert (target / "keep.txt").read_text() == "user data"

    capture = CaptureWeights()
    trainer = lm_trainer(tmp_path, tok, [capture, RelexCallback(observe=4, extrapolate_to=10, buffer_dtype="float32",
                                                                 overwrite=True)])
    trainer.train()
    assert trainer.state.global_step == 4
    assert not (target / "keep.txt").exists()  # replaced, not merged into
    assert (target / "relex_report.json").is_file() and (target / "config.json").is_file()
    close(loaded(target), oracle(capture.weights, 0, [1, 2, 3, 4], 10))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".relex-step10")]  # no staging/retired leftovers


# -- 5. backtest_tolerance with extrapolate_to="auto" --------------------------------------------------------------


def test_a_smaller_backtest_tolerance_writes_a_nearer_auto_horizon(tmp_path, tok):
    runs = {}
    for tolerance in (0.3, 0.75):  # 0.75: the default
        capture = CaptureWeights()
        options = {} if tolerance == 0.75 else {"backtest_tolerance": tolerance}
        relex = RelexCallback(observe=8, extrapolate_to="auto", buffer_dtype="float32", **options)
        lm_trainer(tmp_path / str(tolerance), tok, [capture, relex]).train()
        runs[tolerance] = (capture.weights, relex)
    weights = runs[0.3][0]
    assert all(torch.equal(weights[8][n], runs[0.75][0][8][n]) for n in weights[8])  # the same trajectory
    k_small, k_default = (oracle_k_max(weights, 0, list(range(1, 9)), tolerance=t) for t in (0.3, 0.75))
    assert 8 < k_small < k_default  # the definition: a stricter tolerance supports a nearer horizon
    for tolerance, k in ((0.3, k_small), (0.75, k_default)):
        relex = runs[tolerance][1]
        assert relex.diagnostic.k_max == k and list(relex.written_dirs) == [k], (tolerance, relex.diagnostic.as_dict())
        report = json.loads((relex.written_dirs[k] / "relex_report.json").read_text())
        assert report["diagnostic"]["tolerance"] == tolerance and report["target_step"] == k
        close(loaded(relex.written_dirs[k]), oracle(weights, 0, list(range(1, 9)), k))
    # negative control: the oracle tells the two apart, so a K read at the other tolerance would fail
    assert max_diff(oracle(weights, 0, list(range(1, 9)), k_small), oracle(weights, 0, list(range(1, 9)), k_default)) > 1e-3


# -- 6. jump mode: rank, fit, snapshot_every, start_step -----------------------------------------------------------


JUMP_CASES = {
    "rank2": (dict(rank=2), dict(rank=2)),
    "poly2": (dict(fit="poly2"), dict(degree=2)),
    "power0.5": (dict(fit="power", power=0.5), dict(power=0.5)),
    "every2": (dict(snapshot_every=2), {}),
    "start3": (dict(start_step=3), {}),
    "start3-power": (dict(start_step=3, fit="power", power=0.5), dict(power=0.5)),
}


@pytest.mark.parametrize("case", list(JUMP_CASES))
def test_jump_options_land_on_theta0_plus_the_oracle_prediction_of_that_fit(tmp_path, case):
    options, oracle_options = JUMP_CASES[case]
    start, every, horizon = options.get("start_step", 0), options.get("snapshot_every", 1), 4
    observe = Observe()
    relex = RelexCallback(mode="jump", observe=6, jump_every=4, jump_horizon=horizon, auto_horizon=False,
                          buffer_dtype="float32", max_snapshots=16, **options)
    first, second = start + 6, start + 10
    regress_trainer(tmp_path, [relex, observe], max_steps=second).train()
    history = relex.jump.history
    assert [(r["step"], r["status"], r["horizon"]) for r in history] == [(first, "accepted", horizon), (second, "accepted", horizon)]
    pre, post = observe.pre, observe.post
    # the first jump: snapshots of the window on their real steps
    steps = list(range(start + every, first + 1, every))
    assert history[0]["snapshots"] == len(steps)
    expected = oracle(pre, start, steps, first + horizon, **oracle_options)
    assert max_diff(post[first], expected) < 2e-5, max_diff(post[first], expected)
    # the second jump: the later snapshots sit on virtual steps (real + the first horizon)
    later = list(range(first + every, second + 1, every))
    virtual = steps + [s + horizon for s in later]
    assert relex.buffer.steps == [float(v) for v in virtual]
    expected2 = oracle(pre, start, steps + later, virtual[-1] + horizon, x=virtual, **oracle_options)
    assert max_diff(post[second], expected2) < 2e-5, max_diff(post[second], expected2)
    # negative control: the plain rank-1 line on every step from step 0 lands elsewhere
    plain = oracle(pre, 0, list(range(1, first + 1)), first + horizon)
    assert max_diff(expected, plain) > 1e-4, max_diff(expected, plain)
    assert max_diff(post[first], pre[first]) > 1e-3  # a real move


# -- 7. jump_anchor="current" with a probe -------------------------------------------------------------------------


def test_current_anchor_with_a_probe_scores_the_current_plus_progress_and_restores_a_rejected_jump(tmp_path):
    scores = iter([0.0, 0.0, 0.0, -1.0])  # jump 1 accepted, jump 2 rejected
    scored = []

    def probe(model):
        scored.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return next(scores)

    observe = Observe()
    relex = RelexCallback(mode="jump", observe=4, jump_every=4, jump_horizon=3, jump_anchor="current", probe=probe,
                          auto_horizon=False, buffer_dtype="float32", max_snapshots=16)
    regress_trainer(tmp_path, [relex, observe], max_steps=8).train()
    history = relex.jump.history
    assert [(r["step"], r["status"], r["horizon"], r["anchor"]) for r in history] == [
        (4, "accepted", 3, "current"), (8, "rejected", 6, "current")]  # an accepted jump doubles the next horizon
    pre, post = observe.pre, observe.post
    assert len(scored) == 4
    # θ + (ĉ(v + H) − ĉ(v))·v, from the oracle's line: oracle(K) − oracle(v) = (ĉ(K) − ĉ(v))·v
    steps = [1, 2, 3, 4]
    first = {n: pre[4][n].double() + oracle(pre, 0, steps, 7)[n] - oracle(pre, 0, steps, 4)[n] for n in pre[4]}
    assert max_diff(scored[0], pre[4]) == 0.0 and max_diff(scored[1], first) < 2e-6  # the probe saw both
    assert max_diff(post[4], first) < 2e-6  # accepted: kept
    fit_anchor = oracle(pre, 0, steps, 7)  # negative control: the paper's θ_0 + ĉ(v + H)·v lands elsewhere
    assert max_diff(post[4], fit_anchor) > 1e-4
    # the second jump at real step 8 = virtual 11, on snapshots at virtual 1-4 and 8-11, 6 steps ahead
    real, virtual = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 8, 9, 10, 11]
    second = {n: pre[8][n].double() + oracle(pre, 0, real, 17, x=virtual)[n] - oracle(pre, 0, real, 11, x=virtual)[n]
              for n in pre[8]}
    assert max_diff(scored[3], second) < 2e-6 and max_diff(scored[3], pre[8]) > 1e-4
    assert_bit_equal(post[8], pre[8], "step 8")  # rejected: restored bit for bit
    assert relex.jump.offset == 3 and relex.jump.next_horizon == 3


# -- 8. StepDriver jump mode: save / resume ----------------------------------------------------------------------


def _step_update(model, step):
    """A deterministic non-linear update of every parameter (added to the current weights, so jumps persist)."""
    generator = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            drift = torch.sin(torch.arange(param.numel(), dtype=torch.float32) * (i + 1)).view_as(param)
            noise = torch.randn(param.shape, generator=generator)
            param.add_(1e-3 * (drift * (1 + 0.1 * step) + 0.3 * noise))


JUMP_DRIVER = dict(mode="jump", observe=4, jump_every=3, jump_horizon=3, auto_horizon=False, max_snapshots=16)


def _drive(model, driver, steps, save_root=None, save_at=None):
    records = []
    for step in steps:
        _step_update(model, step)
        outcome = driver.after_step(step)
        if outcome.jump:
            records.append(outcome.jump)
        if save_at == step:
            driver.save(save_root / f"global_step_{step}" / "relex")
    return records


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _strip(history):
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in history]


def test_step_driver_jump_mode_resumes_bit_exact_from_a_saved_state(tmp_path):
    straight_model = tiny_qwen2()
    straight = StepDriver(RelexConfig(**JUMP_DRIVER))
    straight.begin(straight_model, 0, tmp_path / "a")
    _drive(straight_model, straight, range(1, 13))
    straight.close()
    assert [(r["step"], r["status"]) for r in straight.jump.history] == [(4, "accepted"), (7, "accepted"), (10, "accepted")]
    reference = _state(straight_model)

    first_model = tiny_qwen2()
    first = StepDriver(RelexConfig(**JUMP_DRIVER))
    first.begin(first_model, 0, tmp_path / "b")
    _drive(first_model, first, range(1, 7), tmp_path / "b", save_at=6)
    first.close()
    checkpoint = _state(first_model)  # the trainer's own checkpoint of the weights at step 6

    def resume(resume_dir):
        model = tiny_qwen2(seed=1)  # different initial weights: everything must come from the checkpoint
        model.load_state_dict(checkpoint, strict=False)
        driver = StepDriver(RelexConfig(**JUMP_DRIVER))
        driver.begin(model, 6, tmp_path / "b", resume_dir=resume_dir)
        _drive(model, driver, range(7, 13))
        driver.close()
        return model, driver

    model, resumed = resume(tmp_path / "b" / "global_step_6" / "relex")
    assert max_diff(_state(model), reference) == 0.0  # bit for bit
    assert _strip(resumed.jump.history) == _strip(straight.jump.history)
    assert resumed.jump.offset == straight.jump.offset == 9
    assert resumed.engine.buffer.steps == straight.engine.buffer.steps
    logged = [json.loads(line) for line in (tmp_path / "b" / "relex_jumps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [4, 7, 10]

    # negative control: resumed without the saved state, θ_0 and the offset are lost and the run ends elsewhere
    (tmp_path / "b" / "empty").mkdir()
    lost_model, lost = resume(tmp_path / "b" / "empty")
    assert lost.config.start_step == 6 and [r["step"] for r in lost.jump.history] == [10]
    assert max_diff(_state(lost_model), reference) > 1e-4


# -- 9. store_dir ------------------------------------------------------------------------------------------------


STORE = dict(observe=6, extrapolate_to=20, buffer_dtype="float32")


def test_store_dir_holds_the_store_and_the_run_equals_the_in_memory_run_bit_for_bit(tmp_path, tok):
    memory = lm_trainer(tmp_path / "mem", tok, [RelexCallback(**STORE, buffer_device="cpu")])
    memory.train()
    store = tmp_path / "elsewhere" / "store"
    capture = CaptureWeights()
    disk_cb = RelexCallback(**STORE, buffer_device="disk", store_dir=store)
    disk = lm_trainer(tmp_path / "disk", tok, [capture, disk_cb])
    disk.train()
    assert max_diff(live(disk), live(memory)) == 0.0
    a, b = (load_file(str(p / "relex-step20" / "model.safetensors")) for p in (tmp_path / "mem", tmp_path / "disk"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert disk_cb.reports[20]["buffer"]["device"] == "disk"
    assert sorted(p.name for p in store.iterdir()) == ["base-rank00000-of-00001.safetensors", "deltas-rank00000-of-00001.bin"]
    assert not (tmp_path / "disk" / "relex-store").exists()  # not the default folder
    theta0 = load_file(str(store / "base-rank00000-of-00001.safetensors"))
    assert all(torch.equal(theta0[n], capture.weights[0][n].reshape(-1)) for n in capture.weights[0])  # stored flat
    close(live(disk), oracle(capture.weights, 0, list(range(1, 7)), 20))  # and both are the oracle's model

    # a run resumed from a checkpoint reads the rows from store_dir, bit exact
    lm_trainer(tmp_path / "cut", tok, [RelexCallback(**STORE, buffer_device="disk", store_dir=tmp_path / "s2"), StopAt(5)]).train()
    resumed = lm_trainer(tmp_path / "cut", tok, [RelexCallback(**STORE, buffer_device="disk", store_dir=tmp_path / "s2")])
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    assert resumed.state.global_step == 6 and max_diff(live(resumed), live(memory)) == 0.0
    assert not (tmp_path / "cut" / "relex-store").exists()


# -- 10. extrapolate_to="auto" on the disk store -----------------------------------------------------------------


def test_auto_on_the_disk_store_equals_the_in_memory_run(tmp_path, tok):
    runs = {}
    for device in ("cpu", "disk"):
        capture = CaptureWeights()
        relex = RelexCallback(observe=8, extrapolate_to="auto", buffer_dtype="float32", backtest_tolerance=0.5,
                              buffer_device=device)
        trainer = lm_trainer(tmp_path / device, tok, [capture, relex])
        trainer.train()
        runs[device] = (trainer, relex, capture.weights)
    (memory, memory_cb, weights), (disk, disk_cb, _) = runs["cpu"], runs["disk"]
    k = oracle_k_max(weights, 0, list(range(1, 9)), tolerance=0.5)
    assert 8 < k and memory_cb.diagnostic.k_max == disk_cb.diagnostic.k_max == k
    assert list(disk_cb.written_dirs) == list(memory_cb.written_dirs) == [k]
    assert disk_cb.reports[k]["buffer"]["device"] == "disk" and memory_cb.reports[k]["buffer"]["device"] != "disk"
    assert disk_cb.diagnostic.distance_curve == memory_cb.diagnostic.distance_curve
    a, b = (load_file(str(r.written_dirs[k] / "model.safetensors")) for r in (memory_cb, disk_cb))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # bit for bit
    assert max_diff(live(disk), live(memory)) == 0.0
    close(live(disk), oracle(weights, 0, list(range(1, 9)), k))
    assert (tmp_path / "disk" / "relex-store" / "deltas-rank00000-of-00001.bin").is_file()


# -- two defects of `candidates` found while writing these tests (fixed) --------------------------------------


def test_an_existing_directory_of_a_listed_family_is_refused_before_training(tmp_path, tok):
    existing = tmp_path / "relex-step10-scale"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("user data")
    trainer = lm_trainer(tmp_path, tok, [RelexCallback(observe=4, extrapolate_to=10, candidates=["trend", "scale"])])
    with pytest.raises(FileExistsError, match="relex-step10-scale"):
        trainer.train()
    assert trainer.state.global_step == 0  # before the fix: 4 (trained the window, wrote relex-step10, then failed)
    assert not (tmp_path / "relex-step10").exists()


def test_without_a_probe_the_listed_family_at_the_users_target_is_loaded_not_the_k_max_trend(tmp_path, tok):
    capture = CaptureWeights()
    relex = RelexCallback(observe=6, extrapolate_to=[300], buffer_dtype="float32", candidates=["scale"],
                          backtest_tolerance=0.3)
    trainer = lm_trainer(tmp_path, tok, [capture, relex])
    trainer.train()
    weights = capture.weights
    assert relex.diagnostic.k_max < 300  # the premise: the target is beyond the supported horizon
    scale = {n: weights[0][n].double() + math.sqrt(300 / 6) * (weights[6][n].double() - weights[0][n].double())
             for n in weights[0]}
    close(loaded(tmp_path / "relex-step300-scale"), scale)  # holds today
    assert relex.loaded_target == 300  # before the fix: K_max (the trend model relex-step{K_max})
    close(live(trainer), scale)
