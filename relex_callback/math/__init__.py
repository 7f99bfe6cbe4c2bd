"""The RELEX math, framework-free (torch only): :mod:`relex_callback.math.core`."""

from .core import *  # noqa: F401,F403
from .core import __all__  # noqa: F401
