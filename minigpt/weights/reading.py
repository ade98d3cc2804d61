"""A checkpoint directory's files: found, checked before they are opened, and their headers read.

Only regular files inside the checkpoint's directory are read (``minigpt.files.checked_file``):
config.json (checked JSON) and safetensors, whose headers give every tensor's name, shape and
dtype without reading any data. Nothing is unpickled.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from .. import files
from ..config import GPTConfig
from ..errors import CheckpointError
from .names import Header

WEIGHTS_FILE, INDEX_FILE, CONFIG_FILE = "model.safetensors", "model.safetensors.index.json", "config.json"


def checked_file(path: Path, root: Path) -> Path:
    """``path`` resolved, if it is a regular file inside the checkpoint directory ``root`` (else CheckpointError)."""
    return files.checked_file(path, root, CheckpointError)


def read_config(path: Path) -> GPTConfig:
    """The GPTConfig of an HF config.json (CheckpointError if it is not JSON, or not GPT-2's)."""
    return GPTConfig.from_hf(files.read_json(path, CheckpointError, "use the config.json saved with these weights"))


def weight_files(directory: Path, root: Path) -> list[Path]:
    """The checked safetensors files of a checkpoint directory: model.safetensors, or the shards of its index."""
    if (directory / WEIGHTS_FILE).exists() or (directory / WEIGHTS_FILE).is_symlink():
        return [checked_file(directory / WEIGHTS_FILE, root)]
    if (directory / INDEX_FILE).exists() or (directory / INDEX_FILE).is_symlink():
        return [checked_file(directory / shard, root) for shard in index_shards(checked_file(directory / INDEX_FILE, root))]
    # Only names are looked at: these files are never opened.
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt") for p in directory.glob(pattern))
    others = sorted(p.name for pattern in ("*.h5", "*.msgpack", "*.onnx", "*.gguf") for p in directory.glob(pattern))
    hint = (f" It holds {', '.join(pickles)}: pickle files, which minigpt refuses to load because "
            "unpickling can run arbitrary code. Convert it once, where you trust the file, with "
            "transformers: GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True).") if pickles else ""
    if others:
        hint += (f" It holds {', '.join(others)}, a format minigpt does not read; save the model as "
                 f"safetensors ({WEIGHTS_FILE}) with the library that wrote it.")
    raise CheckpointError(f"{directory} has no {WEIGHTS_FILE} (nor {INDEX_FILE} for a sharded one).{hint}")


def index_shards(index: Path) -> list[str]:
    """The shard file names an index lists (each once, sorted): plain names of files beside it, nothing else."""
    raw = files.read_json(index, CheckpointError, "the shard index is damaged: download it again")
    try:
        shards = list(raw["weight_map"].values())
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read the shard index {index} ({type(e).__name__}: {e}); download it again") from e
    # A name with a path in it could make us read a file outside the checkpoint.
    wrong = [s for s in shards if not isinstance(s, str) or Path(s).name != s or s in ("", ".", "..")
             or not s.endswith(".safetensors")]
    if wrong:
        raise CheckpointError(f"the shard index {index} lists {wrong[:3]!r}; shards must be plain .safetensors "
                              "file names in the checkpoint's directory: download the checkpoint again")
    return sorted(set(shards))


def _open(path: Path, stack: ExitStack):
    """A safetensors file opened for reading memory-mapped (its header parsed, no data read)."""
    from safetensors import SafetensorError, safe_open

    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except Exception as e:  # SafetensorError mostly; any failure to parse an untrusted file is the file's fault
        kind = "" if isinstance(e, SafetensorError) else f"{type(e).__name__}: "
        raise CheckpointError(f"{path} is not a readable safetensors file ({kind}{e}); it may be truncated "
                              "or corrupt: download it again") from e


# safetensors' dtype names -> torch's.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(paths: list[Path], stack: ExitStack) -> tuple[Header, dict[str, object]]:
    """Every tensor's shape and dtype, from the files' headers, and which open file (kept open by ``stack``) holds it."""
    header: Header = {}
    where: dict[str, object] = {}
    for path in paths:
        handle = _open(path, stack)
        for key in handle.keys():
            if key in where:
                raise CheckpointError(f"{key!r} is in two shards ({path.name} and another); the checkpoint is "
                                      "ambiguous: download it again")
            piece = handle.get_slice(key)
            dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{path}: {key} has dtype {piece.get_dtype()}, which minigpt does not read")
            header[key], where[key] = (tuple(piece.get_shape()), dtype), handle
    return header, where


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file, memory-mapped (never unpickles anything)."""
    with ExitStack() as stack:
        handle = _open(checked_file(path, Path(path).parent), stack)
        try:
            return {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                                  "corrupt: download it again") from e
