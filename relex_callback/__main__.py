"""``python -m relex_callback``: the ``relex`` command line."""

import sys

from .offline.cli import main

if __name__ == "__main__":
    sys.exit(main())
