"""Time the RELEX delta buffer and fit on one CUDA device (buffer on the GPU vs pinned host memory).

A synthetic "model" of ``--params`` fp32 (or bf16) elements in 4096×4096-sized tensors is moved by a
small random step per snapshot; the script times ``capture_base``, ``record`` (per snapshot), the Gram
pass, the fit and ``combine``, and writes a JSON line per configuration.

    python3 benchmarks/gpu_buffer_timing.py --params 1e9 --snapshots 8 --out timings.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from relex_callback.buffer import DeltaBuffer, TrackedTensor
from relex_callback.math.core import combine, fit_trajectory

logger = logging.getLogger("gpu_buffer_timing")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    started = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - started


def run(params: int, snapshots: int, buffer_device: str, param_dtype: torch.dtype, buffer_dtype: str, device: str = "cuda") -> dict:
    device = torch.device(device)
    width = 4096 * 4096
    sizes = [width] * (params // width) + ([params % width] if params % width else [])
    tensors = [torch.nn.Parameter(torch.randn(n, device=device, dtype=param_dtype) * 0.02) for n in sizes]
    tracked = [TrackedTensor(f"t{i}", p) for i, p in enumerate(tensors)]
    buffer = DeltaBuffer(tracked, snapshots, buffer_dtype, buffer_device)
    result = {
        "params": params, "tensors": len(sizes), "snapshots": snapshots, "buffer_device": buffer_device,
        "param_dtype": str(param_dtype).split(".")[-1], "buffer_dtype": buffer_dtype, "buffer_bytes": buffer.nbytes,
    }
    result["capture_base_s"] = _timed(buffer.capture_base)
    direction = [torch.randn_like(p) * 1e-3 for p in tensors]
    record = []
    with torch.no_grad():
        for step in range(1, snapshots + 1):
            for p, d in zip(tensors, direction, strict=True):
                p.add_(d)
            record.append(_timed(lambda s=step: buffer.record(s)))
    result["record_s_mean"] = sum(record[1:]) / max(len(record) - 1, 1)
    result["record_GBps"] = buffer.nbytes / snapshots / result["record_s_mean"] / 1e9
    grams = []
    result["gram_s"] = _timed(lambda: grams.extend((item.name, g) for item, g in buffer.grams()))
    fits = []
    result["fit_s"] = _timed(lambda: fits.append(fit_trajectory(grams, buffer.steps, [4 * snapshots])))
    weights = {t.name: t.weights for t in fits[0].tensors}
    result["combine_s"] = _timed(lambda: [combine(buffer.stack(t.name), weights[t.name]) for t in tracked])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=float, default=5e8)
    parser.add_argument("--snapshots", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="'cpu' only smoke-tests the script")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --device cpu for a smoke test)")
    rows = []
    for buffer_device in ("param", "cpu"):
        for param_dtype in (torch.bfloat16, torch.float32):
            row = run(int(args.params), args.snapshots, buffer_device, param_dtype, "bfloat16", args.device)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            row["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
            logger.info(json.dumps(row))
            rows.append(row)
    if args.out:
        args.out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
