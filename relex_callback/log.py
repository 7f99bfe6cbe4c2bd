"""The package's log lines: silent by default, as libraries should be; one switch makes them visible.

relex_callback logs through ``logging.getLogger("relex_callback")`` and attaches only a ``NullHandler``: an application
that configures logging (``logging.basicConfig``, transformers' and TRL's example scripts) gets every RELEX line through
its own handlers. :func:`enable_logging` (or the environment variable ``RELEX_VERBOSITY``, read at import) prints them
on stderr as ``[relex] LEVEL message`` while the application has not configured logging itself.
"""

from __future__ import annotations

import logging
import os

__all__ = ["enable_logging", "PACKAGE_LOGGER"]

PACKAGE_LOGGER = "relex_callback"
VERBOSITY_ENV = "RELEX_VERBOSITY"


class _StderrHandler(logging.StreamHandler):
    """``[relex] ...`` on stderr while the root logger has no handler; once the application configures logging,
    records only propagate there (never printed twice)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def enable_logging(level: str | int = "info") -> logging.Handler:
    """Print relex_callback's lines at ``level`` and above (``"debug"``, ``"info"``, ``"warning"``, ``"error"``) on
    stderr; idempotent. Returns the handler (``logging.getLogger("relex_callback").removeHandler(h)`` undoes it)."""
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int):
        raise ValueError(f"level={level!r} is not a logging level; use 'debug', 'info', 'warning' or 'error'.")
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[relex] %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(numeric)
    return handler


def _install() -> None:
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    if os.environ.get(VERBOSITY_ENV):
        enable_logging(os.environ[VERBOSITY_ENV])
