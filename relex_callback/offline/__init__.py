"""RELEX over checkpoints already on disk: ``extrapolate``, ``reconstruct`` and ``report``, with no delta files.

* :mod:`~relex_callback.offline.plan`: the validated input (θ_0, checkpoints in step order, tracked tensors);
* :mod:`~relex_callback.offline.stream`: chunked, threaded reads and the Gram / combine passes;
* :mod:`~relex_callback.offline.output`: output model directories (shards, dtypes, config and tokenizer files);
* :mod:`~relex_callback.offline.commands`: the three commands on one skeleton, each with its weights function;
* :mod:`~relex_callback.offline.plots`: the PNG plots of ``report``;
* :mod:`~relex_callback.offline.cli`: the ``relex`` command line.
"""

from ..options import TREND_KINDS as FIT_KINDS

# Everything else needs torch: imported on first use, so that ``relex --help`` (``offline.cli``) starts fast.
_LAZY = {
    "TensorReader": "..checkpoints",
    "extrapolate_checkpoints": ".commands",
    "reconstruct_checkpoints": ".commands",
    "report_checkpoints": ".commands",
    "DEFAULT_MAX_MEMORY": ".plan",
    "_prepare": ".plan",
    "parse_size": ".plan",
    "_Stream": ".stream",
}

__all__ = [
    "FIT_KINDS",
    "DEFAULT_MAX_MEMORY",
    "parse_size",
    "extrapolate_checkpoints",
    "reconstruct_checkpoints",
    "report_checkpoints",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
