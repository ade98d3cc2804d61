"""Kept for old instructions: the same as ``minigpt download NAME DIR`` (see minigpt/setup_cmd.py).

    python scripts/download.py gpt2 checkpoints/gpt2
"""
import sys

from minigpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["download", *sys.argv[1:]]))
