"""Backward-compatible name of :mod:`relex_callback.trainers.transformers` (the transformers/TRL callback)."""

from .trainers.transformers import STATE_FILE_NAME, STATE_FORMAT_VERSION, RelexCallback

__all__ = ["RelexCallback", "STATE_FILE_NAME", "STATE_FORMAT_VERSION"]
