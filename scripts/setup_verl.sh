#!/usr/bin/env bash
# Create (or reuse) .venv-verl, the virtual environment of the verl integration tests: verl 0.9.1 pins
# transformers < 5.11, which the main environment does not. torch is pinned and installed first, so pip
# never pulls a CUDA build on CPU machines; verl's CUDA engines are not needed for the CPU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${RELEX_VERL_VENV:-.venv-verl}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install "verl[verl-core]==0.9.1" "transformers<5.11" "pytest>=8"
$PIP install --no-deps -e .   # registers the verl.plugins entry point of relex-callback
echo "verl environment ready: $VENV"
