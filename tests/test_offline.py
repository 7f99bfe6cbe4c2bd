"""Offline RELEX (relex_callback.offline) on tiny real checkpoints, against an independent reference.

The reference below shares no code with the package: per tensor it stacks the fp32 deltas, takes
``torch.linalg.svd`` (fp64), fits ``np.polyfit`` on the official script's index axis 0..T−1 and
evaluates at the official target index, then casts θ_0 + ĉ·v to the output dtype.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from relex_callback import offline
from relex_callback.checkpoints import (
    RelexInputError,
    SafetensorsWriter,
    discover_checkpoints,
    open_model_dir,
    parse_step,
)
from relex_callback.math.core import combine, fit_trend, gram_matrix, prediction_weights, subspace_from_gram

transformers = pytest.importorskip("transformers")

FROZEN = "model.layers.1.post_attention_layernorm.weight"  # never moves: must stay θ_0 exactly
LAYOUTS = {
    "checkpoint": "checkpoint-{}",
    "verl": "global_step_{}/actor/huggingface",
    "global_step": "global_step_{}",
    "step_": "step_{}",
    "step": "step{}",
}


# -- building trajectories ----------------------------------------------------------------------------------


def _config(kind: str):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    if kind == "llama-tied":
        return transformers.LlamaConfig(tie_word_embeddings=True, **common), transformers.LlamaForCausalLM
    if kind == "qwen2-untied":
        return transformers.Qwen2Config(tie_word_embeddings=False, **common), transformers.Qwen2ForCausalLM
    raise ValueError(kind)


def make_trajectory(
    root: Path,
    kind: str = "llama-tied",
    steps=(1, 2, 3, 4, 5, 6),
    layout: str = "checkpoint",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    two_directions: bool = False,
    base_shard: str | None = None,
    checkpoint_shard: str | None = None,
) -> tuple[Path, Path]:
    """A base model and one checkpoint per step: θ_t = θ_0 + c(t)·v (+ noise), per tensor, via save_pretrained."""
    config, cls = _config(kind)
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    kwargs = {"max_shard_size": base_shard} if base_shard else {}
    model.save_pretrained(root / "base", **kwargs)
    theta0 = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed + 1)
    v1 = {n: torch.randn(p.shape, generator=generator) for n, p in theta0.items()}
    v2 = {n: torch.randn(p.shape, generator=generator) for n, p in theta0.items()}
    parent = root / "run"
    for t in steps:
        c1 = 0.004 * t + 0.01 + 0.001 * float(torch.randn((), generator=generator))
        c2 = 0.01 * math.sin(t) if two_directions else 0.0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name == FROZEN:
                    continue
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(theta0[name] + c1 * v1[name] + c2 * v2[name] + 2e-4 * noise)
        kwargs = {"max_shard_size": checkpoint_shard} if checkpoint_shard else {}
        model.save_pretrained(parent / LAYOUTS[layout].format(t), **kwargs)
    return root / "base", parent


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _weights_dir(path: Path) -> Path:
    return path / "actor" / "huggingface" if (path / "actor").is_dir() else path


# -- the independent reference ------------------------------------------------------------------------------


def reference(
    base: Path,
    checkpoints: list[Path],
    index_target: float,
    *,
    rank: int = 1,
    window: int | None = None,
    x: list[float] | None = None,
    degree: int = 1,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """θ_0 + Σ_i ĉ_i v_i per tensor: SVD of the stacked deltas, np.polyfit on x (default 0..T−1) at index_target."""
    theta0 = _load_dir(base)
    snaps = [_load_dir(_weights_dir(c)) for c in checkpoints]
    xs = np.arange(len(snaps), dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64)
    out = {}
    for name, base_value in theta0.items():
        stack = torch.stack([s[name].float() - base_value.float() for s in snaps]).reshape(len(snaps), -1)
        delta = torch.zeros(stack.shape[1], dtype=torch.float64)
        if stack.abs().max() > 0:
            u, s, vh = torch.linalg.svd(stack.double(), full_matrices=False)
            coefficients = (u[:, :rank] * s[:rank]).numpy()
            for i in range(min(rank, len(s))):
                if s[i] <= s[0] * 1e-6:
                    continue
                xw, cw = (xs, coefficients[:, i]) if window is None else (xs[-window:], coefficients[-window:, i])
                c_hat = np.polyval(np.polyfit(xw, cw, degree), index_target)
                delta += float(c_hat) * vh[i]
        value = base_value.float() + delta.float().reshape(base_value.shape)
        out[name] = value.to(out_dtype or base_value.dtype)
    return out


def assert_same_up_to_rounding(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal tensors, except for rare one-ulp differences of the output dtype (fp32 rounding in two orders)."""
    assert set(ours) == set(expected)
    for name, want in expected.items():
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        a, b = got.double(), want.double()
        diff = (a - b).abs()
        if want.dtype == torch.float32:
            assert float(diff.max()) <= 2e-5 * max(float(b.abs().max()), 1e-6), name
            continue
        mantissa = {torch.bfloat16: 7, torch.float16: 10}[want.dtype]
        magnitude = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
        ulp = torch.pow(2.0, torch.floor(torch.log2(magnitude)) - mantissa)
        ulp += 2.0**-20 * float(b.abs().max())  # fp32 rounding of θ_0 + Δ̂ where it cancels to ~0
        assert bool((diff <= ulp).all()), f"{name}: differs by more than one ulp ({float(diff.max())})"
        assert float((diff > 0).double().mean()) < 0.01, f"{name}: too many one-ulp differences"


