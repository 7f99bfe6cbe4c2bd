"""The observation window an adapter drives: RELEX's one snapshot schedule and one halt path.

Every adapter (the transformers :class:`~relex_callback.RelexCallback`, :class:`~relex_callback.trainers.steps.StepDriver`
for verl) holds one :class:`Window` and translates its framework's events into calls on it:

* :meth:`Window.check_setup` before any training: every refusal that does not depend on the framework;
* :meth:`Window.attach`, then θ_0 at ``start_step`` (:meth:`Window.step_end`) or the saved window
  (:meth:`Window.restore`, :meth:`Window.restart` without one);
* :meth:`Window.step_end` after each optimizer update of step s: record Δ_s = θ_s − θ_0 when the adapter's schedule
  says so (default :meth:`Window.snapshot_due`), and in jump mode jump when due (:class:`JumpController`);
* :meth:`Window.halt` at the window's end (default :meth:`Window.halt_due`): fit → choose (probe or horizon search)
  → one model directory per candidate (with the merged LoRA model and the fit's plots) → ``relex/*`` metrics.

The adapter passes framework facts in (GRPO's ``frac_reward_zero_std`` of the window, where the trained weights are
kept, how its models are saved) and decides nothing the window decides.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from ..config import RelexConfig
from ..distributed import (
    check_can_generate, detect_layout, gather_state_dict, is_main_process, saving_gathered, unwrap_model, world_info,
)
from ..export import REPORT_NAME, atomic_directory, check_output_dir, check_output_location, write_json
from ..math.core import TrajectoryFit
from ..options import CANDIDATE_FAMILIES
from ..peft_support import check_mergeable, lora_pairs, merged_delta_predictions, merged_state_dict
from ..probe import RewardProbe, choose_candidate
from ..units import merged_dir_name, output_dir_name
from .candidate import Candidate
from .engine import STATE_FILE_NAME, Probe, RelexEngine, candidate_families
from .horizon import horizon_ladder
from .jump import JumpController
from .report import report_metrics, write_model_card

__all__ = ["HaltResult", "StepClock", "Window", "WindowAdapter", "choose_with_probe", "fit_and_choose", "halt_metrics",
           "probe_metric_name", "write_model_dir"]

logger = logging.getLogger(__name__)


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
    """Halt mode's pick: without a probe the candidate at the user's last target, of the configured trend when it is
    listed, else of the first listed family (never the supported-horizon candidate put beside the targets); with
    one, the best-scoring candidate (ties: the nearest), or ``None`` (keep the trained weights) when it scores below
    them and not ``allow_worse``. Scores go into each candidate's report under ``"probe"`` (``loads_chosen``: the
    caller will load the pick into the live model). Returns the index and the scores (``"current"`` and one per
    candidate label); the live weights are left as they were."""
    if probe is None:
        last = max(c.target for c in candidates)
        at_last = [i for i, c in enumerate(candidates) if c.target == last]
        plain = [i for i in at_last if is_plain(candidates[i])]
        return (plain or at_last)[0], {}
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
            cfg.extrapolate_to, "halt", window=cfg.window, families=candidate_families(cfg, probe is not None),
            with_probe=probe is not None, zero_std_fraction=zero_std_fraction)
        chosen, scores = choose_with_probe(engine, model, probe, candidates, predictions, cfg.allow_worse, loads_chosen)
        return fit, candidates, predictions, chosen, scores
    started = time.perf_counter()
    fit = engine.fit_window(cfg.window, zero_std_fraction)
    diagnostic = engine.diagnostic
    last, origin = float(fit.steps[-1]), fit.origin
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


@dataclass
class HaltResult:
    """What :meth:`Window.halt` did: the fit, every candidate with its prediction, the index of the one to load
    (``None``: keep the trained weights), the probe scores, the directories written (keyed by target step for the
    configured trend and the observed weights, by directory name for the other families) and the ``relex/*`` metrics."""

    fit: TrajectoryFit
    candidates: list[Candidate]
    predictions: list[dict[str, torch.Tensor]]
    chosen: int | None
    scores: dict[str, float]
    written: dict[int | str, Path]
    metrics: dict[str, float]

    @property
    def report(self) -> dict[str, Any]:
        """The report of the loaded candidate (of the last one when the trained weights are kept)."""
        return self.candidates[-1 if self.chosen is None else self.chosen].report

    @property
    def loaded_target(self) -> int | None:
        return None if self.chosen is None else int(self.candidates[self.chosen].target)

    @property
    def chosen_weights(self) -> dict[str, torch.Tensor] | None:
        """θ̂ of the chosen candidate, by tracked-tensor name (``None``: keep the trained weights)."""
        return None if self.chosen is None else self.predictions[self.chosen]


def is_plain(candidate: Candidate) -> bool:
    """The configured trend or the observed weights: written as ``relex-step{K}``, keyed by K."""
    return candidate.family in ("trend", "observed")


class Window:
    """One RELEX observation window on a live model (see the module docstring).

    Args:
        config (`RelexConfig`): the settings.
        probe (`Callable[[torch.nn.Module], float]`, *optional*): scores a model, higher is better; every process
            calls it (it may be collective).
        model_subdir (`str`): where a model goes inside ``relex-step{K}/`` (``"actor/huggingface"``: verl's layout).
    """

    def __init__(self, config: RelexConfig, probe: Probe | None = None, model_subdir: str = "") -> None:
        self.engine = RelexEngine(config)
        self.jump = JumpController(config) if config.mode == "jump" else None
        self.probe = probe
        self.model_subdir = model_subdir
        self.output_root = Path(".")
        self.clock = StepClock()  # the window's training time, for the horizon search's cost
        self.halted = False

    @property
    def config(self) -> RelexConfig:
        return self.engine.config

    # -- set-up ---------------------------------------------------------------------------------------------

    def model_dir(self, target: float, family: str = "trend") -> Path:
        directory = self.output_root / output_dir_name(target, family)
        return directory / self.model_subdir if self.model_subdir else directory

    def merged_dir(self, target: float) -> Path:
        directory = self.output_root / merged_dir_name(int(target))
        return directory / self.model_subdir if self.model_subdir else directory

    def check_setup(self, model: torch.nn.Module, output_root: str | Path, step: int, option: str = "output_dir") -> None:
        """Refuse, before any training, what would fail later: an output root that is a file, existing halt-mode
        model directories (``overwrite=False``), a model ``merge_lora`` cannot merge, ``merge_lora="delta"`` on
        several processes, ``optimizer_policy="reset"`` under DeepSpeed and a ``RewardProbe`` on a model that cannot
        generate. ``option`` names where ``output_root`` came from."""
        cfg = self.config
        self.output_root = Path(output_root)
        check_output_location(self.output_root, option)
        if cfg.mode == "halt" and cfg.save_model and step < cfg.last_observed_step and not cfg.auto_target:
            families = candidate_families(cfg, self.probe is not None)
            for target in cfg.extrapolate_to:
                for family in families:
                    check_output_dir(self.model_dir(float(target), family), cfg.overwrite)
                if cfg.merge_lora:
                    check_output_dir(self.merged_dir(target), cfg.overwrite)
        if cfg.merge_lora:
            check_mergeable(model)
            if cfg.merge_lora == "delta" and world_info()[1] > 1:
                raise ValueError("merge_lora='delta' needs the full LoRA factors on one process; use merge_lora=True "
                                 "under DDP/FSDP/DeepSpeed.")
        if self.jump is not None and cfg.optimizer_policy == "reset" and detect_layout(model).startswith("deepspeed"):
            raise ValueError(
                "optimizer_policy='reset' is not supported under DeepSpeed ZeRO: its optimizer keeps the state of flat "
                "fp32 partitions, with one step counter per parameter group, so the state of the jumped parameters "
                "cannot be reset on its own. Use optimizer_policy='keep'."
            )
        if isinstance(self.probe, RewardProbe):
            check_can_generate(model)

    def attach(self, model: torch.nn.Module, step: int, store_dir: Path) -> None:
        """Size the buffer for ``model`` (``store_dir``: the disk store's folder) and start the window's clock."""
        self.engine.attach(model, store_dir=store_dir)
        self.clock.start(step)

    def close(self) -> None:
        """Finish the disk store's pending append."""
        if self.engine.buffer is not None:
            self.engine.buffer.close()

    # -- the schedule ---------------------------------------------------------------------------------------

    def snapshot_due(self, step: int) -> bool:
        """Whether Δ_step is recorded: in halt mode every ``snapshot_every`` steps of the window not yet recorded, in
        jump mode :meth:`JumpController.should_record`."""
        cfg = self.config
        if not self.engine.ready:
            return False
        if self.jump is not None:
            return self.jump.should_record(step)
        if not cfg.start_step < step <= cfg.last_observed_step or (step - cfg.start_step) % cfg.snapshot_every:
            return False
        steps = self.engine.buffer.steps
        return not steps or step > steps[-1]

    def halt_due(self, step: int) -> bool:
        """Whether halt mode fits now: the last step of the window, once its snapshot is recorded."""
        cfg = self.config
        steps = self.engine.buffer.steps if self.engine.ready else []
        return cfg.mode == "halt" and not self.halted and step == cfg.last_observed_step and bool(steps) and steps[-1] == step

    def step_end(self, step: int, model: torch.nn.Module, optimizer: Any = None, *, record: bool) -> dict[str, Any] | None:
        """After the optimizer update of step ``step``: θ_0 at ``start_step``, else Δ_step when ``record`` (the
        adapter's schedule) and, in jump mode, the jump when due. Returns the jump record, if any (collective)."""
        if self.engine.buffer is None or self.halted:
            return None
        if step == self.config.start_step and not self.engine.ready:
            self.engine.capture_base(step)
            return None
        if not self.engine.ready:
            return None
        if self.jump is not None:
            return self.jump.on_step_end(self.engine, step, model, self.probe, optimizer, record=record)
        if record:
            self.engine.record(step)
        return None

    # -- halt mode ------------------------------------------------------------------------------------------

    def halt(
        self, model: torch.nn.Module, *, processing_class: Any = None, zero_std_fraction: float | None = None,
        loads_chosen: bool, trained_weights: str | None = None,
        saving: Callable[[Any], ContextManager] = lambda model: contextlib.nullcontext(),
    ) -> HaltResult:
        """Fit the window and choose (:func:`fit_and_choose`), write every candidate as a model directory (plus the
        merged LoRA model with ``merge_lora``, and the fit's plots), and return what was done. The live weights stay
        θ_N: the adapter loads :attr:`HaltResult.chosen_weights` when it should. ``trained_weights``: where the
        adapter keeps θ_N (the report says so); ``saving(model)``: a context the adapter saves its models in
        (collective)."""
        cfg = self.config
        fit, candidates, predictions, chosen, scores = fit_and_choose(
            self.engine, model, self.probe, zero_std_fraction=zero_std_fraction, loads_chosen=loads_chosen,
            clock=self.clock)
        written: dict[int | str, Path] = {}
        if cfg.save_model:
            started = time.perf_counter()
            for candidate, prediction in zip(candidates, predictions, strict=True):
                candidate.report["timings"]["write_seconds"] = None
                candidate.report["trained_weights"] = trained_weights
                path = self.write_candidate(model, processing_class, candidate, prediction, saving)
                written[int(candidate.target) if is_plain(candidate) else path.name] = path
            logger.info("RELEX: wrote %s in %.1fs", [str(p) for p in written.values()], time.perf_counter() - started)
            if is_main_process():  # the fit's plots next to each relex_report.json (matplotlib, if installed)
                from ..offline.plots import write_fit_plots

                horizon = max([float(c.target) for c in candidates] + [float(fit.steps[-1])])
                write_fit_plots(list(written.values()), fit, candidates[0].report, cfg.rank, horizon)
        self.halted = True
        result = HaltResult(fit, candidates, predictions, chosen, scores, written, {})
        result.metrics = halt_metrics(result.report, self.engine.diagnostic, scores)
        logger.info("RELEX: halt mode done at step %d", cfg.last_observed_step)
        return result

    def write_candidate(
        self, model: torch.nn.Module, processing_class: Any, candidate: Candidate, prediction: dict[str, torch.Tensor],
        saving: Callable[[Any], ContextManager],
    ) -> Path:
        """Write the full model with ``prediction`` in place of the tracked tensors as a Hugging Face directory (and
        with ``merge_lora`` the merged base model), atomically, each with ``relex_report.json`` and a model card.
        Collective: every process calls it; the main process writes."""
        cfg = self.config
        target = int(candidate.target)
        final = self.model_dir(candidate.target, candidate.family)
        started = time.perf_counter()
        state_dict = gather_state_dict(model, self.engine.tracked, prediction)  # None off the main process
        if not is_main_process():
            return final
        to_save = unwrap_model(model)
        with saving(to_save):  # a PeftModel writes its adapter only
            write_model_dir(final, to_save, state_dict, processing_class, candidate.report, cfg.overwrite, started)
            if cfg.merge_lora:
                deltas = self._merged_lora_deltas(model, target) if cfg.merge_lora == "delta" else None
                merged = self.merged_dir(target)
                write_model_dir(merged, to_save.get_base_model(), merged_state_dict(model, state_dict, deltas),
                                processing_class, {**candidate.report, "merged_lora": "delta" if deltas is not None else
                                                   "factors"}, cfg.overwrite)
                logger.info("RELEX: wrote the merged LoRA model for step %d to %s", target, merged)
        logger.info("RELEX: wrote the extrapolated model for step %d to %s", target, final)
        return final

    def _merged_lora_deltas(self, model: torch.nn.Module, target: int) -> dict[str, torch.Tensor]:
        """merge_lora='delta': each LoRA module's extrapolated merged update s·ΣB A at ``target``."""
        cfg = self.config
        deltas = merged_delta_predictions(
            self.engine.buffer, lora_pairs(model), [float(target)], rank=cfg.rank, kind=cfg.fit, power=cfg.power,
            origin=float(cfg.start_step), window=cfg.window,
        )
        return {prefix: value[0] for prefix, value in deltas.items()}

    # -- saved state ----------------------------------------------------------------------------------------

    def save(self, directory: str | Path, rows_dir: Path | None, extra: dict[str, str] | None = None) -> Path:
        """Write this process's window (θ_0's hash, references to the rows Δ_t, the jump bookkeeping and ``extra``)
        into ``directory``; an in-memory buffer writes each row once per run into ``rows_dir``."""
        metadata = {"jump": json.dumps(self.jump.state_dict())} if self.jump is not None else {}
        return self.engine.save_state(directory, {**metadata, **(extra or {})}, rows_dir=rows_dir)

    def restore(self, path: Path, metadata: dict[str, str], step: int) -> None:
        """Resume at trainer step ``step`` from the saved state ``path``: θ_0, the recorded deltas and, in jump mode,
        the jump bookkeeping (snapshots are then at virtual steps)."""
        if self.jump is not None and "jump" in metadata:
            self.jump.load_state_dict(json.loads(metadata["jump"]), step)
        self.engine.load_state(path, metadata, self.jump.virtual_step(step) if self.jump is not None else step)

    def restart(self, step: int, looked: str) -> None:
        """Resume at ``step`` without saved state: θ_0 ← the current weights and the window starts again at ``step``
        (``start_step = step``), with a warning that the prediction will differ from an uninterrupted run."""
        logger.warning(
            "RELEX: resuming at step %d but no saved delta buffer was found (looked for %s). θ_0 is lost, so the "
            "observation restarts from the current weights and the prediction will differ from an uninterrupted run. "
            "Keep %s in your checkpoints to resume exactly.", step, looked, STATE_FILE_NAME,
        )
        self.engine.config = replace(self.engine.config, start_step=step)
        if self.jump is not None:
            self.jump.restart(self.engine.config)
        self.engine.capture_base(step)


class WindowAdapter:
    """What every adapter exposes of its :class:`Window` (``self.window``), and the two overridable decisions."""

    window: Window

    @property
    def config(self) -> RelexConfig:
        return self.window.config

    @config.setter
    def config(self, value: RelexConfig) -> None:
        self.window.engine.config = value

    @property
    def engine(self) -> RelexEngine:
        return self.window.engine

    @property
    def jump(self) -> JumpController | None:
        return self.window.jump

    @property
    def probe(self) -> Probe | None:
        return self.window.probe

    @probe.setter
    def probe(self, value: Probe | None) -> None:
        self.window.probe = value

    def should_snapshot(self, step: int) -> bool:
        """Whether Δ_step is recorded: an observation step of the window not recorded yet (halt mode), a recording or
        jump step (jump mode); :meth:`Window.snapshot_due`. A jump step records whatever this returns."""
        return self.window.snapshot_due(step)

    def should_halt(self, step: int) -> bool:
        """Whether halt mode fits now: the last step of the window, once its snapshot is recorded."""
        return self.window.halt_due(step)
