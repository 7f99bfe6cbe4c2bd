"""Backward-compatible name of :mod:`relex_callback.offline.cli` (the ``relex`` command line)."""

from .offline.cli import build_parser, main

__all__ = ["build_parser", "main"]
