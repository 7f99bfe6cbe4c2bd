#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the default test suite (excludes tests marked slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:warnings "$@"