# -- tests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return make_trajectory(tmp_path_factory.mktemp("tied"), "llama-tied")


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return make_trajectory(tmp_path_factory.mktemp("untied"), "qwen2-untied")


def _ckpts(parent: Path, steps, layout="checkpoint") -> list[Path]:
    return [parent / LAYOUTS[layout].format(t).split("/")[0] for t in steps]


@pytest.mark.parametrize("fixture", ["tied", "untied"])
def test_extrapolate_matches_reference(fixture, request, tmp_path):
    base, parent = request.getfixturevalue(fixture)
    reports = offline.extrapolate_checkpoints(base, [parent], 30, tmp_path / "out", progress=False)
    expected = reference(base, _ckpts(parent, range(1, 7)), index_target=30 - 1)
    ours = _load_dir(tmp_path / "out")
    assert_same_up_to_rounding(ours, expected)
    assert torch.equal(ours[FROZEN], _load_dir(base)[FROZEN])  # unchanged tensor: θ_0 exactly
    report = reports[0]
    assert report["tensors"][FROZEN]["explained_variance"] == 0.0
    assert report["observed_steps"] == [1, 2, 3, 4, 5, 6]
    assert report["horizon_ratio"] == pytest.approx(5.0)
    assert report["bytes"]["intermediate"] == 0
    saved = json.loads((tmp_path / "out" / "relex_report.json").read_text())
    assert saved["target_step"] == 30 and (tmp_path / "out" / "README.md").is_file()
    # float32 output: the same math without the bf16 rounding
    offline.extrapolate_checkpoints(base, [parent], 30, tmp_path / "out32", dtype="float32", progress=False)
    expected32 = reference(base, _ckpts(parent, range(1, 7)), index_target=29, out_dtype=torch.float32)
    assert_same_up_to_rounding(_load_dir(tmp_path / "out32"), expected32)


