"""`RelexConfig`: every setting of the callback, validated when it is built."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .export import check_output_location
from .options import (
    CANDIDATE_FAMILIES,
    BUFFER_DEVICES,
    BUFFER_DTYPES,
    DEFAULT_BACKTEST_TOLERANCE,
    JUMP_ANCHORS,
    MODES,
    OPTIMIZER_POLICIES,
    POWER_GRID,
    TREND_KINDS,
    check_int,
    min_snapshots,
    power_error,
    shrink_error,
)

__all__ = ["RelexConfig", "BUFFER_DTYPES", "BUFFER_DEVICES", "MODES", "OPTIMIZER_POLICIES", "JUMP_ANCHORS", "POWER_GRID"]


def _help(text: str, default: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class RelexConfig:
    """Settings of :class:`~relex_callback.RelexCallback` (paper symbols in brackets).

    Args:
        observe (`int`, defaults to `50`): length of the observation window in optimizer steps [N].
            Snapshots are taken at ``start_step + snapshot_every``, ..., ``start_step + observe``.
        extrapolate_to (`int`, `list[int]` or `"auto"`, *optional*): absolute ``global_step`` target(s) [K] of the
            halt-mode prediction; one model directory is written per target. Required in halt mode. ``"auto"``
            takes the supported horizon K_max of the window diagnostic (``docs/choosing-a-horizon.md``); with a
            probe, the best of the candidates up to K_max, never below the trained weights. An explicit target
            beyond K_max is still written, with a warning, and the K_max model is written beside it.
        mode (`str`, defaults to `"halt"`): ``"halt"`` fits once at the end of the window, writes the
            extrapolated model(s) and stops training. ``"jump"`` keeps training and moves the live weights
            ``jump_horizon`` (virtual) steps ahead along the fitted trajectory at step ``start_step + observe``
            and every ``jump_every`` steps after it (see ``docs/jump-mode.md``).
        start_step (`int`, defaults to `0`): global step whose weights are θ_0.
        snapshot_every (`int`, defaults to `1`): record every n-th step of the window; the regression uses
            the real step numbers, so sparse snapshots predict the same line.
        rank (`int`, defaults to `1`): number of singular directions kept per tensor [r].
        fit (`str`, defaults to `"linear"`): trend of the coefficients c_t: ``"linear"`` (the paper),
            ``"power"`` (c = a + b·(t − start_step)^p) or ``"poly2"``.
        power (`float` or `"auto"`, defaults to `1.0`): the exponent p of the ``"power"`` trend. ``"auto"``
            picks p from ``POWER_GRID`` (0.3 ... 1.0) by the smallest Gram-only backtest distance at every fit.
        window (`int`, *optional*): fit on the last ``window`` snapshots only (default: all). In jump mode the
            buffer then keeps a rolling window of that many snapshots.
        shrink (`float`, defaults to `1.0`): scale λ ∈ (0, 1] of the predicted displacement beyond the last
            observed weights: θ = θ_N + λ(θ̂(K) − θ_N).
        buffer_dtype (`str`, defaults to `"bfloat16"`): dtype of the stored deltas (``"bfloat16"``,
            ``"float16"`` or ``"float32"``). θ_0 is always kept exactly, in float32.
        buffer_device (`str`, defaults to `"auto"`): ``"param"`` keeps the buffer on each parameter's device,
            ``"cpu"`` in host memory (pinned when CUDA is present), ``"auto"`` picks ``"param"`` when the
            parameters are on a GPU and the buffer fits in ``buffer_max_bytes`` (default: half the free GPU
            memory), else ``"cpu"``. ``"disk"`` appends every snapshot once to an append-only file in ``store_dir``
            (host memory: θ_0, one staging row and a fixed read block, whatever the window; checkpoints then
            reference the stored rows instead of copying them; see ``relex_callback/store.py``).
        buffer_max_bytes (`int`, *optional*): memory budget of the buffer; the default is half the free memory
            of the chosen device (GPU) or 80% of the available host memory (CPU). Training refuses to start
            when the buffer would not fit.
        store_dir (`str` or `os.PathLike`, *optional*): with ``buffer_device="disk"``, the folder of the delta
            store (one θ_0 file and one deltas file per process); default ``{args.output_dir}/relex-store``. It
            must stay in place until the run has resumed for the last time: checkpoints point into it.
        include (`list[str]`, *optional*): regular expressions; track only parameters whose name matches one.
        exclude (`list[str]`, *optional*): regular expressions; never track parameters whose name matches one.
        output_dir (`str` or `os.PathLike`, *optional*): folder of the ``relex-step{K}`` model directories
            (default: the trainer's ``args.output_dir``); a path that is or lies under a file is refused here.
        overwrite (`bool`, defaults to `False`): replace existing non-empty output directories.
        save_model (`bool`, defaults to `True`): write the extrapolated model directories (halt mode).
        merge_lora (`bool` or `str`, defaults to `False`): with a LoRA ``PeftModel``, also write a merged full
            model ``relex-step{K}-merged/`` next to the adapter directory ``relex-step{K}/``. ``True`` (or
            ``"factors"``) merges the extrapolated factors, W + s·B̂Â; ``"delta"`` instead extrapolates each
            module's merged update ΔW_t = s·B_t A_t (its Gram comes from the stored factors, r× the factor
            Gram cost) and writes W + ΔŴ, which no rank-r adapter can hold: the adapter directory and the live
            model keep the factor prediction. ``"delta"`` needs one process.
        backtest_tolerance (`float`, defaults to `0.75`): largest acceptable relative distance
            ||θ̂ − θ|| / ||θ − θ_0|| of the in-window backtest; targets beyond the horizon it supports
            get a warning (halt mode) or cap the jump horizon (jump mode with ``auto_horizon``).
        jump_every (`int`, *optional*): jump mode: real optimizer steps J between jumps (default: ``observe``).
        jump_horizon (`int`, *optional*): jump mode: steps H each jump moves ahead of the current virtual step
            (default: ``jump_every``).
        max_snapshots (`int`, *optional*): jump mode: capacity of the delta buffer in snapshots (default:
            ``window`` if set, else ``observe // snapshot_every``). Without ``window`` a full buffer is thinned
            (every other snapshot dropped, recording interval doubled), so it always spans the trajectory since
            θ_0; with ``window`` the oldest snapshot is dropped.
        auto_horizon (`bool`, defaults to `True`): jump mode: cap each horizon at the largest H the backtest
            supports at ``backtest_tolerance``; a jump whose cap is below one step is skipped.
        optimizer_policy (`str`, defaults to `"keep"`): jump mode: what happens to the optimizer state of the
            jumped parameters after an accepted jump: ``"keep"`` leaves it, ``"reset"`` zeroes every state
            tensor (Adam's exp_avg / exp_avg_sq) and its ``step``, as a fresh optimizer would have it. Moments are
            never extrapolated. ``"reset"`` is refused under DeepSpeed ZeRO, whose optimizer state belongs to flat
            partitions shared by many parameters.
        probe_tolerance (`float`, defaults to `0.0`): jump mode: a jump is rejected (weights restored
            bit-for-bit) when the probe score after it is below the score before it minus this tolerance.
        probe_shrink_on_reject (`float`, defaults to `0.5`): jump mode: factor in (0, 1) applied to the next
            horizon after a rejected jump; each accepted jump grows it back by the same factor, up to
            ``jump_horizon`` without a probe and up to ``max_horizon − start_step`` with one.
        jump_anchor (`str`, defaults to `"fit"`): jump mode: where a jump lands. ``"fit"`` is the paper's
            prediction θ̂(v + H) = θ_0 + ĉ(v + H)·v, which drops the part of the current weights off the fitted
            rank-r line; ``"current"`` keeps the current weights and adds the predicted progress along the line,
            θ + (ĉ(v + H) − ĉ(v))·v. ``shrink`` scales the move in both cases.
        allow_worse (`bool`, defaults to `False`): halt mode with a probe: load the best-scoring candidate even
            when it scores below the current weights (by default the current weights are then kept).
        candidates (`list[str]`, *optional*): halt mode: prediction families written for every target and, with a
            probe, competing for it: ``"trend"`` (the configured ``fit``, the paper's line by default), ``"sqrt"``
            (rank r with c = a + b·√(t − start_step)) and ``"scale"`` (θ_0 + √(K/N)·(θ_N − θ_0), magnitude scaling
            with no direction fit). Default ``["trend"]``; ``["trend", "sqrt", "scale"]`` when
            ``extrapolate_to="auto"`` and a probe is given.
        max_horizon (`int`, *optional*): the farthest global step a probe may choose (default ``start_step +
            10·observe``). Halt mode with ``extrapolate_to="auto"`` and a probe: the reward-guided search climbs a
            ladder of targets up to it for every candidate family (``docs/choosing-a-horizon.md``); without a probe
            it is unused (the target is K_max). Jump mode with a probe: accepted jumps grow the horizon up to
            ``max_horizon − start_step`` steps ahead.
        probe_margin (`float`, *optional*): the horizon search stops a family once its probe score falls below the
            best so far by more than this; default one standard error of the probe's per-prompt scores
            (``RewardProbe`` has them; 0 for a probe that returns only a number).
    """

    observe: int = _help("Observation window N in optimizer steps.", 50)
    extrapolate_to: int | list[int] | None = _help("Target global step(s) K of the halt-mode prediction.", None)
    mode: str = _help("'halt' (fit once, write, stop) or 'jump'.", "halt")
    start_step: int = _help("Global step whose weights are θ_0.", 0)
    snapshot_every: int = _help("Record every n-th step of the window.", 1)
    rank: int = _help("Singular directions kept per tensor (r).", 1)
    fit: str = _help("Coefficient trend: 'linear', 'power' or 'poly2'.", "linear")
    power: float = _help("Exponent p of the 'power' trend.", 1.0)
    window: int | None = _help("Fit on the last W snapshots only.", None)
    shrink: float = _help("λ: scale of the predicted move beyond the last observed weights.", 1.0)
    buffer_dtype: str = _help("Stored delta dtype: bfloat16, float16 or float32.", "bfloat16")
    buffer_device: str = _help("'auto', 'cpu', 'param' or 'disk' (an append-only delta store in store_dir).", "auto")
    buffer_max_bytes: int | None = _help("Memory budget of the delta buffer in bytes.", None)
    store_dir: str | None = _help("buffer_device='disk': folder of the delta store (default: {args.output_dir}/relex-store).", None)
    include: list[str] | None = _help("Regexes of parameter names to track.", None)
    exclude: list[str] | None = _help("Regexes of parameter names never to track.", None)
    output_dir: str | os.PathLike | None = _help("Folder of the relex-step{K} directories (default: args.output_dir).", None)
    overwrite: bool = _help("Replace existing non-empty output directories.", False)
    save_model: bool = _help("Write the extrapolated model directories.", True)
    merge_lora: bool | str = _help("LoRA: also write relex-step{K}-merged/ (True/'factors' or 'delta').", False)
    backtest_tolerance: float = _help("Largest acceptable backtest distance before warning.", DEFAULT_BACKTEST_TOLERANCE)
    jump_every: int | None = _help("Jump mode: real steps J between jumps (default: observe).", None)
    jump_horizon: int | None = _help("Jump mode: steps H each jump moves ahead (default: jump_every).", None)
    max_snapshots: int | None = _help("Jump mode: delta-buffer capacity in snapshots.", None)
    auto_horizon: bool = _help("Jump mode: cap the horizon by the backtest at backtest_tolerance.", True)
    optimizer_policy: str = _help("Jump mode: 'keep' or 'reset' the optimizer state of jumped parameters.", "keep")
    probe_tolerance: float = _help("Jump mode: largest probe-score drop a jump may cause.", 0.0)
    probe_shrink_on_reject: float = _help("Jump mode: factor on the next horizon after a rejected jump.", 0.5)
    jump_anchor: str = _help("Jump mode: 'fit' (θ_0 + ĉ(v+H)·v, the paper) or 'current' (θ + (ĉ(v+H) − ĉ(v))·v).", "fit")
    allow_worse: bool = _help("Halt mode with a probe: load the best candidate even if below the current weights.", False)
    candidates: list[str] | None = _help("Halt mode: prediction families 'trend', 'sqrt', 'scale' (default ['trend']).", None)
    max_horizon: int | None = _help("Farthest global step a probe may choose (default start_step + 10·observe).", None)
    probe_margin: float | None = _help("Score drop below the best so far that stops the horizon search (default: 1 SE).", None)

    def __post_init__(self) -> None:
        self._check_int("observe", minimum=1)
        self._check_int("start_step", minimum=0)
        self._check_int("snapshot_every", minimum=1)
        self._check_int("rank", minimum=1)
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; use one of {MODES}.")
        if self.observe % self.snapshot_every:
            raise ValueError(
                f"observe={self.observe} is not a multiple of snapshot_every={self.snapshot_every}: the last "
                f"observed step must be a snapshot. Use e.g. observe={self.observe - self.observe % self.snapshot_every or self.snapshot_every}."
            )
        if self.fit not in TREND_KINDS:
            raise ValueError(f"fit={self.fit!r} is not supported; use one of {TREND_KINDS}.")
        problem = power_error(self.power, self.fit)
        if problem:
            raise ValueError(problem)
        if self.window is not None:
            self._check_int("window", minimum=2)
        needed = min_snapshots(self.rank, self.fit)
        if self.num_fit_snapshots < needed:
            raise ValueError(
                f"observe={self.observe} with snapshot_every={self.snapshot_every}"
                + (f" and window={self.window}" if self.window is not None else "")
                + f" gives {self.num_fit_snapshots} snapshots to fit, too few for rank={self.rank} and fit={self.fit!r}: "
                f"need at least {needed}. Increase observe (or the window) or lower rank."
            )
        problem = shrink_error(self.shrink)
        if problem:
            raise ValueError(problem + ".")
        if self.buffer_dtype not in BUFFER_DTYPES:
            raise ValueError(f"buffer_dtype={self.buffer_dtype!r} is not supported; use one of {BUFFER_DTYPES}.")
        if self.buffer_device not in BUFFER_DEVICES:
            raise ValueError(f"buffer_device={self.buffer_device!r} is not supported; use one of {BUFFER_DEVICES}.")
        if self.buffer_max_bytes is not None:
            self._check_int("buffer_max_bytes", minimum=1)
        if isinstance(self.store_dir, os.PathLike):
            self.store_dir = os.fspath(self.store_dir)
        if self.store_dir is not None and not isinstance(self.store_dir, str):
            raise TypeError(f"store_dir must be a str or os.PathLike path, got {type(self.store_dir).__name__}.")
        if self.store_dir is not None and self.buffer_device != "disk":
            raise ValueError(f"store_dir={self.store_dir!r} is the folder of the disk delta store; pass "
                             f"buffer_device='disk' with it, or drop store_dir (buffer_device={self.buffer_device!r}).")
        self.include = self._check_patterns("include")
        self.exclude = self._check_patterns("exclude")
        if self.output_dir is not None:
            if not isinstance(self.output_dir, (str, os.PathLike)):
                raise TypeError(f"output_dir must be a str or os.PathLike path, got {type(self.output_dir).__name__}.")
            self.output_dir = os.fspath(self.output_dir)  # a str keeps the config JSON-friendly
            check_output_location(self.output_dir, "output_dir")
        if not (isinstance(self.merge_lora, bool) or self.merge_lora in ("factors", "delta")):
            raise TypeError(f"merge_lora={self.merge_lora!r} must be False, True, 'factors' or 'delta'.")
        for name in ("overwrite", "save_model"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False.")
        if isinstance(self.backtest_tolerance, bool) or not isinstance(self.backtest_tolerance, (int, float)) or not self.backtest_tolerance > 0:
            raise ValueError(f"backtest_tolerance={self.backtest_tolerance!r} must be a number > 0.")
        self._check_jump_options()
        self.extrapolate_to = self._check_targets()
        self.candidates = self._check_candidates()
        self._check_search_options()

    def _check_search_options(self) -> None:
        if self.max_horizon is not None:
            self._check_int("max_horizon", minimum=0)
            if self.max_horizon <= self.last_observed_step:
                raise ValueError(
                    f"max_horizon={self.max_horizon} is not beyond the observation window, which ends at step "
                    f"{self.last_observed_step}: it is the farthest global step the probe may choose. Pass e.g. "
                    f"max_horizon={self.start_step + 10 * self.observe} (10x the window), or leave it unset.")
            if self.mode == "halt" and not self.auto_target:
                raise ValueError(
                    f"max_horizon={self.max_horizon} caps the reward-guided search of extrapolate_to='auto', but "
                    f"extrapolate_to={self.extrapolate_to!r} names its targets. Drop max_horizon, or pass "
                    "extrapolate_to='auto' with a probe.")
        margin = self.probe_margin
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not math.isfinite(margin) or margin < 0):
            raise ValueError(f"probe_margin={margin!r} must be a number >= 0 (or None: one standard error of the "
                             "probe's per-prompt scores).")

    def _check_jump_options(self) -> None:
        jump_only = ("jump_every", "jump_horizon", "max_snapshots")
        if self.mode != "jump":
            for name in jump_only:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)!r} is a jump-mode option; pass mode='jump' or drop it.")
        for name in ("jump_every", "jump_horizon"):
            if getattr(self, name) is not None:
                self._check_int(name, minimum=1)
        if self.max_snapshots is not None:
            self._check_int("max_snapshots", minimum=2)
            needed = min_snapshots(self.rank, self.fit)
            if self.max_snapshots < needed:
                raise ValueError(
                    f"max_snapshots={self.max_snapshots} is too few for rank={self.rank} and fit={self.fit!r}: "
                    f"need at least {needed}."
                )
            if self.window is not None and self.max_snapshots < self.window:
                raise ValueError(
                    f"max_snapshots={self.max_snapshots} is smaller than window={self.window}: the buffer could not "
                    f"hold the fit window. Use max_snapshots >= {self.window} or leave it unset."
                )
        for name in ("auto_horizon", "allow_worse"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.optimizer_policy not in OPTIMIZER_POLICIES:
            raise ValueError(
                f"optimizer_policy={self.optimizer_policy!r} is not supported; use one of {OPTIMIZER_POLICIES} "
                "(optimizer moments are never extrapolated)."
            )
        if self.jump_anchor not in JUMP_ANCHORS:
            raise ValueError(f"jump_anchor={self.jump_anchor!r} is not supported; use one of {JUMP_ANCHORS}.")
        tol = self.probe_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"probe_tolerance={tol!r} must be a number >= 0 (0 rejects any drop of the probe score).")
        factor = self.probe_shrink_on_reject
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
            raise ValueError(
                f"probe_shrink_on_reject={factor!r} must be in (0, 1): the next horizon after a rejected jump is "
                "multiplied by it (e.g. 0.5 halves it)."
            )

    # -- helpers -------------------------------------------------------------------------------------------

    def _check_int(self, name: str, minimum: int) -> None:
        check_int(name, getattr(self, name), minimum)

    def _check_patterns(self, name: str) -> list[str] | None:
        value = getattr(self, name)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
            raise TypeError(f"{name} must be a list of regular-expression strings, got {value!r}.")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{name} pattern {pattern!r} is not a valid regular expression: {err}.") from None
        return list(value)

    def _check_candidates(self) -> list[str] | None:
        value = self.candidates
        if value is None:
            return None
        if self.mode == "jump":
            raise ValueError(f"candidates={value!r} is a halt-mode option; jump mode always follows the fitted trend. "
                             "Drop candidates or use mode='halt'.")
        kinds = [value] if isinstance(value, str) else value
        if not isinstance(kinds, (list, tuple)) or not kinds or any(k not in CANDIDATE_FAMILIES for k in kinds):
            raise ValueError(f"candidates={value!r} must be a non-empty list drawn from {CANDIDATE_FAMILIES}.")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"candidates={value!r} lists a family twice.")
        return list(kinds)

    @property
    def auto_target(self) -> bool:
        """``extrapolate_to="auto"``: the target is the window diagnostic's supported horizon."""
        return self.extrapolate_to == "auto"

    def _check_targets(self) -> list[int] | str | None:
        value = self.extrapolate_to
        if isinstance(value, str) and value == "auto":
            if self.mode == "jump":
                raise ValueError("extrapolate_to='auto' is a halt-mode option; jump mode caps each jump by the backtest "
                                 "(auto_horizon). Drop extrapolate_to or use mode='halt'.")
            return "auto"
        if isinstance(value, (list, tuple)) and "auto" in value:
            raise ValueError(f"extrapolate_to={value!r}: 'auto' picks the target itself and cannot be part of a list; "
                             "pass extrapolate_to='auto' alone, or a list of steps.")
        if isinstance(value, str):
            raise TypeError(f"extrapolate_to={value!r} must be an int, a non-empty list of ints or 'auto'.")
        if self.mode == "jump" and value is not None:
            raise ValueError(
                f"extrapolate_to={value!r} is a halt-mode option; jump mode moves jump_horizon steps ahead at every "
                "jump. Drop extrapolate_to or use mode='halt'."
            )
        if value is None:
            if self.mode == "halt":
                raise ValueError(
                    "extrapolate_to is required in halt mode: pass extrapolate_to='auto' (the horizon the window "
                    "supports) or a target step K, e.g. "
                    f"RelexCallback(observe={self.observe}, extrapolate_to={self.last_observed_step * 2})."
                )
            return None
        targets = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(targets, (list, tuple)) or not targets:
            raise TypeError(f"extrapolate_to must be an int or a non-empty list of ints, got {value!r}.")
        for target in targets:
            if isinstance(target, bool) or not isinstance(target, int):
                raise TypeError(f"extrapolate_to must contain ints (global steps), got {target!r}.")
            if target <= self.last_observed_step:
                raise ValueError(
                    f"extrapolate_to={target} is not after the observation window, which ends at step "
                    f"{self.last_observed_step} (start_step={self.start_step} + observe={self.observe}). "
                    f"Pass a target > {self.last_observed_step}."
                )
        if len(set(targets)) != len(targets):
            raise ValueError(f"extrapolate_to has duplicate steps: {list(targets)}.")
        return list(targets)

    # -- derived values -------------------------------------------------------------------------------------

    @property
    def last_observed_step(self) -> int:
        """Global step of the last snapshot of the first window (start_step + observe)."""
        return self.start_step + self.observe

    @property
    def max_horizon_step(self) -> int:
        """The farthest global step a probe may choose: ``max_horizon``, default ``start_step + 10·observe``."""
        return self.max_horizon if self.max_horizon is not None else self.start_step + 10 * self.observe

    @property
    def num_snapshots(self) -> int:
        """T: snapshots in the observation window."""
        return self.observe // self.snapshot_every

    @property
    def num_fit_snapshots(self) -> int:
        return self.num_snapshots if self.window is None else min(self.window, self.num_snapshots)

    @property
    def jump_interval(self) -> int:
        """J: real optimizer steps between jumps (``jump_every``, default ``observe``)."""
        return self.jump_every if self.jump_every is not None else self.observe

    @property
    def horizon(self) -> int:
        """H: steps each jump moves ahead of the current virtual step (``jump_horizon``, default J)."""
        return self.jump_horizon if self.jump_horizon is not None else self.jump_interval

    @property
    def buffer_capacity(self) -> int:
        """Snapshots the delta buffer holds: T in halt mode; ``max_snapshots`` / ``window`` / T in jump mode."""
        if self.mode != "jump":
            return self.num_snapshots
        if self.max_snapshots is not None:
            return self.max_snapshots
        return self.window if self.window is not None else self.num_snapshots

    @property
    def snapshot_steps(self) -> list[int]:
        return [self.start_step + k * self.snapshot_every for k in range(1, self.num_snapshots + 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RelexConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown RelexConfig option(s) {unknown}; valid options are {sorted(known)}.")
        return cls(**values)
