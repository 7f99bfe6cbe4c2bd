"""Jump mode: repeated short RELEX jumps of the live weights while training continues.

Symbols (see ``docs/jump-mode.md``): W = ``start_step + observe`` is the first jump step, J = ``jump_every``
real optimizer steps between jumps, H = ``jump_horizon``, λ = ``shrink``. A is the sum of the accepted
horizons so far, and the *virtual step* of real step s is v = s + A: a snapshot taken at real step s is
recorded at v, so every fit regresses the coefficients c_t on one consistent time axis and an earlier
jump does not bias a later fit (``tests/test_jump.py`` checks it on an exactly linear trajectory).

At a jump at real step s (virtual v) the controller

1. fits the recorded history (:meth:`RelexEngine.fit`, window ``window`` or everything since θ_0);
2. caps the horizon at the largest H the Gram-only backtest supports at ``backtest_tolerance``
   (``auto_horizon``) and skips the jump when that is below one step;
3. scores the live model with the probe (if any) and keeps a bit-exact copy of the tracked weights;
4. writes θ ← θ + λ(θ̂(v + H) − θ) (``jump_anchor="fit"``, the paper's θ̂ = θ_0 + ĉ·v) or
   θ ← θ + λ(ĉ(v + H) − ĉ(v))·v (``jump_anchor="current"``), a :class:`Candidate` of the engine;
5. scores again (:meth:`RelexEngine.trial`); a score below the pre-jump score minus ``probe_tolerance`` restores the copy and
   shrinks the next horizon by ``probe_shrink_on_reject``; an accepted one grows it by the inverse factor, up to
   ``jump_horizon`` without a probe and up to ``max_horizon − start_step`` with one (the probe decides how far);
6. on acceptance adds H to A and applies ``optimizer_policy`` (``keep`` or ``reset``);
7. logs the attempt to the trainer log and to ``relex_jumps.jsonl``.

The LR schedule, the data order and ``global_step`` follow real steps only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config import RelexConfig
from ..distributed import is_main_process
from ..math.core import TrajectoryFit
from .engine import Probe, RelexEngine, finite_or_none
from .report import backtest_section

__all__ = [
    "JUMP_LOG_NAME",
    "JumpController",
    "Probe",
    "generation_period",
    "reset_optimizer_state",
    "risky_settings",
]

logger = logging.getLogger(__name__)

JUMP_LOG_NAME = "relex_jumps.jsonl"
JUMP_STATE_VERSION = 1


def generation_period(args: Any) -> int:
    """Optimizer steps between two fresh generations of a TRL online trainer (GRPO, RLOO); 1 otherwise.

    TRL generates when its micro-step counter ``_step`` is a multiple of ``steps_per_generation ×
    num_iterations`` and reuses the buffered completions (and their old log-probs) in between; an optimizer
    step ends every ``gradient_accumulation_steps`` micro-steps. Both coincide every
    ``lcm(steps_per_generation·num_iterations, gradient_accumulation_steps) / gradient_accumulation_steps``
    optimizer steps, counted from the step at which ``train()`` started (``_step`` is not checkpointed).
    """
    per_generation = getattr(args, "steps_per_generation", None)
    if per_generation is None:
        return 1
    iterations = int(getattr(args, "num_iterations", 1) or 1)
    accumulation = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
    generate_every = int(per_generation) * iterations
    return math.lcm(generate_every, accumulation) // accumulation


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = optimizer.optimizer
        if inner is optimizer or inner is None:
            break
        optimizer = inner
    return optimizer


@torch.no_grad()
def reset_optimizer_state(optimizer: Any, params: Iterable[torch.nn.Parameter]) -> int:
    """Zero every state tensor of ``params`` (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``, ...).

    That is the state a freshly created optimizer would reach for those parameters (bias correction
    restarts with ``step`` 0). Other parameters are untouched. Returns the number of parameters reset.
    """
    state = _unwrap_optimizer(optimizer).state
    params = list(params)
    count = 0
    for param in params:
        entry = state.get(param)
        if not entry:
            continue
        for key, value in list(entry.items()):
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step" and isinstance(value, (int, float)):
                entry[key] = type(value)(0)
        count += 1
    if params and not count and len(state):
        logger.warning(
            "RELEX: optimizer_policy='reset' reset nothing: the optimizer holds state, but for none of the %d jumped "
            "parameters (it is keyed by other tensors, e.g. a wrapper's flat copies).", len(params),
        )
    return count


# Schedules whose learning rate does not decay with the (real) step count.
_STEADY_SCHEDULES = ("constant", "constant_with_warmup", "reduce_lr_on_plateau")


def risky_settings(args: Any, probe: Probe | None) -> list[str]:
    """Why these trainer ``args`` and ``probe`` make jump mode risky (``docs/jump-mode.md``); empty when none."""
    warnings = []
    if probe is None:
        warnings.append(
            "jump mode runs without a probe: every jump the backtest allows is kept, even one that makes the model "
            "worse. Pass probe=RewardProbe(heldout_prompts, reward_funcs, tokenizer) (or any probe(model) -> float) "
            "to reject such jumps."
        )
    schedule = getattr(args, "lr_scheduler_type", None)
    schedule = str(getattr(schedule, "value", schedule))
    if schedule not in _STEADY_SCHEDULES and schedule != "None":
        default = " (the transformers/TRL default)" if schedule == "linear" else ""
        warnings.append(
            f"lr_scheduler_type={schedule!r}{default} decays the learning rate over real steps, while each jump moves the "
            "weights ahead along the trajectory: after jumps the model trains at the learning rate of an earlier "
            "step than its weights belong to, and the fitted line assumed the learning rate of the window. Use "
            "lr_scheduler_type='constant' (or 'constant_with_warmup') with jump mode."
        )
    return warnings


class JumpController:
    """Schedule, virtual-step bookkeeping, horizon cap, probe guard and log of jump mode.

    It holds JSON-only state (``state_dict``), so that it survives checkpoint/resume both through the
    callback's safetensors sidecar and through ``trainer_state.json``.
    """

    def __init__(self, config: RelexConfig) -> None:
        self.config = config
        self.offset = 0  # A: sum of accepted horizons
        self.next_horizon = config.horizon
        self.record_every = config.snapshot_every
        self.next_jump_step = config.last_observed_step
        self.history: list[dict[str, Any]] = []
        self.generation_period = 1
        self.generation_origin = 0
        self.log_path: Path | None = None

    # -- bookkeeping ----------------------------------------------------------------------------------------

    def virtual_step(self, step: int) -> int:
        """v = s + A."""
        return int(step) + self.offset

    @property
    def accepted(self) -> list[dict[str, Any]]:
        return [r for r in self.history if r["status"] == "accepted"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": JUMP_STATE_VERSION,
            "offset": self.offset,
            "next_horizon": self.next_horizon,
            "record_every": self.record_every,
            "next_jump_step": self.next_jump_step,
            "history": list(self.history),
        }

    def load_state_dict(self, values: dict[str, Any], step: int | None = None) -> None:
        """Restore the bookkeeping; with ``step``, refuse a state that records jumps after that real step."""
        version = int(values.get("version", 0))
        if version != JUMP_STATE_VERSION:
            raise ValueError(f"saved jump-mode state has version {version}; this version reads {JUMP_STATE_VERSION}.")
        history = [dict(r) for r in values.get("history", [])]
        if step is not None and any(r["step"] > step for r in history):
            raise ValueError(
                f"saved jump-mode state records jumps after step {step}; it does not belong to this checkpoint."
            )
        self.history = history
        self.offset = int(values["offset"])
        self.next_horizon = int(values["next_horizon"])
        self.record_every = int(values["record_every"])
        self.next_jump_step = int(values["next_jump_step"])

    def restart(self, config: RelexConfig) -> None:
        """Start over with a new θ_0 (resume without a saved buffer): no offset, first jump after a new window."""
        self.__init__(config)

    # -- schedule -------------------------------------------------------------------------------------------

    def is_generation_boundary(self, step: int) -> bool:
        return (int(step) - self.generation_origin) % self.generation_period == 0

    def jump_due(self, step: int) -> bool:
        return step >= self.next_jump_step and self.is_generation_boundary(step)

    def should_record(self, step: int) -> bool:
        cfg = self.config
        if step <= cfg.start_step:
            return False
        return self.jump_due(step) or (step - cfg.start_step) % self.record_every == 0

    def begin(self, args: Any, state: Any, output_root: Path, probe: Probe | None = None) -> None:
        """Bind to a ``train()`` call: warn about risky settings, check the GRPO generation period and open the
        jump log."""
        cfg = self.config
        if is_main_process():
            for warning in risky_settings(args, probe):
                logger.warning("RELEX: %s", warning)
        self.generation_period = generation_period(args)
        self.generation_origin = int(state.global_step)
        period = self.generation_period
        if period > 1:
            where = (
                f"steps_per_generation={getattr(args, 'steps_per_generation', None)}, num_iterations="
                f"{getattr(args, 'num_iterations', 1)}, gradient_accumulation_steps={args.gradient_accumulation_steps}"
            )
            if cfg.jump_interval % period:
                raise ValueError(
                    f"jump_every={cfg.jump_interval} is not a multiple of the trainer's generation period of {period} "
                    f"optimizer steps ({where}): a jump would land while completions generated before it (and their old "
                    f"log-probs) are still being trained on. Use jump_every={period * max(1, round(cfg.jump_interval / period))}."
                )
            if (self.next_jump_step - self.generation_origin) % period:
                if state.global_step <= cfg.start_step:
                    good = cfg.observe + (-(cfg.last_observed_step - self.generation_origin)) % period
                    raise ValueError(
                        f"the first jump at step {cfg.last_observed_step} (start_step={cfg.start_step} + observe={cfg.observe}) "
                        f"is not a generation boundary of the trainer (every {period} optimizer steps from step "
                        f"{self.generation_origin}; {where}). Use observe={good}."
                    )
                logger.warning(
                    "RELEX: resumed at step %d, which is not on the generation grid of the interrupted run; jumps wait for "
                    "the next generation boundary (every %d steps from step %d).",
                    state.global_step, period, self.generation_origin,
                )
        self.log_path = Path(output_root) / JUMP_LOG_NAME
        if is_main_process():
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "w") as handle:  # a resumed run rewrites the jumps it restored
                for record in self.history:
                    handle.write(json.dumps(record) + "\n")

    # -- the step hook --------------------------------------------------------------------------------------

    def on_step_end(
        self, engine: RelexEngine, step: int, model: torch.nn.Module, probe: Probe | None = None, optimizer: Any = None,
        record: bool | None = None,
    ) -> dict[str, Any] | None:
        """Record the snapshot of real step ``step`` and jump (if due). ``record``: the adapter's schedule (its
        ``should_snapshot``), default :meth:`should_record`; a jump step always records, since the jump fits it.
        Returns the jump record, if any."""
        step = int(step)
        if step <= self.config.start_step:
            return None
        due = self.jump_due(step)
        if not (due or (self.should_record(step) if record is None else record)):
            return None
        self._record(engine, step)
        if not due:
            return None
        record = self._jump(engine, model, probe, optimizer, step)
        interval = self.config.jump_interval
        self.next_jump_step += interval * (1 + (step - self.next_jump_step) // interval)
        self._log(record)
        return record

    def _record(self, engine: RelexEngine, step: int) -> None:
        if engine.make_room() == "thinned":
            self.record_every *= 2
            logger.info(
                "RELEX: delta buffer full (%d snapshots); kept every other one, now recording every %d steps",
                engine.buffer.capacity, self.record_every,
            )
        engine.record(self.virtual_step(step))

    # -- the jump -------------------------------------------------------------------------------------------

    def horizon_cap(self, fit: TrajectoryFit, virtual: int) -> int | None:
        """Largest H the backtest supports at ``backtest_tolerance``: (supported ratio − 1)·(v − start_step)."""
        cfg = self.config
        if not cfg.auto_horizon or fit.backtest is None:
            return None
        supported = fit.backtest.supported_ratio(cfg.backtest_tolerance)
        if not math.isfinite(supported):
            return None
        return max(0, math.floor((supported - 1.0) * (virtual - cfg.start_step) + 1e-9))

    def horizon_ceiling(self, with_probe: bool) -> int:
        """Largest horizon an accepted jump grows the next one to: ``jump_horizon`` without a probe; with one, the
        probe decides how far (each accepted jump multiplies H by 1 / ``probe_shrink_on_reject``) up to
        ``max_horizon − start_step`` steps ahead (default 10·observe)."""
        cfg = self.config
        return max(cfg.horizon, cfg.max_horizon_step - cfg.start_step) if with_probe else cfg.horizon

    def accepts(self, before: float, after: float) -> bool:
        """The probe guard: reject a NaN score, or one below the pre-jump score minus ``probe_tolerance``."""
        return not (math.isnan(after) or (not math.isnan(before) and after < before - self.config.probe_tolerance))

    def _new_record(self, fit: TrajectoryFit, step: int, virtual: int, requested: int, cap: int | None) -> dict[str, Any]:
        cfg = self.config
        backtest = backtest_section(fit.backtest, cfg.backtest_tolerance)
        if backtest is not None:
            backtest = {k: finite_or_none(v) if k in ("distance", "supported_ratio") else v for k, v in backtest.items()}
        return {
            "jump": len(self.history),
            "step": step,
            "virtual_step": virtual,
            "status": "skipped",
            "horizon_requested": requested,
            "horizon_cap": cap,
            "horizon": 0,
            "virtual_step_after": virtual,
            "shrink": cfg.shrink,
            "anchor": cfg.jump_anchor,
            "fit": cfg.fit,
            "power": fit.tensors[0].trend.power if fit.tensors else None,
            "rank": cfg.rank,
            "snapshots": len(fit.steps),
            "fit_steps": [fit.steps[0], fit.steps[-1]] if fit.steps else [],
            "backtest": backtest,
            "probe_before": None,
            "probe_after": None,
            "optimizer_policy": cfg.optimizer_policy,
            "optimizer_params_reset": 0,
        }

    def _jump(self, engine: RelexEngine, model: torch.nn.Module, probe: Probe | None, optimizer: Any, step: int) -> dict[str, Any]:
        cfg = self.config
        virtual = self.virtual_step(step)
        requested = self.next_horizon
        started = time.perf_counter()
        fit = engine.fit([float(virtual + requested)], window=cfg.window)
        cap = self.horizon_cap(fit, virtual)
        horizon = requested if cap is None else min(requested, cap)
        record = self._new_record(fit, step, virtual, requested, cap)
        diagnostic = engine.diagnose(fit)  # recorded in the jump log; the cap above stays the backtest's
        record["diagnostic"] = {key: diagnostic.as_dict()[key] for key in (
            "supported_step", "supported_ratio", "growth_exponent", "direction_stability", "noise_share", "warnings")}
        if horizon < 1:
            bt = fit.backtest
            record["reason"] = (
                f"the backtest (distance {bt.distance:.3f} at {bt.ratio:.2f}x) supports less than one step at "
                f"backtest_tolerance={cfg.backtest_tolerance}"
            )
            record["fit_seconds"] = time.perf_counter() - started
            return record
        candidate = engine.candidate(fit, virtual + horizon, window=cfg.window, anchor=cfg.jump_anchor, start=virtual)
        record["horizon"] = horizon
        record["fit_seconds"] = time.perf_counter() - started
        prediction = engine.predict([candidate])[0]
        accepted = True
        probe_seconds = 0.0
        if probe is None:
            engine.load(prediction)
        else:
            t0 = time.perf_counter()
            before = engine.score(probe, model)
            try:
                _, chosen = engine.trial(
                    model, probe, [candidate], [prediction], lambda b, scores: 0 if self.accepts(b, scores[0]) else None,
                    before=before,
                )
            except Exception:
                logger.error(
                    "RELEX: the probe raised while scoring jump %d at step %d; the live weights were restored to the "
                    "pre-jump weights bit for bit and training stops with the probe's error.", len(self.history), step,
                )
                raise
            probe_seconds = time.perf_counter() - t0
            record["probe_before"], record["probe_after"] = before, candidate.score
            accepted = chosen == 0
            if not accepted:
                record["reason"] = (
                    f"probe score fell from {before:.4f} to {candidate.score:.4f} (probe_tolerance={cfg.probe_tolerance})"
                )
        del prediction
        record["probe_seconds"] = probe_seconds
        factor = cfg.probe_shrink_on_reject
        if accepted:
            self.offset += horizon
            record["status"] = "accepted"
            record["virtual_step_after"] = virtual + horizon
            if cfg.optimizer_policy == "reset" and optimizer is not None:
                record["optimizer_params_reset"] = reset_optimizer_state(optimizer, [t.param for t in engine.tracked])
            self.next_horizon = min(self.horizon_ceiling(probe is not None), max(1, math.ceil(self.next_horizon / factor - 1e-9)))
        else:
            record["status"] = "rejected"
            self.next_horizon = max(1, math.floor(self.next_horizon * factor))
        record["next_horizon"] = self.next_horizon
        return record

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if record["status"] == "accepted":
            probe = ("" if record["probe_before"] is None
                     else f", probe {record['probe_before']:.4f} -> {record['probe_after']:.4f}")
            logger.info(
                "RELEX: jump %d at step %d accepted: virtual step %d -> %d (H=%d, cap %s%s)",
                record["jump"], record["step"], record["virtual_step"], record["virtual_step_after"], record["horizon"],
                record["horizon_cap"], probe,
            )
        else:
            logger.warning("RELEX: jump %d at step %d %s: %s", record["jump"], record["step"], record["status"], record.get("reason"))
        if self.log_path is not None and is_main_process():
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def metrics(self, record: dict[str, Any]) -> dict[str, float]:
        """The ``relex/*`` scalars of a jump record for the trainer's loggers."""
        metrics = {
            "relex/jump_step": float(record["step"]),
            "relex/virtual_step": float(record["virtual_step_after"]),
            "relex/jump_horizon": float(record["horizon"] if record["status"] == "accepted" else 0),
            "relex/jump_horizon_requested": float(record["horizon_requested"]),
            "relex/jump_accepted": 1.0 if record["status"] == "accepted" else 0.0,
            "relex/jumps_accepted_total": float(len(self.accepted)),
            "relex/fit_seconds": float(record["fit_seconds"]),
        }
        if record["horizon_cap"] is not None:
            metrics["relex/horizon_cap"] = float(record["horizon_cap"])
        if record["backtest"] and record["backtest"]["distance"] is not None:
            metrics["relex/backtest_distance"] = record["backtest"]["distance"]
        if record["power"] is not None and self.config.fit == "power":
            metrics["relex/power"] = float(record["power"])
        for key in ("probe_before", "probe_after"):
            if record[key] is not None and math.isfinite(record[key]):
                metrics[f"relex/{key}"] = record[key]
        return metrics
