"""`RelexCallback`: a thin transformers/TRL adapter around the delta buffer and the RELEX core."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, ExportableState, TrainerControl, TrainerState
from transformers.training_args import TrainingArguments

from . import __version__
from .buffer import DeltaBuffer, TrackedTensor, format_bytes, host_available_bytes, select_parameters
from .config import RelexConfig
from .core import TrajectoryFit, combine, fit_trajectory, select_power
from .distributed import (
    all_reduce_grams,
    all_reduce_sum,
    communication_report,
    gather_state_dict,
    is_main_process,
    track_parameters,
    unwrap_model,
    world_info,
    write_prediction,
)
from .probe import choose_candidate
from .peft_support import check_mergeable, lora_pairs, merged_delta_predictions, merged_dir_name, merged_state_dict
from .export import REPORT_NAME, atomic_directory, check_output_dir, summarize_explained_variance, write_json, write_model_card
from .jump import JumpController, Probe, score_model

__all__ = ["RelexCallback", "STATE_FILE_NAME", "STATE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

STATE_FILE_NAME = "relex_state.safetensors"
STATE_FORMAT_VERSION = 1


def _state_file(checkpoint_dir: Path) -> Path:
    rank, world = world_info()
    if world == 1:
        return checkpoint_dir / STATE_FILE_NAME
    return checkpoint_dir / f"relex_state-rank{rank:05d}-of-{world:05d}.safetensors"


class RelexCallback(TrainerCallback, ExportableState):
    """Observe the first steps of training, fit RELEX's rank-1 trajectory and extrapolate.

    In halt mode the callback captures θ_0 at ``start_step``, records Δ_t = θ_t − θ_0 for the next
    ``observe`` optimizer steps, then fits the per-tensor rank-r subspace and coefficient trend, writes one
    Hugging Face model directory ``{output_dir}/relex-step{K}`` per target K, stops training, and leaves the
    extrapolated weights (of the last target) in the live model when ``train()`` returns.

    In jump mode (``mode="jump"``) training continues and the live weights are moved ``jump_horizon`` steps
    ahead along the fitted trajectory at step ``start_step + observe`` and every ``jump_every`` steps after it
    (:class:`~relex_callback.jump.JumpController`, ``docs/jump-mode.md``).

    Args:
        config (`RelexConfig` or `dict`, *optional*): the settings; keyword arguments override its fields.
        probe (`Callable[[torch.nn.Module], float]`, *optional*): scores a model, higher is better (e.g.
            :class:`~relex_callback.probe.RewardProbe`). Jump mode rejects a jump that lowers the score by more
            than ``probe_tolerance``; halt mode with several targets loads the best one, never one below the
            current weights unless ``allow_worse=True``. Not saved in checkpoints: a callback rebuilt by
            transformers from ``trainer_state.json`` takes the probe of the callback it replaces.
        **options: any :class:`RelexConfig` field, e.g. ``observe=50, extrapolate_to=1000``.

    Example:

    ```python
    from relex_callback import RelexCallback

    trainer = GRPOTrainer(..., callbacks=[RelexCallback(observe=50, extrapolate_to=1000)])
    trainer.train()  # stops after step 50; writes out/relex-step1000/
    ```

    Resuming: the callback writes ``relex_state.safetensors`` into every ``checkpoint-N/`` and reloads it on
    ``trainer.train(resume_from_checkpoint=...)``; its JSON state also goes into ``trainer_state.json``.
    """

    _instances: list[weakref.ref] = []

    def __init__(
        self, config: RelexConfig | dict | None = None, *, probe: Probe | None = None, _from_state: bool = False, **options: Any
    ) -> None:
        if probe is not None and not callable(probe):
            raise TypeError(f"probe must be a callable probe(model) -> float, got {type(probe).__name__} ({probe!r:.80}).")
        if config is None:
            config = RelexConfig(**options)
        elif isinstance(config, dict):
            config = RelexConfig.from_dict({**config, **options})
        elif isinstance(config, RelexConfig):
            config = replace(config, **options) if options else config
        else:
            raise TypeError(f"config must be a RelexConfig or a dict, got {type(config).__name__}.")
        self.config: RelexConfig = config
        self.buffer: DeltaBuffer | None = None
        self.last_fit: TrajectoryFit | None = None
        self.reports: dict[int, dict[str, Any]] = {}
        self.written_dirs: dict[int, Path] = {}
        self._final_weights: dict[str, torch.Tensor] | None = None
        self._pending_metrics: dict[str, float] = {}
        self._snapshot_seconds = 0.0
        self._halted = False
        self.probe: Probe | None = probe
        self.probe_scores: dict[str, float] = {}
        self.jump: JumpController | None = JumpController(config) if config.mode == "jump" else None
        self._jump_state: dict[str, Any] | None = None
        if probe is None and _from_state:
            self.probe = self._adopt_probe()
        RelexCallback._instances = [r for r in RelexCallback._instances if r() is not None] + [weakref.ref(self)]

    def _adopt_probe(self) -> Probe | None:
        """The probe of the newest live callback with the same config (else the newest with a probe).

        transformers' ``_load_callback_state`` (``restore_callback_states_from_checkpoint=True``) replaces each
        callback by ``type(cb)(**state["args"])``; a probe cannot travel through ``trainer_state.json``.
        """
        live = [cb for cb in (r() for r in reversed(RelexCallback._instances)) if cb is not None and cb.probe is not None]
        same = [cb for cb in live if cb.config == self.config]
        chosen = (same or live or [None])[0]
        if chosen is None:
            logger.warning(
                "RELEX: rebuilt from a checkpoint's trainer_state.json without a probe; set callback.probe = ... on the "
                "callback in trainer.callback_handler.callbacks to keep probing."
            )
            return None
        logger.info("RELEX: rebuilt from trainer_state.json; kept the probe of the callback it replaces")
        return chosen.probe

    # -- transformers' ExportableState ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {"_halted": self._halted, "_snapshot_seconds": self._snapshot_seconds}
        if self.jump is not None:
            attributes["_jump_state"] = self.jump.state_dict()
        return {"args": {**self.config.to_dict(), "_from_state": True}, "attributes": attributes}

    # -- decisions (overridable) ---------------------------------------------------------------------------

    def should_snapshot(self, step: int) -> bool:
        """Whether ``step`` is an observation step of the window that has not been recorded yet."""
        cfg = self.config
        if self.buffer is None or not self.buffer.theta0:
            return False
        if not cfg.start_step < step <= cfg.last_observed_step or (step - cfg.start_step) % cfg.snapshot_every:
            return False
        return not self.buffer.steps or step > self.buffer.steps[-1]

    # -- events --------------------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self._run_first_in_handler()
        cfg = self.config
        if model is None:
            raise ValueError("RelexCallback needs the model: use it through a transformers Trainer.")
        if state.max_steps and state.max_steps > 0 and cfg.last_observed_step > state.max_steps:
            raise ValueError(
                f"max_steps={state.max_steps} ends before the RELEX observation window, which needs step "
                f"{cfg.last_observed_step} (start_step={cfg.start_step} + observe={cfg.observe}). Raise max_steps "
                f"(or num_train_epochs) or lower observe."
            )
        self._output_root = Path(cfg.output_dir or args.output_dir)
        if cfg.mode == "halt" and cfg.save_model and state.global_step < cfg.last_observed_step:
            for target in cfg.extrapolate_to:
                check_output_dir(self.target_dir(target), cfg.overwrite)
                if getattr(cfg, "merge_lora", False):
                    check_output_dir(self._output_root / merged_dir_name(target), cfg.overwrite)
        if getattr(cfg, "merge_lora", False):
            check_mergeable(model)
            if cfg.merge_lora == "delta" and world_info()[1] > 1:
                raise ValueError("merge_lora='delta' needs the full LoRA factors on one process; use merge_lora=True under DDP/FSDP/DeepSpeed.")
        self.buffer = self._make_buffer(model)
        if self.jump is not None and self._jump_state:
            self.jump.load_state_dict(self._jump_state, state.global_step)  # restored by transformers; the sidecar wins
        if state.global_step > cfg.start_step:
            self._resume(args, state)
        elif state.global_step == cfg.start_step:
            self.buffer.capture_base()
            logger.info("RELEX: captured θ_0 at step %d", state.global_step)
        if self.jump is not None:
            self.jump.begin(args, state, self._output_root)
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        cfg = self.config
        if self.buffer is None or self._halted:
            return control
        step = state.global_step
        if step == cfg.start_step and not self.buffer.theta0:
            self.buffer.capture_base()
            logger.info("RELEX: captured θ_0 at step %d", step)
        if self.jump is not None:
            if self.buffer.theta0:
                self.jump.on_step_end(self, state, control, model, kwargs.get("optimizer"))
            return control
        if self.should_snapshot(step):
            started = time.perf_counter()
            self.buffer.record(step)
            self._snapshot_seconds += time.perf_counter() - started
        if cfg.mode == "halt" and step == cfg.last_observed_step and self.buffer.steps and self.buffer.steps[-1] == step:
            self._halt(args, state, control, model, kwargs.get("processing_class"))
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.buffer is None or not self.buffer.theta0:
            return control
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint_dir.is_dir():
            logger.warning("RELEX: checkpoint folder %s not found; the delta buffer was not saved", checkpoint_dir)
            return control
        self.save_state(checkpoint_dir)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.jump is not None:
            logs["relex/virtual_step"] = float(self.jump.virtual_step(state.global_step))
        if logs is not None and self._pending_metrics:
            logs.update(self._pending_metrics)
            self._pending_metrics = {}
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._final_weights is not None:
            self._load_into_model(self._final_weights)
            self._final_weights = None
            logger.info("RELEX: the model now holds the extrapolated weights of step %s", self.loaded_target)
        return control

    # -- paths and persistence -----------------------------------------------------------------------------

    def target_dir(self, target: int) -> Path:
        return self._output_root / f"relex-step{target}"

    def save_state(self, checkpoint_dir: str | Path) -> Path:
        """Write θ_0 and the recorded deltas of this process into ``checkpoint_dir``."""
        path = _state_file(Path(checkpoint_dir))
        rank, world = world_info()
        metadata = {
            "format_version": str(STATE_FORMAT_VERSION),
            "steps": json.dumps(self.buffer.steps),
            "config": json.dumps(self.config.to_dict()),
            "rank": str(rank),
            "world_size": str(world),
        }
        if self.jump is not None:
            metadata["jump"] = json.dumps(self.jump.state_dict())
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.buffer.state_tensors(), str(tmp), metadata=metadata)
        tmp.replace(path)
        return path

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        cfg = self.config
        if state.global_step >= cfg.last_observed_step and cfg.mode == "halt":
            self._halted = True
            logger.info("RELEX: resumed after the observation window (step %d); nothing to do", state.global_step)
            return
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        for directory in candidates:
            path = _state_file(directory)
            if path.is_file():
                self._load_state_file(path, state.global_step)
                return
        self.buffer.capture_base()
        if self.jump is not None:
            self.jump.restart(replace(cfg, start_step=state.global_step))
        looked = ", ".join(str(_state_file(d)) for d in candidates)
        logger.warning(
            "RELEX: resuming at step %d but no saved delta buffer was found (looked for %s). θ_0 is lost, so the "
            "observation restarts from the current weights and the prediction will differ from an uninterrupted "
            "run. Keep %s in your checkpoints to resume exactly.",
            state.global_step,
            looked,
            STATE_FILE_NAME,
        )
        self.config = replace(cfg, start_step=state.global_step, extrapolate_to=cfg.extrapolate_to)

    def _load_state_file(self, path: Path, step: int) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        version = int(metadata.get("format_version", "0"))
        if version != STATE_FORMAT_VERSION:
            raise ValueError(f"{path} has RELEX state format {version}; this version reads {STATE_FORMAT_VERSION}.")
        saved = json.loads(metadata["config"])
        for key in ("start_step", "snapshot_every", "buffer_dtype", "include", "exclude"):
            if saved.get(key) != getattr(self.config, key):
                raise ValueError(
                    f"{path} was written with {key}={saved.get(key)!r} but the callback now has "
                    f"{key}={getattr(self.config, key)!r}; resume with the same setting."
                )
        if self.jump is not None and "jump" in metadata:
            self.jump.load_state_dict(json.loads(metadata["jump"]), step)
        if self.jump is not None:
            step = self.jump.virtual_step(step)  # jump mode records snapshots at virtual steps
        steps = [s for s in json.loads(metadata["steps"]) if s <= step]
        tensors = load_file(str(path))
        tensors = {k: (v[: len(steps)] if k.startswith("deltas/") else v) for k, v in tensors.items()}
        self.buffer.load_state_tensors(tensors, steps)
        logger.info("RELEX: restored θ_0 and %d snapshots from %s", len(steps), path)

    # -- buffer ---------------------------------------------------------------------------------------------

    def _tracked_tensors(self, model: torch.nn.Module) -> list[TrackedTensor]:
        cfg = self.config
        chosen = select_parameters(model, cfg.include, cfg.exclude)
        if not chosen:
            raise ValueError(
                f"no parameter to track: none is a trainable floating-point tensor matching include={cfg.include} "
                f"and not exclude={cfg.exclude}. Loosen include/exclude or unfreeze parameters."
            )
        return track_parameters(model, chosen)  # one slice per process under DDP/FSDP/DeepSpeed

    def _make_buffer(self, model: torch.nn.Module) -> DeltaBuffer:
        cfg = self.config
        tracked = self._tracked_tensors(model)
        numels = [t.numel for t in tracked]
        needed = DeltaBuffer.bytes_needed(numels, cfg.buffer_capacity, cfg.buffer_dtype)
        on_gpu = any(t.view().is_cuda for t in tracked)
        device = cfg.buffer_device
        gpu_budget = cfg.buffer_max_bytes
        if on_gpu and device in ("auto", "param") and gpu_budget is None:
            free, _ = torch.cuda.mem_get_info()
            gpu_budget = free // 2
        host_budget = cfg.buffer_max_bytes if cfg.buffer_max_bytes is not None else int(0.8 * host_available_bytes())
        if device == "auto":
            device = "param" if on_gpu and needed <= gpu_budget else "cpu"
        budget = gpu_budget if (device == "param" and on_gpu) else host_budget
        where = "GPU" if (device == "param" and on_gpu) else "host"
        if needed > budget:
            raise MemoryError(self._budget_message(needed, budget, where, numels))
        logger.info(
            "RELEX: tracking %d tensors (%s parameters); the delta buffer needs %s on %s (%d snapshots, %s)",
            len(tracked), f"{sum(numels):,}", format_bytes(needed), where, cfg.buffer_capacity, cfg.buffer_dtype,
        )
        return DeltaBuffer(tracked, cfg.buffer_capacity, cfg.buffer_dtype, device)

    def _budget_message(self, needed: int, budget: int, where: str, numels: list[int]) -> str:
        cfg = self.config
        fits = []
        for dtype in ("bfloat16", "float16", "float32"):
            for every in sorted({cfg.snapshot_every, cfg.snapshot_every * 2, cfg.snapshot_every * 5}):
                if cfg.observe % every or cfg.observe // every < cfg.rank + 1:
                    continue
                if DeltaBuffer.bytes_needed(numels, cfg.observe // every, dtype) <= budget:
                    fits.append(f"buffer_dtype={dtype!r}, snapshot_every={every}")
        hint = f" Settings that fit: {'; '.join(fits[:4])}." if fits else ""
        other = " Or use buffer_device='cpu' (host memory)." if where == "GPU" else ""
        return (
            f"the RELEX delta buffer needs {format_bytes(needed)} but the {where} budget is {format_bytes(budget)} "
            f"(buffer_max_bytes={cfg.buffer_max_bytes}).{hint}{other} You can also track fewer tensors with "
            f"include/exclude, or raise buffer_max_bytes."
        )

    # -- the fit --------------------------------------------------------------------------------------------

    def fit(self, targets: list[float], window: int | None = None, origin: float | None = None) -> TrajectoryFit:
        """Fit every tracked tensor on the recorded window (Grams summed over processes)."""
        cfg = self.config
        names, grams = [], []
        progress = tqdm(
            self.buffer.grams(window), total=len(self.buffer.tracked), desc="RELEX fit", unit="tensor",
            disable=len(self.buffer.tracked) < 64 or not is_main_process(), leave=False,
        )
        for item, gram in progress:
            names.append(item.name)
            grams.append(gram)
        grams = all_reduce_grams(grams)
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
            list(zip(names, grams, strict=True)), steps, targets, rank=cfg.rank, kind=cfg.fit, power=power, origin=origin,
        )

    @torch.no_grad()
    def predict(self, fit: TrajectoryFit, window: int | None = None, shrink: float = 1.0) -> list[dict[str, torch.Tensor]]:
        """θ̂ per target for every tracked tensor (flat, fp32, on the buffer device).

        With ``shrink`` λ < 1 the move from the current weights θ is scaled: θ + λ(θ̂ − θ).
        """
        predictions: list[dict[str, torch.Tensor]] = [{} for _ in fit.targets]
        by_name = {item.name: item for item in self.buffer.tracked}
        bad = []
        for tensor_fit in fit.tensors:
            base = self.buffer.theta0[tensor_fit.name]
            moved = combine(self.buffer.stack(tensor_fit.name, window), tensor_fit.weights)
            for j in range(len(fit.targets)):
                theta_hat = moved[j].add_(base)
                if shrink != 1.0:
                    current = by_name[tensor_fit.name].view().to(theta_hat.device, torch.float32, copy=True)
                    theta_hat = current.add_(theta_hat.sub_(current), alpha=shrink)
                predictions[j][tensor_fit.name] = theta_hat
            if not all(bool(torch.isfinite(p[tensor_fit.name]).all()) for p in predictions):
                bad.append(tensor_fit.name)
        flags = all_reduce_sum(torch.tensor([float(len(bad))]))
        if bad or float(flags) > 0:
            raise FloatingPointError(
                f"RELEX refuses to extrapolate: non-finite predictions in {bad[:10] or '(another process)'}. "
                "Live weights and output directories were left untouched."
            )
        return predictions

    def _halt(self, args, state: TrainerState, control: TrainerControl, model, processing_class) -> None:
        cfg = self.config
        started = time.perf_counter()
        targets = list(cfg.extrapolate_to)
        fit = self.fit([float(t) for t in targets], window=cfg.window)
        predictions = self.predict(fit, window=cfg.window, shrink=cfg.shrink)
        fit_seconds = time.perf_counter() - started
        self.last_fit = fit
        for target, prediction in zip(targets, predictions, strict=True):
            self.reports[target] = self._report(fit, target, fit_seconds)
        chosen = self._choose_with_probe(model, targets, predictions)
        if cfg.save_model:
            started = time.perf_counter()
            for target, prediction in zip(targets, predictions, strict=True):
                self.reports[target]["timings"]["write_seconds"] = None
                self.written_dirs[target] = self._write_model_dir(model, processing_class, target, prediction)
            logger.info("RELEX: wrote %s in %.1fs", [str(p) for p in self.written_dirs.values()], time.perf_counter() - started)
        self.loaded_target = None if chosen is None else targets[chosen]
        self._final_weights = None if chosen is None else predictions[chosen]
        self._halted = True
        control.should_training_stop = True
        metrics = self._metrics(fit, targets[-1] if chosen is None else targets[chosen], fit_seconds)
        for key, value in self.probe_scores.items():
            if math.isfinite(value):
                metrics["relex/probe_current" if key == "current" else f"relex/probe_step{key}"] = value
        self._emit(metrics, state, control)

    @torch.no_grad()
    def _choose_with_probe(self, model, targets: list[int], predictions: list[dict[str, torch.Tensor]]) -> int | None:
        """Index of the prediction to load: the last target without a probe; with one, the best-scoring target
        (ties: the nearest), or ``None`` (keep the current weights) when it scores below them and not
        ``allow_worse``. Scores go into each target's report under ``"probe"``."""
        if self.probe is None:
            return len(targets) - 1
        saved = {item.name: item.view().detach().clone() for item in self.buffer.tracked}
        current = score_model(self.probe, model)
        scores: list[float] = []
        try:
            for prediction in predictions:
                self._load_into_model(prediction)
                scores.append(score_model(self.probe, model))
        finally:
            self._load_into_model(saved)  # bit-exact: the copies have the parameters' dtype
        del saved
        chosen = choose_candidate(current, scores, targets, self.config.allow_worse)
        self.probe_scores = {"current": current, **{str(t): v for t, v in zip(targets, scores, strict=True)}}
        for i, target in enumerate(targets):
            self.reports[target]["probe"] = {
                "score": scores[i],
                "current_weights_score": current,
                "scores_by_target": {str(t): v for t, v in zip(targets, scores, strict=True)},
                "loaded_into_live_model": i == chosen,
                "allow_worse": self.config.allow_worse,
            }
        if chosen is None:
            logger.warning(
                "RELEX: every extrapolated candidate scores below the current weights (%.4f; candidates %s); the live model "
                "keeps the trained weights. Pass allow_worse=True to load the best candidate anyway.",
                current, {t: round(v, 4) for t, v in zip(targets, scores, strict=True)},
            )
        else:
            logger.info("RELEX: probe scores %s (current weights %.4f); loading step %d",
                        {t: round(v, 4) for t, v in zip(targets, scores, strict=True)}, current, targets[chosen])
        return chosen

    # -- reporting ------------------------------------------------------------------------------------------

    def horizon_ratio(self, target: float) -> float:
        return (target - self.config.start_step) / self.config.observe

    def _report(self, fit: TrajectoryFit, target: int, fit_seconds: float) -> dict[str, Any]:
        cfg = self.config
        j = fit.targets.index(float(target))
        evs = [t.explained_variance for t in fit.tensors]
        r2s = [float(t.r2[0]) for t in fit.tensors if t.subspace.singular_values[0] > 0]
        warnings = []
        backtest = None
        ratio = self.horizon_ratio(target)
        if fit.backtest is not None:
            supported = fit.backtest.supported_ratio(cfg.backtest_tolerance)
            backtest = {
                "num_fit": fit.backtest.num_fit,
                "ratio": fit.backtest.ratio,
                "distance": fit.backtest.distance,
                "tolerance": cfg.backtest_tolerance,
                "supported_ratio": supported,
            }
            if ratio > supported:
                warnings.append(
                    f"target step {target} is {ratio:.1f}x the observed window, but the backtest (fit the first "
                    f"{fit.backtest.num_fit} snapshots, predict the last, {fit.backtest.ratio:.1f}x out) missed by a "
                    f"relative distance of {fit.backtest.distance:.2f}, which supports about {supported:.1f}x at "
                    f"backtest_tolerance={cfg.backtest_tolerance}. Expect the prediction to drift from real training: "
                    "use a nearer target, jump mode, or a probe (RelexCallback(probe=...))."
                )
        for warning in warnings:
            logger.warning("RELEX: %s", warning)
        tensors = []
        for t in fit.tensors:
            tensors.append(
                {
                    "name": t.name,
                    "shape": list(self._param_shape(t.name)),
                    "explained_variance": t.explained_variance,
                    "singular_values": t.subspace.eigenvalues[: max(cfg.rank, 5)].sqrt().tolist(),
                    "r2": t.r2.tolist(),
                    "coefficients": t.subspace.coefficients.T.tolist(),
                    "predicted_coefficient": t.trend([float(target)])[0].tolist(),
                }
            )
        rank, world = world_info()
        return {
            "relex_callback_version": __version__,
            "method": "RELEX rank-r trajectory extrapolation (arXiv 2605.21468)",
            "target_step": target,
            "targets": list(cfg.extrapolate_to or []),
            "settings": cfg.to_dict(),
            "start_step": cfg.start_step,
            "observed_steps": fit.steps,
            "horizon_ratio": ratio,
            "explained_variance": summarize_explained_variance(evs),
            "line_r2": summarize_explained_variance(r2s),
            "backtest": backtest,
            "warnings": warnings,
            "buffer": {
                "bytes": self.buffer.nbytes,
                "bytes_all_processes": int(all_reduce_sum(torch.tensor(float(self.buffer.nbytes), dtype=torch.float64))),
                "dtype": self.config.buffer_dtype,
                "device": str(self.buffer.device),
                "world_size": world,
            },
            "communication_bytes": communication_report(),
            "timings": {
                "snapshot_seconds_total": self._snapshot_seconds,
                "snapshot_seconds_mean": self._snapshot_seconds / max(len(fit.steps), 1),
                "fit_seconds": fit_seconds,
            },
            "tensors": tensors,
            "_target_index": j,
        }

    def _param_shape(self, name: str) -> torch.Size:
        for item in self.buffer.tracked:
            if item.name == name:
                return torch.Size(getattr(item, "full_shape", None) or item.param.shape)
        return torch.Size()

    def _metrics(self, fit: TrajectoryFit, target: int, fit_seconds: float) -> dict[str, float]:
        report = self.reports[target]
        metrics = {
            "relex/explained_variance_mean": report["explained_variance"].get("mean", math.nan),
            "relex/explained_variance_min": report["explained_variance"].get("min", math.nan),
            "relex/line_r2_mean": report["line_r2"].get("mean", math.nan),
            "relex/horizon_ratio": report["horizon_ratio"],
            "relex/fit_seconds": fit_seconds,
            "relex/target_step": float(target),
        }
        if report["backtest"]:
            metrics["relex/backtest_distance"] = report["backtest"]["distance"]
            metrics["relex/backtest_supported_ratio"] = report["backtest"]["supported_ratio"]
        return metrics

    def _emit(self, metrics: dict[str, float], state: TrainerState, control: TrainerControl) -> None:
        """Send metrics to Python logging, ``trainer_state.json`` and the trainer's loggers (next ``on_log``)."""
        logger.info("RELEX metrics at step %d: %s", state.global_step, {k: round(v, 4) for k, v in metrics.items()})
        state.log_history.append({**metrics, "step": state.global_step})
        self._pending_metrics.update(metrics)
        control.should_log = True

    def _run_first_in_handler(self) -> None:
        """Move this callback first in the trainer's CallbackHandler so its ``on_log`` can add RELEX metrics
        before the reporting integrations (W&B, TensorBoard, ...) read the logs.

        transformers gives callbacks no handle on the trainer; the handler is the caller of this event.
        """
        frame = sys._getframe(2)
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler) and self in handler.callbacks:
            handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]

    # -- writing --------------------------------------------------------------------------------------------

    def _merged_lora_deltas(self, model, target: int) -> dict[str, torch.Tensor]:
        """merge_lora='delta': each LoRA module's extrapolated merged update s·ΣB A at ``target``."""
        cfg = self.config
        deltas = merged_delta_predictions(
            self.buffer, lora_pairs(model), [float(target)], rank=cfg.rank, kind=cfg.fit, power=cfg.power,
            origin=float(cfg.start_step), window=cfg.window,
        )
        return {prefix: value[0] for prefix, value in deltas.items()}

    @torch.no_grad()
    def _load_into_model(self, prediction: dict[str, torch.Tensor]) -> None:
        """Write ``prediction`` (this process's slices) into the live weights; collective under DDP/FSDP/DeepSpeed."""
        write_prediction(self.buffer.tracked, prediction)

    def _write_model_dir(self, model, processing_class, target: int, prediction: dict[str, torch.Tensor]) -> Path:
        final = self.target_dir(target)
        report = {k: v for k, v in self.reports[target].items() if not k.startswith("_")}
        started = time.perf_counter()
        state_dict = gather_state_dict(model, self.buffer.tracked, prediction)  # collective; None off rank 0
        if not is_main_process():
            return final
        to_save = unwrap_model(model)
        with atomic_directory(final, overwrite=self.config.overwrite) as staging:
            to_save.save_pretrained(staging, state_dict=state_dict)  # a PeftModel writes its adapter only
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(staging)
            report["timings"]["write_seconds"] = time.perf_counter() - started
            write_json(staging / REPORT_NAME, report)
            write_model_card(staging, report)
        if getattr(self.config, "merge_lora", False):
            merged = self._output_root / merged_dir_name(target)
            with atomic_directory(merged, overwrite=self.config.overwrite) as staging:
                deltas = self._merged_lora_deltas(model, target) if self.config.merge_lora == "delta" else None
                to_save.get_base_model().save_pretrained(staging, state_dict=merged_state_dict(model, state_dict, deltas))
                if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                    processing_class.save_pretrained(staging)
                write_json(staging / REPORT_NAME, {**report, "merged_lora": "delta" if deltas is not None else "factors"})
                write_model_card(staging, report)
            logger.info("RELEX: wrote the merged LoRA model for step %d to %s", target, merged)
        logger.info("RELEX: wrote the extrapolated model for step %d to %s", target, final)
        return final
