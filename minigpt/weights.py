"""Checkpoints: find them (local directory or the hub), read them (safetensors only), map names.

The name mapping between HuggingFace's GPT-2 and minigpt lives here and nowhere else.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import GPTConfig
from .errors import CheckpointError, HubError, HubUnreachableError

# HF name (without "transformer.") -> minigpt name, and whether the tensor is a Conv1D weight,
# which HF stores [in, out] while nn.Linear wants [out, in].
_MODEL_NAMES = [("wte.weight", "embed.weight", False), ("wpe.weight", "pos_embed.weight", False),
                ("ln_f.weight", "ln_f.weight", False), ("ln_f.bias", "ln_f.bias", False)]
_BLOCK_NAMES = [(f"h.{{i}}.{hf}.{kind}", f"blocks.{{i}}.{ours}.{kind}", kind == "weight" and conv1d)
                for hf, ours, conv1d in [("ln_1", "ln1", False), ("attn.c_attn", "attn.qkv", True),
                                         ("attn.c_proj", "attn.out", True), ("ln_2", "ln2", False),
                                         ("mlp.c_fc", "mlp.fc", True), ("mlp.c_proj", "mlp.proj", True)]
                for kind in ("weight", "bias")]


def name_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """HF name -> (minigpt name, is a Conv1D weight to transpose), for every learned tensor."""
    blocks = [(hf.format(i=i), ours.format(i=i), t) for i in range(n_layer) for hf, ours, t in _BLOCK_NAMES]
    return {hf: (ours, t) for hf, ours, t in _MODEL_NAMES + blocks}


# Buffers in the official files (the causal mask) that carry no learned value.
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
WEIGHTS_FILE, INDEX_FILE, CONFIG_FILE = "model.safetensors", "model.safetensors.index.json", "config.json"


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """minigpt parameter name -> shape, without building a model."""
    from .model import GPT

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors (official or ``save_pretrained`` layout) -> minigpt state dict.

    Checks everything at once and raises one CheckpointError listing every missing,
    unexpected and mis-shaped tensor.
    """
    expected = expected_shapes(cfg)
    names = name_map(cfg.n_layer)
    ours: dict[str, torch.Tensor] = {}
    unexpected, misshaped = [], []
    lm_head = None
    for key, tensor in hf.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight":
            lm_head = tensor
        elif name in names:
            new, conv1d = names[name]
            value = tensor.t() if conv1d and tensor.dim() == 2 else tensor
            if tuple(value.shape) != expected[new]:
                want = expected[new][::-1] if conv1d else expected[new]
                misshaped.append(f"{key}: {tuple(tensor.shape)}, expected {want}")
            ours[new] = value.contiguous()
        elif not _IGNORED.fullmatch(name):
            unexpected.append(key)
    missing = [k for k in expected if k not in ours]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {'; '.join(misshaped[:8])}")
    if not problems and lm_head is not None and not torch.equal(lm_head, ours["embed.weight"]):
        problems.append("lm_head.weight differs from wte.weight; GPT-2's unembedding is tied and "
                        "minigpt does not run untied heads")
    if problems:
        raise CheckpointError("the weights do not fit this GPT-2 config (n_layer="
                              f"{cfg.n_layer}, n_embd={cfg.n_embd}, vocab={cfg.vocab_size}): " + " | ".join(problems))
    return ours


def to_hf_state_dict(state: dict[str, torch.Tensor], n_layer: int, official: bool = True) -> dict[str, torch.Tensor]:
    """minigpt state dict -> HF names: official layout (no prefix) or save_pretrained's (``transformer.``)."""
    prefix = "" if official else "transformer."
    return {prefix + hf: (state[ours].t() if conv1d else state[ours]).contiguous()
            for hf, (ours, conv1d) in name_map(n_layer).items()}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file (never unpickles anything)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                              "or corrupt: download it again") from e


def read_config(path: Path) -> GPTConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} as JSON ({e})") from e
    return GPTConfig.from_hf(raw)


def read_directory(directory: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """config.json + model.safetensors (or a sharded index) from a local directory."""
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; a GPT-2 checkpoint directory holds "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = read_config(directory / CONFIG_FILE)
    if (directory / WEIGHTS_FILE).is_file():
        tensors = read_safetensors(directory / WEIGHTS_FILE)
    elif (directory / INDEX_FILE).is_file():
        tensors = {}
        for shard in sorted(set(_index_shards(directory / INDEX_FILE))):
            tensors.update(read_safetensors(directory / shard))
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = (f" It holds {', '.join(pickles)}: pickle files, which minigpt refuses to load because "
                "unpickling can run arbitrary code. Convert it once, where you trust the file, with "
                "transformers: GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True).") if pickles else ""
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}.{hint}")
    return cfg, tensors


def _index_shards(index: Path) -> list[str]:
    try:
        return list(json.loads(index.read_text())["weight_map"].values())
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read the shard index {index} ({e})") from e


def hub_directory(repo_id: str) -> Path:
    """Directory holding config.json and the safetensors weights of a hub model.

    The local cache is tried first, so a cached model loads without touching the network;
    otherwise the files are downloaded (unless HF_HUB_OFFLINE=1).
    """
    try:
        return _hub_fetch(repo_id, local_only=True)
    except HubUnreachableError:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise
    return _hub_fetch(repo_id, local_only=False)


def _hub_fetch(repo_id: str, local_only: bool) -> Path:
    import huggingface_hub as hub
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError)

    def fetch(filename: str) -> Path:
        return Path(hub.hf_hub_download(repo_id, filename, local_files_only=local_only))

    try:
        config = fetch(CONFIG_FILE)
        try:
            fetch(WEIGHTS_FILE)
        except (RemoteEntryNotFoundError, LocalEntryNotFoundError) as missing:
            try:  # a sharded checkpoint
                index = fetch(INDEX_FILE)
            except (RemoteEntryNotFoundError, LocalEntryNotFoundError):
                raise missing from None
            for shard in sorted(set(_index_shards(index))):
                fetch(shard)
    except LocalEntryNotFoundError as e:
        raise HubUnreachableError(
            f"cannot get {repo_id!r}: the hub is unreachable (offline, or HF_HUB_OFFLINE=1) and the model "
            f"is not in the local cache. On a connected machine run `python scripts/download.py {repo_id} DIR` "
            "and pass DIR instead of the name, or use random weights of the same shape "
            "(`minigpt ... --random-if-offline`, or GPT.random(size))") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"no model {repo_id!r} on the hub (or it is private); check the name, "
                       "e.g. 'gpt2', 'gpt2-medium', 'distilgpt2', or pass a local directory") from e
    except RemoteEntryNotFoundError as e:
        raise CheckpointError(f"hub model {repo_id!r} has no {WEIGHTS_FILE}; minigpt reads safetensors "
                              "only and never unpickles .bin files: convert it to safetensors first") from e
    except HfHubHTTPError as e:
        raise HubError(f"the hub refused {repo_id!r}: {e}") from e
    except ValueError as e:  # a malformed repo id
        raise HubError(f"{repo_id!r} is neither a local directory nor a valid hub name ({e})") from e
    return config.parent


def load_checkpoint(name_or_dir: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], str]:
    """(config, minigpt state dict, description of the source) for a directory or hub name."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        directory, source = path, f"weights from {path}"
    elif path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and {WEIGHTS_FILE}")
    else:
        directory, source = hub_directory(str(name_or_dir)), f"weights of {name_or_dir} (HuggingFace hub)"
    cfg, tensors = read_directory(directory)
    return cfg, from_hf_state_dict(tensors, cfg), source
