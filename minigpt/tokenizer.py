"""GPT-2's byte-level BPE through tiktoken, usable offline.

tiktoken fetches its vocabulary from the internet on first use. minigpt first looks for a
verified local copy (``vocab_path()``; ``minigpt setup`` puts it there, see ``minigpt.vocabulary``),
and only then asks tiktoken, which uses its own cache or the network.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

from .config import END_OF_TEXT, END_OF_TEXT_ID
from .errors import TokenizerError
from .files import check_regular_file

GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def vocab_path() -> Path:
    """Where the verified vocabulary file lives ($MINIGPT_TOKENIZER_FILE overrides)."""
    if "MINIGPT_TOKENIZER_FILE" in os.environ:
        return Path(os.environ["MINIGPT_TOKENIZER_FILE"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "minigpt" / "gpt2.tiktoken"


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """GPT-2's encoding (50257 tokens, ``<|endoftext|>`` = 50256)."""
    path = vocab_path()
    if path.exists():
        # Looked at before it is opened: a pipe or a device named by MINIGPT_TOKENIZER_FILE would hang the read.
        check_regular_file(path, TokenizerError, "it is not GPT-2's vocabulary: point MINIGPT_TOKENIZER_FILE at "
                           "a copy of gpt2.tiktoken, or remove what is there and run `minigpt setup`")
        try:
            ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=GPT2_VOCAB_SHA256)
        except (ValueError, OSError) as e:  # hash mismatch or garbage; a directory or unreadable file
            raise TokenizerError(f"{path} is not GPT-2's vocabulary ({type(e).__name__}: {e}); delete it and run "
                                 "`minigpt setup` (or point MINIGPT_TOKENIZER_FILE at a good copy)") from e
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={END_OF_TEXT: END_OF_TEXT_ID}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/OS errors of many kinds when offline
        raise TokenizerError(
            f"GPT-2's tokenizer vocabulary is not available offline ({type(e).__name__}). "
            "Run `minigpt setup` (or `python -m minigpt setup`: tiktoken's source, else the copy in "
            "PyPI's openai-whisper sdist, checked), "
            f"or put a verified gpt2.tiktoken at {path} (or set MINIGPT_TOKENIZER_FILE), "
            "or pass token ids instead of text.") from e
