#!/usr/bin/env bash
# README's test command: set-up (idempotent), then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