def test_tied_output_stays_tied_and_loads(tied, tmp_path):
    base, parent = tied
    offline.extrapolate_checkpoints(base, [parent], 12, tmp_path / "out", progress=False)
    ours = _load_dir(tmp_path / "out")
    assert "lm_head.weight" not in ours  # tied: not tracked, not written
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, ours["model.embed_tokens.weight"])
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_untied_tracks_lm_head_and_biases(untied, tmp_path):
    base, parent = untied
    reports = offline.extrapolate_checkpoints(base, [parent], 9, tmp_path / "out", progress=False)
    tensors = reports[0]["tensors"]
    assert "lm_head.weight" in tensors and "model.layers.0.self_attn.q_proj.bias" in tensors
    assert tensors["lm_head.weight"]["explained_variance"] > 0.9
    ours = _load_dir(tmp_path / "out")
    assert not torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_tied_lm_head_saved_in_base_is_a_copy_of_the_embedding(tmp_path):
    base, parent = make_trajectory(tmp_path, "llama-tied", steps=(1, 2, 3))
    weights = load_file(base / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # some tools save both
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    reports = offline.extrapolate_checkpoints(base, [parent], 7, tmp_path / "out", progress=False)
    assert "lm_head.weight" not in reports[0]["tensors"]
    assert reports[0]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    ours = _load_dir(tmp_path / "out")
    assert torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert not torch.equal(ours["lm_head.weight"], weights["lm_head.weight"])


def test_uneven_spacing_regresses_on_real_steps(tmp_path):
    steps = [2, 3, 5, 8, 13, 21]
    base, parent = make_trajectory(tmp_path, "llama-tied", steps=steps)
    reports = offline.extrapolate_checkpoints(base, [parent], 60, tmp_path / "out", dtype="float32", progress=False)
    expected = reference(base, _ckpts(parent, steps), index_target=60, x=steps, out_dtype=torch.float32)
    assert_same_up_to_rounding(_load_dir(tmp_path / "out"), expected)
    assert reports[0]["observed_steps"] == steps
    # the index axis (the official script's) would predict something else
    by_index = reference(base, _ckpts(parent, steps), index_target=60 - 21 + 5, out_dtype=torch.float32)
    assert not torch.allclose(by_index["model.norm.weight"], _load_dir(tmp_path / "out")["model.norm.weight"])


def test_explicit_steps_override_names(tmp_path):
    base, parent = make_trajectory(tmp_path, "llama-tied", steps=(1, 2, 3, 4))
    paths = _ckpts(parent, (1, 2, 3, 4))
    offline.extrapolate_checkpoints(base, paths, 80, tmp_path / "a", steps=[10, 20, 30, 40], dtype="float32", progress=False)
    offline.extrapolate_checkpoints(base, paths, 8, tmp_path / "b", dtype="float32", progress=False)
    a, b = _load_dir(tmp_path / "a"), _load_dir(tmp_path / "b")
    for name in a:  # the same line in units ten times larger
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_sharded_input_and_matching_sharded_output(tmp_path):
    base, parent = make_trajectory(tmp_path, "qwen2-untied", steps=(1, 2, 3, 4), base_shard="20KB", checkpoint_shard="30KB")
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) > 2
    offline.extrapolate_checkpoints(base, [parent], 10, tmp_path / "out", progress=False)
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(set(base_index["weight_map"].values()))
    for shard in set(base_index["weight_map"].values()):
        assert set(load_file(tmp_path / "out" / shard)) == set(load_file(base / shard))
    expected = reference(base, _ckpts(parent, (1, 2, 3, 4)), index_target=9)
    assert_same_up_to_rounding(_load_dir(tmp_path / "out"), expected)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model.lm_head.weight, _load_dir(tmp_path / "out")["lm_head.weight"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(layout, tmp_path):
    base, parent = make_trajectory(tmp_path, "llama-tied", steps=(1, 2, 3, 4), layout=layout)
    found = discover_checkpoints([parent])
    assert [m.step for m in found] == [1, 2, 3, 4]
    offline.extrapolate_checkpoints(base, [parent], 8, tmp_path / "from_parent", progress=False)
    listed = [parent / LAYOUTS[layout].format(t) for t in (1, 2, 3, 4)]
    offline.extrapolate_checkpoints(base, listed, 8, tmp_path / "from_list", progress=False)
    a, b = _load_dir(tmp_path / "from_parent"), _load_dir(tmp_path / "from_list")
    assert all(torch.equal(a[n], b[n]) for n in a)
    expected = reference(base, _ckpts(parent, (1, 2, 3, 4), layout), index_target=7)
    assert_same_up_to_rounding(a, expected)


def test_parse_step():
    assert parse_step("runs/global_step_75/actor/huggingface") == 75
    assert parse_step("out/checkpoint-120") == 120
    assert parse_step("traj/step_3") == 3 and parse_step("traj/step3") == 3 and parse_step("traj/global_step12") == 12
    assert parse_step("models/base") is None


def test_time_scale_doubles_the_target(tied, tmp_path):
    base, parent = tied
    reports = offline.extrapolate_checkpoints(base, [parent], 40, tmp_path / "out", time_scale=2, progress=False)
    assert reports[0]["effective_target_step"] == 80
    expected = reference(base, _ckpts(parent, range(1, 7)), index_target=2 * 40 - 1)  # x = 79: the official quirk
    assert_same_up_to_rounding(_load_dir(tmp_path / "out"), expected)


def test_window_fits_the_last_snapshots(tied, tmp_path):
    base, parent = tied
    reports = offline.extrapolate_checkpoints(base, [parent], 20, tmp_path / "out", window=3, progress=False)
    assert reports[0]["window_steps"] == [4, 5, 6]
    # official: SVD on all T, np.polyfit on the last W coefficients; on the index axis 0..T−1 the
    # window is 3, 4, 5 and the target index T − 1 + (K − last) = 19
    expected = reference(base, _ckpts(parent, range(1, 7)), index_target=19, window=3)
    assert_same_up_to_rounding(_load_dir(tmp_path / "out"), expected)


def test_fit_steps_ignores_later_checkpoints(tied, tmp_path):
    base, parent = tied
    reports = offline.extrapolate_checkpoints(base, [parent], 20, tmp_path / "out", fit_steps=4, progress=False)
    assert reports[0]["observed_steps"] == [1, 2, 3, 4]
    expected = reference(base, _ckpts(parent, range(1, 5)), index_target=19)
    assert_same_up_to_rounding(_load_dir(tmp_path / "out"), expected)


def test_rank_two_and_poly2(tmp_path):
    base, parent = make_trajectory(tmp_path, "qwen2-untied", steps=tuple(range(1, 9)), two_directions=True)
    ckpts = _ckpts(parent, range(1, 9))
    reports = offline.extrapolate_checkpoints(base, [parent], 12, tmp_path / "r2", rank=2, dtype="float32", progress=False)
    assert len(reports[0]["tensors"]["model.embed_tokens.weight"]["r_squared"]) == 2
    assert_same_up_to_rounding(_load_dir(tmp_path / "r2"),
                               reference(base, ckpts, index_target=11, rank=2, out_dtype=torch.float32))
    offline.extrapolate_checkpoints(base, [parent], 12, tmp_path / "p2", fit="poly2", dtype="float32", progress=False)
    assert_same_up_to_rounding(_load_dir(tmp_path / "p2"),
                               reference(base, ckpts, index_target=11, degree=2, out_dtype=torch.float32))


def test_several_targets_one_directory_each(tied, tmp_path):
    base, parent = tied
    reports = offline.extrapolate_checkpoints(base, [parent], [10, 20], tmp_path / "out", progress=False)
    assert [r["target_step"] for r in reports] == [10, 20]
    for target in (10, 20):
        expected = reference(base, _ckpts(parent, range(1, 7)), index_target=target - 1)
        assert_same_up_to_rounding(_load_dir(tmp_path / "out" / f"step{target}"), expected)
        assert (tmp_path / "out" / f"step{target}" / "relex_report.json").is_file()


def test_shrink_moves_part_of_the_way(tied, tmp_path):
    base, parent = tied
    offline.extrapolate_checkpoints(base, [parent], 30, tmp_path / "full", dtype="float32", progress=False)
    offline.extrapolate_checkpoints(base, [parent], 30, tmp_path / "half", dtype="float32", shrink=0.5, progress=False)
    full, half = _load_dir(tmp_path / "full"), _load_dir(tmp_path / "half")
    last = _load_dir(parent / "checkpoint-6")
    for name in full:
        torch.testing.assert_close(half[name], last[name].float() + 0.5 * (full[name] - last[name].float()), rtol=1e-5, atol=1e-6)


def test_matches_core_on_an_in_memory_stack(tied, tmp_path):
    """Same trajectory, the callback's path: the core functions on an in-memory [T, d] stack."""
    base, parent = tied
    offline.extrapolate_checkpoints(base, [parent], 25, tmp_path / "out", dtype="float32", progress=False)
    ours = _load_dir(tmp_path / "out")
    theta0 = _load_dir(base)
    snaps = [_load_dir(parent / f"checkpoint-{t}") for t in range(1, 7)]
    for name, value in theta0.items():
        stack = torch.stack([s[name].float() - value.float() for s in snaps]).reshape(6, -1)
        subspace = subspace_from_gram(gram_matrix(stack), 1)
        trend = fit_trend(torch.arange(1.0, 7.0), subspace.coefficients)
        weights = prediction_weights(subspace, trend([25.0]))
        expected = value.float() + combine(stack, weights)[0].reshape(value.shape)
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-6)


