"""`relex extrapolate` against the official two-script RELEX pipeline, on the same trajectory, in one run.

The official scripts (``precompute_deltas.py`` and ``svd_extrapolation.py`` of github.com/weizhepei/RELEX)
are not part of this repository; pass the folder holding them with ``--official-dir``. By default the
trajectory is synthetic, with the real shapes of SmolLM2-135M (LlamaConfig: hidden 576, intermediate 1536,
30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings), random bf16 weights and ~20 checkpoints
``global_step_N/`` drifting along one direction per tensor with noise. ``--quick`` uses 4 layers and 8
checkpoints.

Each pipeline runs in its own subprocesses; for each process the wall time and the peak resident set
size (``ru_maxrss`` from ``wait4``) are recorded, and the bytes written are measured on disk
(intermediate files: the official delta memmaps and SVD cache; final: the output model). The two outputs
are then compared tensor by tensor in units of the output dtype's spacing (bf16 ulps).

Example::

    python benchmarks/bench_offline.py --official-dir /tmp/relex_official --workdir /tmp/relex-bench \\
        --output benchmarks/results/offline.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("bench_offline")

SMOLLM2_SHAPES = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


# -- the trajectory ----------------------------------------------------------------------------------------


def build_trajectory(root: Path, layers: int, checkpoints: int, seed: int = 0) -> tuple[Path, Path]:
    """Base model (with a small tokenizer, which the official script needs) and ``global_step_N/`` checkpoints.

    θ_t = θ_0 + c_t·v + σ·ε_t per tensor, c_t = 1e-3·t·(1 + 0.05·ξ_t), v ~ N(0, I), σ = 2e-4, in bf16
    (ε_t: a random window of one Gaussian pool, to keep the build fast); one tensor (the last layer's
    post-attention norm) never moves.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, traj_dir = root / "base", root / "trajectory"
    config = LlamaConfig(**{**SMOLLM2_SHAPES, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base_dir)
    _save_tokenizer(base_dir)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    del model
    frozen = f"model.layers.{layers - 1}.post_attention_layernorm.weight"
    generator = torch.Generator().manual_seed(seed + 1)
    directions = {n: torch.randn(p.shape, generator=generator) for n, p in theta0.items()}
    largest = max(p.numel() for p in theta0.values())
    pool = torch.randn(largest + (1 << 22), generator=generator)  # noise: random windows of one pool (fast)
    for step in range(1, checkpoints + 1):
        scale = 1e-3 * step * (1.0 + 0.05 * float(torch.randn((), generator=generator)))
        tensors = {}
        for name, value in theta0.items():
            if name == frozen:
                tensors[name] = value
                continue
            offset = int(torch.randint(0, 1 << 22, (), generator=generator))
            noise = pool[offset : offset + value.numel()].view(value.shape)
            moved = value.float().add_(directions[name], alpha=scale).add_(noise, alpha=2e-4)
            tensors[name] = moved.to(torch.bfloat16)
        directory = traj_dir / f"global_step_{step}"
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        shutil.copyfile(base_dir / "config.json", directory / "config.json")
        logger.info("wrote %s", directory)
    return base_dir, traj_dir


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["What is 12 + 7? The answer is 19."] * 8,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(directory)


# -- measuring ---------------------------------------------------------------------------------------------


def run_measured(command: list[str], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run ``command``; wall time and the child's peak RSS (``ru_maxrss``, via ``wait4``)."""
    logger.info("$ %s", " ".join(command))
    began = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[0:3]} failed with exit status {process.returncode}; see {log_path}")
    return {
        "command": command,
        "wall_s": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "user_s": usage.ru_utime,
        "system_s": usage.ru_stime,
    }


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _load_dir(directory: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _ulps(a: "torch.Tensor", b: "torch.Tensor", theta0: "torch.Tensor") -> "torch.Tensor":
    """|a − b| in units of the output dtype's spacing at the operands' scale max(|a|, |b|, |θ_0|).

    (At the result's own scale a prediction θ_0 + Δ̂ that cancels to ~0 would make any fp32 rounding
    look like hundreds of ulps.)
    """
    import torch

    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[b.dtype]
    a64, b64 = a.double(), b.double()
    scale = torch.maximum(torch.maximum(a64.abs(), b64.abs()), theta0.double().abs()).clamp_min(1e-38)
    return (a64 - b64).abs() / torch.pow(2.0, torch.floor(torch.log2(scale)) - mantissa)


def compare(first: dict[str, "torch.Tensor"], second: dict[str, "torch.Tensor"], base: dict[str, "torch.Tensor"]) -> dict[str, Any]:
    """Max difference between two outputs (in output-dtype ulps at the operands' scale, and absolute)."""
    worst_ulps, worst_abs, differing, total, worst_name = 0.0, 0.0, 0, 0, None
    for name, value in second.items():
        ulps = _ulps(first[name], value, base.get(name, base.get("model.embed_tokens.weight", value)))
        if float(ulps.max()) > worst_ulps:
            worst_ulps, worst_name = float(ulps.max()), name
        worst_abs = max(worst_abs, float((first[name].double() - value.double()).abs().max()))
        differing += int((first[name] != value).sum())
        total += value.numel()
    return {
        "tensors": len(second),
        "same_tensor_names": sorted(first) == sorted(second),
        "max_diff_ulps": worst_ulps,
        "max_diff_ulps_tensor": worst_name,
        "max_abs_diff": worst_abs,
        "differing_elements": differing,
        "total_elements": total,
        "differing_fraction": differing / max(total, 1),
    }


def reference_sample(names: list[str], layers: int) -> list[str]:
    """The tensors the float64 reference covers: the embedding, the first and last layer, the final norm."""
    keep = ("model.layers.0.", f"model.layers.{layers - 1}.")
    return [n for n in names if "embed_tokens" in n or n.startswith(keep) or n == "model.norm.weight"]


def fp64_reference(base_dir: Path, checkpoint_dirs: list[Path], steps: list[float], target: float,
                   dtype: "torch.dtype", names: list[str] | None = None, chunk: int = 1 << 20) -> dict[str, "torch.Tensor"]:
    """RELEX in float64 end to end (exact deltas, Gram, eigh, OLS on the steps, θ_0 + Δ̂), rounded once to ``dtype``.

    Independent of both pipelines; chunked over d so that it needs about ``T·chunk·8`` bytes per tensor.
    ``names`` restricts it to some tensors (all by default).
    """
    import torch
    from safetensors import safe_open

    x = torch.tensor(steps, dtype=torch.float64)
    handles = [safe_open(str(d / "model.safetensors"), framework="pt") for d in checkpoint_dirs]
    out = {}
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as base_file:
        for name in base_file.keys():
            if names is not None and name not in names:
                continue
            theta0 = base_file.get_tensor(name).double().reshape(-1)
            numel = theta0.numel()
            snapshots = [h.get_tensor(name).reshape(-1).clone() for h in handles]  # stored dtype

            def rows(start: int, stop: int) -> torch.Tensor:
                return torch.stack([snap[start:stop].double() for snap in snapshots]) - theta0[start:stop]

            gram = torch.zeros(len(handles), len(handles), dtype=torch.float64)
            for start in range(0, numel, chunk):
                block = rows(start, min(start + chunk, numel))
                gram += block @ block.T
            eigenvalues, eigenvectors = torch.linalg.eigh(gram)
            sigma = float(eigenvalues[-1].clamp_min(0).sqrt())
            value = theta0.clone()
            if sigma > 0:
                u = eigenvectors[:, -1]
                c = u * sigma
                slope = float(((x - x.mean()) * (c - c.mean())).sum() / ((x - x.mean()) ** 2).sum())
                c_hat = float(c.mean()) + slope * (target - float(x.mean()))
                weights = (c_hat / sigma) * u
                for start in range(0, numel, chunk):
                    stop = min(start + chunk, numel)
                    value[start:stop] += weights @ rows(start, stop)
            out[name] = value.to(dtype).reshape(base_file.get_slice(name).get_shape())
    return out


# -- the benchmark -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_build"]:  # internal: build the trajectory in a child process
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        build_trajectory(Path(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", required=True, type=Path,
                        help="folder with precompute_deltas.py and svd_extrapolation.py from github.com/weizhepei/RELEX")
    parser.add_argument("--workdir", type=Path, help="where to build the trajectory and outputs (default: a temp dir)")
    parser.add_argument("--output", type=Path, help="JSON file for the results (default: WORKDIR/results.json)")
    parser.add_argument("--quick", action="store_true", help="4 layers and 8 checkpoints instead of 30 and 20")
    parser.add_argument("--layers", type=int, help="number of transformer layers (default 30, quick 4)")
    parser.add_argument("--checkpoints", type=int, help="number of checkpoints (default 20, quick 8)")
    parser.add_argument("--target-step", type=int, help="extrapolation target (default 5x the last step)")
    parser.add_argument("--official-workers", type=int, default=4, help="precompute_deltas.py --num_workers (its default 4)")
    parser.add_argument("--max-memory", nargs="+", default=["512MiB", "1GiB"],
                        help="relex --max-memory budget(s), one relex run each; the first is the headline "
                             "(default: 512MiB 1GiB, relex's default)")
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 reference comparison")
    parser.add_argument("--full-reference", action="store_true",
                        help="float64 reference for every tensor (slow) instead of the embedding, the first and "
                             "last layer and the final norm")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY for both pipelines' processes ('' leaves the environment alone); "
                             "PASSIVE keeps OpenMP barriers from spinning on a shared machine")
    parser.add_argument("--keep", action="store_true", help="keep the trajectory and the outputs")
    parser.add_argument("--reuse-trajectory", action="store_true",
                        help="use the base/ and trajectory/ already in --workdir (from an earlier --keep run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    scripts = {name: args.official_dir / name for name in ("precompute_deltas.py", "svd_extrapolation.py")}
    missing = [str(p) for p in scripts.values() if not p.is_file()]
    if missing:
        parser.error(f"official scripts not found: {', '.join(missing)}")
    layers = args.layers or (4 if args.quick else SMOLLM2_SHAPES["num_hidden_layers"])
    count = args.checkpoints or (8 if args.quick else 20)
    target = args.target_step or 5 * count
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="relex-bench-"))
    reuse = args.reuse_trajectory and (workdir / "base").is_dir() and (workdir / "trajectory").is_dir()
    leftovers = [p.name for p in workdir.iterdir() if not (reuse and p.name in ("base", "trajectory"))] if workdir.exists() else []
    if leftovers:
        parser.error(f"--workdir {workdir} is not empty ({', '.join(sorted(leftovers)[:5])})")
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy

    # Built in a child process: the peak RSS of a child (ru_maxrss) includes what it inherited from
    # this process at fork, so this process must stay small while the pipelines run.
    began = time.perf_counter()
    if reuse:
        logger.info("reusing the trajectory in %s (built with --layers %d --checkpoints %d?)", workdir, layers, count)
    else:
        subprocess.run([sys.executable, __file__, "--_build", str(workdir), str(layers), str(count)], check=True)
    base, trajectory = workdir / "base", workdir / "trajectory"
    build_seconds = time.perf_counter() - began
    os.sync()

    relex_runs: list[dict[str, Any]] = []

    def run_relex(budget: str, when: str) -> None:
        out_dir = workdir / f"relex_out_{len(relex_runs)}"
        run = run_measured(
            [sys.executable, "-m", "relex_callback", "extrapolate", "--base", str(base), "--checkpoints",
             str(trajectory), "--target-step", str(target), "--output", str(out_dir), "--max-memory", budget,
             "--no-progress"],
            env, workdir / f"relex_{len(relex_runs)}.log",
        )
        run.update(max_memory=budget, when=when, load_average=os.getloadavg(), bytes_written_final=tree_bytes(out_dir),
                   bytes_written_intermediate=0,
                   internal_timings=json.loads((out_dir / "relex_report.json").read_text())["timings"])
        relex_runs.append(run)

    for budget in args.max_memory:
        run_relex(budget, "before the official pipeline")
    ours_out = workdir / "relex_out_0"

    deltas, cache, official_out = workdir / "official_deltas", workdir / "official_svd_cache", workdir / "official_out"
    precompute = run_measured(
        [sys.executable, str(scripts["precompute_deltas.py"]), "--base_model", str(base), "--checkpoint_dir",
         str(trajectory), "--output_dir", str(deltas), "--num_workers", str(args.official_workers)],
        env, workdir / "official_precompute.log",
    )
    svd = run_measured(  # as in the official run_*.sh: rank 1, linear, extrapolate, with an SVD cache
        [sys.executable, str(scripts["svd_extrapolation.py"]), "--delta_dir", str(deltas), "--base_model", str(base),
         "--output_dir", str(official_out), "--history_steps", str(count), "--rank", "1", "--fit_method", "linear",
         "--mode", "extrapolate", "--target_steps", str(target), "--svd_cache_dir", str(cache)],
        env, workdir / "official_svd.log",
    )
    run_relex(args.max_memory[0], "after the official pipeline")  # the machine's load drifts: measure twice
    headline = [r for r in relex_runs if r["max_memory"] == args.max_memory[0]]
    relex = {
        "max_memory": args.max_memory[0],
        "wall_s": sum(r["wall_s"] for r in headline) / len(headline),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in headline),
        "bytes_written_intermediate": 0,
        "bytes_written_final": headline[0]["bytes_written_final"],
    }
    official = {
        "precompute": precompute,
        "svd_extrapolation": svd,
        "wall_s": precompute["wall_s"] + svd["wall_s"],
        "peak_rss_bytes": max(precompute["peak_rss_bytes"], svd["peak_rss_bytes"]),
        "bytes_written_intermediate": tree_bytes(deltas) + tree_bytes(cache),
        "bytes_written_deltas": tree_bytes(deltas),
        "bytes_written_svd_cache": tree_bytes(cache),
        "bytes_written_final": tree_bytes(official_out),
    }
    import torch
    from safetensors.torch import load_file

    base_tensors = load_file(base / "model.safetensors")
    ours_tensors, official_tensors = _load_dir(ours_out), _load_dir(official_out / f"step{target}")
    parity = compare(ours_tensors, official_tensors, base_tensors)
    accuracy = None
    if not args.no_reference:
        began = time.perf_counter()
        checkpoint_dirs = [trajectory / f"global_step_{t}" for t in range(1, count + 1)]
        sample = None if args.full_reference else reference_sample(sorted(base_tensors), layers)
        reference = fp64_reference(base, checkpoint_dirs, [float(t) for t in range(1, count + 1)], float(target),
                                   torch.bfloat16, names=sample)
        accuracy = {
            "tensors": "all" if sample is None else sample,
            "relex_vs_fp64": compare(ours_tensors, reference, base_tensors),
            "official_vs_fp64": compare(official_tensors, reference, base_tensors),
            "reference_s": time.perf_counter() - began,
        }
    parameters = sum(
        math.prod(info["shape"]) for info in json.loads((deltas / "metadata.json").read_text())["params"].values()
    )
    results = {
        "trajectory": {
            "model": "synthetic, SmolLM2-135M shapes" + ("" if layers == 30 else f" with {layers} layers"),
            "layers": layers,
            "checkpoints": count,
            "tracked_parameters": parameters,
            "checkpoint_bytes": tree_bytes(trajectory),
            "target_step": target,
            "build_s": build_seconds,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg(),
                    "omp_wait_policy": env.get("OMP_WAIT_POLICY")},
        "relex": relex,
        "relex_runs": relex_runs,
        "official": official,
        "speedup": official["wall_s"] / relex["wall_s"],  # relex: mean of its runs before and after
        "peak_rss_ratio": relex["peak_rss_bytes"] / official["peak_rss_bytes"],
        "parity": parity,
        "accuracy": accuracy,
    }
    output = args.output or workdir / "results.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    mib = 1 << 20
    for run in relex_runs:
        print(f"relex ({run['max_memory']:>6}): {run['wall_s']:8.1f} s  peak RSS {run['peak_rss_bytes'] / mib:8.0f} MiB  "
              f"intermediate 0 B  final {run['bytes_written_final'] / mib:.0f} MiB  ({run['when']})")
    print(f"official:         {official['wall_s']:8.1f} s  peak RSS {official['peak_rss_bytes'] / mib:8.0f} MiB  "
          f"intermediate {official['bytes_written_intermediate'] / mib:.0f} MiB  final {official['bytes_written_final'] / mib:.0f} MiB")
    print(f"speedup {results['speedup']:.1f}x (relex {args.max_memory[0]}: mean of the runs before and after), peak memory {results['peak_rss_ratio']:.3f}x; parity: max "
          f"{parity['max_diff_ulps']:.0f} ulp(s), {parity['differing_fraction']:.2e} of elements differ")
    if accuracy:
        print(f"vs float64 reference ({'all tensors' if accuracy['tensors'] == 'all' else 'sampled tensors'}): relex {accuracy['relex_vs_fp64']['differing_fraction']:.2e} of elements differ "
              f"(max {accuracy['relex_vs_fp64']['max_diff_ulps']:.0f} ulp), official "
              f"{accuracy['official_vs_fp64']['differing_fraction']:.2e} (max {accuracy['official_vs_fp64']['max_diff_ulps']:.0f} ulp)")
    print(f"results: {output}")
    if not args.keep:
        for path in [trajectory, deltas, cache, official_out, base] + [workdir / f"relex_out_{i}" for i in range(len(relex_runs))]:
            shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
