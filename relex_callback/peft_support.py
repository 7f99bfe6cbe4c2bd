"""LoRA/PEFT models: writing the extrapolated adapter and, optionally, a merged full model.

With a ``peft.PeftModel`` only the adapter tensors (``lora_A``/``lora_B``, plus any
``modules_to_save``) are trainable, so the callback tracks exactly those and extrapolates A and B
separately. ``PeftModel.save_pretrained(dir, state_dict=...)`` then writes a standard adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) from the predicted tensors.

The merged model (``merge_lora=True``) is computed from a full state dict, not from the live modules,
so it works the same on every parallel layout: W' = W + scaling · B̂ Â per LoRA ``Linear``
(transposed for ``fan_in_fan_out``). ``peft`` is imported only when a PEFT model is seen.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .distributed import clean_name, unwrap_model

__all__ = [
    "is_peft_model",
    "check_mergeable",
    "merged_state_dict",
    "LoraPair",
    "lora_pairs",
    "merged_delta_gram",
    "merged_delta_predictions",
]

logger = logging.getLogger(__name__)

_ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model inside a DDP/FSDP wrapper) is a ``peft.PeftModel``."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(unwrap_model(model), PeftModel)


def _lora_modules(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(clean_name(name), module) for name, module in unwrap_model(model).named_modules() if isinstance(module, LoraLayer)]


def check_mergeable(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless every LoRA layer is a plain ``lora.Linear`` (what :func:`merged_state_dict` merges)."""
    if not is_peft_model(model):
        raise ValueError("merge_lora needs a peft.PeftModel (a LoRA model); this model has no adapters.")
    from peft.tuners.lora import Linear

    unsupported = []
    for name, module in _lora_modules(model):
        if type(module) is not Linear:
            unsupported.append(f"{name} ({type(module).__name__})")
        elif any(module.use_dora.get(adapter, False) for adapter in module.active_adapters):
            unsupported.append(f"{name} (DoRA)")
    if unsupported:
        raise ValueError(
            f"merge_lora merges only plain LoRA Linear layers; unsupported: {unsupported[:5]}"
            f"{' ...' if len(unsupported) > 5 else ''}. Set merge_lora=False and merge the written adapter with "
            "peft's merge_and_unload()."
        )


@torch.no_grad()
def merged_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], lora_deltas: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The base model's state dict with the LoRA adapters in ``state`` merged into their base weights.

    ``state`` is the full PeftModel state dict (cleaned names, e.g. from
    :func:`~relex_callback.distributed.gather_state_dict`). Keys lose the ``base_model.model.`` prefix and
    the ``.base_layer`` segment; ``modules_to_save`` copies replace their originals; adapter keys are dropped.
    ``lora_deltas`` (module prefix → ``[d_out, d_in]``) replaces s·B A by a given total LoRA contribution
    (the merged-ΔW extrapolation of :func:`merged_delta_predictions`).
    """
    peft_model = unwrap_model(model)
    merged = dict(state)
    for name, module in _lora_modules(model):
        weight_key = f"{name}.base_layer.weight"
        weight = merged[weight_key].to(torch.float32)
        if lora_deltas is not None and name in lora_deltas:
            delta = lora_deltas[name].to(weight.device, torch.float32)
            merged[weight_key] = (weight + (delta.T if module.fan_in_fan_out else delta)).to(state[weight_key].dtype)
            continue
        for adapter in module.active_adapters:
            lora_a = merged.get(f"{name}.lora_A.{adapter}.weight")
            lora_b = merged.get(f"{name}.lora_B.{adapter}.weight")
            if lora_a is None or lora_b is None:
                continue
            delta = (lora_b.to(torch.float32) @ lora_a.to(torch.float32)) * float(module.scaling[adapter])
            weight = weight + (delta.T if module.fan_in_fan_out else delta)
        merged[weight_key] = weight.to(state[weight_key].dtype)
    prefix = "base_model.model."
    adapters = set(getattr(peft_model, "active_adapters", None) or ["default"])
    out: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}
    for key, value in merged.items():
        if any(marker in key for marker in _ADAPTER_MARKERS):
            continue
        base_key = key[len(prefix) :] if key.startswith(prefix) else key
        base_key = base_key.replace(".base_layer.", ".")
        if ".original_module." in base_key:
            originals[base_key.replace(".original_module.", ".")] = value
            continue
        if ".modules_to_save." in base_key:
            head, tail = base_key.split(".modules_to_save.", 1)
            adapter, rest = tail.split(".", 1)
            if adapter in adapters:
                out[f"{head}.{rest}"] = value
            continue
        out[base_key] = value
    for key, value in originals.items():
        out.setdefault(key, value)
    return out


# -- the merged-ΔW alternative ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraPair:
    """One LoRA module's tracked factors: A ``[r, d_in]``, B ``[d_out, r]`` and its scaling (alpha / r)."""

    prefix: str
    a_name: str
    b_name: str
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    scaling: float