def test_chunked_tensors_match_and_respect_the_budget(tied, tmp_path):
    base, parent = tied
    budget = 100_000
    reports = offline.extrapolate_checkpoints(base, [parent], 15, tmp_path / "small", max_memory=budget,
                                              dtype="float32", progress=False)
    assert reports[0]["tensors"]["model.embed_tokens.weight"]["chunks"] > 1
    offline.extrapolate_checkpoints(base, [parent], 15, tmp_path / "big", dtype="float32", progress=False)
    small, big = _load_dir(tmp_path / "small"), _load_dir(tmp_path / "big")
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-6, atol=1e-7)
    plan = offline._prepare(base, [parent], None, None, False)
    stream = offline._Stream(plan, rows=6, max_memory=budget, out_bytes=8, num_workers=2)
    try:
        assert stream.per_element * stream.cap <= budget
        buffers = sum(d.numel() * 4 + t.numel() * 4 for d, t in stream._slots) + 2 * stream.cap * 2 + 8 * stream.cap
        assert buffers <= budget  # two slots, two reader stagings (bf16), one fp32 + bf16 output chunk
    finally:
        stream.close()


def test_reconstruct_matches_projection(tied, tmp_path):
    base, parent = tied
    reports = offline.reconstruct_checkpoints(base, [parent], tmp_path / "out", target_steps=[3, 6], fit_steps=5,
                                              dtype="float32", progress=False)
    theta0 = _load_dir(base)
    snaps = {t: _load_dir(parent / f"checkpoint-{t}") for t in range(1, 7)}
    for target, in_fit in ((3, True), (6, False)):
        ours = _load_dir(tmp_path / "out" / f"step{target}")
        errors, norms = 0.0, 0.0
        for name, value in theta0.items():
            stack = torch.stack([snaps[t][name].double() - value.double() for t in range(1, 6)]).reshape(5, -1)
            delta = (snaps[target][name].double() - value.double()).reshape(-1)
            if stack.abs().max() == 0:
                projected = torch.zeros_like(delta)
            else:
                v = torch.linalg.svd(stack, full_matrices=False)[2][0]
                projected = (delta @ v) * v
            expected = (value.double() + projected.reshape(value.shape)).float()
            torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6)
            errors += float((projected - delta).pow(2).sum())
            norms += float(delta.pow(2).sum())
        report = next(r for r in reports if r["target_step"] == target)
        assert report["in_fit"] is in_fit
        assert report["relative_distance"] == pytest.approx(math.sqrt(errors / norms), rel=1e-4)


