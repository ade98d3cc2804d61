#!/usr/bin/env bash
# README's main-job command: set-up (skipped when nothing changed), then the report on a text: real GPT-2
# if the hub is reachable or it is cached, else pydoc-tiny, the small trained model shipped here (labelled).
# Arguments pass through to `minigpt report`:   bash scripts/main.sh "Some text" --model gpt2-medium --out mine
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
text=${1:-"The residual stream carries what each block adds, and the last LayerNorm rescales it."}
shift || true
out=report  # the report's own default; the last --out given wins, as in argparse
previous=
for arg in "$@"; do
    [ "$previous" = --out ] && out=$arg
    case $arg in --out=*) out=${arg#--out=} ;; esac
    previous=$arg
done
.venv/bin/minigpt report "$text" --model gpt2 --out report "$@"
echo "report written to $(cd "$out" && pwd): open $out/index.html in a browser (figures and report.json beside it)"
