#!/usr/bin/env bash
# What the test suite needs on top of scripts/setup.sh (the demo's environment): the trl, peft, plot and dev
# extras, and DeepSpeed with its one CPU op compiled, so that tests/test_deepspeed.py runs ZeRO-1/2/3 on CPU
# instead of skipping. scripts/test.sh runs this; the demo does not need it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${RELEX_VENV:-.venv}
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -e ".[trl,peft,plot,dev]"
# DeepSpeed: no build isolation (an isolated build would download another torch) and no op compiled at install. Its
# CPU accelerator compiles one op, the shared-memory collective, the first time a process group starts; do that once
# here (it is cached under ~/.cache/torch_extensions) so that no torchrun in the tests waits on the compiler.
DS_BUILD_OPS=0 $PIP install --no-build-isolation deepspeed==0.19.8
"$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder('ShareMemCommBuilder')
if builder is not None:
    builder.load(verbose=False)"
echo "test environment ready: $VENV"
