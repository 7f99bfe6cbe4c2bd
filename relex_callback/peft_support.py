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
from typing import Any

import torch

from .distributed import clean_name, unwrap_model

__all__ = ["is_peft_model", "check_mergeable", "merged_state_dict", "merged_dir_name"]

logger = logging.getLogger(__name__)

_ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model inside a DDP/FSDP wrapper) is a ``peft.PeftModel``."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(unwrap_model(model), PeftModel)


def merged_dir_name(target: int) -> str:
    return f"relex-step{target}-merged"


def _lora_modules(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(clean_name(name), module) for name, module in unwrap_model(model).named_modules() if isinstance(module, LoraLayer)]


def check_mergeable(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless every LoRA layer is a plain ``lora.Linear`` (what :func:`merged_state_dict` merges)."""
    if not is_peft_model(model):
        raise ValueError("merge_lora=True needs a peft.PeftModel (a LoRA model); this model has no adapters.")
    from peft.tuners.lora import Linear

    unsupported = []
    for name, module in _lora_modules(model):
        if type(module) is not Linear:
            unsupported.append(f"{name} ({type(module).__name__})")
        elif any(module.use_dora.get(adapter, False) for adapter in module.active_adapters):
            unsupported.append(f"{name} (DoRA)")
    if unsupported:
        raise ValueError(
            f"merge_lora=True merges only plain LoRA Linear layers; unsupported: {unsupported[:5]}"
            f"{' ...' if len(unsupported) > 5 else ''}. Set merge_lora=False and merge the written adapter with "
            "peft's merge_and_unload()."
        )


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with the LoRA adapters in ``state`` merged into their base weights.

    ``state`` is the full PeftModel state dict (cleaned names, e.g. from
    :func:`~relex_callback.distributed.gather_state_dict`). Keys lose the ``base_model.model.`` prefix and
    the ``.base_layer`` segment; ``modules_to_save`` copies replace their originals; adapter keys are dropped.
    """
    peft_model = unwrap_model(model)
    merged = dict(state)
    for name, module in _lora_modules(model):
        weight_key = f"{name}.base_layer.weight"
        weight = merged[weight_key].to(torch.float32)
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
