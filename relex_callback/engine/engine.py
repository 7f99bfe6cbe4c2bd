"""`RelexEngine`: what RELEX does with a model's live weights, free of any training framework.

The engine owns the delta buffer (its sizing, recording and saved state), the sequence fit → candidates →
predictions → report, loading a prediction into the live weights, the trial of candidates under a probe with a
bit-exact restore, and the refusal of non-finite numbers (agreed across processes through
:mod:`relex_callback.distributed`). Trainer adapters (:mod:`relex_callback.trainers`) only decide *when* to call
it; the offline CLI shares its report schema (:mod:`relex_callback.engine.report`) and the math
(:mod:`relex_callback.math.core`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..buffer import DAMAGED_STATE_FIX, DeltaBuffer, DeltaStorage, TrackedTensor, host_available_bytes, select_parameters
from ..config import RelexConfig
from ..distributed import (
    all_reduce_grams,
    all_reduce_sum,
    communication_report,
    is_main_process,
    mean_over_processes,
    track_parameters,
    world_info,
    write_prediction,
)
from ..export import check_output_location
from ..math.core import TrajectoryFit, combine, fit_trajectory, prediction_weights, select_power
from ..math.diagnostic import WindowDiagnostic, diagnose_window, trend_predictor
from ..options import BUFFER_DTYPES, CANDIDATE_FAMILIES, TREND_KINDS, min_snapshots
from ..preflight import Preflight, preflight
from ..store import ROWS_DIR_NAME, DiskDeltaStore, store_footprint
from ..units import format_bytes
from .candidate import Candidate, TrendSpec
from .horizon import HorizonSearch, ProbeFailed, search_horizon, standard_error
from .report import backtest_section, horizon_warning, new_report

__all__ = ["RelexEngine", "BufferPlan", "Probe", "STATE_FILE_NAME", "STATE_FORMAT_VERSION", "find_state", "state_file", "register_candidate_family"]

logger = logging.getLogger(__name__)

STATE_FILE_NAME = "relex_state.safetensors"
STATE_FORMAT_VERSION = 3
"""The newest state format: 3 references rows of the run's row file of an in-memory buffer (metadata ``"rows"``,
:class:`~relex_callback.store.CheckpointRows`); 2 references rows of a disk store (metadata ``"store"``); 1 holds
θ_0 and the deltas themselves (written by older versions; still read)."""
_READABLE_STATE_FORMATS = (1, 2, 3)
_RESUME_KEYS = ("start_step", "snapshot_every", "buffer_dtype", "include", "exclude")

Probe = Callable[[torch.nn.Module], float]
"""``probe(model) -> float``: higher is better (e.g. :class:`~relex_callback.probe.RewardProbe`)."""

CandidateBuilder = Callable[["RelexEngine", TrajectoryFit, float], Candidate]
_CANDIDATE_FAMILIES: dict[str, CandidateBuilder] = {}


def register_candidate_family(name: str, builder: CandidateBuilder) -> None:
    """Make ``RelexEngine.candidates(fit, targets, families=(..., name))`` call ``builder(engine, fit, target)``.

    A builder returns a :class:`Candidate` whose ``weights`` weigh the stored delta rows of ``fit`` (for
    example weight α on the last row for θ_0 + α(θ_N − θ_0)); the engine predicts, trials and reports it
    like an SVD candidate.
    """
    if name in TREND_KINDS or name == "trend":
        raise ValueError(f"{name!r} is the built-in SVD trend family")
    _CANDIDATE_FAMILIES[name] = builder


def _scale_candidate(engine: "RelexEngine", fit: TrajectoryFit, target: float) -> Candidate:
    """θ_0 + α(θ_N − θ_0) with α = √((K − x_0)/(x_N − x_0)): magnitude scaling along the last observed delta."""
    origin = fit.origin
    alpha = math.sqrt((float(target) - origin) / (float(fit.steps[-1]) - origin))
    weights = {}
    for tensor_fit in fit.tensors:
        w = torch.zeros(len(fit.steps), dtype=torch.float64)
        w[-1] = alpha
        weights[tensor_fit.name] = w
    return Candidate(target=float(target), spec=TrendSpec(kind="scale", origin=origin, params={"alpha": alpha}),
                     weights=weights, shrink=engine.config.shrink)


def _observed_candidate(engine: "RelexEngine", fit: TrajectoryFit, target: float) -> Candidate:
    """The last observed weights θ_N themselves (weight 1 on the last row): what "no extrapolation" writes."""
    candidate = _scale_candidate(engine, fit, float(fit.steps[-1]))
    return Candidate(target=float(fit.steps[-1]), spec=TrendSpec(kind="observed", origin=candidate.spec.origin),
                     weights=candidate.weights)


def _sqrt_candidate(engine: "RelexEngine", fit: TrajectoryFit, target: float) -> Candidate:
    """The rank-r subspace with a √t trend, c = a + b·√(x − x_0), fitted on the same Grams."""
    cfg = engine.config
    sqrt_fit = fit_trajectory(list(zip(fit.names, fit.grams, strict=True)), fit.steps, [float(target)], rank=cfg.rank,
                              kind="power", power=0.5, origin=fit.origin)
    return Candidate(target=float(target), spec=TrendSpec(kind="sqrt", rank=cfg.rank, power=0.5, origin=fit.origin),
                     weights={t.name: t.weights[0] for t in sqrt_fit.tensors}, shrink=cfg.shrink)


def _state_name(rank: int, world: int) -> str:
    return STATE_FILE_NAME if world == 1 else f"relex_state-rank{rank:05d}-of-{world:05d}.safetensors"


def state_file(checkpoint_dir: Path) -> Path:
    """This process's saved-state file in ``checkpoint_dir`` (one per rank when distributed)."""
    return checkpoint_dir / _state_name(*world_info())


