"""Put GPT-2's BPE vocabulary where minigpt's tokenizer looks for it, without the internet.

tiktoken downloads its vocabulary on first use. Where that host cannot be reached, the same
file (tiktoken's r50k_base, GPT-2's encoding) ships inside the openai-whisper sdist on PyPI as
whisper/assets/gpt2.tiktoken. This script takes it from there (or from --file), checks its
sha256 and copies it to minigpt's cache (see minigpt.tokenizer.vocab_path()).

    python scripts/seed_tokenizer.py              # fetch the sdist with pip, extract, verify
    python scripts/seed_tokenizer.py --file PATH  # use a copy you already have
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from minigpt.tokenizer import GPT2_VOCAB_SHA256, vocab_path

WHISPER_SDIST = "openai-whisper==20250625"
MEMBER_SUFFIX = "whisper/assets/gpt2.tiktoken"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def from_whisper_sdist() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", tmp, WHISPER_SDIST],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(MEMBER_SUFFIX))
            return tar.extractfile(member).read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, help="an existing gpt2.tiktoken / r50k_base.tiktoken")
    args = parser.parse_args()
    target = vocab_path()
    if target.exists() and sha256(target.read_bytes()) == GPT2_VOCAB_SHA256:
        print(f"tokenizer vocabulary already in place: {target}")
        return 0
    data = args.file.read_bytes() if args.file else from_whisper_sdist()
    if sha256(data) != GPT2_VOCAB_SHA256:
        print(f"error: sha256 {sha256(data)} is not GPT-2's vocabulary ({GPT2_VOCAB_SHA256})", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    tmp.write_bytes(data)
    shutil.move(tmp, target)
    print(f"tokenizer vocabulary verified and written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
