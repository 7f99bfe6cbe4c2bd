#!/usr/bin/env bash
# Set up the environment, then run real TRL GRPO on the packaged SmolLM2-135M-Instruct with RelexCallback:
# observe the first steps, write the extrapolated checkpoint and its report, print held-out accuracies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/grpo_smollm2.py "$@"
