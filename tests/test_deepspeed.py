"""RELEX under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 with the real transformers Trainer (skipped without deepspeed).

The fit tracks DeepSpeed's fp32 master partitions; the prediction must reach both the fp32 master copy
(else the next optimizer step undoes it) and the 16-bit weights, identically on every process, and the
halt-mode checkpoint must hold the full weights. Expected values come from an independent single-process
computation on full fp32 masters gathered by a separate callback (``safe_get_full_fp32_param``).

DeepSpeed runs on CPU through its CPU accelerator with the gloo backend, so these tests run on 2 CPU
processes wherever ``import deepspeed`` works (``pip install deepspeed`` builds no extension by default).
With CUDA, ``RELEX_TEST_WORLD`` (default: 2 on CPU, the GPU count capped at 2 on CUDA) sets the processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

try:
    from tests._distributed_checks import check_generation, check_jump_run, check_sharded_run, infos, run_scenarios, scenario, tampered
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from _distributed_checks import check_generation, check_jump_run, check_sharded_run, infos, run_scenarios, scenario, tampered

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install deepspeed)"),
]

SCENARIOS = ["zero1", "zero2", "zero3", "zero2_bf16", "zero3_bf16", "zero2_jump", "zero2_jump_reset", "zero3_jump"]


def _world() -> int:
    if "RELEX_TEST_WORLD" in os.environ:
        return int(os.environ["RELEX_TEST_WORLD"])
    return min(torch.cuda.device_count(), 2) if torch.cuda.is_available() else 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return run_scenarios(tmp_path_factory.mktemp("relex-deepspeed"), SCENARIOS, nproc=_world())


FP32 = {"fp32/": torch.float32, "16bit/": torch.float32}
BF16 = {"fp32/": torch.float32, "16bit/": torch.bfloat16}


def test_zero1_fp32_masters_and_weights(runs):
    check_sharded_run(scenario(runs, "zero1"), {"ZeroFragment"}, exact_halves=False, world=_world(), final_keys=FP32)


def test_zero2_fp32_masters_and_weights(runs):
    check_sharded_run(scenario(runs, "zero2"), {"ZeroFragment"}, exact_halves=False, world=_world(), final_keys=FP32)


def test_zero3_fp32_masters_and_weights(runs):
    directory = scenario(runs, "zero3")
    check_sharded_run(directory, {"Zero3Partition"}, exact_halves=True, world=_world(), final_keys=FP32)
    assert all(i["zero3_persistent"] == 0 for i in infos(directory, _world()))  # all partitioned between steps


def test_zero2_bf16_reaches_master_and_16bit_copy(runs):
    check_sharded_run(scenario(runs, "zero2_bf16"), {"ZeroFragment"}, exact_halves=False, world=_world(),
                      final_keys=BF16, saved_dtype=torch.bfloat16)


def test_zero3_bf16_reaches_master_and_16bit_copy(runs):
    directory = scenario(runs, "zero3_bf16")
    check_sharded_run(directory, {"Zero3Partition"}, exact_halves=True, world=_world(), final_keys=BF16,
                      saved_dtype=torch.bfloat16)
    assert all(i["zero3_persistent"] > 0 for i in infos(directory, _world()))  # small tensors stay gathered


def test_zero2_jump_mode_probe_and_bit_exact_restore_of_masters_and_weights(runs):
    directory = scenario(runs, "zero2_jump")
    info = check_jump_run(directory, _world(), reset=False, replicated=("fp32/", "16bit/"))
    assert info["kinds"] == ["ZeroFragment"]
    values = load_file(str(directory / "jump-rank0.safetensors"))
    for name in info["tracked"]:  # an accepted jump reached the fp32 master (else the next step undoes it) and the weights
        for step in (6, 8):
            assert torch.equal(values[f"post/{step}/16bit/{name}"], values[f"post/{step}/fp32/{name}"]), (step, name)


def test_zero3_jump_mode_probe_generates_on_partitions_and_restores_masters_and_weights_bit_exactly(runs):
    """ZeRO-3 with every parameter partitioned: a rejected jump leaves the full fp32 masters and the full 16-bit
    weights bit for bit as they were on every process, accepted ones reach both; the probe's ``generate`` runs on the
    partitioned model with different prompts, batch counts and completion lengths per process, and its reward and
    loss equal a single-process computation on the gathered weights."""
    directory = scenario(runs, "zero3_jump")
    info = check_jump_run(directory, _world(), reset=False, replicated=("fp32/", "16bit/"))
    assert info["kinds"] == ["Zero3Partition"]
    values = load_file(str(directory / "jump-rank0.safetensors"))
    for name in info["tracked"]:
        for step in (6, 8):
            assert torch.equal(values[f"post/{step}/16bit/{name}"], values[f"post/{step}/fp32/{name}"]), (step, name)
    check_generation(directory, _world(), prefix="16bit/", tie=True)


@pytest.mark.parametrize("copy", ["fp32/", "16bit/"])
def test_zero3_jump_checks_catch_a_copy_left_jumped_on_one_process(runs, tmp_path, copy):
    """Negative control: rank 1's fp32 masters (or 16-bit weights) one ulp off after the rejected jump, or left at
    their pre-jump values after an accepted one, fail the checks."""
    directory = scenario(runs, "zero3_jump")
    key = f"{copy}model.layers.0.mlp.up_proj.weight"

    def nudged(tensors):
        value = tensors[f"post/4/{key}"].clone().reshape(-1)
        value[0] = torch.nextafter(value[0], value[0] + 1)
        return {f"post/4/{key}": value.view_as(tensors[f"post/4/{key}"])}

    for label, edit in (("not restored", nudged), ("not jumped", lambda t: {f"post/6/{key}": t[f"pre/6/{key}"]})):
        with pytest.raises(AssertionError):
            check_jump_run(tampered(directory, tmp_path / label, rank=1, edit=edit), _world(), reset=False,
                           replicated=("fp32/", "16bit/"))


def test_zero_refuses_optimizer_reset_at_train_begin(runs):
    directory = scenario(runs, "zero2_jump_reset")
    for rank in range(_world()):
        message = json.loads((directory / f"errors-rank{rank}.json").read_text())["reset"]
        assert message is not None and message.startswith("optimizer_policy='reset' is not supported under DeepSpeed ZeRO")
        assert "Use optimizer_policy='keep'." in message
