"""Checkpoints: find them (local directory or the hub), read them (safetensors only), map names.

The name mapping between HuggingFace's GPT-2 and minigpt lives here and nowhere else.
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .config import GPTConfig
from .errors import CheckpointError, HubError, HubUnreachableError, MiniGPTWarning

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


# minigpt parameter name -> shape for a config (``GPT.parameter_shapes``): the model says what it holds.
ShapesOf = Callable[[GPTConfig], dict[str, tuple[int, ...]]]


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig, shapes_of: ShapesOf) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors (official or ``save_pretrained`` layout) -> minigpt state dict.

    Checks everything at once and raises one CheckpointError listing every missing,
    unexpected, mis-shaped and non-float tensor (or, first, saying that the config and the
    weights describe different models). Warns (MiniGPTWarning) if a tensor holds NaN or inf.
    ``shapes_of(cfg)`` (``GPT.parameter_shapes``) is asked only once config and weights agree.
    """
    _check_agreement(hf, cfg)
    expected = shapes_of(cfg)
    names = name_map(cfg.n_layer)
    ours: dict[str, torch.Tensor] = {}
    unexpected, misshaped, not_float = [], [], []
    lm_head = None
    for key, tensor in hf.items():
        name = key.removeprefix("transformer.") if isinstance(key, str) else key
        if not isinstance(tensor, torch.Tensor):
            not_float.append(f"{key}: a {type(tensor).__name__}, not a tensor")
        elif name == "lm_head.weight":
            lm_head = tensor
        elif name in names:
            new, conv1d = names[name]
            value = tensor.t() if conv1d and tensor.dim() == 2 else tensor
            if tuple(value.shape) != expected[new]:
                want = expected[new][::-1] if conv1d else expected[new]
                misshaped.append(f"{key}: {tuple(tensor.shape)}, expected {want}")
            if not tensor.is_floating_point():
                not_float.append(f"{key}: {tensor.dtype}")
            ours[new] = value.contiguous()
        elif not (isinstance(name, str) and _IGNORED.fullmatch(name)):
            unexpected.append(str(key))
    hf_name = {ours_: hf_ for hf_, (ours_, _) in names.items()}
    missing = [hf_name[k] for k in expected if k not in ours]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {'; '.join(misshaped[:8])}{' ...' if len(misshaped) > 8 else ''}")
    if not_float:
        problems.append(f"not floating point {len(not_float)}: {'; '.join(not_float[:8])}"
                        f"{' ...' if len(not_float) > 8 else ''}")
    if not problems and lm_head is not None and not torch.equal(lm_head, ours["embed.weight"]):
        problems.append("lm_head.weight differs from wte.weight; GPT-2's unembedding is tied and "
                        "minigpt does not run untied heads")
    if problems:
        raise CheckpointError("the weights do not fit this GPT-2 config (n_layer="
                              f"{cfg.n_layer}, n_embd={cfg.n_embd}, vocab={cfg.vocab_size}): " + " | ".join(problems)
                              + ". Is this a complete GPT-2 checkpoint saved with its own config.json?")
    _warn_if_not_finite(ours)
    return ours


