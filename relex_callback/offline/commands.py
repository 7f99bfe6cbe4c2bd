"""The three offline commands on one skeleton (:func:`_execute`): each one checks its options, gives a per-tensor
weights function ``weights_fn(name, G) -> (w [n, T] or None, stats)`` and builds its ``relex-report/2``.

For every named tensor the snapshots' deltas Δ_t = θ_t − θ_0 are streamed from the checkpoints (chunked over d
when the tensor does not fit the memory budget, :mod:`relex_callback.offline.stream`); the Gram matrix
``G = M Mᵀ`` gives the subspace and the coefficients c_t (:mod:`relex_callback.math.core`), a trend ĉ(x) is
fitted on the real step numbers, and the output ``θ_0 + Σ_t w_t Δ_t`` is combined chunk by chunk and written
straight into the output shards. ``V`` is never materialised and nothing but the output directory is written.

Memory model: a chunk of ``c`` elements costs ``2·(4·T + 4)`` (two buffer slots of deltas and θ_0: the next
chunk is read while the current one is processed) + ``workers·itemsize`` (read staging) + ``n·(4 + out_itemsize)``
(n predictions and their cast) bytes per element; ``c`` is the largest size within ``max_memory``. A tensor that
fits is read once; a larger one is read twice (pass 1 sums the chunk Gram matrices, pass 2 combines the chunks).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..checkpoints import RelexInputError
from ..engine.candidate import TrendSpec
from ..engine.report import backtest_section, new_report, write_model_card
from ..math.diagnostic import WindowDiagnostic, diagnose_window, trend_predictor
from ..export import REPORT_NAME, atomic_directory, write_json
from ..export import summarize_explained_variance as summarize
from ..math.core import (
    Subspace,
    backtest,
    fit_tensors,
    prediction_weights,
    r_squared,
    reconstruction_weights,
    squared_errors,
    subspace_from_gram,
)
from ..options import DEFAULT_BACKTEST_TOLERANCE, power_error, shrink_error
from ..units import format_bytes
from .output import _aux_sources, _check_output, _checkpoint_list, _copy_aux, _open_outputs, _OutputModel, _settings
from .plan import (
    DEFAULT_MAX_MEMORY,
    _check_common,
    _check_counts,
    _check_targets,
    _Plan,
    _prepare,
    _resolve_dtype,
    _steps_text,
    parse_size,
)
from .plots import _floats, _write_plots, trajectory_entry
from .stream import _Run, _stream_tensors

__all__ = ["extrapolate_checkpoints", "reconstruct_checkpoints", "report_checkpoints"]

logger = logging.getLogger("relex_callback.offline")

WeightsFn = Callable[[str, torch.Tensor], "tuple[torch.Tensor | None, dict[str, Any]]"]


def _execute(
    command: str,
    plan: _Plan,
    output: Path,
    labels: Sequence[int],
    out_dtype: torch.dtype | None,
    weights_fn: WeightsFn,
    finish: Callable[[_Run, list[_OutputModel], Path, dict[str, Path]], Any],
    *,
    rows: int,
    budget: int,
    num_workers: int | None,
    progress: bool,
    overwrite: bool,
    aux_plan: _Plan | None = None,
    emit_rows: int | None = None,
    observe: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> Any:
    """The skeleton of every command: stream the tensors into one output model per label (none for ``report``)
    inside an atomic output directory, copy the config and tokenizer files, then ``finish(run, outputs, staging,
    copied)`` writes the reports. A failure leaves no output directory behind."""
    with atomic_directory(output, overwrite) as staging:
        outputs = _open_outputs(staging, labels, plan.base, out_dtype) if labels else []
        try:
            run = _stream_tensors(plan, rows, weights_fn, outputs, budget, num_workers, progress, command,
                                  emit_rows=emit_rows, observe=observe)
            for out in outputs:
                out.close()
        except BaseException:
            for out in outputs:
                out.abort()
            raise
        sources = _aux_sources(aux_plan or plan) if outputs else {}
        for out in outputs:
            _copy_aux(sources, out.directory, out_dtype)
        return finish(run, outputs, staging, sources)


def _run_sections(run: _Run, began: float, out: _OutputModel | None = None) -> dict[str, Any]:
    """The ``timings`` and ``bytes`` sections of an offline report."""
    written = {"written": out.nbytes} if out is not None else {}
    return {
        "timings": {"read_wait_s": run.read_seconds, "gram_s": run.gram_seconds, "compute_s": run.compute_seconds,
                    "write_s": run.write_seconds, "total_s": time.perf_counter() - began},
        "bytes": {"read": run.bytes_read, **written, "intermediate": 0},
    }


def _input_sections(plan: _Plan, checkpoints: int | None = None) -> dict[str, Any]:
    return {"base": str(plan.base.path), "checkpoints": _checkpoint_list(plan)[:checkpoints],
            "tie_word_embeddings": plan.tie_word_embeddings, "tied": plan.tied}


# -- per-tensor math on G ---------------------------------------------------------------------------------


def _singular_values(subspace: Subspace) -> list[float]:
    return subspace.eigenvalues.clamp_min(0.0).sqrt().tolist()


def _diagnose(grams: Sequence[torch.Tensor], steps: Sequence[float], numels: Sequence[int], rank: int, fit: str,
              power: float, tolerance: float, origin: float) -> WindowDiagnostic:
    """The window diagnostic (relex_callback.math.diagnostic) of the fit snapshots, θ_0 at step ``origin``; logged."""
    g = torch.stack([x.detach().to(torch.float64) for x in grams])
    x = [float(v) for v in steps]
    predictor = trend_predictor(g, x, rank=rank, kind=fit, power=power, origin=origin)
    diagnostic = diagnose_window(g, x, origin, numels, predictor, rank=rank, tolerance=tolerance)
    logger.info("%s", diagnostic.summary_line())
    for warning in diagnostic.warnings:
        logger.warning("%s", warning)
    return diagnostic


def _beyond_horizon(target: float, diagnostic: WindowDiagnostic) -> str | None:
    return diagnostic.beyond_warning(target, "Use a nearer target, or the callback's extrapolate_to='auto' with a probe.")


def _check_trend(fit: str, power: float, time_scale: float) -> None:
    problem = power_error(power, fit, allow_auto=False)
    if problem:
        raise RelexInputError(problem)
    if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not time_scale > 0:
        raise RelexInputError(f"time_scale={time_scale!r} must be a number > 0")


# -- extrapolate -------------------------------------------------------------------------------------------


def _trend_weights(x_fit: torch.Tensor, used: int, x_targets: torch.Tensor, rank: int, fit: str, power: float,
                   shrink: float, origin: float) -> WeightsFn:
    """``extrapolate``: w = ĉ(S·K) Σ_r⁻¹ U_rᵀ per target (:func:`~relex_callback.math.core.fit_tensors`, the trend
    fitted on the last ``used`` fit snapshots), moved to θ_N + λ(θ̂ − θ_N) by ``shrink`` λ (weight
    1 − λ on the last snapshot)."""
    def weights_fn(name: str, gram: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        (tensor_fit,) = fit_tensors([name], gram[None], x_fit, x_targets, rank=rank, kind=fit, power=power,
                                    origin=origin, trend_steps=used)
        weights = tensor_fit.weights  # Δ̂ = w M, [n, T]
        if shrink != 1.0:
            weights = shrink * weights
            weights[:, -1] += 1.0 - shrink
        return weights, {
            "explained_variance": tensor_fit.explained_variance,
            "singular_values": _singular_values(tensor_fit.subspace),
            "r_squared": _floats(tensor_fit.r2),
            "predicted_coefficients": [_floats(row) for row in tensor_fit.trend(x_targets)],  # ĉ(S·K), [n, r]
        }

    return weights_fn


def extrapolate_checkpoints(
    base: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    target_steps: int | Sequence[int],
    output_dir: str | os.PathLike,
    *,
    steps: Sequence[int] | None = None,
    base_step: int | None = None,
    rank: int = 1,
    fit: str = "linear",
    power: float = 1.0,
    window: int | None = None,
    fit_steps: int | None = None,
    time_scale: float = 1.0,
    shrink: float = 1.0,
    dtype: str | torch.dtype | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    num_workers: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    backtest_tolerance: float = DEFAULT_BACKTEST_TOLERANCE,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write θ̂(K) = θ_0 + Σ_i ĉ_i(S·K) v_i for each target step K (the paper's RELEX), from checkpoints on disk.

    Per tensor the rank-``rank`` subspace comes from every snapshot with step ≤ ``fit_steps`` (all by
    default); the trend ĉ (``fit``, with exponent ``power`` for ``"power"``) is fitted on the real step numbers
    of the last ``window`` of them and evaluated at S·K, S = ``time_scale``. ``shrink`` λ keeps
    θ_N + λ(θ̂ − θ_N). θ_0 is at step x_0 = ``base_step`` (default: the step in the base's directory name, else 0),
    the trend's origin. One model directory is written per target (``output_dir`` itself for one target,
    ``output_dir/step{K}`` for several), each with ``relex_report.json`` and a model card. Returns the reports.
    """
    began = time.perf_counter()
    targets = _check_targets(target_steps, minimum=1)
    _check_common(rank, fit, window, num_workers)
    _check_trend(fit, power, time_scale)
    if shrink_error(shrink):
        raise RelexInputError(shrink_error(shrink))
    out_dtype = _resolve_dtype(dtype)
    budget = parse_size(max_memory)
    plan = _prepare(base, checkpoints, steps, fit_steps, allow_pickle, base_step)
    _check_targets(targets, minimum=int(plan.origin) + 1)
    used = _check_counts(plan, rank, fit, window)
    output = Path(output_dir)
    _check_output(output, overwrite)
    origin = plan.origin
    if plan.num_fit < len(plan.models):
        logger.info("ignoring %d checkpoint(s) after --fit-steps %s", len(plan.models) - plan.num_fit, fit_steps)
    x_fit = torch.tensor(plan.fit_steps, dtype=torch.float64)
    effective = [float(k) * float(time_scale) for k in targets]
    last = plan.fit_steps[-1]
    x_targets = torch.tensor(effective, dtype=torch.float64)
    spec = TrendSpec(kind=fit, rank=rank, power=float(power), origin=origin, window=window)

    weights_fn = _trend_weights(x_fit, used, x_targets, rank=rank, fit=fit, power=power, shrink=shrink, origin=origin)

    def finish(run: _Run, outputs: list[_OutputModel], staging: Path, sources: dict[str, Path]) -> list[dict[str, Any]]:
        bt = backtest([run.grams[n] for n in plan.tracked], x_fit, rank=rank, kind=fit, power=power, origin=origin)
        section = backtest_section(bt, backtest_tolerance)
        diagnostic = _diagnose([run.grams[n] for n in plan.tracked], plan.fit_steps,
                               [plan.base.tensors[n].numel for n in plan.tracked], rank, fit, power, backtest_tolerance,
                               origin)
        settings = _settings(base_step=int(origin), rank=rank, fit=fit, power=float(power), window=window, fit_steps=fit_steps,
                             time_scale=float(time_scale), shrink=float(shrink), dtype=out_dtype or "auto",
                             max_memory=budget, num_workers=num_workers, backtest_tolerance=backtest_tolerance,
                             target_steps=targets)
        reports = []
        for j, (target, eff, out) in enumerate(zip(targets, effective, outputs)):
            horizon = (eff - origin) / (last - origin) if last > origin else math.inf
            warnings = [f"target step {target} (effective {eff:g}) is not after the last observed step {last}: this interpolates"] if eff <= last else []
            beyond = _beyond_horizon(eff, diagnostic)
            warnings += list(diagnostic.warnings) + ([beyond] if beyond else [])
            report = new_report(
                "extrapolate", target_step=target, targets=targets, horizon_ratio=horizon,
                observed_steps=plan.fit_steps, window_steps=plan.fit_steps[-used:], settings=settings,
                explained_variance=[run.tensors[n]["explained_variance"] for n in plan.tracked],
                r_squared=[run.tensors[n]["r_squared"][0] for n in plan.tracked], backtest=section, warnings=warnings,
                candidate={"target_step": eff, "trend": spec.to_dict(), "anchor": "fit", "shrink": float(shrink),
                           "start_step": None, "probe_score": None},
                effective_target_step=eff, **_input_sections(plan, plan.num_fit),
                copied_files={k: str(v) for k, v in sources.items()}, **_run_sections(run, began, out),
                tensors={n: {**{k: v for k, v in run.tensors[n].items() if k != "predicted_coefficients"},
                             "predicted_coefficients": run.tensors[n]["predicted_coefficients"][j]} for n in plan.tracked},
            )
            report["diagnostic"] = diagnostic.as_dict()
            write_json(out.directory / REPORT_NAME, report)
            write_model_card(out.directory, report)
            for warning in warnings:
                if warning not in diagnostic.warnings:  # those were logged once by _diagnose
                    logger.warning("%s", warning)
            reports.append(report)
        logger.info(
            "extrapolated %d tensors to step(s) %s in %.1f s (waited %.1f s for reads of %s; %d tensor(s) chunked)",
            len(plan.tracked), ", ".join(map(str, targets)), time.perf_counter() - began, run.read_seconds,
            format_bytes(run.bytes_read), run.chunked,
        )
        return reports

    return _execute("extrapolate", plan, output, targets, out_dtype, weights_fn, finish, rows=plan.num_fit,
                    budget=budget, num_workers=num_workers, progress=progress, overwrite=overwrite)