def find_state(checkpoint_dir: Path) -> Path | None:
    """This process's saved-state file in ``checkpoint_dir``, or ``None`` when the checkpoint has no RELEX state.

    Every process reads the same files, so every process returns or raises alike.

    Raises:
        ValueError: a state file is half written (the run was killed while saving it) or missing for some process,
            or the states were saved by another number of processes (names the files, both world sizes and the fix).
    """
    saved = sorted(p.name for p in checkpoint_dir.glob("relex_state*.safetensors"))
    partial = [p for p in sorted(checkpoint_dir.glob("relex_state*.safetensors.tmp")) if p.name[:-4] not in saved]
    if partial:
        raise ValueError(
            f"{partial[0]} is a half-written RELEX state: the run stopped while saving checkpoint {checkpoint_dir}, so "
            f"it cannot resume RELEX exactly. {DAMAGED_STATE_FIX}")
    if not saved:
        return None
    world = world_info()[1]
    expected = [_state_name(r, world) for r in range(world)]
    if set(expected) <= set(saved):
        return state_file(checkpoint_dir)
    found = re.search(r"-of-(\d+)\.safetensors$", saved[0])
    saved_world = int(found.group(1)) if found else 1
    if saved_world == world:
        raise ValueError(f"{checkpoint_dir} lacks the RELEX state of some processes (it holds {', '.join(saved[:4])}). "
                         f"{DAMAGED_STATE_FIX}")
    raise ValueError(
        f"{checkpoint_dir} holds RELEX state saved by {saved_world} process(es) ({', '.join(saved[:4])}), but this run "
        f"has {world}: the saved buffer is split per process and cannot be re-split. Resume with {saved_world} "
        "process(es), or set start_step to this checkpoint's step to restart the observation from its weights.")


@dataclass(frozen=True)
class BufferPlan:
    """Where the delta buffer goes and whether it fits: ``needed`` and ``budget`` bytes on ``where``."""

    device: str  # "param" or "cpu"
    where: str  # "GPU" or "host"
    needed: int
    budget: int

    @property
    def fits(self) -> bool:
        return self.needed <= self.budget


def plan_buffer(config: RelexConfig, numels: Sequence[int], on_gpu: bool, gpu_free: int | None, host_free: int) -> BufferPlan:
    """The buffer placement rule (pure): ``buffer_device`` "auto" takes the parameters' GPU when the buffer fits
    half its free memory (or ``buffer_max_bytes``), else host memory within 80% of what is available."""
    needed = DeltaBuffer.bytes_needed(numels, config.buffer_capacity, config.buffer_dtype)
    gpu_budget = config.buffer_max_bytes
    if on_gpu and config.buffer_device in ("auto", "param") and gpu_budget is None:
        gpu_budget = (gpu_free or 0) // 2
    host_budget = config.buffer_max_bytes if config.buffer_max_bytes is not None else int(0.8 * host_free)
    device = config.buffer_device
    if device == "auto":
        device = "param" if on_gpu and needed <= gpu_budget else "cpu"
    on_device = device == "param" and on_gpu
    return BufferPlan(device=device, where="GPU" if on_device else "host", needed=needed,
                      budget=gpu_budget if on_device else host_budget)


_CANDIDATE_FAMILIES.update({"scale": _scale_candidate, "sqrt": _sqrt_candidate, "observed": _observed_candidate})


def candidate_families(config: RelexConfig, with_probe: bool) -> list[str]:
    """The candidate families of a halt-mode fit: ``config.candidates`` when set; else all of
    ``CANDIDATE_FAMILIES`` (trend, √t, scale) for ``extrapolate_to="auto"`` with a probe to choose among them,
    else the trend alone."""
    if config.candidates is not None:
        return list(config.candidates)
    return list(CANDIDATE_FAMILIES) if config.auto_target and with_probe else ["trend"]


