"""The one vocabulary of RELEX options, shared by :class:`~relex_callback.config.RelexConfig`, the engine and
the offline CLI (whose ``argparse`` choices are these constants)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "TREND_KINDS",
    "POWER_GRID",
    "BUFFER_DTYPES",
    "OUTPUT_DTYPES",
    "BUFFER_DEVICES",
    "MODES",
    "OPTIMIZER_POLICIES",
    "JUMP_ANCHORS",
    "DEFAULT_BACKTEST_TOLERANCE",
    "CANDIDATE_FAMILIES",
    "min_snapshots",
    "check_int",
    "shrink_error",
    "power_error",
]

# No torch here: the ``relex`` parser reads these choices, and ``relex --help`` must not wait for torch.
TREND_KINDS = ("linear", "power", "poly2")
POWER_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BUFFER_DTYPES = ("bfloat16", "float16", "float32")
OUTPUT_DTYPES = ("auto",) + BUFFER_DTYPES  # "auto": each tensor keeps its dtype
BUFFER_DEVICES = ("auto", "cpu", "param", "disk")
MODES = ("halt", "jump")
OPTIMIZER_POLICIES = ("keep", "reset")
JUMP_ANCHORS = ("fit", "current")
DEFAULT_BACKTEST_TOLERANCE = 0.75
"""Relative distance ||θ̂(K) − θ(K)|| / ||θ(K) − θ_0|| beyond which a target counts as unsupported."""
CANDIDATE_FAMILIES = ("trend", "sqrt", "scale")  # halt mode: the configured trend, a √t trend, magnitude scaling


def min_snapshots(rank: int, fit: str) -> int:
    """Snapshots a fit needs: one more than the rank, and at least 3 for the quadratic trend."""
    return rank + 1 if fit != "poly2" else max(rank + 1, 3)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` when it is an int >= ``minimum``; else a ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}.")
    return value


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def shrink_error(shrink: Any) -> str | None:
    """Why ``shrink`` (λ in θ_N + λ(θ̂ − θ_N)) is invalid, or ``None``."""
    if _is_number(shrink) and 0 < shrink <= 1:
        return None
    return f"shrink={shrink!r} must be in (0, 1]; 1.0 keeps the full prediction"


def power_error(power: Any, fit: str, allow_auto: bool = True) -> str | None:
    """Why ``power`` (the exponent p of the ``"power"`` trend) is invalid for trend ``fit``, or ``None``."""
    if power == "auto":
        if not allow_auto:
            return "power='auto' needs every tensor's Gram matrix at once; give a number (e.g. 0.5)"
        if fit != "power":
            return f"power='auto' selects the exponent of the power trend, but fit={fit!r}. Pass fit='power'."
        return None
    if _is_number(power) and power > 0:
        return None
    return f"power={power!r} must be a number > 0 (1.0 is the paper's line, 0.5 a √t axis) or 'auto'."
