"""`StepDriver`: RELEX driven by a step number, for trainers without a callback API (verl's workers).

An adapter calls :meth:`StepDriver.begin` once with the live (possibly sharded) model, then
:meth:`StepDriver.after_step` after every optimizer update of the policy with the trainer's step count, and
:meth:`StepDriver.save` beside each checkpoint. The driver decides nothing about the trainer: it captures θ_0 at
``start_step``, records Δ_t = θ_t − θ_0 over the window, and then either halts (fit → candidates → model
directories, :meth:`RelexEngine.extrapolate`) or jumps (:class:`~relex_callback.trainers.jump.JumpController`).
Every process of a sharded run makes the same calls; only the main process writes files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ..config import RelexConfig
from ..distributed import gather_state_dict, is_main_process, saving_gathered, unwrap_model
from ..engine.candidate import Candidate, output_dir_name
from ..engine.engine import STATE_FILE_NAME, Probe, RelexEngine, candidate_kinds, find_state, state_file
from ..engine.horizon import horizon_ladder
from ..engine.report import report_metrics, write_model_card
from ..export import REPORT_NAME, atomic_directory, check_output_dir, write_json
from ..math.core import TREND_KINDS, TrajectoryFit
from ..options import CANDIDATE_FAMILIES
from ..probe import choose_candidate
from ..store import ROWS_DIR_NAME, DiskDeltaStore
from .jump import JumpController

__all__ = ["StepClock", "StepDriver", "StepOutcome", "choose_with_probe", "fit_and_choose", "halt_metrics",
           "probe_metric_name", "restart_window", "restore_window", "write_candidate_model", "write_model_dir"]

logger = logging.getLogger(__name__)


@dataclass
class StepOutcome:
    """What one :meth:`StepDriver.after_step` did: ``relex/*`` metrics for the trainer's logger, whether the run
    should stop (halt mode fitted), the model directories written and the jump record (jump mode)."""

    metrics: dict[str, float] = field(default_factory=dict)
    halted: bool = False
    written: list[str] = field(default_factory=list)
    jump: dict[str, Any] | None = None


def halt_metrics(report: dict[str, Any], diagnostic: Any, probe_scores: dict[str, float]) -> dict[str, float]:
    """The ``relex/*`` scalars of a halt-mode fit: the loaded candidate's report, the window diagnostic (K_max,
    α, direction stability, noise share) and the finite probe scores."""
    metrics = {**report_metrics(report), "relex/fit_seconds": report["timings"]["fit_seconds"]}
    if diagnostic is not None:
        metrics["relex/supported_step"] = diagnostic.supported_step
        metrics["relex/supported_ratio"] = diagnostic.supported_ratio
        for key in ("growth_exponent", "direction_stability", "noise_share"):
            value = getattr(diagnostic, key)
            if value is not None:
                metrics[f"relex/{key}"] = value
    for key, value in probe_scores.items():
        if math.isfinite(value):
            metrics[probe_metric_name(key)] = value
    return metrics


def probe_metric_name(label: str) -> str:
    """``relex/probe_current``, ``relex/probe_step{K}`` (the configured trend) or ``relex/probe_{family}_step{K}``
    for a probe-score label ``"current"``, ``"K"`` or ``"family@K"``."""
    if label == "current":
        return "relex/probe_current"
    family, _, target = label.rpartition("@")
    return f"relex/probe_{family}_step{target}" if family else f"relex/probe_step{target}"


def choose_with_probe(
    engine: RelexEngine, model: torch.nn.Module, probe: Probe | None, candidates: list[Candidate],
    predictions: list[dict[str, torch.Tensor]], allow_worse: bool, loads_chosen: bool,
) -> tuple[int | None, dict[str, float]]:
    """Halt mode's pick: without a probe the last candidate of the configured trend (the user's last target); with
    one, the best-scoring candidate (ties: the nearest), or ``None`` (keep the trained weights) when it scores below
    them and not ``allow_worse``. Scores go into each candidate's report under ``"probe"`` (``loads_chosen``: the
    caller will load the pick into the live model). Returns the index and the scores (``"current"`` and one per
    candidate label); the live weights are left as they were."""
    if probe is None:
        plain = [i for i, c in enumerate(candidates) if c.spec.kind in TREND_KINDS or c.spec.kind == "observed"]
        return (plain[-1] if plain else len(candidates) - 1), {}
    targets = [int(c.target) for c in candidates]
    current, chosen = engine.trial(
        model, probe, candidates, predictions, lambda cur, scores: choose_candidate(cur, scores, targets, allow_worse),
        keep_chosen=False,
    )
    by_target = {str(c.label): c.score for c in candidates}
    for i, candidate in enumerate(candidates):
        candidate.report["candidate"]["probe_score"] = candidate.score
        candidate.report["probe"] = {
            "score": candidate.score,
            "current_weights_score": current,
            "scores_by_target": by_target,
            "chosen": i == chosen,
            "loaded_into_live_model": loads_chosen and i == chosen,
            "allow_worse": allow_worse,
        }
    rounded = {t: round(c.score, 4) for t, c in zip(targets, candidates, strict=True)}
    if chosen is None:
        logger.warning(
            "RELEX: every extrapolated candidate scores below the current weights (%.4f; candidates %s); the live model "
            "keeps the trained weights. Pass allow_worse=True to load the best candidate anyway.", current, rounded,
        )
    else:
        logger.info("RELEX: probe scores %s (current weights %.4f); loading step %d", rounded, current, targets[chosen])
    return chosen, {"current": current, **by_target}


class StepClock:
    """Wall time per training step since :meth:`start` (the window's cost, and the probe's in step equivalents)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.first_step = 0

    def start(self, step: int) -> None:
        self.started, self.first_step = time.perf_counter(), step

    def elapsed(self) -> float | None:
        return None if self.started is None else time.perf_counter() - self.started

    def seconds_per_step(self, step: int) -> float | None:
        elapsed = self.elapsed()
        return elapsed / (step - self.first_step) if elapsed is not None and step > self.first_step else None


def fit_and_choose(
    engine: RelexEngine, model: torch.nn.Module, probe: Probe | None, *, zero_std_fraction: float | None,
    loads_chosen: bool, clock: StepClock | None = None,
) -> tuple[TrajectoryFit, list[Candidate], list[dict[str, torch.Tensor]], int | None, dict[str, float]]:
    """Halt mode up to the choice, for every adapter: fit and diagnose the window, then either the reward-guided
    horizon search (``extrapolate_to="auto"`` with a probe: :meth:`RelexEngine.search` up to ``max_horizon``) or
    the candidates of the targets with :func:`choose_with_probe`. Returns the fit, the candidates to write, their
    predictions, the index of the one to load (``None``: keep the trained weights) and the probe scores."""
    cfg = engine.config
    if not (cfg.auto_target and probe is not None):
        fit, candidates, predictions = engine.extrapolate(
            cfg.extrapolate_to, "halt", window=cfg.window, kinds=candidate_kinds(cfg, probe is not None),
            with_probe=probe is not None, zero_std_fraction=zero_std_fraction)
        chosen, scores = choose_with_probe(engine, model, probe, candidates, predictions, cfg.allow_worse, loads_chosen)
        return fit, candidates, predictions, chosen, scores
    started = time.perf_counter()
    fit = engine.fit_window(cfg.window, zero_std_fraction)
    diagnostic = engine.diagnostic
    last, origin = float(fit.steps[-1]), float(engine.fit_inputs[3])
    k_max = diagnostic.k_max
    ladder = horizon_ladder(origin, last, cfg.max_horizon_step, extra=[k_max] if k_max > last else [])
    families = cfg.candidates or list(CANDIDATE_FAMILIES)
    elapsed = clock.elapsed() if clock is not None else None
    step_seconds = clock.seconds_per_step(int(last)) if clock is not None else None
    search, pick = engine.search(model, probe, fit, families, ladder, window=cfg.window, margin=cfg.probe_margin,
                                 allow_worse=cfg.allow_worse, window_seconds=elapsed)
    candidate = pick if pick is not None else engine.observed_candidate(fit)
    predictions = engine.predict([candidate])
    fit_seconds = time.perf_counter() - started
    timings = {"snapshot_seconds_total": engine.snapshot_seconds,
               "snapshot_seconds_mean": engine.snapshot_seconds / max(len(fit.steps), 1), "fit_seconds": fit_seconds,
               "probe_seconds": search.seconds}
    section = search.as_dict(step_seconds)
    engine.report(fit, candidate, "halt", timings=timings, search=section)
    by_label = {(f"{c.target:g}" if c.family == "trend" else f"{c.family}@{c.target:g}"): c.score for c in search.calls}
    candidate.report["candidate"]["probe_score"] = candidate.score
    candidate.report["probe"] = {
        "score": candidate.score if pick is not None else search.current,
        "current_weights_score": search.current,
        "scores_by_target": by_label,
        "chosen": pick is not None,
        "loaded_into_live_model": loads_chosen and pick is not None,
        "allow_worse": cfg.allow_worse,
    }
    if pick is None:
        logger.info("RELEX: horizon search: no candidate beat the trained weights (%.4f)%s; keeping them", search.current,
                    f" ({search.failure})" if search.failure else "")
    else:
        logger.info("RELEX: horizon search chose %s at step %d (probe %.4f vs trained weights %.4f; %d probe calls, "
                    "%.0fs%s)", search.chosen.family, int(pick.target), pick.score, search.current, len(search.calls) + 1,
                    search.seconds, f", {section['step_equivalents']:.1f} training steps" if step_seconds else "")
    scores = {"current": search.current, **by_label}
    return fit, [candidate], predictions, (0 if pick is not None else None), scores


def write_model_dir(
    final: Path, to_save: Any, state_dict: dict[str, torch.Tensor] | None, processing_class: Any,
    report: dict[str, Any], overwrite: bool, started: float | None = None,
) -> None:
    """Write ``to_save.save_pretrained(state_dict=...)``, the processing class, ``relex_report.json`` and a model
    card as the directory ``final``, atomically; ``started``: record the write time in ``report`` since then."""
    with atomic_directory(final, overwrite=overwrite) as staging, saving_gathered(to_save):
        to_save.save_pretrained(staging, state_dict=state_dict)
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(staging)
        if started is not None:
            report["timings"]["write_seconds"] = time.perf_counter() - started
        write_json(staging / REPORT_NAME, report)
        write_model_card(staging, report)


def write_candidate_model(
    engine: RelexEngine, model: torch.nn.Module, processing_class: Any, candidate: Candidate,
    prediction: dict[str, torch.Tensor], final: Path, overwrite: bool,
) -> Path:
    """Write the full model with ``prediction`` in place of the tracked tensors as a Hugging Face directory
    ``final`` (atomically), with ``relex_report.json`` and a model card. Collective: every process calls it."""
    started = time.perf_counter()
    state_dict = gather_state_dict(model, engine.tracked, prediction)  # None off the main process
    if is_main_process():
        write_model_dir(final, unwrap_model(model), state_dict, processing_class, candidate.report, overwrite, started)
        logger.info("RELEX: wrote the extrapolated model for step %d to %s", int(candidate.target), final)
    return final


def restore_window(engine: RelexEngine, jump: JumpController | None, path: Path, metadata: dict[str, str],
                   step: int) -> None:
    """Resume at trainer step ``step`` from the saved state ``path``: θ_0, the recorded deltas and, in jump mode,
    the jump bookkeeping (snapshots are then at virtual steps)."""
    if jump is not None and "jump" in metadata:
        jump.load_state_dict(json.loads(metadata["jump"]), step)
    engine.load_state(path, metadata, jump.virtual_step(step) if jump is not None else step)


def restart_window(engine: RelexEngine, jump: JumpController | None, step: int, looked: str) -> None:
    """Resume at ``step`` without saved state: θ_0 ← the current weights and the window starts again at ``step``
    (``start_step = step``), with a warning that the prediction will differ from an uninterrupted run."""
    logger.warning(
        "RELEX: resuming at step %d but no saved delta buffer was found (looked for %s). θ_0 is lost, so the "
        "observation restarts from the current weights and the prediction will differ from an uninterrupted run. "
        "Keep %s in your checkpoints to resume exactly.", step, looked, STATE_FILE_NAME,
    )
    engine.config = replace(engine.config, start_step=step)
    if jump is not None:
        jump.restart(engine.config)
    engine.capture_base(step)


class StepDriver:
    """RELEX on a live model, advanced by step numbers (see the module docstring).

    Args:
        config (`RelexConfig`): the settings.
        probe (`Callable[[torch.nn.Module], float]`, *optional*): scores a model, higher is better; every process
            must call it (it may be collective).
        model_subdir (`str`): where a model goes inside ``relex-step{K}/`` (``"actor/huggingface"`` gives verl's
            checkpoint layout, which ``relex`` reads back).
    """

    def __init__(self, config: RelexConfig, probe: Probe | None = None, model_subdir: str = "") -> None:
        self.engine = RelexEngine(config)
        self.jump = JumpController(config) if config.mode == "jump" else None
        self.probe = probe
        self.model_subdir = model_subdir
        self.halted = False
        self.model: torch.nn.Module | None = None
        self.processing_class: Any = None
        self.optimizer: Any = None
        self.output_root = Path(".")
        self.zero_std_fraction: Callable[[], float | None] = lambda: None
        self.optimizer_steps = 0  # counted by a post-step hook since the last after_step
        self.clock = StepClock()  # the window's training time, for the horizon search's cost
        self._hook = None

    @property
    def config(self) -> RelexConfig:
        return self.engine.config

    # -- set-up ---------------------------------------------------------------------------------------------

    def check_outputs(self, output_root: str | Path, step: int = 0) -> None:
        """Refuse existing halt-mode output directories before any training (``overwrite=False``)."""
        cfg = self.config
        if cfg.mode == "halt" and cfg.save_model and step < cfg.last_observed_step and not cfg.auto_target:
            for target in cfg.extrapolate_to:
                check_output_dir(self.model_dir(Path(output_root), float(target), "svd"), cfg.overwrite)

    def begin(
        self, model: torch.nn.Module, step: int, output_root: str | Path, *, optimizer: Any = None,
        processing_class: Any = None, resume_dir: str | Path | None = None,
    ) -> None:
        """Attach to ``model`` at trainer step ``step``: size the buffer, capture θ_0 (``step == start_step``) or
        restore the saved window from ``resume_dir`` (``step > start_step``)."""
        cfg = self.config
        self.model, self.processing_class, self.optimizer = model, processing_class, optimizer
        self.output_root = Path(output_root)
        self.check_outputs(self.output_root, step)
        self.clock.start(step)
        self.engine.attach(model, store_dir=self.output_root / "relex-store")  # used by buffer_device="disk"
        if optimizer is not None and hasattr(optimizer, "register_step_post_hook"):
            self._hook = optimizer.register_step_post_hook(self._count_optimizer_step)
        if step > cfg.start_step:
            self._resume(step, resume_dir)
        elif step == cfg.start_step:
            self.engine.capture_base(step)
        if self.jump is not None:
            self.jump.begin(SimpleNamespace(), SimpleNamespace(global_step=step), self.output_root)

    def _count_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.optimizer_steps += 1

    def close(self) -> None:
        """Remove the optimizer hook; finish the disk store's pending append."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if isinstance(self.engine.buffer, DiskDeltaStore):
            self.engine.buffer.close()

    # -- the step -------------------------------------------------------------------------------------------

    def after_step(self, step: int) -> StepOutcome:
        """Record, halt or jump after the policy update of trainer step ``step`` (collective)."""
        cfg = self.config
        outcome = StepOutcome()
        if self.optimizer_steps:
            outcome.metrics["relex/optimizer_steps"] = float(self.optimizer_steps)
            self.optimizer_steps = 0
        if self.halted or self.engine.buffer is None:
            return outcome
        if step == cfg.start_step and not self.engine.ready:
            self.engine.capture_base(step)
            return outcome
        if self.jump is not None:
            record = self.jump.on_step_end(self.engine, step, self.model, self.probe, self.optimizer)
            outcome.metrics["relex/virtual_step"] = float(self.jump.virtual_step(step))
            if record is not None:
                outcome.jump = record
                outcome.metrics.update(self.jump.metrics(record))
            return outcome
        steps = self.engine.buffer.steps
        due = cfg.start_step < step <= cfg.last_observed_step and not (step - cfg.start_step) % cfg.snapshot_every
        if due and (not steps or step > steps[-1]):
            self.engine.record(step)
        if step == cfg.last_observed_step and steps and steps[-1] == step:
            self._halt(outcome)
        return outcome

    def model_dir(self, root: Path, target: float, kind: str) -> Path:
        directory = root / output_dir_name(target, kind)
        return directory / self.model_subdir if self.model_subdir else directory

    def _halt(self, outcome: StepOutcome) -> None:
        cfg = self.config
        fit, candidates, predictions, chosen, probe_scores = fit_and_choose(  # the trainer stops; files only
            self.engine, self.model, self.probe, zero_std_fraction=self.zero_std_fraction(), loads_chosen=False,
            clock=self.clock)
        if cfg.save_model:
            for candidate, prediction in zip(candidates, predictions, strict=True):
                candidate.report["timings"]["write_seconds"] = None
                path = self.model_dir(self.output_root, candidate.target, candidate.spec.kind)
                outcome.written.append(str(write_candidate_model(
                    self.engine, self.model, self.processing_class, candidate, prediction, path, cfg.overwrite)))
        report = candidates[-1 if chosen is None else chosen].report
        outcome.metrics.update(halt_metrics(report, self.engine.diagnostic, probe_scores))
        outcome.halted = self.halted = True
        logger.info("RELEX: halt mode done at step %d; wrote %s", cfg.last_observed_step, outcome.written)

    # -- saved state ----------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path | None:
        """Write this process's RELEX state (and the jump bookkeeping) into ``directory``: a reference to rows that
        an in-memory buffer writes once per run into ``{output_root}/relex-rows`` (the disk store: its own rows)."""
        if not self.engine.ready:
            return None
        Path(directory).mkdir(parents=True, exist_ok=True)
        extra = {"jump": json.dumps(self.jump.state_dict())} if self.jump is not None else {}
        extra["halted"] = json.dumps(self.halted)
        return self.engine.save_state(directory, extra, rows_dir=self.output_root / ROWS_DIR_NAME)

    def _resume(self, step: int, resume_dir: str | Path | None) -> None:
        cfg = self.config
        path = find_state(Path(resume_dir)) if resume_dir is not None else None
        if path is not None:
            metadata = self.engine.read_state_metadata(path)
            self.halted = json.loads(metadata.get("halted", "false"))
            restore_window(self.engine, self.jump, path, metadata, step)
            return
        if cfg.mode == "halt" and step >= cfg.last_observed_step:
            self.halted = True
            logger.info("RELEX: resumed after the observation window (step %d); nothing to do", step)
            return
        restart_window(self.engine, self.jump, step, str(resume_dir and state_file(Path(resume_dir))))
