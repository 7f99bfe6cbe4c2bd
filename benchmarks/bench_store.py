"""Disk delta store vs in-memory buffer: snapshot cost, fit time and peak RSS against T and the model size.

For every (parameters, T, store) point a fresh subprocess (so its peak RSS is its own) builds a synthetic model
with transformer-like tensor sizes, runs the real :class:`~relex_callback.engine.RelexEngine` (``attach``,
``capture_base``, ``record`` every step, then ``fit`` + ``predict`` of one target, exactly what halt mode does)
and measures, on the same machine in the same process:

* snapshot cost per step: ``engine.record`` (disk: the synchronous part, and with the background append waited
  for), as a ratio of a plain sequential ``os.write`` of the same bytes (the "plain-write floor");
* fit time (Gram pass + combine pass + small math), as a ratio of two plain sequential reads of the same bytes;
* peak RSS (VmHWM) of the process, and the RSS the fit adds on top of the recorded state.

    python benchmarks/bench_store.py --quick      # 1M and 4M parameters, T up to 50 (about 2 minutes)
    python benchmarks/bench_store.py              # 1M, 4M, 16M parameters, T = 10 ... 200

The disk store's file is read back while it is still in the page cache (written seconds before), as it is in a
real run whose fit follows the last snapshot; the plain-read floor is measured the same way. The in-memory
buffer is skipped where it would exceed ``--max-rss`` (the point of the disk store). Results:
``benchmarks/results/store[-quick]/`` (results.json, points.csv).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, RESULTS_ROOT, load_average, log, machine_info, setup_logging, write_csv, write_json  # noqa: E402


def tensor_sizes(parameters: int) -> list[int]:
    """A transformer-like split: three large matrices, two medium ones, four norm/bias vectors."""
    vectors = [1024] * 4
    rest = parameters - sum(vectors)
    large, medium = rest // 4, rest // 8
    return [large, large, large, medium, rest - 3 * large - medium] + vectors


def run_point(parameters: int, snapshots: int, store: str, directory: str, threads: int) -> dict[str, Any]:
    """One measurement in this process (called in a fresh subprocess by :func:`main`)."""
    import torch

    from _common import peak_rss_bytes, rss_bytes
    from relex_callback.config import RelexConfig
    from relex_callback.engine.engine import RelexEngine

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n) * 0.02) for n in tensor_sizes(parameters)])
    options = dict(observe=snapshots, extrapolate_to=2 * snapshots, buffer_dtype="bfloat16", save_model=False)
    if store == "disk":
        options.update(buffer_device="disk", store_dir=str(Path(directory) / "relex-store"))
    else:
        options.update(buffer_device="cpu")
    engine = RelexEngine(RelexConfig(**options))
    engine.attach(model)
    engine.capture_base(0)
    direction = [torch.randn_like(p) for p in model.weights]
    noise = [torch.empty_like(p) for p in model.weights]
    record_seconds, flushed_seconds = [], []
    for step in range(1, snapshots + 1):
        with torch.no_grad():
            for p, v, e in zip(model.weights, direction, noise):
                p.add_(v, alpha=1e-4).add_(e.normal_(), alpha=2e-5)
        started = time.perf_counter()
        engine.record(step)
        record_seconds.append(time.perf_counter() - started)
        if engine.buffer.location == "disk":
            engine.buffer.flush()
            flushed_seconds.append(time.perf_counter() - started)
    del direction, noise
    row_bytes = sum(tensor_sizes(parameters)) * 2
    # the plain-write floor: the same row bytes, appended with os.write to a fresh file in the same folder
    payload = torch.randn(row_bytes // 4).view(torch.uint8).numpy().tobytes()[:row_bytes]
    plain = Path(directory) / "plain-write.bin"
    fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    write_seconds = []
    for _ in range(min(snapshots, 20)):
        started = time.perf_counter()
        view, done = memoryview(payload), 0
        while done < len(view):
            done += os.write(fd, view[done : done + (1 << 28)])
        write_seconds.append(time.perf_counter() - started)
    os.close(fd)
    plain.unlink()
    rss_before_fit = rss_bytes()
    started = time.perf_counter()
    fit = engine.fit([2.0 * snapshots])
    engine.predict(engine.candidates(fit, [2.0 * snapshots]))
    fit_seconds = time.perf_counter() - started
    point: dict[str, Any] = {
        "parameters": sum(tensor_sizes(parameters)), "snapshots": snapshots, "store": store,
        "row_bytes": row_bytes, "stored_bytes": row_bytes * snapshots,
        "record_seconds_median": sorted(record_seconds)[len(record_seconds) // 2],
        "record_flushed_seconds_median": sorted(flushed_seconds)[len(flushed_seconds) // 2] if flushed_seconds else None,
        "plain_write_seconds_median": sorted(write_seconds)[len(write_seconds) // 2],
        "fit_seconds": fit_seconds, "rss_before_fit": rss_before_fit, "peak_rss": peak_rss_bytes(),
        "buffer_memory_bytes": engine.buffer.nbytes,
    }
    if engine.buffer.location == "disk":
        engine.buffer.close()
        point["disk_bytes"] = engine.buffer.disk_nbytes
        reads = []
        for _ in range(2):  # two plain sequential reads of the deltas file: the fit's I/O floor
            started = time.perf_counter()
            with open(engine.buffer.deltas_path, "rb", buffering=0) as handle:
                chunk = bytearray(1 << 24)
                while handle.readinto(chunk):
                    pass
            reads.append(time.perf_counter() - started)
        point["two_plain_reads_seconds"] = sum(reads)
    point["record_vs_plain_write"] = point["record_seconds_median"] / point["plain_write_seconds_median"]
    if point["record_flushed_seconds_median"] is not None:
        point["record_flushed_vs_plain_write"] = point["record_flushed_seconds_median"] / point["plain_write_seconds_median"]
        point["fit_vs_two_plain_reads"] = fit_seconds / point["two_plain_reads_seconds"]
    return point


def project(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-rank projections (8 ranks) for 1.5B × 75 and 8B × 100 bf16 from the largest measured disk points:
    seconds per stored byte for the fit's streaming and per T²·n multiply-add of the Gram pass."""
    disk = [p for p in points if p["store"] == "disk"]
    biggest = max(p["parameters"] for p in disk)
    at = sorted((p for p in disk if p["parameters"] == biggest), key=lambda p: p["snapshots"])
    # fit ≈ a·(stored bytes) + b·(T²·n): least squares over the largest model's T sweep
    import numpy as np

    design = np.array([[p["stored_bytes"], p["snapshots"] ** 2 * p["parameters"]] for p in at], dtype=float)
    seconds = np.array([p["fit_seconds"] for p in at])
    (per_byte, per_mac), *_ = np.linalg.lstsq(design, seconds, rcond=None)
    per_byte, per_mac = max(float(per_byte), 0.0), max(float(per_mac), 0.0)
    write_rate = max(p["row_bytes"] / p["record_flushed_seconds_median"] for p in at)
    out = {"fit_seconds_per_stored_byte": per_byte, "fit_seconds_per_gram_mac": per_mac,
           "record_bytes_per_second": write_rate, "from_parameters": biggest}
    for label, total, window in (("1.5B x 75", 1.54e9, 75), ("8B x 100", 8.03e9, 100)):
        per_rank = total / 8
        stored = per_rank * window * 2
        out[label] = {
            "parameters_per_rank": per_rank, "snapshots": window,
            "disk_bytes_per_rank": stored + per_rank * 4,
            "memory_bytes_per_rank_disk_store": per_rank * 6 + (64 << 20),
            "memory_bytes_per_rank_in_memory": per_rank * (window * 2 + 4),
            "write_bytes_per_step_per_rank": per_rank * 2,
            "record_seconds_per_step": per_rank * 2 / write_rate,
            "fit_seconds_one_cpu_core": per_byte * stored + per_mac * window**2 * per_rank,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-rss", type=float, default=2.5, help="GiB: skip in-memory points whose buffer exceeds it")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--point", type=str, default=None, help=argparse.SUPPRESS)  # internal: one point as JSON
    args = parser.parse_args()
    if args.point:
        spec = json.loads(args.point)
        print(json.dumps(run_point(**spec, threads=args.threads)))
        return
    setup_logging()
    sizes = [1 << 20, 1 << 22] if args.quick else [1 << 20, 1 << 22, 1 << 24]
    windows = [10, 25, 50] if args.quick else [10, 25, 50, 100, 200]
    output = args.output or RESULTS_ROOT / ("store-quick" if args.quick else "store")
    points = []
    for parameters in sizes:
        for snapshots in windows:
            for store in ("memory", "disk"):
                if store == "memory" and parameters * (snapshots * 2 + 4) > args.max_rss * (1 << 30):
                    log.info("skip in-memory %d x %d: the buffer would exceed --max-rss", parameters, snapshots)
                    continue
                with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as directory:
                    spec = json.dumps({"parameters": parameters, "snapshots": snapshots, "store": store, "directory": directory})
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]),
                           "OMP_NUM_THREADS": str(args.threads)}
                    done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--point", spec],
                                          capture_output=True, text=True, env=env, check=False)
                if done.returncode:
                    raise RuntimeError(done.stderr[-3000:])
                point = json.loads(done.stdout.strip().splitlines()[-1])
                log.info("%s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in point.items()})
                points.append(point)
    for point in points:  # the store's own cost: its record time beyond the in-memory record of the same point
        twin = [p for p in points if p["store"] == "memory" and p["parameters"] == point["parameters"]
                and p["snapshots"] == point["snapshots"]]
        if point["store"] == "disk" and twin:
            extra = point["record_flushed_seconds_median"] - twin[0]["record_seconds_median"]
            point["store_overhead_vs_plain_write"] = extra / point["plain_write_seconds_median"]
            point["disk_record_vs_memory_record"] = point["record_flushed_seconds_median"] / twin[0]["record_seconds_median"]
            point["fit_disk_vs_memory"] = point["fit_seconds"] / twin[0]["fit_seconds"]
    results = {"machine": machine_info(), "load_average_end": load_average(), "threads": args.threads,
               "points": points, "projection": project(points)}
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "results.json", results)
    write_csv(output / "points.csv", points)
    log.info("projection: %s", json.dumps(results["projection"], indent=1))


if __name__ == "__main__":
    main()
