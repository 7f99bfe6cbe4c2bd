"""`StepDriver`: RELEX driven by a step number, for trainers without a callback API (verl's workers).

An adapter calls :meth:`StepDriver.begin` once with the live (possibly sharded) model, then
:meth:`StepDriver.after_step` after every optimizer update of the policy with the trainer's step count, and
:meth:`StepDriver.save` beside each checkpoint. The driver translates these calls into the
:class:`~relex_callback.engine.window.Window`'s, which captures θ_0 at ``start_step``, records Δ_t = θ_t − θ_0 over
the window, and then either halts (fit → candidates → model directories) or jumps
(:class:`~relex_callback.engine.jump.JumpController`). Every process of a sharded run makes the same calls; only
the main process writes files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ..config import RelexConfig
from ..engine.engine import Probe, find_state, state_file
from ..engine.window import Window, WindowAdapter
from ..store import ROWS_DIR_NAME

__all__ = ["StepDriver", "StepOutcome"]

logger = logging.getLogger(__name__)


@dataclass
class StepOutcome:
    """What one :meth:`StepDriver.after_step` did: ``relex/*`` metrics for the trainer's logger, whether the run
    should stop (halt mode fitted), the model directories written and the jump record (jump mode)."""

    metrics: dict[str, float] = field(default_factory=dict)
    halted: bool = False
    written: list[str] = field(default_factory=list)
    jump: dict[str, Any] | None = None


class StepDriver(WindowAdapter):
    """RELEX on a live model, advanced by step numbers (see the module docstring).

    Args:
        config (`RelexConfig`): the settings.
        probe (`Callable[[torch.nn.Module], float]`, *optional*): scores a model, higher is better; every process
            must call it (it may be collective).
        model_subdir (`str`): where a model goes inside ``relex-step{K}/`` (``"actor/huggingface"`` gives verl's
            checkpoint layout, which ``relex`` reads back).

    Subclasses may override :meth:`should_snapshot` and :meth:`should_halt`, as on the transformers callback.
    """

    def __init__(self, config: RelexConfig, probe: Probe | None = None, model_subdir: str = "") -> None:
        self.window = Window(config, probe, model_subdir)
        self.model: torch.nn.Module | None = None
        self.processing_class: Any = None
        self.optimizer: Any = None
        self.zero_std_fraction: Callable[[], float | None] = lambda: None
        self.optimizer_steps = 0  # counted by a post-step hook since the last after_step
        self._hook = None

    @property
    def halted(self) -> bool:
        return self.window.halted

    @property
    def output_root(self) -> Path:
        return self.window.output_root

    # -- set-up ---------------------------------------------------------------------------------------------

    def begin(
        self, model: torch.nn.Module, step: int, output_root: str | Path, *, optimizer: Any = None,
        processing_class: Any = None, resume_dir: str | Path | None = None,
    ) -> None:
        """Attach to ``model`` at trainer step ``step``: check the set-up, size the buffer, capture θ_0
        (``step == start_step``) or restore the saved window from ``resume_dir`` (``step > start_step``)."""
        cfg = self.config
        self.model, self.processing_class, self.optimizer = model, processing_class, optimizer
        self.window.check_setup(model, output_root, step)
        self.window.attach(model, step, store_dir=self.output_root / "relex-store")  # used by buffer_device="disk"
        if optimizer is not None and hasattr(optimizer, "register_step_post_hook"):
            self._hook = optimizer.register_step_post_hook(self._count_optimizer_step)
        if step > cfg.start_step:
            self._resume(step, resume_dir)
        elif step == cfg.start_step:
            self.engine.capture_base(step)
        if self.jump is not None:
            self.jump.begin(SimpleNamespace(), SimpleNamespace(global_step=step), self.output_root, self.probe)

    def _count_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.optimizer_steps += 1

    def close(self) -> None:
        """Remove the optimizer hook; finish the disk store's pending append."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.window.close()

    # -- the step -------------------------------------------------------------------------------------------

    def after_step(self, step: int) -> StepOutcome:
        """Record, halt or jump after the policy update of trainer step ``step`` (collective)."""
        outcome = StepOutcome()
        if self.optimizer_steps:
            outcome.metrics["relex/optimizer_steps"] = float(self.optimizer_steps)
            self.optimizer_steps = 0
        if self.halted or self.engine.buffer is None:
            return outcome
        record = self.window.step_end(step, self.model, self.optimizer, record=self.should_snapshot(step))
        if self.jump is not None:
            outcome.metrics["relex/virtual_step"] = float(self.jump.virtual_step(step))
            if record is not None:
                outcome.jump = record
                outcome.metrics.update(self.jump.metrics(record))
        elif self.should_halt(step):
            result = self.window.halt(self.model, processing_class=self.processing_class, loads_chosen=False,
                                      zero_std_fraction=self.zero_std_fraction())  # the trainer stops; files only
            outcome.written = [str(path) for path in result.written.values()]
            outcome.metrics.update(result.metrics)
            outcome.halted = True
        return outcome

    # -- saved state ----------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path | None:
        """Write this process's RELEX state (and the jump bookkeeping) into ``directory``: a reference to rows that
        an in-memory buffer writes once per run into ``{output_root}/relex-rows`` (the disk store: its own rows)."""
        if not self.engine.ready:
            return None
        Path(directory).mkdir(parents=True, exist_ok=True)
        return self.window.save(directory, self.output_root / ROWS_DIR_NAME, {"halted": json.dumps(self.halted)})

    def _resume(self, step: int, resume_dir: str | Path | None) -> None:
        cfg = self.config
        path = find_state(Path(resume_dir)) if resume_dir is not None else None
        if path is not None:
            metadata = self.engine.read_state_metadata(path)
            self.window.halted = json.loads(metadata.get("halted", "false"))
            self.window.restore(path, metadata, step)
            return
        if cfg.mode == "halt" and step >= cfg.last_observed_step:
            self.window.halted = True
            logger.info("RELEX: resumed after the observation window (step %d); nothing to do", step)
            return
        self.window.restart(step, str(resume_dir and state_file(Path(resume_dir))))
