"""Backward-compatible name of :mod:`relex_callback.math.core`, the framework-free RELEX math.

``import relex_callback.core`` gives the very same module object, so every name (public or not) and every
patch applies to both spellings.
"""

import sys

from .math import core as _core

sys.modules[__name__] = _core
