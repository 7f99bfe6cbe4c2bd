"""Units, dtypes and names shared across the package: the buffer dtypes by name, byte sizes for messages, and the
names of the model directories RELEX writes (``relex-step{K}``, ``relex-step{K}-{family}``, ``relex-step{K}-merged``)."""

from __future__ import annotations

import torch

from .options import BUFFER_DTYPES

__all__ = ["DTYPES", "format_bytes", "output_dir_name", "merged_dir_name"]

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in BUFFER_DTYPES}
"""``buffer_dtype`` / ``--dtype`` names -> torch dtypes."""


def format_bytes(num: float) -> str:
    """``512 B``, ``1.5 KiB`` ... ``2.0 TiB`` (binary units, one decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024:
            return f"{int(num)} B" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"


def output_dir_name(target: float, family: str) -> str:
    """The model directory of the prediction for step ``target`` by candidate ``family``: ``relex-step{K}`` for the
    SVD trend (``"trend"``) and for ``"observed"`` (θ_N), else ``relex-step{K}-{family}``."""
    plain = family in ("trend", "observed")
    return f"relex-step{int(target)}" if plain else f"relex-step{int(target)}-{family}"


def merged_dir_name(target: int) -> str:
    """The merged LoRA model directory written beside ``relex-step{K}`` by ``merge_lora``."""
    return f"relex-step{int(target)}-merged"
