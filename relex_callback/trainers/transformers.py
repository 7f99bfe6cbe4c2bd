"""`RelexCallback`: a thin transformers/TRL adapter around the delta buffer and the RELEX core."""

from __future__ import annotations

import contextlib
import json
import logging
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerControl, TrainerState
from transformers.training_args import TrainingArguments

from ..config import RelexConfig
from ..distributed import unwrap_model
from ..engine.candidate import Candidate
from ..engine.engine import STATE_FILE_NAME, STATE_FORMAT_VERSION, Probe, find_state, state_file
from ..engine.window import Window, WindowAdapter, is_plain
from ..math.core import TrajectoryFit
from ..store import ROWS_DIR_NAME

__all__ = ["RelexCallback", "STATE_FILE_NAME", "STATE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path:
    """The folder the Trainer saves this step's checkpoint into."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


class RelexCallback(WindowAdapter, TrainerCallback, ExportableState):
    """Observe the first steps of training, fit RELEX's rank-1 trajectory and extrapolate.

    In halt mode the callback captures θ_0 at ``start_step``, records Δ_t = θ_t − θ_0 for the next
    ``observe`` optimizer steps, then fits the per-tensor rank-r subspace and coefficient trend, writes one
    Hugging Face model directory ``{output_dir}/relex-step{K}`` per target K, stops training, and leaves the
    extrapolated weights (of the last target) in the live model when ``train()`` returns.

    In jump mode (``mode="jump"``) training continues and the live weights are moved ``jump_horizon`` steps
    ahead along the fitted trajectory at step ``start_step + observe`` and every ``jump_every`` steps after it
    (:class:`~relex_callback.engine.jump.JumpController`, ``docs/jump-mode.md``). The callback only decides
    *when*; its :class:`~relex_callback.engine.window.Window` does the work.

    Args:
        config (`RelexConfig` or `dict`, *optional*): the settings; keyword arguments override its fields.
        probe (`Callable[[torch.nn.Module], float]`, *optional*): scores a model, higher is better (e.g.
            :class:`~relex_callback.probe.RewardProbe`). Jump mode rejects a jump that lowers the score by more
            than ``probe_tolerance``; halt mode with several targets loads the best one, never one below the
            current weights unless ``allow_worse=True``. Not saved in checkpoints: a callback rebuilt by
            transformers from ``trainer_state.json`` takes the probe of the callback it replaces.
        **options: any :class:`RelexConfig` field, e.g. ``observe=50, extrapolate_to="auto"``.

    Example:

    ```python
    from relex_callback import RelexCallback

    trainer = GRPOTrainer(..., callbacks=[RelexCallback(observe=50, extrapolate_to="auto", probe=probe)])
    trainer.train()  # stops after step 50; writes out/relex-step{K}/ for the probe-chosen K ≤ K_max
    ```

    Resuming: the callback writes ``relex_state.safetensors`` into every ``checkpoint-N/`` and reloads it on
    ``trainer.train(resume_from_checkpoint=...)``; its JSON state also goes into ``trainer_state.json``. That file
    only names θ_0's SHA-256 and the rows Δ_t it covers (CRC-32s), so checkpoints stay a few KB: an in-memory
    buffer writes each row once per run into ``{output_dir}/relex-rows``, the disk store keeps them in ``store_dir``.
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
        self.window = Window(config, probe)
        self.last_fit: TrajectoryFit | None = None
        self.candidates: list[Candidate] = []
        self.diagnostic = None  # the window diagnostic of the halt-mode fit
        self.written_dirs: dict[int | str, Path] = {}  # target step (the trend) or directory name (other families)
        self.loaded_target: int | None = None
        self._final_weights: dict[str, torch.Tensor] | None = None
        self._pending_metrics: dict[str, float] = {}
        self._trainer: weakref.ref | None = None
        self._use_cache: bool | None = None  # the model's own config.use_cache (see on_init_end)
        self._saved_step: int | None = None  # the step whose checkpoint got the RELEX state before the Trainer saved it
        self.probe_scores: dict[str, float] = {}
        self.search: dict[str, Any] | None = None  # the reward-guided horizon search of the halt (report section)
        self._args: TrainingArguments | None = None  # the Trainer's arguments (where checkpoint-N goes)
        self._jump_state: dict[str, Any] | None = None
        if probe is None and _from_state:
            self.probe = self._adopt_probe()
        RelexCallback._instances = [r for r in RelexCallback._instances if r() is not None] + [weakref.ref(self)]

    @property
    def _halted(self) -> bool:  # restored from trainer_state.json by transformers' from_state
        return self.window.halted

    @_halted.setter
    def _halted(self, value: bool) -> None:
        self.window.halted = bool(value)

    @property
    def buffer(self):
        """The engine's delta buffer (``None`` before training begins)."""
        return self.engine.buffer

    @property
    def reports(self) -> dict[int, dict[str, Any]]:
        """The halt-mode report of each target step."""
        return {(int(c.target) if is_plain(c) else c.label): c.report for c in self.candidates if c.report is not None}

    @property
    def _snapshot_seconds(self) -> float:  # restored from trainer_state.json by transformers' from_state
        return self.engine.snapshot_seconds

    @_snapshot_seconds.setter
    def _snapshot_seconds(self, value: float) -> None:
        self.engine.snapshot_seconds = float(value)

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

    def set_trainer(self, trainer: Any) -> "RelexCallback":
        """Send RELEX metrics through ``trainer.log``, so every reporting integration (W&B, TensorBoard, ...)
        sees them at the step they belong to, whatever the order of the callbacks.

        Without it the metrics go into ``trainer_state.json`` and into the ``logs`` of the next ``on_log``,
        which reaches the callbacks after this one; ``Trainer`` puts its ``report_to`` integrations before the
        user's callbacks. Returns the callback.
        """
        self._trainer = weakref.ref(trainer)
        return self

    # -- transformers' ExportableState ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {"_halted": self._halted, "_snapshot_seconds": self._snapshot_seconds,
                                      "_saved_steps": list(self.buffer.steps) if self.engine.ready else None}
        if self.jump is not None:
            attributes["_jump_state"] = self.jump.state_dict()
        return {"args": {**self.config.to_dict(), "_from_state": True}, "attributes": attributes}

    # -- events --------------------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        # Trainer sets model.config.use_cache = args.use_cache (False by default) right after this event; the
        # exported directories keep the model's own value, so that generation from them uses the KV cache.
        config = getattr(unwrap_model(model), "config", None) if model is not None else None
        self._use_cache = getattr(config, "use_cache", None)
        return control

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        cfg = self.config
        if model is None:
            raise ValueError("RelexCallback needs the model: use it through a transformers Trainer.")
        if state.max_steps and state.max_steps > 0 and cfg.last_observed_step > state.max_steps:
            raise ValueError(
                f"max_steps={state.max_steps} ends before the RELEX observation window, which needs step "
                f"{cfg.last_observed_step} (start_step={cfg.start_step} + observe={cfg.observe}). Raise max_steps "
                f"(or num_train_epochs) or lower observe."
            )
        self.window.check_setup(model, cfg.output_dir or args.output_dir, state.global_step,
                                "output_dir" if cfg.output_dir else "TrainingArguments.output_dir")
        self.window.attach(model, state.global_step, store_dir=Path(args.output_dir) / "relex-store")
        self._args = args
        if self.jump is not None and self._jump_state:
            self.jump.load_state_dict(self._jump_state, state.global_step)  # restored by transformers; the sidecar wins
        if state.global_step > cfg.start_step:
            self._resume(args, state)
        elif state.global_step == cfg.start_step:
            self.engine.capture_base(state.global_step)
        if self.jump is not None:
            self.jump.begin(args, state, self.window.output_root, self.probe)
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self._step_end(state, control, model, **kwargs)
        self._save_before_checkpoint(args, state, control)
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._save_before_checkpoint(args, state, control)
        return control

    def _step_end(self, state: TrainerState, control: TrainerControl, model, **kwargs) -> None:
        if self.buffer is None or self._halted:
            return
        step = state.global_step
        record = self.window.step_end(step, model, kwargs.get("optimizer"), record=self.should_snapshot(step))
        if record is not None:
            self._emit(self.jump.metrics(record), state, control)
        if self.jump is None and self.should_halt(step):
            self._halt(state, control, model, kwargs.get("processing_class"))

    def _save_before_checkpoint(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Write the RELEX state into ``checkpoint-N`` before the Trainer saves it there: the Trainer deletes older
        checkpoints (``save_total_limit``) before ``on_save``, so a run killed while saving RELEX state in ``on_save``
        would keep no checkpoint to resume RELEX from."""
        if control.should_save and self.engine.ready:
            checkpoint_dir = _checkpoint_dir(args, state)
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self.save_state(checkpoint_dir)
            self._saved_step = state.global_step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self.engine.ready or self._saved_step == state.global_step:  # written before the checkpoint
            return control
        checkpoint_dir = _checkpoint_dir(args, state)
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
        self.window.close()
        if self._final_weights is not None:
            self.engine.load(self._final_weights)
            self._final_weights = None
            logger.info("RELEX: the model now holds the extrapolated weights of step %s", self.loaded_target)
        return control

    # -- paths and persistence -----------------------------------------------------------------------------

    @staticmethod
    def _window_zero_std(state: TrainerState, first: int, last: int) -> float | None:
        """Mean ``frac_reward_zero_std`` (GRPO's share of prompt groups without reward variance) logged in the window."""
        values = [h["frac_reward_zero_std"] for h in state.log_history
                  if "frac_reward_zero_std" in h and first < h.get("step", -1) <= last]
        return sum(values) / len(values) if values else None

    def save_state(self, checkpoint_dir: str | Path) -> Path:
        """Write this process's RELEX state into ``checkpoint_dir``: a reference to rows written once per run (an
        in-memory buffer's into ``{output_dir}/relex-rows``; with ``buffer_device="disk"`` the store's)."""
        rows_dir = Path(self._args.output_dir) / ROWS_DIR_NAME if self._args is not None else None
        return self.window.save(checkpoint_dir, rows_dir)

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        cfg = self.config
        if state.global_step >= cfg.last_observed_step and cfg.mode == "halt":
            self._halted = True
            logger.info("RELEX: resumed after the observation window (step %d); nothing to do", state.global_step)
            return
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(_checkpoint_dir(args, state))
        recorded = self._recorded_steps(state)
        for directory in candidates:
            path = find_state(directory)
            if path is None:
                continue
            metadata = self.engine.read_state_metadata(path)
            if recorded is None or json.loads(metadata["steps"]) == recorded:
                self.window.restore(path, metadata, state.global_step)
                return
        looked = ", ".join(str(state_file(d)) for d in candidates)
        if recorded is not None:
            raise ValueError(
                f"the Trainer resumed at step {state.global_step} from a checkpoint whose trainer_state.json records a "
                f"RELEX state of {len(recorded)} snapshots, but it is not in {looked} (transformers does not tell "
                "callbacks which folder train(resume_from_checkpoint=...) loaded). Resume from a checkpoint inside "
                "TrainingArguments.output_dir, or pass the same folder as TrainingArguments(resume_from_checkpoint=...) "
                f"too; to restart the observation from this checkpoint's weights instead, set start_step="
                f"{state.global_step}.")
        self.window.restart(state.global_step, looked)

    def _recorded_steps(self, state: TrainerState) -> list[float] | None:
        """The snapshot steps of the RELEX state saved with the resumed checkpoint, from its trainer_state.json (``None``
        when it records none, or records several callbacks of this class: which one was this is unknown)."""
        exported = state.stateful_callbacks.get(type(self).__name__)
        return (exported.get("attributes") or {}).get("_saved_steps") if isinstance(exported, dict) else None

    # -- halt mode ------------------------------------------------------------------------------------------

    def _halt(self, state: TrainerState, control: TrainerControl, model, processing_class) -> None:
        cfg = self.config
        trained = _checkpoint_dir(self._args, state) if self._args is not None else None
        result = self.window.halt(
            model, processing_class=processing_class, loads_chosen=True, saving=self._model_use_cache,
            zero_std_fraction=self._window_zero_std(state, cfg.start_step, cfg.last_observed_step),
            trained_weights=None if trained is None else str(trained))
        self.last_fit, self.candidates, self.diagnostic = result.fit, result.candidates, self.engine.diagnostic
        if result.scores:
            self.probe_scores = result.scores
        self.search = (result.candidates[0].report or {}).get("search")
        self.written_dirs.update(result.written)
        self.loaded_target, self._final_weights = result.loaded_target, result.chosen_weights
        control.should_training_stop = True
        # The Trainer saves checkpoint-N now, before on_train_end loads the extrapolation: the trained weights of
        # the window's end (and the optimizer state, to continue training from them) are kept under their step.
        control.should_save = True
        self._emit(result.metrics, state, control)

    # -- metrics --------------------------------------------------------------------------------------------

    def _emit(self, metrics: dict[str, float], state: TrainerState, control: TrainerControl) -> None:
        """Send metrics to Python logging, ``trainer_state.json`` and the trainer's loggers (see :meth:`set_trainer`)."""
        logger.info("RELEX metrics at step %d: %s", state.global_step, {k: round(v, 4) for k, v in metrics.items()})
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            should_log = control.should_log  # Trainer.log resets it; keep the step's own log request
            trainer.log(dict(metrics))  # appends to log_history and calls every callback's on_log, in order
            control.should_log = should_log
            return
        state.log_history.append({**metrics, "step": state.global_step})
        self._pending_metrics.update(metrics)
        control.should_log = True

    # -- writing --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _model_use_cache(self, model):
        """``model.config.use_cache`` as it was before the Trainer set it to ``args.use_cache`` (when this callback
        saw the Trainer's construction; else the config class's default), for the duration of a save."""
        config = getattr(model, "config", None)
        wanted = self._use_cache
        if wanted is None and config is not None:
            try:
                wanted = getattr(type(config)(), "use_cache", None)
            except Exception:  # a config class that needs arguments: leave the value alone
                wanted = None
        if config is None or wanted is None or not hasattr(config, "use_cache"):
            yield
            return
        training = config.use_cache
        config.use_cache = wanted
        try:
            yield
        finally:
            config.use_cache = training
