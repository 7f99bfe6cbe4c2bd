"""relex-callback: RELEX rank-1 trajectory extrapolation (arXiv 2605.21468) for RLVR training."""

__version__ = "0.1.0"

from .log import _install as _install_logging, enable_logging  # noqa: E402

_install_logging()

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

__all__ = ["__version__", "RelexConfig", "RelexCallback", "enable_logging", *_MATH_NAMES]


def __getattr__(name: str):
    if name == "RelexCallback":
        from .trainers.transformers import RelexCallback

        return RelexCallback
    if name in _MATH_NAMES:
        from .math import core

        return getattr(core, name)
    raise AttributeError(f"module 'relex_callback' has no attribute {name!r}")
