"""The validated input of an offline command: θ_0, the checkpoints in step order, the tracked tensors; the
checks of the offline options (their vocabulary is :mod:`relex_callback.options`)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..checkpoints import ModelDir, RelexInputError, discover_checkpoints, is_tied, open_model_dir, tied_output_embeddings, validate_trajectory
from ..options import TREND_KINDS, min_snapshots
from ..units import DTYPES

logger = logging.getLogger("relex_callback.offline")

DEFAULT_MAX_MEMORY = 1 << 30
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(value: int | str) -> int:
    """Bytes from ``2GiB``, ``1.5G``, ``512MB`` or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise RelexInputError(f"cannot read the size {value!r}; write e.g. 2GiB, 512MB or 1000000000")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()




@dataclass
class _Plan:
    """The validated input: θ_0, the snapshot rows (fit rows first), the streamed tensors."""

    base: ModelDir
    models: list[ModelDir]  # every checkpoint, sorted by step
    num_fit: int  # the first num_fit models span the subspace and the fit (step <= fit_steps)
    tracked: list[str]  # floating tensors streamed, in the base's order
    tied: dict[str, str]  # output embedding -> its (predicted) input embedding, when saved in the base
    config: dict[str, Any] | None
    tie_word_embeddings: bool = False

    @property
    def steps(self) -> list[int]:
        return [int(m.step) for m in self.models]  # type: ignore[arg-type]

    @property
    def fit_steps(self) -> list[int]:
        return self.steps[: self.num_fit]

    @property
    def origin(self) -> float:
        """x_0, the training step of θ_0: the trend's origin and the start of every horizon ratio."""
        return float(self.base.step)  # type: ignore[arg-type]


