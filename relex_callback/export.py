"""Atomic output directories, the JSON report and the model card."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["check_output_dir", "atomic_directory", "write_json", "write_model_card", "summarize_explained_variance"]

REPORT_NAME = "relex_report.json"


def check_output_dir(path: str | os.PathLike, overwrite: bool, option: str = "overwrite") -> None:
    """Refuse an existing non-empty ``path`` unless ``overwrite`` (raised before any work)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(
            f"output directory {str(path)!r} already exists and is not empty; pass {option}=True to replace it "
            "or choose another output_dir."
        )


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``final``, on error delete it.

    A crash never leaves a directory at ``final`` that looks complete.
    """
    final = Path(final)
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private (0700); give it the usual permissions
    try:
        yield staging
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, retired / final.name)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")


def summarize_explained_variance(values: list[float]) -> dict[str, float | int]:
    """Mean, min, median, max and counts ≥ 0.9 / 0.95 / 0.99, as in the official variance report."""
    if not values:
        return {"tensors": 0}
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    return {
        "tensors": len(values),
        "mean": sum(values) / len(values),
        "min": ordered[0],
        "median": median,
        "max": ordered[-1],
        "at_least_0.90": sum(v >= 0.90 for v in values),
        "at_least_0.95": sum(v >= 0.95 for v in values),
        "at_least_0.99": sum(v >= 0.99 for v in values),
    }


def write_model_card(directory: str | os.PathLike, report: dict[str, Any]) -> None:
    """A short README.md that says how the weights were made and how far to trust them."""
    settings = report.get("settings", {})
    ev = report.get("explained_variance", {})
    bt = report.get("backtest") or {}
    lines = [
        "---",
        "tags: [relex, rlvr, extrapolated]",
        "---",
        f"# RELEX extrapolation to step {report.get('target_step')}",
        "",
        "These weights were not trained to this step: they were predicted by RELEX (arXiv 2605.21468) from "
        f"{len(report.get('observed_steps', []))} snapshots of steps {report.get('observed_steps', [None])[0]}"
        f"–{report.get('observed_steps', [None])[-1]} with relex-callback, as θ_0 + ĉ(K)·v per tensor "
        f"(rank {settings.get('rank')}, {settings.get('fit')} trend, shrink {settings.get('shrink')}).",
        "",
        f"- Horizon: {report.get('horizon_ratio', float('nan')):.2f}× the observed window.",
        f"- Rank-{settings.get('rank')} explained variance: mean {ev.get('mean', float('nan')):.3f}, "
        f"min {ev.get('min', float('nan')):.3f} over {ev.get('tensors', 0)} tensors.",
    ]
    if bt:
        lines.append(
            f"- Backtest: fitting the first {bt.get('num_fit')} snapshots and predicting the last one "
            f"({bt.get('ratio', float('nan')):.2f}× out) missed by a relative distance of {bt.get('distance', float('nan')):.3f}; "
            f"horizon supported at tolerance {settings.get('backtest_tolerance')}: {bt.get('supported_ratio', float('nan')):.2f}×."
        )
    for warning in report.get("warnings", []):
        lines.append(f"- **Warning:** {warning}")
    lines += [
        "",
        "Evaluate this model before you use it: in-window statistics do not guarantee the extrapolation holds.",
        "Details: `relex_report.json`.",
        "",
    ]
    Path(directory, "README.md").write_text("\n".join(lines))
