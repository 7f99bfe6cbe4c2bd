"""relex-callback: RELEX rank-1 trajectory extrapolation (arXiv 2605.21468) for RLVR training."""

__version__ = "0.1.0"

import logging as _logging  # noqa: E402
import os as _os  # noqa: E402


class _DefaultHandler(_logging.StreamHandler):
    """Prints relex_callback's INFO and WARNING lines (``[relex] ...`` on stderr) while the application has not
    configured logging; once the root logger has a handler, records only propagate there, as usual."""

    def emit(self, record: _logging.LogRecord) -> None:
        if not _logging.getLogger().handlers:
            super().emit(record)


_library_logger = _logging.getLogger(__name__)
if not any(isinstance(h, _DefaultHandler) for h in _library_logger.handlers):
    _handler = _DefaultHandler()
    _handler.setFormatter(_logging.Formatter("[relex] %(levelname)s %(message)s"))
    _library_logger.addHandler(_handler)
    if _library_logger.level == _logging.NOTSET:  # RELEX_VERBOSITY=warning (or debug, error) overrides
        _library_logger.setLevel(_os.environ.get("RELEX_VERBOSITY", "info").upper())

from .config import RelexConfig  # noqa: E402

# The math needs torch and the callback transformers: both are imported on first use, so that the ``relex``
# command line (``relex --help``) and ``RelexConfig`` start without them.
_MATH_NAMES = (
    "Subspace",
    "Trend",
    "backtest",
    "combine",
    "fit_trajectory",
    "fit_trend",
    "gram_matrix",
    "prediction_weights",
    "reconstruction_weights",
    "subspace_from_gram",
)

__all__ = ["__version__", "RelexConfig", "RelexCallback", *_MATH_NAMES]


def __getattr__(name: str):
    if name == "RelexCallback":
        from .trainers.transformers import RelexCallback

        return RelexCallback
    if name in _MATH_NAMES:
        from .math import core

        return getattr(core, name)
    raise AttributeError(f"module 'relex_callback' has no attribute {name!r}")
