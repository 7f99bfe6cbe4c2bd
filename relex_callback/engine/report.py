"""The one RELEX report schema, ``relex-report/2``, written by halt mode, jump mode and the offline CLI.

Every report is a JSON object with these sections (``None`` or empty when they do not apply):

* ``format`` (``"relex-report/2"``), ``producer`` (``"halt"``, ``"extrapolate"``, ``"reconstruct"``,
  ``"report"``), ``relex_callback_version``, ``method``;
* ``target_step``, ``targets``, ``horizon_ratio`` (target span / observed span), ``observed_steps``,
  ``window_steps`` (the snapshots the trend is fitted on), ``settings``;
* ``explained_variance`` and ``r_squared`` (summaries over tensors of σ₁²/Σσ² and of the trend's in-window R²);
* ``backtest`` (:func:`backtest_section`), ``diagnostic`` (a window diagnostic, filled by who computes one),
  ``warnings`` (list of str);
* ``candidate`` (:meth:`Candidate.describe`), ``probe`` (scores when a probe chose among candidates);
* ``tensors``: ``{name: {"shape", "explained_variance", "singular_values", "r_squared", ...}}``;
* ``timings`` and producer-specific sections (``buffer``, ``bytes``, ``checkpoints``, ...).

:func:`read_report` reads this format and refuses any other.
"""

from __future__ import annotations

import json
import math
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..export import REPORT_NAME, summarize_explained_variance as summarize
from ..math.core import Backtest

__all__ = [
    "REPORT_FORMAT",
    "backtest_section",
    "horizon_warning",
    "new_report",
    "report_metrics",
    "check_report_format",
    "read_report",
    "write_model_card",
]

REPORT_FORMAT = "relex-report/2"
METHOD = "RELEX rank-r trajectory extrapolation (arXiv 2605.21468)"


def backtest_section(backtest: Backtest | None, tolerance: float) -> dict[str, Any] | None:
    """The report's ``backtest``: fit the first ``num_fit`` snapshots, predict the last (``ratio``× out), the
    relative ``distance`` ||θ̂ − θ|| / ||θ − θ_0||, and the horizon ratio it supports at ``tolerance``."""
    if backtest is None:
        return None
    return {"num_fit": backtest.num_fit, "ratio": backtest.ratio, "distance": backtest.distance,
            "tolerance": tolerance, "supported_ratio": backtest.supported_ratio(tolerance)}


def horizon_warning(target: float, ratio: float, section: dict[str, Any] | None) -> str | None:
    """The warning for a target beyond the horizon the backtest supports (``None`` when it is within)."""
    if section is None or not ratio > section["supported_ratio"]:
        return None
    return (
        f"target step {target:g} is {ratio:.1f}x the observed window, but the backtest (fit the first "
        f"{section['num_fit']} snapshots, predict the last, {section['ratio']:.1f}x out) missed by a relative distance "
        f"of {section['distance']:.2f}, which supports about {section['supported_ratio']:.1f}x at backtest_tolerance="
        f"{section['tolerance']}. Expect the prediction to drift from real training: use a nearer target, jump mode, "
        "or a probe."
    )


def _package_version() -> str:
    """The installed relex-callback version (read from the distribution, so this module imports no package face)."""
    try:
        return version("relex-callback")
    except PackageNotFoundError:
        return "unknown"