class RelexEngine:
    """RELEX on one model's live weights: buffer, fit, candidates, predictions, trials and reports.

    Args:
        config (`RelexConfig`): the settings (rank, trend, window, shrink, buffer, ...).
    """

    def __init__(self, config: RelexConfig) -> None:
        self.config = config
        self.buffer: DeltaStorage | None = None
        self.snapshot_seconds = 0.0
        self.diagnostic: WindowDiagnostic | None = None  # the last fit's window diagnostic
        self.preflight: Preflight | None = None  # the cost estimate of this process, set by attach()

    # -- the buffer -----------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """θ_0 has been captured (or restored)."""
        return self.buffer is not None and bool(self.buffer.theta0)

    @property
    def tracked(self) -> list[TrackedTensor]:
        return self.buffer.tracked if self.buffer is not None else []

    def attach(self, model: torch.nn.Module, store_dir: str | Path | None = None) -> DeltaStorage:
        """Choose the tracked tensors of ``model`` (this process's slices), size and allocate the buffer
        (``buffer_device="disk"``: a :class:`~relex_callback.store.DiskDeltaStore` in ``store_dir``)."""
        cfg = self.config
        chosen = select_parameters(model, cfg.include, cfg.exclude)
        if not chosen:
            raise ValueError(
                f"no parameter to track: none is a trainable floating-point tensor matching include={cfg.include} "
                f"and not exclude={cfg.exclude}. Loosen include/exclude or unfreeze parameters."
            )
        tracked = track_parameters(model, chosen)  # one slice per process under DDP/FSDP/DeepSpeed
        numels = [t.numel for t in tracked]
        self.preflight = preflight(numels, cfg, world_info()[1])  # before any refusal, so the user sees the costs
        if is_main_process():
            logger.info("%s", self.preflight.summary_line())
        if cfg.buffer_device == "disk":
            return self._attach_store(tracked, Path(cfg.store_dir or store_dir or "relex-store"))
        on_gpu = any(t.view().is_cuda for t in tracked)
        gpu_free = torch.cuda.mem_get_info()[0] if on_gpu and cfg.buffer_device in ("auto", "param") and cfg.buffer_max_bytes is None else None
        plan = plan_buffer(cfg, numels, on_gpu, gpu_free, host_available_bytes() if cfg.buffer_max_bytes is None else 0)
        if not plan.fits:
            raise MemoryError(self._budget_message(plan, numels))
        logger.info(
            "RELEX: tracking %d tensors (%s parameters); the delta buffer needs %s on %s (%d snapshots, %s)",
            len(tracked), f"{sum(numels):,}", format_bytes(plan.needed), plan.where, cfg.buffer_capacity, cfg.buffer_dtype,
        )
        self.buffer = DeltaBuffer(tracked, cfg.buffer_capacity, cfg.buffer_dtype, plan.device)
        return self.buffer

    def _attach_store(self, tracked: list[TrackedTensor], directory: Path) -> DiskDeltaStore:
        """The disk store: refuses before training when its memory exceeds the budget or its file the free disk."""
        cfg = self.config
        numels = [t.numel for t in tracked]
        memory, disk = store_footprint(numels, cfg.buffer_capacity, cfg.buffer_dtype, drops_rows=cfg.mode == "jump")
        budget = cfg.buffer_max_bytes if cfg.buffer_max_bytes is not None else int(0.8 * host_available_bytes())
        if memory > budget:
            raise MemoryError(
                f"the RELEX disk store needs {format_bytes(memory)} of host memory (θ_0 in fp32, one staging row and the "
                f"fit's read block) but the budget is {format_bytes(budget)} (buffer_max_bytes={cfg.buffer_max_bytes}). "
                "Track fewer tensors with include/exclude, or raise buffer_max_bytes.")
        check_output_location(directory, "store_dir")
        existing = next(d for d in (directory, *directory.parents) if d.exists())
        free = shutil.disk_usage(existing).free
        if free is not None and disk > free:
            raise OSError(
                f"the RELEX disk store needs {format_bytes(disk)} in {directory} but only {format_bytes(free)} is free "
                f"there. Point store_dir at a larger disk, or use a smaller buffer_dtype, snapshot_every or include/exclude.")
        rank, world = world_info()
        self.buffer = DiskDeltaStore(tracked, cfg.buffer_capacity, cfg.buffer_dtype, directory, rank, world)
        logger.info(
            "RELEX: tracking %d tensors (%s parameters); the disk delta store needs %s on disk in %s and %s of host memory "
            "(%d snapshots, %s)", len(tracked), f"{sum(numels):,}", format_bytes(disk), directory, format_bytes(memory),
            cfg.buffer_capacity, cfg.buffer_dtype,
        )
        return self.buffer

    def _budget_message(self, plan: BufferPlan, numels: list[int]) -> str:
        """The refusal of a buffer over budget, with settings that fit: each one a ``RelexConfig`` accepts (T =
        observe / snapshot_every ≥ ``min_snapshots(rank, fit)``), sized by that config's buffer capacity."""
        cfg = self.config
        fits = []
        for dtype in BUFFER_DTYPES:
            for every in sorted({cfg.snapshot_every, cfg.snapshot_every * 2, cfg.snapshot_every * 5}):
                if cfg.observe % every or cfg.observe // every < min_snapshots(cfg.rank, cfg.fit):
                    continue
                try:
                    capacity = replace(cfg, buffer_dtype=dtype, snapshot_every=every).buffer_capacity
                except (TypeError, ValueError):  # another rule of the config refuses it (e.g. jump mode's window)
                    continue
                if DeltaBuffer.bytes_needed(numels, capacity, dtype) <= plan.budget:
                    fits.append(f"buffer_dtype={dtype!r}, snapshot_every={every}")
        fixes = [f"settings that fit: {'; '.join(fits[:4])}"] if fits else []
        if plan.where == "GPU":
            fixes.append("buffer_device='cpu' (host memory)")
        fixes += ["fewer tracked tensors (include/exclude)", "a larger buffer_max_bytes"]
        return (
            f"the RELEX delta buffer needs {format_bytes(plan.needed)} but the {plan.where} budget is "
            f"{format_bytes(plan.budget)} (buffer_max_bytes={cfg.buffer_max_bytes}). Use "
            + "; or ".join(fixes) + "."
        )

    def capture_base(self, step: int) -> None:
        self.buffer.capture_base()
        logger.info("RELEX: captured θ_0 at step %d", step)

    def record(self, step: float) -> None:
        """Record Δ = θ − θ_0 of the live weights at (virtual) step ``step``."""
        started = time.perf_counter()
        self.buffer.record(step)
        self.snapshot_seconds += time.perf_counter() - started

    def make_room(self) -> str | None:
        """Free one row of a full buffer before a record: drop the oldest row when the fit uses a rolling
        ``window`` (returns ``"dropped_oldest"``), else keep every other row counted from the newest
        (``"thinned"``: the caller doubles its recording interval). ``None`` when there was room."""
        buffer = self.buffer
        if len(buffer) < buffer.capacity:
            return None
        if self.config.window is not None:
            buffer.drop_oldest(buffer.capacity - 1)
            return "dropped_oldest"
        buffer.keep_rows(range(len(buffer) - 1, -1, -2))
        return "thinned"

    # -- saved state ----------------------------------------------------------------------------------------

    def save_state(self, checkpoint_dir: str | Path, metadata: dict[str, str] | None = None,
                   rows_dir: str | Path | None = None) -> Path:
        """Write this process's saved state into ``checkpoint_dir`` (atomically): which rows the checkpoint covers
        (rows, CRC-32s, θ_0's SHA-256), never the rows themselves. An in-memory buffer first writes the rows the
        run's row file lacks into ``rows_dir`` (default ``{checkpoint_dir}/../relex-rows``), each once per run
        (:class:`~relex_callback.store.CheckpointRows`); the disk store holds them already. The metadata carries
        its own CRC-32."""
        path = state_file(Path(checkpoint_dir))
        rank, world = world_info()
        values = {
            "format_version": str(STATE_FORMAT_VERSION),
            "steps": json.dumps(self.buffer.steps),
            "config": json.dumps(self.config.to_dict()),
            "rank": str(rank),
            "world_size": str(world),
            **(metadata or {}),
        }
        rows_dir = Path(rows_dir or Path(checkpoint_dir).resolve().parent / ROWS_DIR_NAME).resolve()
        values.update(self.buffer.checkpoint_metadata(path, rows_dir, rank, world))
        values["metadata_crc32"] = str(_metadata_crc32(values))
        tmp = path.with_name(path.name + ".tmp")
        save_file({}, str(tmp), metadata=values)
        tmp.replace(path)
        return path

    @staticmethod
    def read_state_metadata(path: Path) -> dict[str, str]:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise ValueError(f"{path} is not a readable RELEX state ({err}): it is truncated or corrupted. "
                             f"{DAMAGED_STATE_FIX}") from None
        version = int(metadata.get("format_version", "0"))
        if version not in _READABLE_STATE_FORMATS:
            raise ValueError(f"{path} has RELEX state format {version}; this version reads {_READABLE_STATE_FORMATS}.")
        if "metadata_crc32" in metadata and str(_metadata_crc32(metadata)) != metadata["metadata_crc32"]:
            raise ValueError(f"{path} fails its CRC-32 check: the RELEX state is corrupted. {DAMAGED_STATE_FIX}")
        return metadata

    def load_state(self, path: Path, metadata: dict[str, str], up_to_step: float) -> None:
        """Restore θ_0 and the snapshots recorded at steps ≤ ``up_to_step``; refuse a state written with other
        settings that change what the buffer holds."""
        saved = json.loads(metadata["config"])
        for key in _RESUME_KEYS:
            if saved.get(key) != getattr(self.config, key):
                raise ValueError(
                    f"{path} was written with {key}={saved.get(key)!r} but the callback now has "
                    f"{key}={getattr(self.config, key)!r}; resume with the same setting."
                )
        steps = [s for s in json.loads(metadata["steps"]) if s <= up_to_step]
        on_disk = self.buffer.location == "disk"
        if ("store" in metadata) != on_disk:
            saved_device = "disk" if "store" in metadata else saved.get("buffer_device")
            raise ValueError(
                f"{path} was written with buffer_device={saved_device!r} but the callback now has "
                f"buffer_device={self.config.buffer_device!r}; resume with the same setting.")
        source = self.buffer.restore(metadata, len(steps), path, *world_info())
        logger.info("RELEX: restored θ_0 and %d snapshots from %s (checked against %s)", len(steps), source, path)

    # -- fit and candidates ---------------------------------------------------------------------------------

    def refuse_non_finite(self, bad: list[str], what: str) -> None:
        """Raise on every process when any process found non-finite ``what`` (one all-reduce)."""
        flags = all_reduce_sum(torch.tensor([float(len(bad))]))
        if bad or float(flags) > 0:
            raise FloatingPointError(
                f"RELEX refuses to extrapolate: non-finite {what} in {bad[:10] or '(another process)'}"
                f"{' ...' if len(bad) > 10 else ''}. Live weights and output directories were left untouched."
            )

    def fit(self, targets: Sequence[float], window: int | None = None, origin: float | None = None) -> TrajectoryFit:
        """Fit every tracked tensor on the recorded ``window`` (Grams summed over processes)."""
        cfg = self.config
        names, grams = [], []
        progress = tqdm(
            self.buffer.grams(window), total=len(self.buffer.tracked), desc="RELEX fit", unit="tensor",
            disable=len(self.buffer.tracked) < 64 or not is_main_process(), leave=False,
        )
        for item, gram in progress:
            names.append(item.name)
            grams.append(gram)
        grams = all_reduce_grams(grams)  # summed Grams: the same on every process, so no all-reduce for the check
        bad = [name for name, g in zip(names, grams, strict=True) if not bool(torch.isfinite(g).all())]
        if bad:
            raise FloatingPointError(
                f"RELEX refuses to extrapolate: non-finite deltas in {bad[:10]}{' ...' if len(bad) > 10 else ''}. "
                "Live weights and output directories were left untouched."
            )
        steps = self.buffer.window_steps(window)
        origin = float(cfg.start_step if origin is None else origin)
        power = cfg.power
        if power == "auto":
            power, distances = select_power(grams, steps, rank=cfg.rank, origin=origin)
            logger.info("RELEX: power='auto' chose p=%.2f (backtest distance by p: %s)", power,
                        {p: round(d, 4) for p, d in distances.items()})
        return fit_trajectory(
            list(zip(names, grams, strict=True)), steps, [float(t) for t in targets], rank=cfg.rank, kind=cfg.fit,
            power=power, origin=origin,
        )

    def diagnose(self, fit: TrajectoryFit, zero_std_fraction: float | None = None) -> WindowDiagnostic:
        """The window diagnostic of ``fit`` (Gram-only; the same on every process): growth exponent, direction
        stability, noise share, backtests and the supported horizon K_max of the configured trend at
        ``backtest_tolerance`` (:mod:`relex_callback.math.diagnostic`); also kept as :attr:`diagnostic`."""
        cfg = self.config
        stacked, steps, origin = fit.grams, fit.steps, fit.origin
        numels = [math.prod(getattr(item, "full_shape", None) or item.param.shape) for item in self.buffer.tracked]
        trend = fit.tensors[0].trend
        predictor = trend_predictor(stacked, steps, rank=cfg.rank, kind=cfg.fit, power=trend.power, origin=origin)
        self.diagnostic = diagnose_window(stacked, steps, origin, numels, predictor, rank=cfg.rank,
                                          tolerance=cfg.backtest_tolerance, zero_std_fraction=zero_std_fraction)
        return self.diagnostic

    def auto_targets(self, fit: TrajectoryFit, diagnostic: WindowDiagnostic, with_probe: bool) -> list[float]:
        """``extrapolate_to="auto"``: K_max (rounded down to a step); with a probe, a ladder of targets up to K_max
        as well (1.5, 2, 3, 5, 8, 12 and 20 times the window). An empty list: nothing beyond the window is
        supported."""
        last, span = float(fit.steps[-1]), float(fit.steps[-1]) - float(fit.origin)
        k_max = float(diagnostic.k_max)
        if k_max <= last:
            return []
        ladder = [float(math.floor(fit.origin + r * span)) for r in (1.5, 2, 3, 5, 8, 12, 20)] if with_probe else []
        return sorted({k for k in ladder if last < k < k_max} | {k_max})

    def trend_spec(self, fit: TrajectoryFit, window: int | None) -> TrendSpec:
        cfg = self.config
        trend = fit.tensors[0].trend  # fit_trajectory refuses an empty model
        return TrendSpec(kind=cfg.fit, rank=cfg.rank, power=trend.power, origin=trend.origin, window=window)

    def candidate(
        self, fit: TrajectoryFit, target: float, *, window: int | None = None, anchor: str = "fit",
        start: float | None = None, shrink: float | None = None,
    ) -> Candidate:
        """The SVD-trend candidate of ``fit`` at ``target``.

        ``anchor="fit"``: θ_0 + ĉ(target)·v (weights of ``fit`` when ``target`` is one of its targets);
        ``anchor="current"``: the live weights plus ĉ(target) − ĉ(start) along v.
        """
        shrink = self.config.shrink if shrink is None else shrink
        weights: dict[str, torch.Tensor] = {}
        for tensor_fit in fit.tensors:
            if anchor == "current":
                step = tensor_fit.trend([float(target)]) - tensor_fit.trend([float(start)])
                weights[tensor_fit.name] = prediction_weights(tensor_fit.subspace, step)[0]
            elif float(target) in fit.targets:
                weights[tensor_fit.name] = tensor_fit.weights[fit.targets.index(float(target))]
            else:
                weights[tensor_fit.name] = prediction_weights(tensor_fit.subspace, tensor_fit.trend([float(target)]))[0]
        return Candidate(target=float(target), spec=self.trend_spec(fit, window), weights=weights, anchor=anchor,
                         shrink=shrink, start=None if start is None else float(start))

    def candidates(self, fit: TrajectoryFit, targets: Sequence[float] | None = None, *, window: int | None = None,
                   families: Sequence[str] = ("trend",)) -> list[Candidate]:
        """One candidate per target and family: ``"trend"`` (the fitted SVD trend) and any registered family."""
        targets = fit.targets if targets is None else targets
        out = []
        for family in families:
            for target in targets:
                if family == "trend":
                    out.append(self.candidate(fit, target, window=window))
                elif family in _CANDIDATE_FAMILIES:
                    out.append(_CANDIDATE_FAMILIES[family](self, fit, float(target)))
                else:
                    raise ValueError(f"unknown candidate family {family!r}; registered: {['trend', *_CANDIDATE_FAMILIES]}")
        return out

    def fit_window(self, window: int | None = None, zero_std_fraction: float | None = None,
                   targets: Sequence[float] | None = None) -> TrajectoryFit:
        """Fit the recorded ``window`` (at ``targets``, default the last recorded step) and diagnose it
        (:meth:`diagnose`); the diagnostic's summary and warnings are logged."""
        fit = self.fit(list(targets or [float(self.buffer.window_steps(window)[-1])]), window=window)
        diagnostic = self.diagnose(fit, zero_std_fraction)
        logger.info("RELEX: %s", diagnostic.summary_line())
        for text in diagnostic.warnings:
            logger.warning("RELEX: %s", text)
        return fit

    def observed_candidate(self, fit: TrajectoryFit) -> Candidate:
        """The last observed weights θ_N as a candidate (what halt mode writes when nothing is extrapolated)."""
        return _CANDIDATE_FAMILIES["observed"](self, fit, float(fit.steps[-1]))

    def extrapolate(
        self,
        targets: Sequence[float] | Callable[[TrajectoryFit], Sequence[float]] | str,
        producer: str,
        window: int | None = None,
        families: Sequence[str] = ("trend",),
        *,
        with_probe: bool = False,
        zero_std_fraction: float | None = None,
        **sections: Any,
    ) -> tuple[TrajectoryFit, list[Candidate], list[dict[str, torch.Tensor]]]:
        """The whole sequence: fit the recorded ``window``, diagnose it (:meth:`diagnose`), one candidate per target
        and kind, their predictions and their reports (``candidate.report``, with the diagnostic, the snapshot and
        fit timings and ``sections``).

        ``targets`` may be a function of the fit, or ``"auto"``: the supported horizon K_max and, ``with_probe``, a
        ladder of targets below it (:meth:`auto_targets`); when nothing beyond the window is supported the one
        candidate is the last observed weights (kind ``"observed"``). When an explicit target lies beyond K_max, a
        candidate at K_max is put first, beside the targets (it is never loaded instead of them without a probe).
        """
        started = time.perf_counter()
        auto = isinstance(targets, str)
        if auto and targets != "auto":
            raise ValueError(f"targets={targets!r}: pass step numbers, a function of the fit, or 'auto'")
        chosen = None if auto or callable(targets) else [float(t) for t in targets]
        fit = self.fit_window(window, zero_std_fraction, chosen)
        diagnostic = self.diagnostic
        k_max = float(diagnostic.k_max)
        if auto:
            chosen = self.auto_targets(fit, diagnostic, with_probe)
        elif chosen is None:
            chosen = [float(t) for t in targets(fit)]
        if chosen:
            candidates = self.candidates(fit, chosen, window=window, families=families)
        else:
            logger.warning("RELEX: the window supports no extrapolation (K_max = the last observed step %g); writing the "
                           "last observed weights instead of a prediction", fit.steps[-1])
            candidates = [self.observed_candidate(fit)]
        if not auto and any(t > k_max for t in chosen) and k_max > fit.steps[-1] and k_max not in chosen:
            candidates.insert(0, self.candidate(fit, k_max, window=window))
        predictions = self.predict(candidates)
        fit_seconds = time.perf_counter() - started
        timings = {"snapshot_seconds_total": self.snapshot_seconds,
                   "snapshot_seconds_mean": self.snapshot_seconds / max(len(fit.steps), 1), "fit_seconds": fit_seconds}
        for candidate in candidates:
            self.report(fit, candidate, producer, timings=dict(timings), **sections)
        return fit, candidates, predictions

    # -- predictions ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, candidates: Sequence[Candidate]) -> list[dict[str, torch.Tensor]]:
        """θ̂ of each candidate for every tracked tensor (flat fp32, on the buffer device), one pass over the
        buffer per tensor and window; refuses (on every process) when any value is non-finite."""
        predictions: list[dict[str, torch.Tensor]] = [{} for _ in candidates]
        bad: list[str] = []
        by_window: dict[int | None, list[int]] = {}
        for j, cand in enumerate(candidates):
            by_window.setdefault(cand.spec.window, []).append(j)
        for item in self.buffer.tracked:
            name = item.name
            base = self.buffer.theta0[name]
            for window, members in by_window.items():
                stacked = torch.stack([candidates[j].weights[name] for j in members])
                moved = combine(self.buffer.stack(name, window), stacked)
                for row, j in enumerate(members):
                    predictions[j][name] = self._apply(candidates[j], item, base, moved[row])
            # a value finite in fp32 can still overflow the parameter's own dtype (float16: |x| > 65504) when written
            dtype = item.param.dtype
            limit = torch.finfo(dtype).max if dtype.is_floating_point else None
            limit = limit if limit is not None and limit < torch.finfo(torch.float32).max else None
            for p in predictions:
                if not bool(torch.isfinite(p[name]).all()):
                    bad.append(name)
                    break
                if limit is not None and p[name].numel() and float(p[name].abs().max()) > limit:
                    bad.append(f"{name} (beyond the {str(dtype).removeprefix('torch.')} range, |x| > {limit:g})")
                    break
        self.refuse_non_finite(bad, "predictions")
        return predictions

    @staticmethod
    def _apply(cand: Candidate, item: TrackedTensor, base: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        if cand.anchor == "current":
            current = item.view().to(moved.device, torch.float32, copy=True)
            return current.add_(moved, alpha=cand.shrink)
        theta_hat = moved.add_(base)
        if cand.shrink != 1.0:
            current = item.view().to(theta_hat.device, torch.float32, copy=True)
            theta_hat = current.add_(theta_hat.sub_(current), alpha=cand.shrink)
        return theta_hat

    @torch.no_grad()
    def load(self, prediction: dict[str, torch.Tensor]) -> None:
        """Write ``prediction`` (this process's slices) into the live weights; collective under DDP/FSDP/DeepSpeed."""
        write_prediction(self.buffer.tracked, prediction)

    @torch.no_grad()
    def live_copy(self) -> dict[str, torch.Tensor]:
        """Bit-exact copies of the tracked live weights (in the parameters' dtype), for :meth:`load`."""
        return {item.name: item.view().detach().clone() for item in self.buffer.tracked}

    # -- probes ---------------------------------------------------------------------------------------------

    @staticmethod
    def score(probe: Probe, model: torch.nn.Module) -> float:
        """``probe(model)`` averaged over processes, so every process takes the same decision; a probe that raises on
        one process makes every process raise (:func:`~relex_callback.distributed.mean_over_processes`)."""
        return mean_over_processes(lambda: probe(model), "the probe")

    @torch.no_grad()
    def trial(
        self,
        model: torch.nn.Module,
        probe: Probe,
        candidates: Sequence[Candidate],
        predictions: Sequence[dict[str, torch.Tensor]],
        choose: Callable[[float, list[float]], int | None],
        keep_chosen: bool = True,
        before: float | None = None,
    ) -> tuple[float, int | None]:
        """Score the live weights (unless ``before`` is given) and each prediction loaded in turn; set each
        candidate's ``score``; pick ``choose(before, scores)``.

        Afterwards the live weights are the chosen prediction when ``keep_chosen`` (the last one loaded is kept
        as is), else the original weights restored bit for bit; they are restored as well when a probe raises.
        Returns ``(before, chosen index or None)``.
        """
        before = self.score(probe, model) if before is None else before
        saved = self.live_copy()
        scores: list[float] = []
        try:
            for cand, prediction in zip(candidates, predictions, strict=True):
                self.load(prediction)
                cand.score = self.score(probe, model)
                scores.append(cand.score)
        except BaseException:
            self.load(saved)  # never leave an unchecked prediction behind
            raise
        chosen = choose(before, scores)
        if not (keep_chosen and chosen == len(predictions) - 1):
            self.load(saved)  # bit-exact: the copies have the parameters' dtype
            if keep_chosen and chosen is not None:
                self.load(predictions[chosen])
        return before, chosen

    @torch.no_grad()
    def search(
        self, model: torch.nn.Module, probe: Probe, fit: TrajectoryFit, families: Sequence[str], ladder: Sequence[float],
        *, window: int | None = None, margin: float | None = None, allow_worse: bool = False,
        window_seconds: float | None = None,
    ) -> tuple[HorizonSearch, Candidate | None]:
        """The reward-guided horizon (:func:`~relex_callback.engine.horizon.search_horizon`): score the live weights,
        then each family's prediction up the ``ladder``, one at a time (one extra copy of the weights at a time).

        Afterwards the live weights are the original ones, restored bit for bit, whatever happened; a probe that
        fails ends the search (``search.failure``) instead of raising. Returns the search and the chosen candidate
        (``None``: keep the trained weights). ``window_seconds``: the window's training time, for the warning when
        the ladder's probe cost could exceed it."""
        def probe_once() -> tuple[float, float | None]:
            try:
                value = self.score(probe, model)
            except Exception as err:
                raise ProbeFailed(f"the probe raised {type(err).__name__}: {err}") from err
            return value, standard_error(getattr(probe, "last_scores", None))

        saved = self.live_copy()
        started = time.perf_counter()
        try:
            current, current_se = probe_once()
        except ProbeFailed as err:
            search = HorizonSearch(current=math.nan, current_standard_error=None, margin=0.0, margin_source="",
                                   ladder=list(ladder), failure=str(err) + " (scoring the trained weights)")
            return search, None
        one_call = time.perf_counter() - started
        worst = one_call * len(ladder) * len(families)
        if window_seconds and worst > window_seconds:
            logger.warning(
                "RELEX: the horizon search may make up to %d probe calls of about %.1fs each (%.0fs), more than the "
                "window's own training time (%.0fs); lower max_horizon, use fewer candidates or a cheaper probe.",
                len(ladder) * len(families), one_call, worst, window_seconds)

        def evaluate(family: str, target: float) -> tuple[float, float | None]:
            candidate = self.candidates(fit, [target], window=window, families=[family])[0]
            self.load(self.predict([candidate])[0])
            return probe_once()

        try:
            search = search_horizon(families, ladder, evaluate, current, current_se, margin, allow_worse)
        finally:
            self.load(saved)  # bit-exact: the copies have the parameters' dtype
        for call in search.calls:
            logger.info("RELEX: horizon search %s@%g: probe %.4f (%.1fs)", call.family, call.target, call.score, call.seconds)
        if search.failure:
            logger.warning("RELEX: the horizon search stopped: %s; the trained weights are kept", search.failure)
        chosen = None
        if search.chosen is not None:
            pick = search.chosen
            chosen = self.candidates(fit, [pick.target], window=window, families=[pick.family])[0]
            chosen.score = pick.score
        return search, chosen

    # -- reports --------------------------------------------------------------------------------------------

    def horizon_ratio(self, target: float) -> float:
        return (target - self.config.start_step) / self.config.observe

    def report(self, fit: TrajectoryFit, candidate: Candidate, producer: str, **sections: Any) -> dict[str, Any]:
        """The ``relex-report/2`` of ``candidate`` predicted from ``fit`` (a collective under DDP: all-reduces
        the buffer size); target-horizon warnings are logged."""
        cfg = self.config
        ratio = self.horizon_ratio(candidate.target)
        backtest = backtest_section(fit.backtest, cfg.backtest_tolerance)
        diagnostic = getattr(self, "diagnostic", None)
        if diagnostic is not None:
            warnings = list(diagnostic.warnings)
            beyond = diagnostic.beyond_warning(candidate.target, "Use extrapolate_to='auto', a nearer target or a probe.")
            if beyond:
                warnings.append(beyond)
                logger.warning("RELEX: %s", beyond)
        else:
            warning = horizon_warning(candidate.target, ratio, backtest)
            warnings = [warning] if warning else []
            for text in warnings:
                logger.warning("RELEX: %s", text)
        shapes = {item.name: list(getattr(item, "full_shape", None) or item.param.shape) for item in self.buffer.tracked}
        tensors = {
            t.name: {
                "shape": shapes.get(t.name, []),
                "explained_variance": t.explained_variance,
                "singular_values": t.subspace.eigenvalues[: max(cfg.rank, 5)].sqrt().tolist(),
                "r_squared": t.r2.tolist(),
                "coefficients": t.subspace.coefficients.T.tolist(),
                "predicted_coefficient": t.trend([float(candidate.target)])[0].tolist(),
            }
            for t in fit.tensors
        }
        _, world = world_info()
        window_steps = fit.steps
        report = new_report(
            producer,
            target_step=int(candidate.target) if float(candidate.target).is_integer() else candidate.target,
            targets=cfg.extrapolate_to if cfg.auto_target else list(cfg.extrapolate_to or []),
            horizon_ratio=ratio,
            observed_steps=list(self.buffer.steps),
            window_steps=window_steps,
            settings=cfg.to_dict(),
            explained_variance=[t.explained_variance for t in fit.tensors],
            r_squared=[float(t.r2[0]) for t in fit.tensors if t.subspace.singular_values[0] > 0],
            backtest=backtest,
            tensors=tensors,
            warnings=warnings,
            candidate=candidate.describe(),
            start_step=cfg.start_step,
            buffer={
                "bytes": self.buffer.nbytes,
                "bytes_all_processes": int(all_reduce_sum(torch.tensor(float(self.buffer.nbytes), dtype=torch.float64))),
                "dtype": cfg.buffer_dtype,
                "device": self.buffer.location,
                "disk_bytes": self.buffer.disk_nbytes,
                "world_size": world,
                "preflight": None if self.preflight is None else self.preflight.as_dict(),
            },
            communication_bytes=communication_report(),
            **sections,
        )
        report["diagnostic"] = None if diagnostic is None else diagnostic.as_dict()
        candidate.report = report
        return report


def _metadata_crc32(metadata: dict[str, str]) -> int:
    """CRC-32 of a state's metadata (sorted, without its own ``metadata_crc32``): a flipped byte is refused."""
    body = json.dumps({k: v for k, v in metadata.items() if k != "metadata_crc32"}, sort_keys=True)
    return zlib.crc32(body.encode())


def finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
