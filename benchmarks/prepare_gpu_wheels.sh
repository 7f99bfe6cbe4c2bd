#!/usr/bin/env bash
# Build/download the wheels benchmarks/gpu_check.sh installs on a GPU machine that cannot reach a package index:
# DeepSpeed (built here from its sdist as a pure-Python wheel: no CUDA extension is compiled, ops stay JIT) and
# the dependencies the GPU image lacks (hjson, pydantic 2). Writes .whl/ in the repo root (git-ignored locally).
# Usage (repo root, a Python with torch): bash benchmarks/prepare_gpu_wheels.sh [python]
set -euo pipefail
PY=${1:-python3}
DS_VERSION=${DS_VERSION:-0.19.8}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==${DS_VERSION}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hjson "pydantic>=2,<3" "pydantic-core" annotated-types typing-inspection "typing-extensions>=4.16"
ls -la .whl
