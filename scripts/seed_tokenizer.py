"""Kept for old instructions: the same as ``minigpt setup`` (see minigpt/vocabulary.py).

    python scripts/seed_tokenizer.py              # tiktoken's download, else PyPI's openai-whisper sdist; verified
    python scripts/seed_tokenizer.py --file PATH  # a copy you already have
"""
import sys

from minigpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["setup", *sys.argv[1:]]))