def lora_pairs(model: torch.nn.Module) -> list[LoraPair]:
    """The (A, B) parameter pairs of every active adapter of every LoRA ``Linear`` (names as ``named_parameters``)."""
    pairs = []
    for name, module in unwrap_model(model).named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if lora_a is None or lora_b is None or not hasattr(module, "scaling"):
            continue
        for adapter in module.active_adapters:
            if adapter not in lora_a:
                continue
            a, b = lora_a[adapter].weight, lora_b[adapter].weight
            pairs.append(LoraPair(clean_name(name), f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight",
                                  tuple(a.shape), tuple(b.shape), float(module.scaling[adapter])))
    return pairs


def _factor_history(buffer: Any, name: str, shape: tuple[int, int], window: int | None) -> torch.Tensor:
    """``[T + 1, *shape]`` fp32: θ_0 then θ_t = θ_0 + Δ_t of every recorded (window) snapshot."""
    base = buffer.theta0[name].to(torch.float32)
    deltas = buffer.stack(name, window).to(torch.float32)
    return torch.cat([base[None], base[None] + deltas]).view(-1, *shape)


def merged_delta_gram(history_a: torch.Tensor, history_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Gram ``[T, T]`` (fp64) of the merged deltas D_t = s(B_t A_t − B_0 A_0), without forming any D_t.

    ⟨B_k A_k, B_l A_l⟩_F = Σ_ij (b_ki · b_lj)(a_ki · a_lj), so with the stacked columns of B and rows of A
    (``P = B̃ᵀB̃``, ``Q = ÃÃᵀ``, ``[(T+1)r, (T+1)r]``) the product Gram is a block sum of P ⊙ Q; the
    delta Gram follows by differencing against k = 0. Cost: (T+1)²r²(d_in + d_out), r× the factor Grams.
    """
    steps, rank, _ = history_a.shape
    stacked_a = history_a.reshape(steps * rank, -1).to(torch.float64)
    stacked_b = history_b.permute(0, 2, 1).reshape(steps * rank, -1).to(torch.float64)
    products = ((stacked_b @ stacked_b.T) * (stacked_a @ stacked_a.T)).view(steps, rank, steps, rank).sum((1, 3))
    products = products * scaling**2
    diff = torch.cat([-torch.ones(steps - 1, 1, dtype=torch.float64), torch.eye(steps - 1, dtype=torch.float64)], dim=1)
    return diff @ products @ diff.T


def merged_delta_predictions(
    buffer: Any,
    pairs: list[LoraPair],
    targets: list[float],
    rank: int = 1,
    kind: str = "linear",
    power: float | str = 1.0,
    origin: float = 0.0,
    window: int | None = None,
) -> dict[str, torch.Tensor]:
    """Extrapolate each LoRA module's merged update ΔW_t = s·B_t A_t directly (one process, full factors).

    Returns, per module prefix, ``[len(targets), d_out, d_in]`` fp32: the predicted total LoRA contribution
    s·B̂A at every target, to add to the frozen base weight. RELEX on ΔW is linear in the observed merged
    deltas, so its prediction Σ_t w_t ΔW_t has rank up to (T+1)·r: it can be written as a merged model
    (or an adapter of that rank), not as a rank-r adapter. Extrapolating A and B separately instead
    (the default) gives s·B̂Â, which is quadratic in the step and stays a rank-r adapter.
    """
    from .math.core import fit_trajectory, select_power

    steps = buffer.window_steps(window)
    grams, histories = [], {}
    for pair in pairs:
        history_a = _factor_history(buffer, pair.a_name, pair.a_shape, window)
        history_b = _factor_history(buffer, pair.b_name, pair.b_shape, window)
        histories[pair.prefix] = (history_a, history_b)
        grams.append((pair.prefix, merged_delta_gram(history_a, history_b, pair.scaling)))
    if power == "auto":
        power, _ = select_power([g for _, g in grams], steps, rank=rank, origin=origin)
    fit = fit_trajectory(grams, steps, targets, rank=rank, kind=kind, power=power, origin=origin)
    out = {}
    for pair, tensor_fit in zip(pairs, fit.tensors, strict=True):
        history_a, history_b = histories[pair.prefix]
        weights = tensor_fit.weights.to(torch.float64)  # [n, T] over D_1..D_T
        # s Σ_k c_k B_k A_k with c_0 = 1 − Σ_t w_t (the θ_0 term) and c_t = w_t
        coef = torch.cat([1.0 - weights.sum(1, keepdim=True), weights], dim=1).to(torch.float32)
        stacked_a = history_a.reshape(-1, history_a.shape[-1])  # [(T+1) r, d_in]
        predictions = []
        for row in coef:
            scaled_b = (history_b * row.view(-1, 1, 1)).permute(1, 0, 2).reshape(history_b.shape[1], -1)  # [d_out, (T+1) r]
            predictions.append(pair.scaling * scaled_b @ stacked_a)
        out[pair.prefix] = torch.stack(predictions)
    return out
