"""GPT-2's BPE vocabulary put on this machine, checked (what ``minigpt setup`` does).

tiktoken downloads the vocabulary (its r50k_base, GPT-2's encoding) from OpenAI's blob store on first
use; ``minigpt setup`` downloads the same file from there. Where that host cannot be reached, the identical file ships inside the openai-whisper sdist on
PyPI as whisper/assets/gpt2.tiktoken. Whatever the source, the bytes are stored at
``tokenizer.vocab_path()`` only if their sha256 is ``GPT2_VOCAB_SHA256``, so a changed or truncated
file is never used.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .errors import TokenizerError
from .files import check_regular_file
from .tokenizer import GPT2_VOCAB_SHA256, gpt2_tokenizer, vocab_path

# Where tiktoken itself takes r50k_base from (tiktoken_ext.openai_public.r50k_base).
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
WHISPER_INDEX = "https://pypi.org/simple/openai-whisper/"  # PyPI's JSON simple API (PEP 691)
WHISPER_SDIST = "openai_whisper-20250625.tar.gz"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
TIMEOUT_S = 60  # per network read: a silent network fails instead of hanging
MAX_BYTES = 64 << 20  # the vocabulary is 1.6 MB, the sdist 0.8 MB; anything far larger is neither


def sha256(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def from_openai() -> bytes:
    """The file tiktoken downloads, from where tiktoken downloads it (with a timeout, which tiktoken's lacks)."""
    data = _get(R50K_URL)
    if sha256(data) != GPT2_VOCAB_SHA256:  # a proxy's or captive portal's page: worth trying PyPI
        raise ValueError(f"{R50K_URL} sent {len(data)} bytes that are not GPT-2's vocabulary")
    return data


def _get(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        data = response.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError(f"{url} sent over {MAX_BYTES} bytes")
    return data


def from_pypi() -> bytes:
    """The vocabulary inside the openai-whisper sdist on PyPI (the sdist checked against PyPI's sha256)."""
    index = json.loads(_get(WHISPER_INDEX, accept="application/vnd.pypi.simple.v1+json"))
    entry = next((f for f in index.get("files", []) if f.get("filename") == WHISPER_SDIST), None)
    if entry is None:
        raise ValueError(f"{WHISPER_INDEX} does not list {WHISPER_SDIST}")
    data = _get(entry["url"])
    if sha256(data) != entry["hashes"]["sha256"]:
        raise ValueError(f"{entry['url']} does not have the sha256 PyPI lists for it")
    return from_sdist(data)


def from_sdist(data: bytes) -> bytes:
    """The member whisper/assets/gpt2.tiktoken of an openai-whisper sdist (a .tar.gz, as bytes)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(WHISPER_MEMBER)), None)
        if member is None:
            raise ValueError(f"the archive holds no {WHISPER_MEMBER}")
        return tar.extractfile(member).read()


def from_file(path: Path) -> bytes:
    """A copy the user has: the vocabulary itself, or an openai-whisper sdist holding it."""
    check_regular_file(path, TokenizerError, "give the file itself")  # a pipe or a device would hang the read
    data = path.read_bytes()
    return from_sdist(data) if tarfile.is_tarfile(path) else data


def _fetch(say: Callable[[str], None]) -> tuple[bytes, str]:
    """The vocabulary's bytes from the network and where they came from: tiktoken's host, else PyPI."""
    try:
        return from_openai(), f"tiktoken's source ({R50K_URL})"
    except (OSError, ValueError, http.client.HTTPException) as e:  # urllib's errors; the next source decides
        say(f"note: tiktoken's source failed ({type(e).__name__}: {e}); taking {WHISPER_MEMBER} from "
            f"{WHISPER_SDIST} on PyPI")
    try:
        return from_pypi(), f"{WHISPER_SDIST} on PyPI"
    except (OSError, ValueError, KeyError, http.client.HTTPException, tarfile.TarError) as e:
        raise TokenizerError(
            f"GPT-2's tokenizer vocabulary could not be downloaded from OpenAI ({R50K_URL}) nor from PyPI "
            f"({WHISPER_INDEX}): {type(e).__name__}: {e}. On a machine that can reach either, download "
            f"{WHISPER_SDIST} (`pip download --no-deps --no-binary :all: openai-whisper==20250625`) or "
            "r50k_base.tiktoken, then run `minigpt setup --file PATH` here") from e


def setup_vocabulary(file: Path | None = None, say: Callable[[str], None] = print) -> Path:
    """Put a verified copy of GPT-2's vocabulary at ``vocab_path()`` and return that path.

    ``file``: a copy you already have (the .tiktoken file or an openai-whisper sdist); otherwise
    tiktoken's source (OpenAI's host), else PyPI's openai-whisper sdist. A copy already in place and verified is kept.
    Raises TokenizerError when no source gives bytes with GPT-2's sha256.
    """
    target = vocab_path()
    if file is None and target.is_file() and sha256(target.read_bytes()) == GPT2_VOCAB_SHA256:
        say(f"tokenizer vocabulary already in place and verified: {target}")
        return target
    if file is not None:
        try:
            data, source = from_file(file), str(file)
        except (OSError, ValueError, tarfile.TarError) as e:
            raise TokenizerError(f"--file {file} cannot be read as a vocabulary or an openai-whisper sdist: "
                                 f"{e}; give r50k_base.tiktoken, gpt2.tiktoken or {WHISPER_SDIST}") from e
    else:
        data, source = _fetch(say)
    if sha256(data) != GPT2_VOCAB_SHA256:
        raise TokenizerError(f"{source}: sha256 {sha256(data)} is not GPT-2's vocabulary ({GPT2_VOCAB_SHA256}); "
                             "nothing was written. Give r50k_base.tiktoken, gpt2.tiktoken or an openai-whisper sdist")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    with open(partial, "wb") as f:  # written whole, then renamed: a reader never sees half a file
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, target)
    gpt2_tokenizer.cache_clear()  # the next tokenizer is built from this copy
    say(f"tokenizer vocabulary verified (sha256 {GPT2_VOCAB_SHA256[:16]}...) from {source}, written to {target}")
    return target
