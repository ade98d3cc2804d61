#!/usr/bin/env bash
# README's test command: set-up (skipped when nothing changed), then the whole test suite; extra arguments
# go to pytest (bash scripts/test.sh tests/test_cli.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
echo "running the tests with .venv/bin/python -m pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
