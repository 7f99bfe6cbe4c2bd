"""RELEX under DDP, FSDP2, FSDP1 and on LoRA adapters with 2 real gloo processes on CPU.

One ``torchrun --nproc_per_node 2`` launch (``tests/_distributed_worker.py``) runs every scenario; each test
checks one scenario's files. The expected weights come from an independent single-process computation
(``torch.linalg.svd`` + least squares, no ``relex_callback`` code) on full snapshots that a separate
callback captured during the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relex_callback.buffer import TrackedTensor
from relex_callback.distributed import (
    all_reduce_grams,
    clean_name,
    communication_bytes,
    detect_layout,
    gather_state_dict,
    partition_range,
    track_parameters,
    write_prediction,
)

try:
    from tests._distributed_checks import (POISONED, TARGETS, assert_close, check_generation, check_jump_run, check_nonfinite_stop,
                                          check_sharded_run, oracle, run_scenarios, scenario, tampered)
    from tests._tiny import tiny_qwen2
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from _distributed_checks import (POISONED, TARGETS, assert_close, check_generation, check_jump_run, check_nonfinite_stop,
                                     check_sharded_run, oracle, run_scenarios, scenario, tampered)
    from _tiny import tiny_qwen2

WORLD = 2

SCENARIOS = ["ddp", "ddp_disk", "fsdp2", "fsdp1", "ddp_peft", "unsupported", "ddp_jump", "fsdp2_jump", "fsdp2_trainer",
             "fsdp2_trainer_jump", "ddp_nonfinite"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return run_scenarios(tmp_path_factory.mktemp("relex-distributed"), SCENARIOS)


@pytest.mark.distributed
def test_ddp_trainer_matches_single_process_and_halves_buffer(runs):
    check_sharded_run(scenario(runs, "ddp"), {"ReplicatedSlice"}, exact_halves=True)


@pytest.mark.distributed
def test_ddp_disk_store_matches_in_memory_ddp_with_one_file_pair_per_process(runs):
    directory, memory = scenario(runs, "ddp_disk"), scenario(runs, "ddp")
    for target in TARGETS:  # same run, same slices: the streamed fit is bit-identical to the in-memory one
        disk_model = load_file(str(directory / f"relex-step{target}" / "model.safetensors"))
        memory_model = load_file(str(memory / f"relex-step{target}" / "model.safetensors"))
        for name, value in memory_model.items():
            assert torch.equal(disk_model[name], value), (target, name)
    expected = oracle(load_file(str(directory / "snapshots.safetensors")), TARGETS)
    saved = load_file(str(directory / f"relex-step{TARGETS[-1]}" / "model.safetensors"))
    for name, value in expected[TARGETS[-1]].items():  # and both match the independent single-process oracle
        assert_close(saved[name], value, name, torch.float32)
    store = directory / "store"
    sizes = [(store / f"deltas-rank{r:05d}-of-{WORLD:05d}.bin").stat().st_size for r in range(WORLD)]
    bases = [load_file(str(store / f"base-rank{r:05d}-of-{WORLD:05d}.safetensors")) for r in range(WORLD)]
    total = sum(v.numel() for v in expected[TARGETS[-1]].values())
    assert sum(v.numel() for b in bases for v in b.values()) == total  # θ_0 split between the processes, not copied
    assert all(abs(size - sizes[0]) < 0.2 * sizes[0] for size in sizes)


@pytest.mark.distributed
def test_fsdp2_matches_single_process(runs):
    check_sharded_run(scenario(runs, "fsdp2"), {"LocalShard"}, exact_halves=True)


@pytest.mark.distributed
def test_fsdp1_use_orig_params_matches_single_process(runs):
    check_sharded_run(scenario(runs, "fsdp1"), {"LocalShard"}, exact_halves=False)


@pytest.mark.distributed
def test_ddp_lora_writes_adapter_and_merged_model(runs):
    from peft import PeftModel

    directory = scenario(runs, "ddp_peft")
    snapshots = load_file(str(directory / "snapshots.safetensors"))
    expected = oracle(snapshots, TARGETS)
    assert all(".lora_" in name for name in expected[TARGETS[0]])
    frozen = load_file(str(directory / "frozen.safetensors"))
    for target in TARGETS:
        adapter_dir = directory / f"relex-step{target}"
        saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
        assert len(saved) == len(expected[target])
        for name, value in expected[target].items():
            assert_close(saved[name.replace(".default", "")], value, f"adapter {name}")
        loaded = PeftModel.from_pretrained(tiny_qwen2(), str(adapter_dir))
        live = dict(loaded.named_parameters())
        for name, value in expected[target].items():
            assert_close(live[name], value, f"loaded {name}")
        merged = load_file(str(directory / f"relex-step{target}-merged" / "model.safetensors"))
        assert not any("lora" in k for k in merged)
        for prefix in ("base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.v_proj"):
            lora_a, lora_b = expected[target][f"{prefix}.lora_A.default.weight"], expected[target][f"{prefix}.lora_B.default.weight"]
            base = frozen[f"{prefix}.base_layer.weight"]
            key = prefix.removeprefix("base_model.model.") + ".weight"
            assert_close(merged[key], base.double() + 2.0 * lora_b @ lora_a, f"merged {key}")  # scaling = alpha / r
    finals = [load_file(str(directory / f"final-rank{r}.safetensors")) for r in range(WORLD)]
    for name, value in expected[TARGETS[-1]].items():
        assert torch.equal(finals[0][name], finals[1][name])
        assert_close(finals[0][name], value, f"live {name}")


@pytest.mark.distributed
def test_unsupported_layouts_raise_at_train_begin(runs):
    directory = scenario(runs, "unsupported")
    for rank in range(WORLD):
        errors = json.loads((directory / f"errors-rank{rank}.json").read_text())
        assert errors["fsdp1_flat"] is not None and "use_orig_params=True" in errors["fsdp1_flat"]
        assert errors["tensor_parallel"] is not None and "Shard(dim=1)" in errors["tensor_parallel"]
        assert "up_proj" in errors["tensor_parallel"]
        assert errors["fsdp1_generate"] is not None and errors["fsdp1_generate"].startswith("RewardProbe cannot generate on an FSDP1")


@pytest.mark.distributed
def test_ddp_jump_mode_probe_restore_and_optimizer_reset(runs):
    info = check_jump_run(scenario(runs, "ddp_jump"), WORLD, reset=True, replicated=("",))
    assert info["kinds"] == ["ReplicatedSlice"]


@pytest.mark.distributed
def test_fsdp2_jump_mode_probe_restore_and_optimizer_reset_on_every_shard(runs):
    directory = scenario(runs, "fsdp2_jump")
    info = check_jump_run(directory, WORLD, reset=True)
    assert info["kinds"] == ["LocalShard"]
    shards = [load_file(str(directory / f"jump-rank{r}.safetensors")) for r in range(WORLD)]
    key = "post/6/model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(shards[0][key], shards[1][key])  # really sharded: each process holds its own rows


@pytest.mark.distributed
def test_fsdp2_jump_checks_catch_a_process_that_did_not_restore_or_did_not_jump(runs, tmp_path):
    """Negative controls: the checks above fail when one process's shard is one ulp off after the rejected jump,
    or one process kept its shard at an accepted jump."""
    directory = scenario(runs, "fsdp2_jump")
    key = "model.layers.0.mlp.up_proj.weight"
    for label, edit in (("not restored", lambda t: {f"post/4/{key}": _nudged(t[f"post/4/{key}"])}),
                        ("not jumped", lambda t: {f"post/6/{key}": t[f"pre/6/{key}"]})):
        with pytest.raises(AssertionError):
            check_jump_run(tampered(directory, tmp_path / label, rank=1, edit=edit), WORLD, reset=True)


def _nudged(value: torch.Tensor) -> torch.Tensor:
    """``value`` with its first element moved to the next representable number."""
    flat = value.clone().reshape(-1)
    flat[0] = torch.nextafter(flat[0], flat[0] + 1)
    return flat.view_as(value)


@pytest.mark.distributed
def test_fsdp2_through_the_real_trainer_matches_single_process(runs):
    """FSDP2 applied by transformers (``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))``) and
    trained by the real ``Trainer`` (accelerate's FSDP plugin needs an accelerator; see docs/distributed.md)."""
    check_sharded_run(scenario(runs, "fsdp2_trainer"), {"LocalShard"}, exact_halves=True)


@pytest.mark.distributed
def test_fsdp2_trainer_jump_with_a_probe_that_generates_on_the_shards(runs):
    """The probe's ``generate`` runs on the sharded model with different prompts, batch counts and completion lengths
    on the two processes (no hang), and each process's reward equals one computed on one process from the full
    weights; the jumps are restored / kept on every shard as with the hand-written loop."""
    directory = scenario(runs, "fsdp2_trainer_jump")
    info = check_jump_run(directory, WORLD, reset=True, replicated=("full/",))
    assert info["kinds"] == ["LocalShard"]
    check_generation(directory, WORLD, prefix="full/", tie=False)


@pytest.mark.distributed
@pytest.mark.parametrize("case, errors", [
    ("prediction", ["non-finite predictions in (another process)", f"non-finite predictions in ['{POISONED}']"]),
    ("deltas", [f"non-finite deltas in ['{POISONED}']"] * 2),
    ("probe", ["RuntimeError: RELEX: the probe raised on 1 other process(es)", "RuntimeError: reward server unreachable"]),
])
def test_a_fault_on_one_process_stops_every_process_with_the_weights_as_before_the_jump(runs, case, errors):
    """Rank 1 alone has a NaN in its prediction slice or in one recorded delta, or its probe raises on the jumped
    weights: both processes stop at step 4 with the single-process message (the other one names "another process"),
    and every process's live weights are bit for bit those before the jump."""
    check_nonfinite_stop(scenario(runs, "ddp_nonfinite") / case, WORLD, errors)


@pytest.mark.distributed
def test_the_fault_check_catches_a_process_whose_weights_changed(runs, tmp_path):
    """Negative control: one element of rank 1's final weights one ulp off fails the check."""
    directory = scenario(runs, "ddp_nonfinite") / "prediction"
    key = f"final/{POISONED}"
    copy = tampered(directory, tmp_path / "copy", rank=1, edit=lambda t: {key: _nudged(t[key])})
    with pytest.raises(AssertionError):
        check_nonfinite_stop(copy, WORLD, ["non-finite predictions"] * 2)


# -- single-process behaviour of the distributed helpers (no processes spawned) -------------------------------


def test_partition_range_covers_every_element_once():
    for numel in (0, 1, 5, 64, 1001):
        for world in (1, 2, 3, 8):
            ranges = [partition_range(numel, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_single_process_helpers_are_plain():
    model = tiny_qwen2(tie=True)
    assert detect_layout(model) == "single"
    chosen = [(n, p) for n, p in model.named_parameters()]
    tracked = track_parameters(model, chosen)
    assert all(type(t) is TrackedTensor and t.numel == t.param.numel() for t in tracked)
    grams = [torch.randn(3, 3)]
    assert all_reduce_grams(grams) is grams
    before = communication_bytes()
    prediction = {t.name: torch.full((t.numel,), 0.5) for t in tracked}
    state = gather_state_dict(model, tracked, prediction)
    assert torch.equal(state["lm_head.weight"], torch.full_like(model.lm_head.weight, 0.5))  # tied alias too
    assert not torch.equal(model.lm_head.weight, state["lm_head.weight"])  # the live model is untouched
    write_prediction(tracked, prediction)
    assert torch.equal(model.model.embed_tokens.weight, torch.full_like(model.model.embed_tokens.weight, 0.5))
    assert communication_bytes() == before  # nothing is communicated on one process


def test_clean_name_strips_wrappers():
    assert clean_name("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp.weight") == "model.layers.0.mlp.weight"
    assert clean_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    assert clean_name("model._checkpoint_wrapped_module.x") == "model.x"


@pytest.mark.parametrize("kind", ["MEGATRON_LM", "XLA"])
def test_accelerate_backends_without_support_raise(monkeypatch, kind):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from relex_callback.distributed import UnsupportedSetupError

    monkeypatch.setitem(AcceleratorState._shared_state, "distributed_type", DistributedType[kind])
    with pytest.raises(UnsupportedSetupError, match=kind):
        detect_layout(tiny_qwen2())


def test_deepspeed_without_zero_metadata_raises(monkeypatch):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from relex_callback.distributed import UnsupportedSetupError

    monkeypatch.setitem(AcceleratorState._shared_state, "distributed_type", DistributedType.DEEPSPEED)
    with pytest.raises(UnsupportedSetupError, match="no ZeRO partition metadata"):
        detect_layout(tiny_qwen2())
