"""Shared fixtures and the tiers of the test suite.

``pytest`` runs every test (the README's test command, what CI runs). ``pytest -m "not slow"`` is the fast tier
for the edit-test loop: it leaves out what spawns ``torch.distributed`` processes, loads the real SmolLM2 or needs
verl (those markers imply ``slow``), and the tests marked ``slow`` by hand (the long end-to-end runs).
"""

from __future__ import annotations

import pytest
from _tiny import tiny_tokenizer

_SLOW_MARKERS = ("distributed", "smollm2", "verl", "gpu")


@pytest.fixture(scope="module")
def tok():
    """The tiny word-level tokenizer without a chat template (tests/_tiny.py), one per test module."""
    return tiny_tokenizer(chat_template=False)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(name) for name in _SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)
