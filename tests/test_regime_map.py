"""The regime-map benchmark's resumable training (benchmarks/regime_map.py) on a tiny real model under TRL GRPO:
a run stopped after a checkpoint and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from transformers import TrainerCallback  # noqa: E402

from _oracle import oracle_prediction  # noqa: E402
from _tiny import tiny_llama, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("regime_map", ROOT / "benchmarks" / "regime_map.py")
regime_map = importlib.util.module_from_spec(spec)
spec.loader.exec_module(regime_map)

REGIME = dict(learning_rate=5e-3, prompts_per_step=2, generations=4, observe=2, last_step=6, eval_every=2,
              max_operand=20, temperature=1.0, n_train=40)


def loader():
    tokenizer = tiny_tokenizer()
    return tiny_llama(tokenizer=tokenizer), tokenizer


def digit_reward(completions, **kwargs):
    """A dense reward (share of digits in the completion), so the tiny model's weights always move."""
    from relex_callback.demo import completion_text

    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


class StopAt(TrainerCallback):
    """Simulates a session that ends after ``step``: training stops there (the checkpoint of that step is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture()
def small_world(monkeypatch):
    monkeypatch.setattr(regime_map, "HELDOUT", 8)
    monkeypatch.setattr(regime_map, "SELECTION", 4)
    monkeypatch.setattr(regime_map, "SAVE_EVERY", 2)


def test_resumed_run_matches_uninterrupted_run(tmp_path, small_world):
    straight = regime_map.run_paths(tmp_path / "a", "tiny", 0, results_root=tmp_path / "ra")
    resumed = regime_map.run_paths(tmp_path / "b", "tiny", 0, results_root=tmp_path / "rb")
    theta0 = {n: p.detach().clone() for n, p in loader()[0].named_parameters()}

    full = regime_map.train_run("tiny", REGIME, 0, straight, loader, reward=digit_reward)
    first = regime_map.train_run("tiny", REGIME, 0, resumed, loader, callbacks=[StopAt(4)], reward=digit_reward)
    stopped_at_4 = {n: p.detach().clone() for n, p in first.named_parameters()}
    assert regime_map.latest_checkpoint(resumed["trainer"]).name == "checkpoint-4"
    second = regime_map.train_run("tiny", REGIME, 0, resumed, loader, reward=digit_reward)

    moved = sum(float((p.detach() - theta0[n]).abs().sum()) for n, p in full.named_parameters())
    assert moved > 0  # the run trained: a negative control for the equality below
    assert any(not torch.equal(stopped_at_4[n], p.detach()) for n, p in full.named_parameters())
    for name, param in full.named_parameters():
        assert torch.equal(param.detach(), dict(second.named_parameters())[name].detach()), name

    # the results files agree record by record (last record per step), and the resumed run evaluated each step once
    a, b = regime_map.read_records(straight["results"]), regime_map.read_records(resumed["results"])
    real_a, real_b = regime_map.latest_by_step(a, "real"), regime_map.latest_by_step(b, "real")
    assert sorted(real_a) == [0, 2, 4, 6] and {s: r["accuracy"] for s, r in real_a.items()} == {s: r["accuracy"] for s, r in real_b.items()}
    assert [r["step"] for r in b if r["kind"] == "real"] == [0, 2, 4, 6]
    train_a, train_b = regime_map.latest_by_step(a, "train"), regime_map.latest_by_step(b, "train")
    assert [train_a[s]["reward"] for s in range(1, 7)] == [train_b[s]["reward"] for s in range(1, 7)]
    # the window files hold Δ_t for t ≤ N and every evaluated step
    names = sorted(p.name for p in straight["deltas"].glob("*.safetensors"))
    assert names == [f"delta-{s:05d}.safetensors" for s in (1, 2, 4, 6)]
    # a completed run is not trained again
    assert regime_map.train_run("tiny", REGIME, 0, resumed, loader, reward=digit_reward) is None


def test_changed_settings_are_refused(tmp_path, small_world):
    paths = regime_map.run_paths(tmp_path / "s", "tiny", 0, results_root=tmp_path / "r")
    regime_map.append_record(paths["results"], {**regime_map.settings_record("tiny", REGIME, 0), "theta0": "x"})
    with pytest.raises(SystemExit, match="other settings"):
        regime_map.train_run("tiny", {**REGIME, "learning_rate": 1e-3}, 0, paths, loader)


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "r.jsonl"
    regime_map.append_record(path, {"kind": "real", "step": 2, "accuracy": 0.5})
    regime_map.append_record(path, {"kind": "real", "step": 2, "accuracy": 0.75})
    with open(path, "a") as handle:
        handle.write('{"kind": "real", "step": 4, "accu')
    assert regime_map.latest_by_step(regime_map.read_records(path), "real") == {2: {"kind": "real", "step": 2, "accuracy": 0.75}}


def test_training_again_from_step_0_drops_what_the_earlier_window_gave(tmp_path):
    """A run retrained from step 0 wrote a new window: the earlier window's scores are not reused (else evaluate
    would skip them), while the real curve and training log stay, the newest per step winning."""
    path = tmp_path / "r.jsonl"
    old = [{"kind": "settings", "step": 0}, {"kind": "real", "step": 0, "accuracy": 0.2},
           {"kind": "train", "step": 1, "reward": 0.1}, {"kind": "real", "step": 40, "accuracy": 0.6},
           {"kind": "diagnostic", "step": 20}, {"kind": "eval", "candidate": "line@40", "accuracy": 0.5},
           {"kind": "probe", "candidate": "theta_N", "score": 0.4},
           {"kind": "session", "step": 30, "resumed_from": "checkpoint-30"}]  # a resume is not a new window
    new = [{"kind": "session", "step": 0, "resumed_from": None}, {"kind": "real", "step": 0, "accuracy": 0.2},
           {"kind": "train", "step": 1, "reward": 0.1000001}, {"kind": "eval", "candidate": "scale@2", "accuracy": 0.3}]
    for record in old + new:
        regime_map.append_record(path, record)
    records = regime_map.read_records(path)
    assert not [r for r in records if r["kind"] in ("diagnostic", "probe") or r.get("candidate") == "line@40"]
    assert [r["candidate"] for r in records if r["kind"] == "eval"] == ["scale@2"]
    assert regime_map.latest_by_step(records, "real")[40]["accuracy"] == 0.6  # not retrained yet: kept
    assert regime_map.latest_by_step(records, "train")[1]["reward"] == 0.1000001
    # negative control: without a fresh start nothing is dropped; the raw file keeps everything
    assert len(regime_map.read_records(path, latest_run=False)) == len(old) + len(new)
    only_resumed = tmp_path / "s.jsonl"
    for record in old:
        regime_map.append_record(only_resumed, record)
    assert regime_map.read_records(only_resumed) == old


def test_a_gram_file_is_never_replaced_by_one_with_fewer_real_steps(tmp_path):
    path = tmp_path / "g.safetensors"
    wide = torch.arange(2 * 5 * 5, dtype=torch.float64).reshape(2, 5, 5)
    assert regime_map.save_grams(path, ["a", "b"], wide, [1, 2, 3, 4, 8])
    narrow = torch.ones(2, 4, 4, dtype=torch.float64)
    assert not regime_map.save_grams(path, ["a", "b"], narrow, [1, 2, 3, 4])  # step 8 would be lost
    names, grams, steps = regime_map.load_grams(path)
    assert steps == [1, 2, 3, 4, 8] and torch.equal(grams, wide)
    # negative control: a file covering every step it had, and more, replaces it
    wider = torch.zeros(2, 6, 6, dtype=torch.float64)
    assert regime_map.save_grams(path, ["a", "b"], wider, [1, 2, 3, 4, 8, 12])
    assert regime_map.load_grams(path)[2] == [1, 2, 3, 4, 8, 12] and torch.equal(regime_map.load_grams(path)[1], wider)


def test_evaluate_scores_every_candidate_once_and_measures_distances(tmp_path, small_world):
    from safetensors.torch import load_file

    regime = {**REGIME, "observe": 4, "last_step": 8, "eval_every": 4}
    paths = regime_map.run_paths(tmp_path / "s", "tiny", 0, results_root=tmp_path / "r")
    regime_map.train_run("tiny", regime, 0, paths, loader, reward=digit_reward)
    regime_map.evaluate_run("tiny", regime, 0, paths, loader, reward=digit_reward)
    records = regime_map.read_records(paths["results"])

    diagnostic = [r for r in records if r["kind"] == "diagnostic"][-1]
    assert diagnostic["num_snapshots"] == 4 and diagnostic["supported_step"] >= 4
    # θ_0 + 2(θ_N − θ_0) against the real step 8, computed here straight from the saved files
    d4, d8 = load_file(str(regime_map.delta_path(paths, 4))), load_file(str(regime_map.delta_path(paths, 8)))
    err = sum(float((2 * d4[k].double() - d8[k].double()).pow(2).sum()) for k in d8)
    ref = sum(float(d8[k].double().pow(2).sum()) for k in d8)
    got = [r for r in records if r["kind"] == "distance" and r["candidate"] == "scale@2" and r["step"] == 8]
    assert len(got) == 1 and got[0]["distance"] == pytest.approx((err / ref) ** 0.5, rel=1e-5)
    # the paper's line at K = 8 (through the engine) against an independent per-tensor SVD + polyfit of the window
    window = [load_file(str(regime_map.delta_path(paths, t))) for t in range(1, 5)]
    def line_distance(target: float) -> float:
        stacks = {k: torch.stack([w[k].reshape(-1) for w in window]) for k in d8}
        err = sum(float((oracle_prediction(stacks[k], [1, 2, 3, 4], target) - d8[k].double().reshape(-1)).pow(2).sum())
                  for k in d8)
        return (err / ref) ** 0.5

    got = [r for r in records if r["kind"] == "distance" and r["candidate"] == "line@8" and r["step"] == 8]
    assert len(got) == 1 and got[0]["distance"] == pytest.approx(line_distance(8.0), rel=1e-4)
    assert got[0]["distance"] != pytest.approx(line_distance(7.0), rel=1e-3)  # negative control: another target
    # the probe's pick follows the package's rule: never below θ_N on the selection prompts
    probes = {r["candidate"]: r["score"] for r in records if r["kind"] == "probe"}
    pick = [r for r in records if r["kind"] == "selection"][-1]["picks"]["probe-all"]
    assert pick == "theta_N" or probes[pick] >= probes["theta_N"]
    evals = {r["candidate"] for r in records if r["kind"] == "eval"}
    assert {"line@8", "line@12", "line@20", "scale@2"} <= evals
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records if r["kind"] == "eval")
    # the reward-guided auto ran through the package's halt path (RelexEngine + fit_and_choose) on the saved window
    search = [r for r in records if r["kind"] == "search"]
    assert len(search) == 1 and search[0]["ladder"][-1] == 40  # max_horizon defaults to 10N
    calls = search[0]["calls"]
    assert calls and search[0]["probe_calls"] == len(calls) + 1
    chosen = search[0]["chosen"]
    assert chosen is None or chosen["score"] >= search[0]["current_weights_score"]
    assert [r["candidate"] for r in records if r["kind"] == "eval"].count(regime_map.SEARCH) == 1
    summary = regime_map.run_summary(records, regime)
    assert summary["methods"]["search-auto"]["probe_calls"] == len(calls) + 1
    # a second call reuses every score (resumable, nothing evaluated twice)
    regime_map.evaluate_run("tiny", regime, 0, paths, loader, reward=digit_reward)
    again = regime_map.read_records(paths["results"])
    assert sum(r["kind"] in ("eval", "probe", "search") for r in again) == sum(r["kind"] in ("eval", "probe", "search") for r in records)


def test_jump_run_records_every_jump_and_stops_at_the_target(tmp_path, small_world):
    """A jump-mode run through the benchmark: every attempt in the results file equals the callback's own
    relex_jumps.jsonl, each evaluation is at virtual step = real step + accepted horizons so far, and training ends
    at the first evaluation that reaches ``stop_at`` (negative control: without it the run goes to the last step)."""
    import json

    regime = {**REGIME, "observe": 2, "last_step": 6, "eval_every": 2}
    settings = {**regime_map.jump_settings(regime, "keep"), "jump_horizon": 2}
    free = regime_map.jump_paths(tmp_path / "s", "tiny", 0, "keep", results_root=tmp_path / "r1")
    regime_map.train_run("tiny", regime, 0, free, loader, reward=digit_reward, jump=settings)
    records = regime_map.read_records(free["results"])
    jumps = [r for r in records if r["kind"] == "jump"]
    logged = [json.loads(line) for line in (free["trainer"] / "relex_jumps.jsonl").read_text().splitlines()]
    assert [j["step"] for j in jumps] == [j["step"] for j in logged] == [2, 3, 4, 5, 6]  # every N/2 = 1 step from N
    assert [j["status"] for j in jumps] == [j["status"] for j in logged]
    assert [j["horizon"] for j in jumps] == [j["horizon"] for j in logged]
    assert any(j["status"] == "accepted" for j in logged)  # else the virtual-step check below is trivial
    real = regime_map.latest_by_step(records, "real")
    assert sorted(real) == [0, 2, 4, 6]
    for step in (2, 4, 6):
        moved = sum(j["horizon"] for j in logged if j["status"] == "accepted" and j["step"] <= step)
        assert real[step]["virtual_step"] == step + moved
    assert not list(free["deltas"].glob("*.safetensors"))  # a jump run writes no window files

    # stop at the first evaluation: the step-2 accuracy is reachable by construction
    stopped = regime_map.jump_paths(tmp_path / "t", "tiny", 0, "keep", results_root=tmp_path / "r2")
    target = real[2]["accuracy"]
    regime_map.train_run("tiny", regime, 0, stopped, loader, reward=digit_reward, jump=settings, stop_at=target)
    again = regime_map.read_records(stopped["results"])
    assert max(r["step"] for r in again if r["kind"] == "train") == 2
    assert regime_map.latest_by_step(again, "real")[2]["accuracy"] == target
    # a finished jump run is not trained again
    assert regime_map.train_run("tiny", regime, 0, stopped, loader, reward=digit_reward, jump=settings, stop_at=target) is None


def test_jump_summary_counts_the_jumps_time_in_step_equivalents():
    regime = {"last_step": 40, "observe": 10}
    plain = [{"kind": "real", "step": s, "accuracy": a} for s, a in ((0, 0.2), (20, 0.4), (40, 0.6))]
    run = [{"kind": "real", "step": 0, "accuracy": 0.2}, {"kind": "real", "step": 10, "accuracy": 0.5},
           {"kind": "real", "step": 20, "accuracy": 0.7, "virtual_step": 45},
           {"kind": "jump", "step": 10, "status": "accepted", "fit_seconds": 3.0, "probe_seconds": 7.0},
           {"kind": "jump", "step": 20, "status": "rejected", "fit_seconds": 1.0, "probe_seconds": 9.0}]
    run += [{"kind": "train", "step": s, "seconds": 5.0 + (10.0 if s in (10, 20) else 0.0)} for s in range(1, 21)]
    out = regime_map.jump_summary(plain, run, regime)
    # the run reaches 0.6 halfway between steps 10 (0.5) and 20 (0.7): step 15; only the jump at step 10 is before it
    assert out["steps"] == pytest.approx(15.0) and out["reached"]
    assert out["overhead_steps"] == pytest.approx(10.0 / 5.0)
    assert out["steps_saved"] == pytest.approx(40.0 / 17.0)
    assert (out["accepted"], out["rejected"]) == (1, 0)
    # not reached: the saving is an upper bound
    short = regime_map.jump_summary(plain, [r for r in run if r.get("step", 0) <= 10], regime)
    assert not short["reached"] and short["steps"] == 10.0