def new_report(
    producer: str,
    *,
    target_step: float | None,
    targets: list[Any] | str,
    horizon_ratio: float | None,
    observed_steps: list[Any],
    window_steps: list[Any],
    settings: dict[str, Any],
    explained_variance: list[float],
    r_squared: list[float],
    backtest: dict[str, Any] | None,
    tensors: dict[str, dict[str, Any]],
    warnings: list[str] | None = None,
    candidate: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A ``relex-report/2`` object; ``sections`` add producer-specific keys (``buffer``, ``timings``, ...)."""
    return {
        "format": REPORT_FORMAT,
        "producer": producer,
        "relex_callback_version": _package_version(),
        "method": METHOD,
        "target_step": target_step,
        "targets": targets if isinstance(targets, str) else list(targets),  # "auto" or the steps
        "horizon_ratio": horizon_ratio,
        "observed_steps": list(observed_steps),
        "window_steps": list(window_steps),
        "settings": settings,
        "explained_variance": summarize(explained_variance),
        "r_squared": summarize(r_squared),
        "backtest": backtest,
        "diagnostic": None,
        "warnings": list(warnings or []),
        "candidate": candidate,
        "probe": None,
        **sections,
        "tensors": tensors,
    }


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The ``relex/*`` scalars of a report for the trainer's loggers."""
    ev, r2 = report["explained_variance"], report["r_squared"]
    metrics = {
        "relex/explained_variance_mean": ev.get("mean", math.nan),
        "relex/explained_variance_min": ev.get("min", math.nan),
        "relex/line_r2_mean": r2.get("mean", math.nan),
        "relex/horizon_ratio": report["horizon_ratio"],
        "relex/target_step": float(report["target_step"]),
    }
    if report["backtest"]:
        metrics["relex/backtest_distance"] = report["backtest"]["distance"]
        metrics["relex/backtest_supported_ratio"] = report["backtest"]["supported_ratio"]
    return metrics


def check_report_format(report: dict[str, Any], source: str = "report") -> dict[str, Any]:
    """``report`` itself when it is in the ``relex-report/2`` layout; any other format is refused."""
    found = report.get("format")
    if found != REPORT_FORMAT:
        raise ValueError(f"{source} has RELEX report format {found!r}; this version reads {REPORT_FORMAT} only. "
                         "Write it again with this version (relex report CHECKPOINT_DIR ... or the callback's run).")
    return report


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``relex_report.json`` (a file or the model directory holding it), in the ``relex-report/2`` layout."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, REPORT_NAME)
    with open(path) as handle:
        return check_report_format(json.load(handle), path)


def _score(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def _step(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _probe_lines(probe: dict[str, Any] | None, observed: list[Any]) -> list[str]:
    """The card's probe lines: this model's score against the trained weights', every candidate's, and a warning
    when this model lost (so that a user who opens this directory alone sees it)."""
    if not probe:
        return []
    score, current = probe.get("score"), probe.get("current_weights_score")
    others = ", ".join(f"{target}: {_score(value)}" for target, value in (probe.get("scores_by_target") or {}).items())
    if probe.get("loaded_into_live_model"):
        pick = "The probe chose this model and it was loaded into the trained model."
    elif probe.get("chosen"):
        pick = "The probe chose this model (the trainer's live weights were left as trained)."
    else:
        pick = "The probe did not choose this model."
    lines = [
        f"- Probe score (higher is better): {_score(score)}; the trained weights of step {_step(observed[-1])} scored "
        f"{_score(current)}. All candidates: {others}. {pick}"
    ]
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (score, current))
    if not finite or score < current:
        lines.append(
            f"- **Warning:** this model scored {_score(score)} on the probe, below the {_score(current)} of the trained "
            f"weights of step {_step(observed[-1])} it was extrapolated from: it lost."
        )
    return lines


def _search_lines(search: dict[str, Any] | None) -> list[str]:
    """The card's lines on the reward-guided horizon search: its cost, margin, why each family stopped, the pick."""
    if not search:
        return []
    cost = f"{search['probe_calls']} probe calls, {search['probe_seconds']:.1f} s"
    if search.get("step_equivalents") is not None:
        cost += f" (about {search['step_equivalents']:.1f} training steps)"
    chosen = search.get("chosen")
    pick = (f"chose {chosen['family']} at step {_step(chosen['target_step'])} (score {_score(chosen['score'])})"
            if chosen else "kept the trained weights")
    lines = [f"- Horizon search (extrapolate_to='auto' with a probe, up to step {_step((search.get('ladder') or [None])[-1])}): "
             f"{cost}; margin {_score(search['margin'])} ({search['margin_source']}); {pick}."]
    lines += [f"  - {family}: {reason}." for family, reason in (search.get("stopped") or {}).items()]
    if search.get("failure"):
        lines.append(f"- **Warning:** the horizon search stopped because {search['failure']}; the trained weights were kept.")
    return lines


def write_model_card(directory: str | os.PathLike, report: dict[str, Any]) -> None:
    """A short README.md that says how the weights were made and how far to trust them."""
    report = check_report_format(report)
    settings = report.get("settings", {})
    ev = report.get("explained_variance", {})
    bt = report.get("backtest") or {}
    observed = report.get("observed_steps") or [None]
    span = f"{len(report.get('observed_steps', []))} snapshots of steps {_step(observed[0])}–{_step(observed[-1])}"
    if ((report.get("candidate") or {}).get("trend") or {}).get("kind") == "observed":
        intro = (f"These are the trained weights of step {_step(observed[-1])}, the window's last step: no extrapolation "
                 f"beyond the window was supported or chosen, so RELEX (arXiv 2605.21468) wrote them as observed ({span}).")
    else:
        intro = (f"These weights were not trained to this step: they were predicted by RELEX (arXiv 2605.21468) from "
                 f"{span} with relex-callback, as θ_0 + ĉ(K)·v per tensor (rank {settings.get('rank')}, "
                 f"{settings.get('fit')} trend, shrink {settings.get('shrink')}).")
    lines = [
        "---",
        "tags: [relex, rlvr, extrapolated]",
        "---",
        f"# RELEX extrapolation to step {report.get('target_step')}",
        "",
        intro,
        "",
        f"- Horizon: {report.get('horizon_ratio', float('nan')):.2f}× the observed window.",
        f"- Rank-{settings.get('rank')} explained variance: mean {ev.get('mean', float('nan')):.3f}, "
        f"min {ev.get('min', float('nan')):.3f} over {ev.get('tensors', 0)} tensors.",
    ]
    if bt:
        lines.append(
            f"- Backtest: fitting the first {bt.get('num_fit')} snapshots and predicting the last one "
            f"({bt.get('ratio', float('nan')):.2f}× out) missed by a relative distance of {bt.get('distance', float('nan')):.3f}"
            + ("." if (report.get("diagnostic") or {}).get("supported_step") is not None else
               f"; horizon supported at tolerance {settings.get('backtest_tolerance')}: {bt.get('supported_ratio', float('nan')):.2f}×.")
        )
    diagnostic = report.get("diagnostic") or {}
    if diagnostic.get("supported_step") is not None:
        k_max = diagnostic.get("k_max", math.floor(diagnostic["supported_step"] + 1e-9))
        lines.append(
            f"- Window diagnostic: supported horizon K_max = step {k_max} "
            f"({diagnostic.get('k_max_ratio', diagnostic.get('supported_ratio', float('nan'))):.2f}× the window) at "
            f"tolerance {diagnostic.get('tolerance')}: the farthest step whose prediction the window expects within that "
            "relative distance of real training."
        )
    lines += _probe_lines(report.get("probe"), report.get("observed_steps") or [None])
    lines += _search_lines(report.get("search"))
    if report.get("trained_weights"):
        lines.append(f"- The trained weights of step {_step(observed[-1])} (not extrapolated): `{report['trained_weights']}`.")
    for warning in report.get("warnings", []):
        lines.append(f"- **Warning:** {warning}")
    lines += [
        "",
        "Evaluate this model before you use it: in-window statistics do not guarantee the extrapolation holds.",
        "Details: `relex_report.json`.",
        "",
    ]
    Path(directory, "README.md").write_text("\n".join(lines))
