#!/usr/bin/env bash
# Set up the environments (scripts/setup_tests.sh, scripts/setup_verl.sh) and run the whole test suite: the main suite
# in .venv, then the verl integration tests (tests/with_verl) in .venv-verl.
# Arguments go to the main pytest run; RELEX_SKIP_VERL=1 skips the verl stage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_tests.sh
.venv/bin/python -m pytest -q -p no:warnings "$@"
if [ "${RELEX_SKIP_VERL:-0}" != "1" ]; then
  bash scripts/setup_verl.sh
  .venv-verl/bin/python -m pytest -q -p no:warnings tests/with_verl
fi
