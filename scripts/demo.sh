#!/usr/bin/env bash
# Set up the environment, then run real TRL GRPO on the packaged SmolLM2-135M-Instruct with RelexCallback:
# observe the first steps, write the extrapolated checkpoint with its report, model card and plots, save the
# observed checkpoints for `relex report`, print a summary with held-out accuracies (± SE). Re-runnable: it
# replaces its own earlier output in runs/smollm2-grpo (options: python examples/grpo_smollm2.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" examples/grpo_smollm2.py --check-output "$@"  # a bad --output-dir stops here, before the set-up
bash scripts/setup.sh
exec .venv/bin/python examples/grpo_smollm2.py "$@"
