"""Download a GPT-2 checkpoint (config.json + safetensors) into a directory for offline use.

    python scripts/download.py gpt2 checkpoints/gpt2
    minigpt trace "Hello" --model checkpoints/gpt2      # later, offline

Only config.json and safetensors files are fetched (never pickles); the result is checked by
loading it with minigpt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import huggingface_hub as hub

from minigpt import GPT, MiniGPTError

PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="hub name, e.g. gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    args = parser.parse_args()
    try:
        hub.snapshot_download(args.name, revision=args.revision, allow_patterns=PATTERNS, local_dir=args.directory)
    except Exception as e:  # the hub's errors are many; all end the same way here
        print(f"error: could not download {args.name!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        model = GPT.from_pretrained(args.directory)
    except MiniGPTError as e:
        print(f"error: downloaded, but minigpt cannot load it: {e}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.name}: {n_params / 1e6:.1f}M parameters in {args.directory}; use --model {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