def _check_agreement(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> None:
    """One clear CheckpointError when config.json and the weights describe different models.

    Runs before anything is built from the config, so an absurd config (n_layer=10**9) fails fast.
    """
    blocks = {int(m.group(1)) for k in hf if isinstance(k, str) and (m := re.match(r"(?:transformer\.)?h\.(\d+)\.", k))}
    found = []
    if blocks and max(blocks) + 1 != cfg.n_layer:
        found.append(f"n_layer={cfg.n_layer} but the weights hold blocks h.0..h.{max(blocks)} ({max(blocks) + 1})")
    for table, axis0 in (("wte.weight", "vocab_size"), ("wpe.weight", "n_positions")):
        t = hf.get(table, hf.get("transformer." + table))
        want = (getattr(cfg, axis0), cfg.n_embd)
        if isinstance(t, torch.Tensor) and t.dim() == 2 and tuple(t.shape) != want:
            found.append(f"{axis0}={want[0]}, n_embd={want[1]} but {table} is {list(t.shape)} ([{axis0}, n_embd])")
    if found:
        raise CheckpointError("config.json and the weights describe different models: the config says "
                              + "; ".join(found) + ". Use the config.json saved with these weights")


def _warn_if_not_finite(state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if not torch.isfinite(v if v.dtype in _FINITE_OK else v.float()).all()]
    if bad:
        warnings.warn(f"the checkpoint holds NaN or inf in {len(bad)} tensors ({', '.join(bad[:4])}); every output "
                      "will be NaN. Was the download corrupted? Fetch the weights again", MiniGPTWarning, stacklevel=3)


_FINITE_OK = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete: download it again") from e
    except Exception as e:  # SafetensorError mostly; any failure to parse an untrusted file is the file's fault
        kind = "" if isinstance(e, SafetensorError) else f"{type(e).__name__}: "
        raise CheckpointError(f"{path} is not a readable safetensors file ({kind}{e}); it may be truncated "
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
        # Only names are looked at: these files are never opened.
        pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
                         for p in directory.glob(pattern))
        others = sorted(p.name for pattern in ("*.h5", "*.msgpack", "*.onnx", "*.gguf") for p in directory.glob(pattern))
        hint = (f" It holds {', '.join(pickles)}: pickle files, which minigpt refuses to load because "
                "unpickling can run arbitrary code. Convert it once, where you trust the file, with "
                "transformers: GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True).") if pickles else ""
        if others:
            hint += (f" It holds {', '.join(others)}, a format minigpt does not read; save the model as "
                     f"safetensors ({WEIGHTS_FILE}) with the library that wrote it.")
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE} (nor {INDEX_FILE} for a sharded one).{hint}")
    return cfg, tensors


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index lists: plain names of files beside it, nothing else."""
    try:
        shards = list(json.loads(index.read_text())["weight_map"].values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read the shard index {index} ({type(e).__name__}: {e}); download it again") from e
    # A name with a path in it could make us read a file outside the checkpoint.
    wrong = [s for s in shards if not isinstance(s, str) or Path(s).name != s or s in ("", ".", "..")
             or not s.endswith(".safetensors")]
    if wrong:
        raise CheckpointError(f"the shard index {index} lists {wrong[:3]!r}; shards must be plain .safetensors "
                              "file names in the checkpoint's directory: download the checkpoint again")
    return shards


def hub_directory(repo_id: str) -> Path:
    """Directory holding config.json and the safetensors weights of a hub model.

    The local cache is tried first, so a cached model loads without touching the network;
    otherwise the files are downloaded (unless HF_HUB_OFFLINE=1).
    """
    try:
        return _hub_fetch(repo_id, local_only=True)
    except HubUnreachableError:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE or not _resolves(constants.ENDPOINT):
            raise  # no network: fail now rather than after the hub client's retries
    return _hub_fetch(repo_id, local_only=False)


def _resolves(url: str) -> bool:
    """Whether the hub's host name resolves (False at once on a machine without a network)."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy resolves names for us
    try:
        socket.getaddrinfo(urlparse(url).hostname, 443)
    except (socket.gaierror, UnicodeError, TypeError):
        return False
    return True


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


def load_model(model_class: type, name_or_dir: str | Path, *, dtype: torch.dtype, device: torch.device | str):
    """``model_class`` (GPT) built from the config of a checkpoint directory or hub name and loaded with its weights."""
    cfg, state, source = load_checkpoint(name_or_dir, model_class.parameter_shapes)
    model = model_class(cfg).to(dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    model.source = source
    return model.to(device)


def load_checkpoint(name_or_dir: str | Path, shapes_of: ShapesOf) -> tuple[GPTConfig, dict[str, torch.Tensor], str]:
    """(config, minigpt state dict, description of the source) for a directory or hub name."""
    if not isinstance(name_or_dir, (str, Path)) or not str(name_or_dir):
        raise CheckpointError(f"expected a checkpoint directory or a hub name such as 'gpt2', got {name_or_dir!r}")
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        directory, source = path, f"weights from {path}"
    elif path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and {WEIGHTS_FILE}")
    else:
        directory, source = hub_directory(str(name_or_dir)), f"weights of {name_or_dir} (HuggingFace hub)"
    cfg, tensors = read_directory(directory)
    return cfg, from_hf_state_dict(tensors, cfg, shapes_of), source
