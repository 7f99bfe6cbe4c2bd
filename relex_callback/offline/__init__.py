"""RELEX over checkpoints already on disk: ``extrapolate``, ``reconstruct`` and ``report``, with no delta files.

* :mod:`~relex_callback.offline.plan`: the validated input (θ_0, checkpoints in step order, tracked tensors);
* :mod:`~relex_callback.offline.stream`: chunked, threaded reads and the Gram / combine passes;
* :mod:`~relex_callback.offline.output`: output model directories (shards, dtypes, config and tokenizer files);
* :mod:`~relex_callback.offline.commands`: the three commands on one skeleton, each with its weights function;
* :mod:`~relex_callback.offline.plots`: the PNG plots of ``report``;
* :mod:`~relex_callback.offline.cli`: the ``relex`` command line.
"""

from ..checkpoints import TensorReader
from ..options import TREND_KINDS as FIT_KINDS
from .commands import extrapolate_checkpoints, reconstruct_checkpoints, report_checkpoints
from .plan import DEFAULT_MAX_MEMORY, OUTPUT_DTYPES, _prepare, parse_size
from .stream import _Stream

__all__ = [
    "FIT_KINDS",
    "OUTPUT_DTYPES",
    "DEFAULT_MAX_MEMORY",
    "parse_size",
    "extrapolate_checkpoints",
    "reconstruct_checkpoints",
    "report_checkpoints",
]
