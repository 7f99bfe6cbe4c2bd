"""Backward-compatible name of :mod:`relex_callback.trainers.jump` (jump-mode scheduling)."""

from .trainers.jump import JUMP_LOG_NAME, JumpController, Probe, generation_period, reset_optimizer_state

__all__ = ["JUMP_LOG_NAME", "JumpController", "Probe", "generation_period", "reset_optimizer_state"]
