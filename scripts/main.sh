#!/usr/bin/env bash
# README's main-job command: set-up (idempotent), then the report (report/index.html) on a text. Arguments pass through:
#   bash scripts/main.sh "Some text" --model gpt2-medium
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
text=${1:-"The residual stream carries what each block adds, and the last LayerNorm rescales it."}
shift || true
exec .venv/bin/minigpt report "$text" --model gpt2 --out report "$@"
