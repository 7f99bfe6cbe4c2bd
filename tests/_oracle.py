"""The one independent RELEX oracle, the one weight-capture callback and the NaN-injecting callback of the test suite.

Nothing here imports ``relex_callback``: predictions come from ``torch.linalg.svd`` of the stacked deltas and a
least-squares polynomial (``numpy.polyfit``) of the coefficients c = M v on the given step axis.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import TrainerCallback


def oracle_prediction(deltas: torch.Tensor, steps: Sequence[float], target: float, rank: int = 1, degree: int = 1) -> torch.Tensor:
    """Δ̂(target) = Σ_i ĉ_i(target) v_i of a ``[T, d]`` delta stack (fp64; σ_i ≤ 1e-6·σ_1 dropped)."""
    m = deltas.double()
    out = torch.zeros(m.shape[1], dtype=torch.float64)
    if not torch.count_nonzero(m):
        return out
    _, s_vals, vh = torch.linalg.svd(m, full_matrices=False)
    for i in range(min(rank, vh.shape[0])):
        if s_vals[i] <= 1e-6 * s_vals[0]:
            continue
        c = (m @ vh[i]).numpy()
        out += float(np.polyval(np.polyfit(np.asarray(steps, dtype=np.float64), c, degree), target)) * vh[i]
    return out


def oracle(weights, base_step, steps, target, rank=1, round_to=None, x=None, degree=1, power=None):
    """θ_0 + Σ ĉ_i(K) v_i per tensor of ``weights[step][name]``; the trend is fitted on ``x`` (default: ``steps``).

    ``round_to`` rounds the deltas to a storage dtype first (as a compact delta buffer does); ``power`` fits the
    line on (x − base_step)^power instead of x (the trend c = a + b·t^p)."""
    x = list(steps if x is None else x)
    if power is not None:
        x, target = [(s - base_step) ** power for s in x], (target - base_step) ** power
    out = {}
    for name, base in weights[base_step].items():
        m = torch.stack([(weights[s][name] - base).reshape(-1) for s in steps])
        m = (m.to(round_to) if round_to is not None else m).double()
        pred = oracle_prediction(m, x, target, rank=rank, degree=degree)
        out[name] = (base.double().reshape(-1) + pred).reshape(base.shape)
    return out


def max_diff(actual, expected) -> float:
    return max(float((actual[n].double() - expected[n].double()).abs().max()) for n in expected)


class CaptureWeights(TrainerCallback):
    """Independent record of trainable tensors (clones), keyed by global step.

    ``weights`` (also ``post``): at ``on_train_begin`` and at every ``on_step_end``, i.e. after the
    ``on_step_end`` of the callbacks listed before this one; with ``pre=True`` also ``pre``: right after every
    optimizer step, before any ``on_step_end``; ``logs``: every ``on_log``; with ``with_optimizer`` the optimizer
    state at both points (``opt_pre``, ``opt_post``). ``dtype`` casts the clones (``None`` keeps the parameter
    dtype); ``names`` limits the tensors.
    """

    def __init__(self, pre: bool = False, with_optimizer: bool = False, dtype: torch.dtype | None = torch.float32, names=None):
        self.weights, self.pre, self.opt_pre, self.opt_post, self.logs = {}, {}, {}, {}, []
        self.post = self.weights
        self.with_pre, self.with_optimizer, self.dtype, self.names = pre, with_optimizer, dtype, names

    def grab(self, model):
        chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (self.names is None or n in self.names)]
        if self.dtype is None:
            return {n: p.detach().clone() for n, p in chosen}
        return {n: p.detach().to(self.dtype).clone() for n, p in chosen}

    @staticmethod
    def grab_optimizer(model, optimizer):
        state = getattr(optimizer, "optimizer", optimizer).state
        return {n: {k: v.detach().clone() for k, v in state[p].items()} for n, p in model.named_parameters() if p in state}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = self.grab(model)
        if self.with_pre:
            self.pre.setdefault(state.global_step, self.weights[state.global_step])

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.with_pre:
            self.pre[state.global_step + 1] = self.grab(model)
            if self.with_optimizer:
                self.opt_pre[state.global_step + 1] = self.grab_optimizer(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights[state.global_step] = self.grab(model)
        if self.with_optimizer:
            self.opt_post[state.global_step] = self.grab_optimizer(model, optimizer)


class PoisonAt(TrainerCallback):
    """Writes a NaN into one weight right after the optimizer step that ends at global step ``step``."""

    def __init__(self, step, name):
        self.step, self.name = step, name

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                dict(model.named_parameters())[self.name].view(-1)[0] = float("nan")
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}