def test_report_matches_reference_and_writes_plots(tied, tmp_path):
    base, parent = tied
    report = offline.report_checkpoints(base, [parent], tmp_path / "rep", fit_steps=4, target_steps=[20], top=3,
                                        progress=False)
    for png in ("explained_variance.png", "coefficients.png", "r_squared.png", "backtest.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    saved = json.loads((tmp_path / "rep" / "relex_report.json").read_text())
    assert saved["plots"] == report["plots"] == ["explained_variance.png", "coefficients.png", "r_squared.png", "backtest.png"]
    assert saved["fit_steps"] == [1, 2, 3, 4] and saved["heldout_steps"] == [5, 6]
    assert len(saved["trajectories"]) == 3
    theta0 = _load_dir(base)
    snaps = [_load_dir(parent / f"checkpoint-{t}") for t in range(1, 7)]
    errors = np.zeros(2)
    norms = np.zeros(2)
    for name, value in theta0.items():
        stack = torch.stack([s[name].double() - value.double() for s in snaps]).reshape(6, -1)
        stats = saved["tensors"][name]
        if stack.abs().max() == 0:
            assert stats["explained_variance"] == 0.0
            continue
        u, s, vh = torch.linalg.svd(stack[:4], full_matrices=False)
        assert stats["explained_variance"] == pytest.approx(float(s[0] ** 2 / (s**2).sum()), rel=1e-5)
        assert stats["singular_values"][:4] == pytest.approx(s.tolist(), rel=1e-4, abs=1e-4 * float(s[0]))
        c = (stack @ vh[0]).numpy()  # held-out points projected onto the fit direction
        line = np.polyfit([1, 2, 3, 4], c[:4], 1)
        fitted = np.polyval(line, [1, 2, 3, 4])
        r2_in = 1 - ((c[:4] - fitted) ** 2).sum() / ((c[:4] - c[:4].mean()) ** 2).sum()
        assert stats["r_squared_in_window"][0] == pytest.approx(r2_in, rel=1e-4, abs=1e-6)
        predicted = np.polyval(line, [5, 6])
        r2_out = 1 - ((c[4:] - predicted) ** 2).sum() / ((c[4:] - c[4:].mean()) ** 2).sum()
        assert stats["r_squared_out_of_window"][0] == pytest.approx(r2_out, rel=1e-3, abs=1e-5)
        for k, step_row in enumerate((4, 5)):
            prediction = torch.as_tensor(predicted[k]) * vh[0]
            errors[k] += float((prediction - stack[step_row]).pow(2).sum())
            norms[k] += float(stack[step_row].pow(2).sum())
    # from G alone (no second read): fp32 Gram accumulation limits it to about three digits here
    assert saved["out_of_window"]["relative_distance"] == pytest.approx(np.sqrt(errors / norms).tolist(), rel=3e-3)
    assert saved["horizon_ratios"] == {"20": 5.0}
    assert saved["bytes"]["intermediate"] == 0


def test_pickles_need_the_flag(tmp_path):
    base, parent = make_trajectory(tmp_path, "llama-tied", steps=(1, 2, 3))
    expected = reference(base, [parent / f"checkpoint-{t}" for t in (1, 2, 3)], index_target=8)
    for t in (1, 2, 3):  # replace the safetensors of each checkpoint by a pickle
        directory = parent / f"checkpoint-{t}"
        torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()
    with pytest.raises(RelexInputError, match="pickled weights .*--allow-pickle"):
        offline.extrapolate_checkpoints(base, [parent], 9, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    offline.extrapolate_checkpoints(base, [parent], 9, tmp_path / "out", allow_pickle=True, progress=False)
    assert_same_up_to_rounding(_load_dir(tmp_path / "out"), expected)


def _rewrite(directory: Path, change) -> None:
    weights = load_file(directory / "model.safetensors")
    change(weights)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def test_mismatches_are_listed_before_any_work(tmp_path, monkeypatch):
    base, parent = make_trajectory(tmp_path, "llama-tied", steps=(1, 2, 3, 4))
    _rewrite(parent / "checkpoint-2", lambda w: w.pop("model.norm.weight"))
    _rewrite(parent / "checkpoint-3", lambda w: w.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3, dtype=torch.bfloat16)}))
    _rewrite(parent / "checkpoint-4", lambda w: w.update({"model.layers.0.input_layernorm.weight": w["model.layers.0.input_layernorm.weight"].float()}))
    _rewrite(parent / "checkpoint-1", lambda w: w.update({"extra.weight": torch.zeros(2)}))
    reads = []
    monkeypatch.setattr(offline.TensorReader, "read_float", lambda *a, **k: reads.append(a))
    with pytest.raises(RelexInputError) as caught:
        offline.extrapolate_checkpoints(base, [parent], 9, tmp_path / "out", progress=False)
    message = str(caught.value)
    assert "4 problem(s)" in message
    assert "step 2" in message and "missing tensor model.norm.weight" in message
    assert "step 3" in message and "model.layers.0.mlp.up_proj.weight has shape [3, 3], the base has [64, 32]" in message
    assert "step 4" in message and "model.layers.0.input_layernorm.weight is float32" in message
    assert "step 1" in message and "extra.weight is not in the base model" in message
    assert reads == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty", "no checkpoints found in"),
        ("one", "need at least 2 checkpoints"),
        ("missing_path", "does not exist"),
        ("unnamed", "cannot tell the step"),
        ("steps_count", "--steps lists 2 step"),
        ("no_weights", "no model weights found"),
        ("window", "too few for rank=1"),
        ("rank", "too few for rank=3"),
        ("fit_steps", "no checkpoint has a step <= --fit-steps 0"),
    ],
)
def test_bad_inputs(case, match, tied, tmp_path):
    base, parent = tied
    kwargs = {}
    checkpoints: list = [parent]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        checkpoints = [tmp_path / "empty"]
    elif case == "one":
        checkpoints = [parent / "checkpoint-1"]
    elif case == "missing_path":
        checkpoints = [tmp_path / "nowhere"]
    elif case == "unnamed":
        checkpoints = [base]
        base = parent / "checkpoint-1"
    elif case == "steps_count":
        kwargs["steps"] = [1, 2]
    elif case == "no_weights":
        (tmp_path / "checkpoint-7").mkdir()
        checkpoints = [parent / "checkpoint-1", tmp_path / "checkpoint-7"]
    elif case == "window":
        kwargs["window"] = 1 + 1
        kwargs["fit"] = "poly2"
    elif case == "rank":
        kwargs["rank"] = 3
        kwargs["fit_steps"] = 3
    elif case == "fit_steps":
        kwargs["fit_steps"] = 0
    if case == "window":
        match = "too few for rank=1 and fit='poly2'"
    with pytest.raises(RelexInputError, match=match):
        offline.extrapolate_checkpoints(base, checkpoints, 20, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_duplicate_steps_are_refused(tied, tmp_path):
    base, parent = tied
    with pytest.raises(RelexInputError, match="step 2 appears twice"):
        discover_checkpoints([parent / "checkpoint-2", parent / "checkpoint-2"])


def test_existing_output_needs_overwrite(tied, tmp_path):
    base, parent = tied
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite"):
        offline.extrapolate_checkpoints(base, [parent], 20, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    offline.extrapolate_checkpoints(base, [parent], 20, tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_no_complete_looking_output(existing, tied, tmp_path, monkeypatch):
    base, parent = tied
    if existing:
        offline.extrapolate_checkpoints(base, [parent], 20, tmp_path / "out", progress=False)
        before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls = []
    original = SafetensorsWriter.write

    def failing(self, name, start, values):
        calls.append(name)
        if len(calls) == 7:
            raise OSError("disk full")
        return original(self, name, start, values)

    monkeypatch.setattr(SafetensorsWriter, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        offline.extrapolate_checkpoints(base, [parent], [30, 40], tmp_path / "out", overwrite=True, progress=False)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers == []  # no staging directory survives
    if existing:
        assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # the old output is intact
    else:
        assert not (tmp_path / "out").exists()


def test_incomplete_shard_is_refused(tmp_path):
    writer = SafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (4,)), ("b", torch.bfloat16, (2, 3))])
    writer.write("a", 0, torch.arange(4.0))
    writer.write("b", 0, torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="not completely written: b"):
        writer.close()
    writer = SafetensorsWriter(tmp_path / "y.safetensors", [("a", torch.float32, (4,)), ("b", torch.bfloat16, (2, 3))],
                               {"format": "pt"})
    writer.write("b", 3, torch.full((3,), 2.0, dtype=torch.bfloat16))
    writer.write("a", 2, torch.tensor([2.0, 3.0]))
    writer.write("b", 0, torch.ones(3, dtype=torch.bfloat16))
    writer.write("a", 0, torch.tensor([0.0, 1.0]))
    writer.close()
    loaded = load_file(tmp_path / "y.safetensors")
    assert torch.equal(loaded["a"], torch.arange(4.0))
    assert torch.equal(loaded["b"], torch.tensor([[1.0] * 3, [2.0] * 3], dtype=torch.bfloat16))


def test_base_with_fp32_and_bf16_checkpoints(tmp_path):
    """A float32 base with bfloat16 snapshots: deltas in fp32, output in the base's dtype unless --dtype."""
    base, parent = make_trajectory(tmp_path, "llama-tied", steps=(1, 2, 3))
    _rewrite(base, lambda w: w.update({k: v.float() for k, v in w.items()}))
    reports = offline.extrapolate_checkpoints(base, [parent], 6, tmp_path / "out", progress=False)
    assert reports[0]["tensors"]["model.norm.weight"]["dtype"] == "float32"
    assert all(v.dtype == torch.float32 for v in _load_dir(tmp_path / "out").values())
    offline.extrapolate_checkpoints(base, [parent], 6, tmp_path / "bf", dtype="bfloat16", progress=False)
    assert all(v.dtype == torch.bfloat16 for v in _load_dir(tmp_path / "bf").values())
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_model_dir_reads_only_headers(tied):
    base, _ = tied
    model = open_model_dir(base)
    entry = model.tensors["model.embed_tokens.weight"]
    assert entry.shape == (96, 32) and entry.dtype == torch.bfloat16 and model.fmt == "safetensors"
    assert os.path.getsize(entry.file) >= entry.offset + entry.nbytes


def test_reports_carry_the_window_diagnostic_and_flag_targets_beyond_it(tmp_path):
    base, parent = make_trajectory(tmp_path / "wavy", two_directions=True)  # a second direction that oscillates
    diagnosis = offline.report_checkpoints(base, [parent], tmp_path / "report", plots=False, progress=False)["diagnostic"]
    assert diagnosis["num_snapshots"] == 6 and diagnosis["growth_exponent"] is not None
    k_max = diagnosis["supported_step"]
    assert 6 <= k_max < 120  # the oscillating direction limits the horizon
    near, far = int(k_max), 120
    # `relex report` flags a target beyond K_max as `relex extrapolate` does, and only such a target
    for target, beyond in ((far, True), (near, False)):
        report = offline.report_checkpoints(base, [parent], tmp_path / f"report{target}", target_steps=[target],
                                            plots=False, progress=False)
        assert any(f"target step {target} is beyond the supported horizon" in w for w in report["warnings"]) is beyond
    reports = offline.extrapolate_checkpoints(base, [parent], [near, far] if near > 6 else [far], tmp_path / "out",
                                              progress=False)
    flagged = {r["target_step"]: any("beyond the supported horizon" in w for w in r["warnings"]) for r in reports}
    assert flagged[far] and (near <= 6 or not flagged[near])
    assert all(r["diagnostic"]["supported_step"] == pytest.approx(k_max) for r in reports)


def test_a_base_at_a_later_step_is_the_trend_origin(tmp_path):
    """θ_0 at step 100 (a checkpoint of the run as the base): the same trajectory shifted by 100 steps gives the same
    prediction, horizon and K_max − 100 as from step 0, for a trend that depends on the origin (√t)."""
    import shutil

    steps = (1, 2, 3, 4, 5, 6)
    base, parent = make_trajectory(tmp_path, "llama-tied", steps=steps)
    shifted = tmp_path / "later"
    shutil.copytree(base, shifted / "checkpoint-100")
    for t in steps:
        shutil.copytree(parent / f"checkpoint-{t}", shifted / "run" / f"checkpoint-{100 + t}")
    options = dict(fit="power", power=0.5, dtype="float32", progress=False)
    at_zero = offline.extrapolate_checkpoints(base, [parent], 12, tmp_path / "a", **options)[0]
    later = offline.extrapolate_checkpoints(shifted / "checkpoint-100", [shifted / "run"], 112, tmp_path / "b", **options)[0]
    a, b = _load_dir(tmp_path / "a"), _load_dir(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    assert later["settings"]["base_step"] == 100 and later["candidate"]["trend"]["origin"] == 100.0
    assert later["horizon_ratio"] == pytest.approx(at_zero["horizon_ratio"]) == pytest.approx(2.0)
    assert later["diagnostic"]["k_max"] == pytest.approx(at_zero["diagnostic"]["k_max"] + 100, abs=1)
    report = offline.report_checkpoints(shifted / "checkpoint-100", [shifted / "run"], tmp_path / "r", fit="power", power=0.5,
                                        target_steps=[112], plots=False, progress=False)
    assert report["diagnostic"]["k_max"] == later["diagnostic"]["k_max"]
    assert report["horizon_ratios"]["112"] == pytest.approx(2.0)
    # negative control: the same directories with θ_0 declared at step 0 fit √t on another axis
    offline.extrapolate_checkpoints(shifted / "checkpoint-100", [shifted / "run"], 112, tmp_path / "c", base_step=0, **options)
    c = _load_dir(tmp_path / "c")
    assert not torch.allclose(c["model.norm.weight"], a["model.norm.weight"], rtol=1e-4, atol=1e-6)
    # bad input, refused before anything is written
    with pytest.raises(RelexInputError, match="before the base's step 103"):
        offline.extrapolate_checkpoints(shifted / "run" / "checkpoint-103", [shifted / "run"], 112, tmp_path / "d", **options)
    with pytest.raises(RelexInputError, match="give a step >= 101"):
        offline.extrapolate_checkpoints(shifted / "checkpoint-100", [shifted / "run"], 100, tmp_path / "d", **options)
    with pytest.raises(RelexInputError, match="base_step=-1 must be an int >= 0"):
        offline.extrapolate_checkpoints(base, [parent], 12, tmp_path / "d", base_step=-1, **options)
    assert not (tmp_path / "d").exists()
