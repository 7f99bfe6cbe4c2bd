"""Shared helpers of the benchmarks: machine description, JSON/CSV writing, timing and memory probes."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("bench")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "trl", "accelerate", "datasets", "relex_callback"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # transformers prints generation-flag warnings through its own logger
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads. On a shared, oversubscribed CPU one thread per process avoids OpenMP
    spin-waiting on descheduled threads (measured here: about 2x faster wall time per evaluation)."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # pragma: no cover
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were measured (load average included: the CPU may be shared)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "trl", "datasets", "numpy", "relex_callback"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # pragma: no cover
            versions[name] = None
    mem_total = None
    try:
        with open("/proc/meminfo") as meminfo:
            mem_total = int(meminfo.readline().split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem_total,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
        "git_commit": _git_commit(),
        "load_average_at_start": load_average(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return info


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        for key in row:
            if key not in keys:
                keys.append(key)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in keys})


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Wall-clock seconds of ``fn()``: min, median and all samples (min is the least contended)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return {"min": min(samples), "median": statistics.median(samples), "samples": samples}


def timeit_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time several variants round-robin (one sample of each per round), so that a burst of contention on a
    shared machine hits all of them alike; per variant: min, median and all samples."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: {"min": min(v), "median": statistics.median(v), "samples": v} for name, v in samples.items()}


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status in bytes (0 where it is missing)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def mean_ci(values: Iterable[float]) -> dict[str, float]:
    """Mean, standard error and the 95% half-width 1.96·SE across ``values`` (NaN SE for one value)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": math.nan, "se": math.nan, "ci95": math.nan}
    mean = sum(xs) / n
    se = statistics.stdev(xs) / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "se": se, "ci95": 1.96 * se if n > 1 else math.nan}


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else math.nan
