"""Shared by the multi-process tests: launch ``_distributed_worker.py`` with torchrun and check its files
against an independent single-process RELEX (``torch.linalg.svd`` + least squares, no relex_callback code)."""

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

WORKER = Path(__file__).with_name("_distributed_worker.py")
OBSERVE, TARGETS = 4, [10, 20]  # as in the worker
JUMP_STEPS = (4, 6, 8)  # observe=4, jump_every=2, max_steps=8


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: Path, args: list[str], nproc: int = 2, timeout: float = 420, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` in ``nproc`` processes with ``torch.distributed.run`` on a free local port."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(script), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def run_scenarios(out: Path, scenarios: list[str], nproc: int = 2, env: dict | None = None) -> Path:
    """Run the worker's ``scenarios`` in one launch (each test then reads its scenario's folder)."""
    result = run_torchrun(WORKER, [str(out), *scenarios], nproc=nproc, env=env)
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return out


def scenario(runs: Path, name: str) -> Path:
    directory = runs / name
    errors = sorted(directory.glob("error-rank*.txt"))
    if errors:
        pytest.fail(f"scenario {name} failed:\n" + "\n".join(e.read_text() for e in errors))
    return directory


def oracle(snapshots: dict[str, torch.Tensor], targets: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """θ̂(K) = θ_0 + ĉ(K)·v from the top right singular vector of the stacked deltas (fp64, one process).

    ``snapshots`` maps ``"{step}/{name}"`` to the full tensor; step 0 is θ_0.
    """
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
        line = torch.linalg.lstsq(design, (deltas @ vh[0])[:, None]).solution[:, 0]
        for t in targets:
            out[t][name] = base + ((line[0] + line[1] * t) * vh[0]).view_as(base)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, dtype: torch.dtype = torch.float32) -> None:
    """fp32: tight; a 16-bit copy: within one rounding of the expected value."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(actual.double(), expected.double(), rtol=eps, atol=1e-5, msg=lambda m: f"{name}: {m}")


def infos(directory: Path, world: int) -> list[dict]:
    return [json.loads((directory / f"info-rank{r}.json").read_text()) for r in range(world)]


def check_sharded_run(
    directory: Path,
    kinds: set[str],
    exact_halves: bool,
    world: int = 2,
    final_keys: dict[str, torch.dtype] | None = None,
    saved_dtype: torch.dtype = torch.float32,
) -> None:
    """The checkpoints, the live weights of every process, the buffer split and the fit's communication.

    ``final_keys`` maps a key prefix of the ``final-rank*.safetensors`` files (e.g. ``"fp32/"``) to the
    precision that copy has; default: one fp32 copy without a prefix.
    """
    snapshots = load_file(str(directory / "snapshots.safetensors"))
    expected = oracle(snapshots, TARGETS)
    names = list(expected[TARGETS[0]])
    moved = max(float((snapshots[f"{OBSERVE}/{n}"] - snapshots[f"0/{n}"]).abs().max()) for n in names)
    assert moved > 1e-3, f"training barely moved the weights ({moved}): the comparisons below would pass trivially"
    for target in TARGETS:  # rank 0's checkpoints hold the full extrapolated weights
        saved = load_file(str(directory / f"relex-step{target}" / "model.safetensors"))
        for name in names:
            assert saved[name].dtype == saved_dtype, (name, saved[name].dtype)
            assert_close(saved[name], expected[target][name], f"step {target} {name}", saved_dtype)
        report = json.loads((directory / f"relex-step{target}" / "relex_report.json").read_text())
        assert report["buffer"]["world_size"] == world
    finals = [load_file(str(directory / f"final-rank{r}.safetensors")) for r in range(world)]
    for prefix, dtype in (final_keys or {"": torch.float32}).items():
        for name in names:  # every process ends with the same live weights: the last target's prediction
            key = prefix + name
            for other in finals[1:]:
                assert torch.equal(finals[0][key], other[key]), f"ranks differ on {key}"
            assert_close(finals[0][key], expected[TARGETS[-1]][name], f"live {key}", dtype)
    info = infos(directory, world)
    assert {k for i in info for k in i["kinds"]} == kinds
    total = sum(v.numel() for k, v in snapshots.items() if k.startswith("0/"))
    assert sum(i["tracked_elements"] for i in info) == total
    single_bytes = total * (OBSERVE * 4 + 4)  # float32 deltas + float32 θ_0, as one process would hold them
    assert sum(i["buffer_bytes"] for i in info) == single_bytes
    for i in info:
        assert i["report_buffer"]["bytes_all_processes"] == single_bytes
        share = i["buffer_bytes"] / single_bytes
        if exact_halves:
            assert abs(i["buffer_bytes"] - single_bytes / world) <= len(names) * (OBSERVE * 4 + 4), share
        else:
            assert abs(share - 1 / world) <= 0.15, share
        # the fit communicates only the packed Gram matrices: T(T+1)/2 fp64 values per tensor
        comm = i["communication_bytes"]
        per_fit = len(names) * OBSERVE * (OBSERVE + 1) // 2 * 8 if world > 1 else 0
        assert comm["last_fit_bytes"] == per_fit
        assert comm["cumulative"].get("gram_all_reduce", 0) == per_fit


def check_jump_run(directory: Path, world: int = 2, reset: bool = True, replicated: tuple[str, ...] = ()) -> dict:
    """Jump mode with ``_distributed_worker.rank_probe``: every process saw the same (averaged) scores and took
    the same decisions; the rejected jump at step 4 left every process's tensors bit for bit as they were; the
    accepted jumps at 6 and 8 moved every tracked tensor; ``reset`` zeroed exactly the jumped parameters' optimizer
    state on every process. Keys starting with a prefix in ``replicated`` must be equal on every process."""
    infos_ = [json.loads((directory / f"jump-rank{r}.json").read_text()) for r in range(world)]
    tensors = [load_file(str(directory / f"jump-rank{r}.safetensors")) for r in range(world)]
    mean = (world - 1) / 2  # the raw scores are 10 + rank, rank (+ 20): only the mean is the same everywhere
    expected = [(4, "rejected", 4, 10 + mean, mean), (6, "accepted", 2, 10 + mean, 20 + mean),
                (8, "accepted", 4, 10 + mean, 20 + mean)]
    for info in infos_:
        got = [(r["step"], r["status"], r["horizon"], r["probe_before"], r["probe_after"]) for r in info["history"]]
        assert got == expected, got
        assert [r["optimizer_params_reset"] for r in info["history"]] == [0] + [len(info["tracked"]) if reset else 0] * 2
    tracked = infos_[0]["tracked"]
    for rank, values in enumerate(tensors):
        weights = [k.split("/", 2)[2] for k in values if k.startswith("pre/4/") and "/optim/" not in k]
        assert weights, rank
        for key in weights:  # the rejected jump: bit-exact restore of this process's tensors
            assert torch.equal(values[f"post/4/{key}"], values[f"pre/4/{key}"]), (rank, key)
        for step in (6, 8):  # accepted: every tracked tensor this process holds moved
            for name in tracked:
                for key in weights:
                    if key.split("/", 1)[-1] == name and values[f"pre/{step}/{key}"].numel():
                        assert not torch.equal(values[f"post/{step}/{key}"], values[f"pre/{step}/{key}"]), (rank, step, key)
        optim = [k for k in values if k.startswith("pre/6/optim/")]
        assert bool(optim) == reset, (rank, optim[:3])
        for key in optim:  # step 6: jumped parameters' state zeroed, the rest untouched; step 4: untouched
            name = key.split("/")[3]
            post = values[key.replace("pre/", "post/", 1)]
            assert torch.count_nonzero(values[key]), key
            assert not torch.count_nonzero(post) if name in tracked else torch.equal(post, values[key]), key
            four = key.replace("pre/6/", "pre/4/", 1)
            assert torch.equal(values[four.replace("pre/", "post/", 1)], values[four]), four
    for key in tensors[0]:
        if key.split("/", 2)[2].startswith(replicated) and "/optim/" not in key:
            assert all(torch.equal(tensors[0][key], other[key]) for other in tensors[1:]), f"processes differ on {key}"
    return infos_[0]


# -- jump mode: generation on sharded weights and faults on one process ------------------------------------------

POISONED = "model.layers.0.mlp.up_proj.weight"  # the tensor a fault scenario poisons on rank 1


def token_reward(completion_ids, **kwargs) -> list[float]:
    """A reward that changes with every generated token."""
    return [float(sum(ids) % 101) + len(ids) / 8 for ids in completion_ids]


def generation_probe(tok, rank: int):
    """Process ``rank``'s probe: 3 + 2·rank prompts in batches of 2 and 3 + 3·rank new tokens (so the processes
    run different numbers of ``generate`` calls and steps)."""
    from relex_callback.probe import RewardProbe

    prompts = [{"prompt": f"{a} + {b} ="} for a, b in ((3, 4), (12, 5), (7, 7), (40, 2), (9, 11))][: 3 + 2 * rank]
    return RewardProbe(prompts, token_reward, tok, max_new_tokens=3 + 3 * rank, batch_size=2)


def forward_loss(model, tok) -> float:
    """The language-model loss of one fixed text: a continuous function of every weight."""
    ids = tok("12 + 30 = 42", return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def check_generation(directory: Path, world: int, prefix: str, tie: bool) -> None:
    """Each process's generated reward and forward loss equal those of a single-process model holding the full
    weights it scored: those before each jump (``pre/``) and after the accepted ones (``post/``; the rejected
    candidate is not recorded)."""
    sys.path.insert(0, str(WORKER.parent))
    from _tiny import tiny_qwen2, tiny_tokenizer

    tok = tiny_tokenizer()
    for rank in range(world):
        generated = json.loads((directory / f"jump-rank{rank}.json").read_text())["generated"]
        tensors = load_file(str(directory / f"jump-rank{rank}.safetensors"))
        assert len(generated) == 2 * len(JUMP_STEPS), generated
        scored = {0: "pre/4", 2: "pre/6", 3: "post/6", 4: "pre/8", 5: "post/8"}  # call index -> weights
        for call, when in scored.items():
            model = tiny_qwen2(tie=tie, tokenizer=tok)
            weights = {k[len(when) + 1 + len(prefix):]: v for k, v in tensors.items()
                       if k.startswith(f"{when}/{prefix}") and "/optim/" not in k}
            missing, _ = model.load_state_dict(weights, strict=False)
            assert not [m for m in missing if "rotary" not in m and not (tie and m == "lm_head.weight")], missing
            reward, loss = generated[call]
            assert reward == generation_probe(tok, rank)(model), (rank, call, when)
            assert abs(loss - forward_loss(model, tok)) <= 1e-5 * abs(loss), (rank, call, when)


def check_nonfinite_stop(directory: Path, world: int, errors: list[str]) -> None:
    """Every process stopped at the first jump (step 4) with ``errors[rank]`` in its message, no jump recorded, and
    its live weights bit for bit those after step 4's optimizer step, the same on every process."""
    finals = []
    for rank in range(world):
        info = json.loads((directory / f"jump-rank{rank}.json").read_text())
        assert info["error"] is not None and errors[rank] in info["error"], (rank, info["error"])
        assert info["step"] == 4 and info["history"] == [], (rank, info["step"], info["history"])
        tensors = load_file(str(directory / f"jump-rank{rank}.safetensors"))
        final = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("final/")}
        assert final, rank
        for name, value in final.items():
            assert torch.equal(value, tensors[f"pre/4/{name}"]), (rank, name)
        finals.append(final)
    for name, value in finals[0].items():
        assert all(torch.equal(value, other[name]) for other in finals[1:]), f"processes differ on {name}"


def tampered(directory: Path, copy: Path, rank: int, edit) -> Path:
    """A copy of a jump scenario's ``directory`` in which ``edit(tensors)`` replaced some of ``rank``'s tensors."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(directory, copy)
    path = copy / f"jump-rank{rank}.safetensors"
    tensors = load_file(str(path))
    tensors.update({key: value.clone() for key, value in edit(tensors).items()})
    save_file(tensors, str(path))
    return copy