# -- reconstruct -------------------------------------------------------------------------------------------


class _Projection:
    """``reconstruct``: w = U_r U_rᵀ row t for a fit snapshot t, else the projection of Δ_t onto the fit's subspace;
    ``observe`` sums the exact squared errors ||Δ̂_t − Δ_t||² chunk by chunk."""

    def __init__(self, num_fit: int, rank: int, target_rows: list[int]) -> None:
        self.num_fit, self.rank, self.target_rows = num_fit, rank, target_rows
        self.norms = torch.zeros(len(target_rows), dtype=torch.float64)
        self.tensor_errors: dict[str, torch.Tensor] = {}

    def weights(self, name: str, gram: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        num_fit = self.num_fit
        subspace = subspace_from_gram(gram[:num_fit, :num_fit], self.rank)
        projector = reconstruction_weights(subspace)  # U_r U_rᵀ
        rows = []
        for row in self.target_rows:
            if row < num_fit:
                rows.append(projector[row])
            else:
                rows.append(prediction_weights(subspace, subspace.project(gram[row : row + 1, :num_fit]))[0])
        sq_norm = torch.diagonal(gram)[self.target_rows]
        self.norms.add_(sq_norm)
        self.tensor_errors[name] = torch.zeros(len(self.target_rows), dtype=torch.float64)
        return torch.stack(rows), {
            "explained_variance": subspace.explained_variance,
            "singular_values": _singular_values(subspace),
            "squared_norm": _floats(sq_norm),
        }

    def observe(self, name: str, deltas: torch.Tensor, predicted: torch.Tensor) -> None:
        # ||Δ̂_t − Δ_t||² summed exactly over the chunks (more accurate than from G when it is small)
        for j, row in enumerate(self.target_rows):
            self.tensor_errors[name][j] += float((predicted[j] - deltas[row]).double().pow(2).sum())

    @property
    def errors(self) -> torch.Tensor:
        return sum(self.tensor_errors.values(), torch.zeros(len(self.target_rows), dtype=torch.float64))


def reconstruct_checkpoints(
    base: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    target_steps: int | Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    base_step: int | None = None,
    rank: int = 1,
    fit_steps: int | None = None,
    dtype: str | torch.dtype | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    num_workers: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write θ_0 + V_r V_rᵀ Δ_t for observed steps t (the paper's Finding-1 check), V_r from the fit snapshots.

    ``target_steps`` must be steps of the given checkpoints (default: the last fit step); a step
    after ``fit_steps`` is projected onto the subspace of the earlier ones.
    """
    began = time.perf_counter()
    _check_common(rank, "linear", None, num_workers)
    out_dtype = _resolve_dtype(dtype)
    budget = parse_size(max_memory)
    plan = _prepare(base, checkpoints, steps, fit_steps, allow_pickle, base_step)
    if len(plan.models) < 1 or plan.num_fit < 1:
        raise RelexInputError("need at least one checkpoint to reconstruct")
    if plan.num_fit < 2:
        raise RelexInputError(f"need at least 2 checkpoints to span a subspace worth checking, got {plan.num_fit}")
    targets = _check_targets(target_steps if target_steps is not None else [plan.fit_steps[-1]], "reconstruction step")
    position = {s: i for i, s in enumerate(plan.steps)}
    unknown = [t for t in targets if t not in position]
    if unknown:
        raise RelexInputError(
            f"reconstruct needs observed steps; {', '.join(map(str, unknown))} not among the checkpoints ({_steps_text(plan.models)})"
        )
    output = Path(output_dir)
    _check_output(output, overwrite)
    # Rows read: the fit snapshots, then the held-out targets (their G row gives their projection).
    held = [position[t] for t in targets if position[t] >= plan.num_fit]
    order = list(range(plan.num_fit)) + sorted(set(held))
    rows_plan = _Plan(base=plan.base, models=[plan.models[i] for i in order], num_fit=plan.num_fit,
                      tracked=plan.tracked, tied=plan.tied, config=plan.config,
                      tie_word_embeddings=plan.tie_word_embeddings)
    row_of = {plan.steps[i]: r for r, i in enumerate(order)}
    target_rows = [row_of[t] for t in targets]
    projection = _Projection(plan.num_fit, rank, target_rows)

    def finish(run: _Run, outputs: list[_OutputModel], staging: Path, sources: dict[str, Path]) -> list[dict[str, Any]]:
        errors, norms, tensor_errors = projection.errors, projection.norms, projection.tensor_errors
        for name in plan.tracked:
            stats = run.tensors[name]
            squared_norm = stats.pop("squared_norm")
            stats["relative_error"] = [
                math.sqrt(float(e) / n) if n > 0 else 0.0 for e, n in zip(tensor_errors[name], squared_norm)
            ]
        settings = _settings(rank=rank, fit_steps=fit_steps, dtype=out_dtype or "auto", max_memory=budget,
                             num_workers=num_workers)
        reports = []
        for j, (target, out) in enumerate(zip(targets, outputs)):
            report = new_report(
                "reconstruct", target_step=target, targets=targets, horizon_ratio=None, observed_steps=plan.fit_steps,
                window_steps=plan.fit_steps, settings=settings,
                explained_variance=[run.tensors[n]["explained_variance"] for n in plan.tracked], r_squared=[],
                backtest=None, in_fit=position[target] < plan.num_fit,
                relative_distance=float((errors[j] / norms[j]).sqrt()) if norms[j] > 0 else 0.0,
                **_input_sections(plan), copied_files={k: str(v) for k, v in sources.items()},
                **_run_sections(run, began, out),
                tensors={n: {**{k: v for k, v in run.tensors[n].items() if k != "relative_error"},
                             "relative_error": run.tensors[n]["relative_error"][j]} for n in plan.tracked},
            )
            write_json(out.directory / REPORT_NAME, report)
            _write_reconstruction_card(out.directory, report)
            reports.append(report)
        logger.info("reconstructed step(s) %s at rank %d in %.1f s", ", ".join(map(str, targets)), rank, time.perf_counter() - began)
        return reports

    return _execute("reconstruct", rows_plan, output, targets, out_dtype, projection.weights, finish, rows=len(order),
                    budget=budget, num_workers=num_workers, progress=progress, overwrite=overwrite, aux_plan=plan,
                    emit_rows=len(order), observe=projection.observe)


def _write_reconstruction_card(directory: Path, report: dict[str, Any]) -> None:
    ev = report["explained_variance"]
    lines = [
        "---",
        "tags: [relex, rlvr, reconstruction]",
        "---",
        f"# RELEX rank-{report['settings']['rank']} reconstruction of step {report['target_step']}",
        "",
        f"The observed step-{report['target_step']} weights projected onto the rank-{report['settings']['rank']} "
        f"trajectory subspace of steps {report['observed_steps'][0]}–{report['observed_steps'][-1]}, per tensor: "
        "θ_0 + V_r V_rᵀ (θ_t − θ_0) (the paper's Finding-1 check; arXiv 2605.21468), made with relex-callback.",
        "",
        f"- Relative distance to the real weights ||θ̂ − θ|| / ||θ − θ_0||: {report['relative_distance']:.4f}.",
        f"- Explained variance: mean {ev.get('mean', float('nan')):.3f}, min {ev.get('min', float('nan')):.3f} "
        f"over {ev.get('tensors', 0)} tensors.",
        "",
        "Details: `relex_report.json`.",
        "",
    ]
    (directory / "README.md").write_text("\n".join(lines))


# -- report ------------------------------------------------------------------------------------------------


class _Diagnostics:
    """``report``: no weights to write; per tensor the explained variance, singular values, in-window R², and for
    the held-out snapshots (after the fit) their R² against the extended trend and the prediction's squared
    error (summed over tensors in ``errors``/``norms``); the coefficient trajectories of the ``largest`` tensors."""

    def __init__(self, steps: list[int], fit_count: int, used: int, rank: int, fit: str, power: float,
                 largest: set[str], origin: float) -> None:
        self.steps, self.fit_count, self.used, self.rank, self.fit, self.power = steps, fit_count, used, rank, fit, power
        self.origin = origin
        self.largest = largest
        self.held_rows = list(range(fit_count, len(steps)))
        self.x_fit = torch.tensor(steps[:fit_count], dtype=torch.float64)
        self.x_held = torch.tensor(steps[fit_count:], dtype=torch.float64)
        self.errors = torch.zeros(len(self.held_rows), dtype=torch.float64)
        self.norms = torch.zeros(len(self.held_rows), dtype=torch.float64)
        self.trajectories: dict[str, dict[str, Any]] = {}

    def weights(self, name: str, gram: torch.Tensor) -> tuple[None, dict[str, Any]]:
        fit_count, used, held_rows = self.fit_count, self.used, self.held_rows
        (tensor_fit,) = fit_tensors([name], gram[None, :fit_count, :fit_count], self.x_fit, self.x_held, rank=self.rank,
                                    kind=self.fit, power=self.power, origin=self.origin, trend_steps=used)
        subspace, trend = tensor_fit.subspace, tensor_fit.trend
        coefficients = subspace.coefficients
        stats: dict[str, Any] = {
            "explained_variance": subspace.explained_variance,
            "singular_values": _singular_values(subspace),
            "r_squared_in_window": _floats(tensor_fit.r2),
            "r_squared_out_of_window": None,
        }
        held = subspace.project(gram[fit_count:, :fit_count]) if held_rows else coefficients[:0]
        if held_rows:
            if len(held_rows) >= 2:
                spread = (held - held.mean(0)).pow(2).sum(0)
                r2 = r_squared(self.x_held, held, trend)
                stats["r_squared_out_of_window"] = [float(v) if s > 0 else None for v, s in zip(r2, spread)]
            sq_err, sq_norm = squared_errors(gram, tensor_fit.weights, fit_count, held_rows)
            self.errors.add_(sq_err)
            self.norms.add_(sq_norm)
            stats["relative_error_out_of_window"] = [float((e / n).sqrt()) if n > 0 else 0.0 for e, n in zip(sq_err, sq_norm)]
        if name in self.largest:
            self.trajectories[name] = trajectory_entry(
                self.steps, torch.cat([coefficients, held]), trend, subspace.explained_variance,
                stats["r_squared_in_window"], stats["r_squared_out_of_window"], last_fit_row=fit_count - 1)
        return None, stats


def report_checkpoints(
    base: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    steps: Sequence[int] | None = None,
    base_step: int | None = None,
    rank: int = 1,
    fit: str = "linear",
    power: float = 1.0,
    window: int | None = None,
    fit_steps: int | None = None,
    target_steps: int | Sequence[int] | None = None,
    time_scale: float = 1.0,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    num_workers: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    backtest_tolerance: float = DEFAULT_BACKTEST_TOLERANCE,
    plots: bool = True,
    top: int = 6,
    progress: bool = True,
) -> dict[str, Any]:
    """Diagnostics only (one read of every checkpoint, no weights written): ``relex_report.json`` and PNG plots.

    Per tensor: explained variance of the rank-r subspace of the fit snapshots (step ≤ ``fit_steps``),
    singular values, R² of the trend in the window and — for the later, held-out snapshots — R² of
    their coefficients c_t = Δ_t · v against the extended trend, and the whole-model relative distance
    ||θ̂_t − θ_t|| / ||θ_t − θ_0|| of the prediction at each held-out step. θ_0 is at step ``base_step``
    (default: the step in the base's directory name, else 0).
    """
    began = time.perf_counter()
    _check_common(rank, fit, window, num_workers)
    _check_trend(fit, power, time_scale)
    if not isinstance(top, int) or top < 0:
        raise RelexInputError(f"top={top!r} must be an int >= 0")
    targets = _check_targets(target_steps, minimum=1) if target_steps is not None else []
    budget = parse_size(max_memory)
    plan = _prepare(base, checkpoints, steps, fit_steps, allow_pickle, base_step)
    if targets:
        _check_targets(targets, minimum=int(plan.origin) + 1)
    used = _check_counts(plan, rank, fit, window)
    output = Path(output_dir)
    _check_output(output, overwrite)
    origin = plan.origin
    fit_count = plan.num_fit
    x_all = torch.tensor(plan.steps, dtype=torch.float64)
    x_fit = x_all[:fit_count]
    held_rows = list(range(fit_count, len(plan.models)))
    largest = sorted(plan.tracked, key=lambda n: -plan.base.tensors[n].numel)[:top]
    diagnostics = _Diagnostics(plan.steps, fit_count, used, rank, fit, power, set(largest), origin)
    errors, norms, trajectories = diagnostics.errors, diagnostics.norms, diagnostics.trajectories

    def finish(run: _Run, outputs: list[_OutputModel], staging: Path, sources: dict[str, Path]) -> dict[str, Any]:
        bt = backtest([run.grams[n][:fit_count, :fit_count] for n in plan.tracked], x_fit, rank=rank, kind=fit, power=power,
                      origin=origin)
        tensors = run.tensors
        ev_values = [tensors[n]["explained_variance"] for n in plan.tracked]
        r2_out = [tensors[n]["r_squared_out_of_window"][0] for n in plan.tracked
                  if tensors[n]["r_squared_out_of_window"] and tensors[n]["r_squared_out_of_window"][0] is not None]
        numel = [tensors[n]["numel"] for n in plan.tracked]
        out_of_window = None
        if held_rows:
            out_of_window = {
                "steps": plan.steps[fit_count:],
                "relative_distance": [float((e / n).sqrt()) if n > 0 else 0.0 for e, n in zip(errors, norms)],
                "r_squared": summarize(r2_out) if r2_out else None,
            }
        horizon_end = max([float(t) * time_scale for t in targets] + plan.steps + [2.0 * plan.fit_steps[-1] - origin])
        report = new_report(
            "report", target_step=None, targets=targets, horizon_ratio=None, observed_steps=plan.fit_steps,
            window_steps=plan.fit_steps[-used:],
            settings=_settings(base_step=int(origin), rank=rank, fit=fit, power=float(power), window=window,
                               fit_steps=fit_steps, time_scale=float(time_scale), max_memory=budget, num_workers=num_workers,
                               backtest_tolerance=backtest_tolerance, top=top),
            explained_variance=ev_values, r_squared=[tensors[n]["r_squared_in_window"][0] for n in plan.tracked],
            backtest=backtest_section(bt, backtest_tolerance),
            steps=plan.steps, fit_steps=plan.fit_steps, heldout_steps=plan.steps[fit_count:], target_steps=targets,
            **_input_sections(plan),
            out_of_window=out_of_window,
            horizon_ratios={str(t): (float(t) * time_scale - origin) / (plan.fit_steps[-1] - origin) for t in targets}
            if plan.fit_steps[-1] > origin else {},
            trajectories=trajectories, plots=[], tensors=tensors,
        )
        report["explained_variance"]["numel_weighted_mean"] = sum(e * n for e, n in zip(ev_values, numel)) / max(sum(numel), 1)
        diagnostic = _diagnose([run.grams[n][:fit_count, :fit_count] for n in plan.tracked], plan.fit_steps, numel, rank, fit,
                               power, backtest_tolerance, origin)
        report["diagnostic"] = diagnostic.as_dict()
        beyond = [w for w in (_beyond_horizon(float(t) * time_scale, diagnostic) for t in targets) if w]
        for warning in beyond:  # the diagnostic's own warnings were logged by _diagnose
            logger.warning("%s", warning)
        report["warnings"] = list(report["warnings"]) + list(diagnostic.warnings) + beyond
        if plots:
            report["plots"] = _write_plots(staging, report, plan, rank, horizon_end)
        report.update(_run_sections(run, began))
        write_json(staging / REPORT_NAME, report)
        logger.info("report of %d tensors over %d checkpoints in %.1f s", len(plan.tracked), len(plan.models), time.perf_counter() - began)
        return report

    return _execute("report", plan, output, [], None, diagnostics.weights, finish, rows=len(plan.models), budget=budget,
                    num_workers=num_workers, progress=progress, overwrite=overwrite)
