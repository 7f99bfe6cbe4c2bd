"""RELEX under DDP, FSDP2, FSDP1 and on LoRA adapters with 2 real gloo processes on CPU.

One ``torchrun --nproc_per_node 2`` launch (``tests/_distributed_worker.py``) runs every scenario; each test
checks one scenario's files. The expected weights come from an independent single-process computation
(``torch.linalg.svd`` + least squares, no ``relex_callback`` code) on full snapshots that a separate
callback captured during the same run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
    unwrap_model,
    write_prediction,
)

try:
    from tests._tiny import tiny_qwen2
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from _tiny import tiny_qwen2

WORKER = Path(__file__).with_name("_distributed_worker.py")
SCENARIOS = ["ddp", "fsdp2", "fsdp1", "ddp_peft", "unsupported"]
OBSERVE, TARGETS = 4, [10, 20]
WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: Path, args: list[str], nproc: int = WORLD, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in ``nproc`` processes with ``torch.distributed.run`` on a free local port."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(script), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("relex-distributed")
    result = run_torchrun(WORKER, [str(out), *SCENARIOS])
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return out


def scenario(runs: Path, name: str) -> Path:
    directory = runs / name
    errors = sorted(directory.glob("error-rank*.txt"))
    if errors:
        pytest.fail(f"scenario {name} failed:\n" + "\n".join(e.read_text() for e in errors))
    return directory


# -- the independent oracle -----------------------------------------------------------------------------------


def oracle(snapshots: dict[str, torch.Tensor], targets: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """θ̂(K) = θ_0 + ĉ(K)·v from the top right singular vector of the stacked deltas (fp64, one process)."""
    steps = sorted({int(k.split("/", 1)[0]) for k in snapshots})
    names = sorted({k.split("/", 1)[1] for k in snapshots})
    observed = [s for s in steps if s > 0]
    x = torch.tensor(observed, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    out: dict[int, dict[str, torch.Tensor]] = {t: {} for t in targets}
    for name in names:
        base = snapshots[f"0/{name}"].double()
        deltas = torch.stack([(snapshots[f"{s}/{name}"].double() - base).reshape(-1) for s in observed])
        _, sigma, vh = torch.linalg.svd(deltas, full_matrices=False)
        if sigma[0] <= 1e-12:
            for t in targets:
                out[t][name] = base
            continue
        coefficients = deltas @ vh[0]
        line = torch.linalg.lstsq(design, coefficients[:, None]).solution[:, 0]
        for t in targets:
            out[t][name] = base + ((line[0] + line[1] * t) * vh[0]).view_as(base)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


def infos(directory: Path) -> list[dict]:
    return [json.loads((directory / f"info-rank{r}.json").read_text()) for r in range(WORLD)]


def check_sharded_run(directory: Path, kinds: set[str], exact_halves: bool) -> None:
    snapshots = load_file(str(directory / "snapshots.safetensors"))
    expected = oracle(snapshots, TARGETS)
    names = list(expected[TARGETS[0]])
    # the HF checkpoints written by rank 0 hold the full extrapolated weights
    for target in TARGETS:
        saved = load_file(str(directory / f"relex-step{target}" / "model.safetensors"))
        for name in names:
            assert_close(saved[name], expected[target][name], f"step {target} {name}")
        report = json.loads((directory / f"relex-step{target}" / "relex_report.json").read_text())
        assert report["buffer"]["world_size"] == WORLD
    # every process ends with the same live weights: the prediction of the last target
    finals = [load_file(str(directory / f"final-rank{r}.safetensors")) for r in range(WORLD)]
    for name in names:
        key = name if name in finals[0] else clean_name(name)
        assert torch.equal(finals[0][key], finals[1][key]), f"ranks differ on {name}"
        assert_close(finals[0][key], expected[TARGETS[-1]][name], f"live {name}")
    # buffer: each process holds about half; all of it adds up to the single-process buffer
    info = infos(directory)
    assert {k for i in info for k in i["kinds"]} == kinds
    total_elements = sum(v.numel() for k, v in snapshots.items() if k.startswith("0/"))
    assert sum(i["tracked_elements"] for i in info) == total_elements
    single_bytes = total_elements * (OBSERVE * 4 + 4)  # float32 deltas + float32 θ_0
    assert sum(i["buffer_bytes"] for i in info) == single_bytes
    for i in info:
        assert i["report_buffer"]["bytes_all_processes"] == single_bytes
        share = i["buffer_bytes"] / single_bytes
        if exact_halves:
            assert abs(i["buffer_bytes"] - single_bytes / WORLD) <= len(names) * (OBSERVE * 4 + 4), share
        else:
            assert 0.35 <= share <= 0.65, share
    # the fit communicates only the packed Gram matrices: T(T+1)/2 fp64 values per tensor
    for i in info:
        comm = i["communication_bytes"]
        assert comm["last_fit_bytes"] == len(names) * OBSERVE * (OBSERVE + 1) // 2 * 8
        assert comm["cumulative"]["gram_all_reduce"] == comm["last_fit_bytes"]


@pytest.mark.distributed
def test_ddp_trainer_matches_single_process_and_halves_buffer(runs):
    check_sharded_run(scenario(runs, "ddp"), {"ReplicatedSlice"}, exact_halves=True)


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