def _as_model_list(checkpoints: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    if isinstance(checkpoints, (str, os.PathLike)):
        return [checkpoints]
    return list(checkpoints)


def _prepare(
    base: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    steps: Sequence[int] | None,
    fit_steps: int | None,
    allow_pickle: bool,
    base_step: int | None = None,
) -> _Plan:
    """Open θ_0 and the checkpoints. θ_0's step x_0 is ``base_step``, else the step its directory name carries
    (``checkpoint-N``, ``global_step_N``, ...), else 0; every checkpoint must come after it."""
    if base_step is not None and (isinstance(base_step, bool) or not isinstance(base_step, int) or base_step < 0):
        raise RelexInputError(f"base_step={base_step!r} must be an int >= 0: the training step of the base model")
    base_model = open_model_dir(base, allow_pickle=allow_pickle)
    named = base_model.step
    base_model.step = base_step if base_step is not None else named if named is not None else 0
    if base_step is None and named:
        logger.info("the base %s is step %d (from its directory name; base_step=N sets another)", base_model.path, named)
    models = discover_checkpoints(_as_model_list(checkpoints), steps=steps, allow_pickle=allow_pickle)
    earlier = [m for m in models if m.step < base_model.step]  # type: ignore[operator]
    if earlier:
        raise RelexInputError(
            f"{earlier[0].path} is step {earlier[0].step}, before the base's step {base_model.step}: deltas are "
            "measured from θ_0 forward. Pass only checkpoints after the base, or set base_step=N to the base's "
            "training step"
        )
    base_path = base_model.path.resolve()
    if any(m.path.resolve() == base_path for m in models):
        raise RelexInputError(f"the base model {base_model.path} is also listed among the checkpoints")
    config = base_model.config
    if config is None:
        config = next((m.config for m in reversed(models) if m.config is not None), None)
    tied_flag = is_tied(config)
    if config is None:
        logger.warning("no config.json in the base or the checkpoints: every tensor is tracked as untied")
    shapes = {n: e.shape for n, e in base_model.tensors.items()}
    tied = tied_output_embeddings(base_model.tensors, shapes) if tied_flag else {}
    skip = set(tied)
    if tied_flag:  # a tied output embedding saved in some checkpoints only is a copy: ignore it
        for model in models:
            skip.update(tied_output_embeddings(list(model.tensors) + list(base_model.tensors)))
    if fit_steps is not None:
        num_fit = sum(1 for m in models if m.step <= fit_steps)  # type: ignore[operator]
        if num_fit == 0:
            raise RelexInputError(f"no checkpoint has a step <= --fit-steps {fit_steps} (steps: {_steps_text(models)})")
    else:
        num_fit = len(models)
    validate_trajectory(base_model, models, skip=skip)
    tracked = [n for n, e in base_model.tensors.items() if n not in skip and e.is_floating]
    if any(m.step == base_model.step for m in models):
        logger.warning("a checkpoint has step %d, the base's step: it is used as an ordinary snapshot", base_model.step)
    logger.info(
        "base %s (step %d); %d checkpoint(s) at steps %s (%d in the fit); %d tensors tracked%s",
        base_model.path,
        base_model.step,
        len(models),
        _steps_text(models),
        num_fit,
        len(tracked),
        f"; tied: {', '.join(f'{k} = {v}' for k, v in tied.items())}" if tied else "",
    )
    return _Plan(base=base_model, models=models, num_fit=num_fit, tracked=tracked, tied=tied, config=config,
                 tie_word_embeddings=tied_flag)


def _steps_text(models: Sequence[ModelDir]) -> str:
    steps = [str(m.step) for m in models]
    return ", ".join(steps) if len(steps) <= 12 else ", ".join(steps[:5] + ["..."] + steps[-3:])


def _check_common(rank: int, fit: str, window: int | None, num_workers: int | None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RelexInputError(f"rank={rank!r} must be an int >= 1")
    if fit not in TREND_KINDS:
        raise RelexInputError(f"fit={fit!r} is not supported; use one of {', '.join(TREND_KINDS)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 2):
        raise RelexInputError(f"window={window!r} must be an int >= 2 (the last W snapshots of the fit)")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
        raise RelexInputError(f"num_workers={num_workers!r} must be an int >= 1")


def _check_counts(plan: _Plan, rank: int, fit: str, window: int | None) -> int:
    """The number of snapshots W the trend is fitted on; raises when there are too few."""
    if len(plan.models) < 2 or plan.num_fit < 2:
        raise RelexInputError(
            f"need at least 2 checkpoints to fit a trend, got {plan.num_fit} (step "
            f"{_steps_text(plan.models[: max(plan.num_fit, 1)])})"
            + (f" of the {len(plan.models)} found: raise --fit-steps (fit_steps) to include more"
               if plan.num_fit != len(plan.models) else
               ": give --checkpoints (checkpoints) two or more checkpoint directories, or a folder holding them")
        )
    used = plan.num_fit if window is None else min(window, plan.num_fit)
    needed = min_snapshots(rank, fit)
    if used < needed:
        raise RelexInputError(
            f"{used} snapshot(s) to fit" + (f" (window={window})" if window is not None else "")
            + f" are too few for rank={rank} and fit={fit!r}: need at least {needed}. "
            "Give more checkpoints, widen the window or lower the rank."
        )
    return used


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise RelexInputError(f"dtype={dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise RelexInputError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def _check_targets(target_steps: Sequence[int] | int, what: str = "target step", minimum: int | None = None) -> list[int]:
    """The target steps as a list of distinct ints, each ``>= minimum`` when given."""
    targets = [target_steps] if isinstance(target_steps, int) else list(target_steps)
    if not targets:
        raise RelexInputError(f"give at least one {what}")
    for target in targets:
        if isinstance(target, bool) or not isinstance(target, int):
            raise RelexInputError(f"{what} {target!r} must be an int")
        if minimum is not None and target < minimum:
            raise RelexInputError(f"{what} {target} is not a training step: give a step >= {minimum}, after the last "
                                  "checkpoint to extrapolate")
    if len(set(targets)) != len(targets):
        raise RelexInputError(f"duplicate {what}s: {targets}")
    return targets
