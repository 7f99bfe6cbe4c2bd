"""Atomic output directories, JSON writing and the explained-variance summary."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["check_output_dir", "check_output_location", "atomic_directory", "write_json", "summarize_explained_variance"]

REPORT_NAME = "relex_report.json"


def check_output_dir(path: str | os.PathLike, overwrite: bool, option: str = "overwrite") -> None:
    """Refuse an existing non-empty ``path`` unless ``overwrite`` (raised before any work)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(
            f"output directory {str(path)!r} already exists and is not empty; pass {option}=True to replace it "
            "or choose another output_dir."
        )


def check_output_location(path: str | os.PathLike, option: str = "output_dir") -> None:
    """Refuse a ``path`` that is a file or lies under one, so that writing fails before any work, not after it.

    The nearest existing ancestor must be a folder; nothing is created.
    """
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {str(existing)!r}, which is a file"
        raise NotADirectoryError(
            f"{option}={str(path)!r} {where}, not a folder: nothing could be written there. Choose an {option} in a "
            "folder (it is created if missing)."
        )


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``final``, on error delete it.

    A crash never leaves a directory at ``final`` that looks complete; the staging folders a killed writer left
    beside ``final`` (``.NAME.tmp-*``, ``.NAME.old-*``) are removed once ``final`` is complete.
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
        for stale in (*final.parent.glob(f".{glob.escape(final.name)}.tmp-*"), *final.parent.glob(f".{glob.escape(final.name)}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
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
