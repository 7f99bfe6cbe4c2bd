"""relex-callback: RELEX rank-1 trajectory extrapolation (arXiv 2605.21468) for RLVR training."""

__version__ = "0.1.0"

from .config import RelexConfig  # noqa: E402
from .math.core import (  # noqa: E402
    Subspace,
    Trend,
    backtest,
    combine,
    fit_trajectory,
    fit_trend,
    gram_matrix,
    prediction_weights,
    reconstruction_weights,
    subspace_from_gram,
)

__all__ = [
    "__version__",
    "RelexConfig",
    "RelexCallback",
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
]


def __getattr__(name: str):
    # The callback needs transformers; import it only when asked for, so the core works without it.
    if name == "RelexCallback":
        from .trainers.transformers import RelexCallback

        return RelexCallback
    raise AttributeError(f"module 'relex_callback' has no attribute {name!r}")
