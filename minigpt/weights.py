"""Checkpoints: find them (local directory or the hub), check them, and load them memory-mapped.

The name mapping between HuggingFace's GPT-2 and minigpt lives here and nowhere else. Loading
reads the files' headers first and checks them against config.json before anything is built;
the model is then built on the meta device (no memory) and each parameter is the file's own
memory-mapped tensor (or, where the dtype or device differs, its converted copy), so a load
costs about the weights' bytes. Only config.json and safetensors are read: nothing is unpickled.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .config import OFFICIAL, GPTConfig
from .errors import CheckpointError, HubError, HubUnreachableError, InputError, MiniGPTWarning
from .inputs import check_placement, check_seed

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
# What a file's header says of one tensor: its shape and dtype.
Header = dict[str, tuple[tuple[int, ...], torch.dtype]]


# ---------------------------------------------------------------------------------------------
# The plan: which file tensor becomes which parameter, checked before anything is read or built


def plan(header: Header, cfg: GPTConfig, shapes_of: ShapesOf) -> tuple[dict[str, tuple[str, bool]], list]:
    """Map the tensors a checkpoint holds onto minigpt's parameters, from names, shapes and dtypes alone.

    Returns ``{minigpt name: (file name, transpose)}`` and the pairs of file names that hold one
    tensor twice (``lm_head.weight`` and ``wte.weight``; a name with and without ``transformer.``),
    which the loader must find equal. Raises one CheckpointError listing every missing,
    unexpected, mis-shaped and non-float tensor, or first, saying that the config and the files
    describe different models (checked by arithmetic, so an absurd config fails at once).
    """
    _check_agreement(header, cfg)
    expected = shapes_of(cfg)
    names = name_map(cfg.n_layer)
    chosen: dict[str, tuple[str, bool]] = {}
    twins: list[tuple[str, str]] = []
    unexpected, misshaped, not_float = [], [], []
    for key, (shape, dtype) in header.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight":
            name = "wte.weight"  # the unembedding: GPT-2 ties it to the token embedding
        if name not in names:
            if not _IGNORED.fullmatch(name):
                unexpected.append(key)
            continue
        ours, conv1d = names[name]
        if ours in chosen:
            twins.append((chosen[ours][0], key))
            continue
        want = expected[ours][::-1] if conv1d else expected[ours]
        if tuple(shape) != want:
            misshaped.append(f"{key}: {tuple(shape)}, expected {want}")
        if not dtype.is_floating_point:
            not_float.append(f"{key}: {dtype}")
        chosen[ours] = key, conv1d
    hf_name = {ours: hf for hf, (ours, _) in names.items()}
    missing = [hf_name[k] for k in expected if k not in chosen]
    problems = [f"{what} {len(items)}: {sep.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for what, items, sep in (("missing", missing, ", "), ("unexpected", unexpected, ", "),
                                         ("mis-shaped", misshaped, "; "), ("not floating point", not_float, "; "))
                if items]
    if problems:
        raise CheckpointError("the weights do not fit this GPT-2 config (n_layer="
                              f"{cfg.n_layer}, n_embd={cfg.n_embd}, vocab={cfg.vocab_size}): " + " | ".join(problems)
                              + ". Is this a complete GPT-2 checkpoint saved with its own config.json?")
    return chosen, twins


def _check_agreement(header: Header, cfg: GPTConfig) -> None:
    """One clear CheckpointError when config.json and the weights describe different models.

    Arithmetic on the header only, before any tensor is listed or built: a config that declares
    more blocks or bigger tables than the files hold (n_layer=10**9, or no weights at all) fails here.
    """
    blocks = {int(m.group(1)) for k in header if (m := re.match(r"(?:transformer\.)?h\.(\d+)\.", k))}
    found = []
    if blocks and max(blocks) + 1 != cfg.n_layer:
        found.append(f"n_layer={cfg.n_layer} but the weights hold blocks h.0..h.{max(blocks)} ({max(blocks) + 1})")
    for table, axis0 in (("wte.weight", "vocab_size"), ("wpe.weight", "n_positions")):
        shape = (header.get(table) or header.get("transformer." + table) or (None,))[0]
        want = (getattr(cfg, axis0), cfg.n_embd)
        if shape is not None and len(shape) == 2 and tuple(shape) != want:
            found.append(f"{axis0}={want[0]}, n_embd={want[1]} but {table} is {list(shape)} ([{axis0}, n_embd])")
    declared = 4 + 12 * cfg.n_layer  # tensors a GPT-2 of this depth has
    values = (cfg.vocab_size + cfg.n_positions + 2 + cfg.n_layer * 2 * cfg.d_mlp) * cfg.n_embd
    held = sum(math.prod(shape) for shape, _ in header.values())
    if not found and (declared > len(header) or values > held):
        found.append(f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size}: {declared} tensors "
                     f"of at least {values} values, but the weight files hold {len(header)} tensors of {held}")
    if found:
        raise CheckpointError("config.json and the weights describe different models: the config says "
                              + "; ".join(found) + ". Use the config.json saved with these weights")


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig, shapes_of: ShapesOf) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors in memory (official or ``save_pretrained`` layout) -> minigpt state dict.

    Checks as ``plan`` does (one CheckpointError listing every problem), refuses a tensor held
    twice with different values, and warns (MiniGPTWarning) if a tensor holds NaN or inf.
    ``shapes_of(cfg)`` (``GPT.parameter_shapes``) is asked only once config and weights agree.
    """
    not_tensors = [f"{k}: a {type(v).__name__}, not a tensor" for k, v in hf.items() if not isinstance(v, torch.Tensor)]
    bad_keys = [repr(k) for k in hf if not isinstance(k, str)]
    if not_tensors or bad_keys:
        raise CheckpointError(f"the weights do not fit a GPT-2 checkpoint: not floating point {len(not_tensors)}: "
                              f"{'; '.join(not_tensors[:8])}" if not_tensors else
                              f"the weights do not fit a GPT-2 checkpoint: unexpected {len(bad_keys)}: {bad_keys[:8]}")
    chosen, twins = plan({k: (tuple(v.shape), v.dtype) for k, v in hf.items()}, cfg, shapes_of)
    _check_twins((a, hf[a], b, hf[b]) for a, b in twins)
    # A Conv1D weight stays as HF stores it, [in, out]; nn.Linear gets its transposed view, as on loading.
    state = {ours: hf[key].t() if conv1d else hf[key] for ours, (key, conv1d) in chosen.items()}
    _warn_if_not_finite([k for k, v in state.items() if not finite(v)])
    return state


def _check_twins(pairs: Iterator[tuple[str, torch.Tensor, str, torch.Tensor]]) -> None:
    """Refuse a tensor held under two names unless both hold the same bits (NaN included)."""
    for first, a, second, b in pairs:
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
        if not same:
            tied = "lm_head.weight" in (first.removeprefix("transformer."), second.removeprefix("transformer."))
            raise CheckpointError(
                "lm_head.weight differs from wte.weight; GPT-2's unembedding is tied and minigpt does not run "
                "untied heads" if tied else f"the checkpoint holds one tensor twice, as {first!r} and {second!r}, "
                "with different values: it is ambiguous which is meant; keep one of them (re-save the checkpoint)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that equal NaNs compare equal."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view({2: torch.int16, 4: torch.int32,
                                                                     8: torch.int64}[t.dtype.itemsize])


def finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf, without a temporary the size of ``t``.

    Any NaN or inf makes the sum NaN or inf; a finite sum needs no more. Only when the sum
    overflows are the values looked at one by one, a slice at a time.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(1 << 22))


def _warn_if_not_finite(bad: list[str]) -> None:
    if bad:
        warnings.warn(f"the checkpoint holds NaN or inf in {len(bad)} tensors ({', '.join(bad[:4])}); every output "
                      "will be NaN. Was the download corrupted, or is the dtype too narrow for the values (float16 "
                      "overflows past 65504)? Fetch the weights again, or load in a wider dtype",
                      MiniGPTWarning, stacklevel=4)


def to_hf_state_dict(state: dict[str, torch.Tensor], n_layer: int, official: bool = True) -> dict[str, torch.Tensor]:
    """minigpt state dict -> HF names: official layout (no prefix) or save_pretrained's (``transformer.``)."""
    prefix = "" if official else "transformer."
    return {prefix + hf: (state[ours].t() if conv1d else state[ours]).contiguous()
            for hf, (ours, conv1d) in name_map(n_layer).items()}


# ---------------------------------------------------------------------------------------------
# Files: only regular files inside the checkpoint's directory, checked before they are opened


def checked_file(path: Path, root: Path) -> Path:
    """``path`` resolved, if it is a regular file inside ``root`` (links may point within it).

    Anything else (a pipe, a device, a directory, a link out of the checkpoint) raises
    CheckpointError without the file being opened, so nothing can hang or be read from elsewhere.
    """
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(root)):
        raise CheckpointError(f"{path} is a link to {real}, outside the checkpoint directory {root}; minigpt reads "
                              "only files inside it: copy the file into the directory")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete: download it again") from None
    except OSError as e:
        raise CheckpointError(f"cannot look at {path} ({e})") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a regular file; a checkpoint holds plain files: "
                              "download it again")
    return real


def read_config(path: Path) -> GPTConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} as JSON ({e})") from e
    return GPTConfig.from_hf(raw)


def weight_files(directory: Path, root: Path) -> list[Path]:
    """The checked safetensors files of a checkpoint directory: model.safetensors, or the shards of its index."""
    if (directory / WEIGHTS_FILE).exists() or (directory / WEIGHTS_FILE).is_symlink():
        return [checked_file(directory / WEIGHTS_FILE, root)]
    if (directory / INDEX_FILE).exists() or (directory / INDEX_FILE).is_symlink():
        return [checked_file(directory / shard, root) for shard in _index_shards(checked_file(directory / INDEX_FILE, root))]
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


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index lists (each once, sorted): plain names of files beside it, nothing else."""
    try:
        shards = list(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _header(files: list[Path], stack: ExitStack) -> tuple[Header, dict[str, object]]:
    """Every tensor's shape and dtype, from the files' headers, and which open file holds it."""
    header: Header = {}
    where: dict[str, object] = {}
    for path in files:
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


def save_pretrained(model, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (a GPT) as HuggingFace's ``save_pretrained`` does: config.json + model.safetensors.

    The names are save_pretrained's (``transformer.h.0.attn.c_attn.weight``, Conv1D weights [in, out]),
    the unembedding left out as it is tied, so ``GPT2LMHeadModel.from_pretrained(directory)`` and
    ``GPT.from_pretrained(directory)`` both load it. ``dtype``: store in another dtype (e.g. bfloat16).
    Each file is written under a temporary name and renamed, so a file under its name is whole.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in model.state_dict().items()}
    write_atomically(directory / WEIGHTS_FILE, lambda path: save_file(
        to_hf_state_dict(state, model.cfg.n_layer, official=False), path, metadata={"format": "pt"}))
    config = json.dumps({**model.cfg.to_hf(), "torch_dtype": str(dtype or model.unembedding.dtype)[6:]}, indent=2)
    write_atomically(directory / CONFIG_FILE, lambda path: Path(path).write_text(config + "\n", encoding="utf-8"))
    return directory


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read 16 MiB at a time (OSError if it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """``write(temporary path)``, flushed to disk, then renamed to ``path``: never seen half-written.

    The temporary name holds the process id, so processes sharing a directory never write one file.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(str(temporary))
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # as any file the user writes (safetensors creates it private)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------
# The hub


def hub_directory(repo_id: str) -> Path:
    """Directory holding config.json and the safetensors weights of a hub model (a cache snapshot).

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
            for shard in _index_shards(index):
                fetch(shard)
    except LocalEntryNotFoundError as e:
        raise HubUnreachableError(
            f"cannot get {repo_id!r}: the hub is unreachable (offline, or HF_HUB_OFFLINE=1) and the model "
            f"is not in the local cache. On a connected machine run `python scripts/download.py {repo_id} DIR` "
            "and pass DIR instead of the name; or use the small model trained by minigpt that ships with it "
            "(`--model pydoc-tiny`, `--trained-if-offline`, GPT.from_pretrained('pydoc-tiny')), or random weights of "
            "the same shape (`--random-if-offline`, GPT.random(size))") from e
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


# ---------------------------------------------------------------------------------------------
# Loading


# Trained models that come with minigpt (made by scripts/train_small.py), by the name that loads them.
SHIPPED = {"pydoc-tiny": Path(__file__).parent / "assets" / "pydoc-tiny"}
# Ends the ``source`` of every shipped model, so that whoever shows a model can tell (the report's banner).
SHIPPED_MARK = "shipped with minigpt; NOT OpenAI's GPT-2"


def shipped_description(name: str) -> str:
    """What a shipped model is, from the TRAINING.json beside it: a label no one can take for OpenAI's GPT-2."""
    try:
        record = json.loads((SHIPPED[name] / "TRAINING.json").read_text(encoding="utf-8"))
        cfg = record["config"]
        return (f"{name}: a small GPT-2 ({cfg['n_layer']} blocks, d_model {cfg['n_embd']}, "
                f"{record['parameters'] / 1e6:.1f}M parameters) trained by minigpt on the Python 3.11 documentation "
                f"(validation loss {record['final_validation_loss']:.2f}), {SHIPPED_MARK}")
    except (OSError, ValueError, KeyError, TypeError):
        return f"{name}: a small model trained by minigpt, {SHIPPED_MARK}"


def locate(name_or_dir: str | Path) -> tuple[Path, Path, str]:
    """(directory of config.json and the weights, the root no file may leave, a description of the source)."""
    if not isinstance(name_or_dir, (str, Path)) or not str(name_or_dir):
        raise CheckpointError(f"expected a checkpoint directory or a hub name such as 'gpt2', got {name_or_dir!r}")
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path, path, f"weights from {path}"
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and {WEIGHTS_FILE}")
    if str(name_or_dir) in SHIPPED:
        return SHIPPED[str(name_or_dir)], SHIPPED[str(name_or_dir)], shipped_description(str(name_or_dir))
    snapshot = hub_directory(str(name_or_dir))
    # The hub's cache links each snapshot's files to blobs/ beside snapshots/: the repository's folder is the root.
    return snapshot, snapshot.parent.parent, f"weights of {name_or_dir} (HuggingFace hub)"


class _SkipInit(TorchFunctionMode):
    """While active (in this thread only), torch.nn.init's functions leave their tensor as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]  # every init function's first argument
        return func(*args, **kwargs)


def parameter_shapes(model_class: type, cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """``GPT.parameter_shapes``: parameter name -> shape for ``cfg``, without allocating any weight."""
    return {name: tuple(p.shape) for name, p in build_on_meta(model_class, cfg).state_dict().items()}


def random_model(model_class: type, size: str | GPTConfig = "gpt2", *, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """``GPT.random``: a GPT-2 of an official size (or any config) with seeded random weights, as HF
    initialises them (and as ``minigpt train`` starts)."""
    check_placement(dtype, device)
    check_seed(seed)
    if not (isinstance(size, GPTConfig) or (isinstance(size, str) and size in OFFICIAL)):
        raise InputError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(OFFICIAL)}, or pass a GPTConfig")
    model = model_class(OFFICIAL[size] if isinstance(size, str) else size)
    generator = torch.Generator().manual_seed(seed)
    # GPT-2's init: N(0, 0.02), the residual projections shrunk by sqrt(2 * n_layer); biases 0, LayerNorm 1.
    projection_std = 0.02 / math.sqrt(2 * model.cfg.n_layer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                std = projection_std if name.endswith(("out.weight", "proj.weight")) else 0.02
                param.normal_(0.0, std, generator=generator)
    model.source = f"RANDOM weights (seed {seed}), {size if isinstance(size, str) else 'custom'} shape"
    return model.to(dtype=dtype, device=device)


def build_on_meta(model_class: type, cfg: GPTConfig):
    """``model_class(cfg)`` on the meta device (shapes, no memory), its initialisation skipped.

    There are no values to initialise; and the first ``normal_`` on a meta tensor in a process
    imports torch._dynamo (about 1 s and 80 MiB), a cost a load has no reason to pay.
    """
    with torch.device("meta"), _SkipInit():
        return model_class(cfg)


def load_model(model_class: type, name_or_dir: str | Path, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu"):
    """``GPT.from_pretrained``: ``model_class`` (GPT) with the weights of a checkpoint (hub name or local
    directory with config.json + safetensors), at about their bytes.

    config.json and the files' headers are checked first (``plan``); the model is built on the
    meta device, and each parameter becomes the file's memory-mapped tensor as it is (a Conv1D
    weight as its transposed view), or its copy in ``dtype`` on ``device``, whose file pages are
    let go at once. NaN and inf are looked for in the weights as they will be used.
    """
    device = check_placement(dtype, device)
    directory, root, source = locate(name_or_dir)
    config = directory / CONFIG_FILE
    if not (config.exists() or config.is_symlink()):
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; a GPT-2 checkpoint directory holds "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = read_config(checked_file(config, root))
    with ExitStack() as stack:
        header, where = _header(weight_files(directory, root), stack)
        chosen, twins = plan(header, cfg, lambda c: parameter_shapes(model_class, c))
        model = build_on_meta(model_class, cfg)
        try:
            _check_twins((a, where[a].get_tensor(a), b, where[b].get_tensor(b)) for a, b in twins)
            state, bad = {}, []
            for ours, (key, conv1d) in chosen.items():
                value = _convert(where[key].get_tensor(key), dtype, device)
                state[ours] = value.t() if conv1d else value
                if not finite(value):
                    bad.append(ours)
        except CheckpointError:
            raise
        except Exception as e:  # a file whose data is shorter than its header says, or unreadable
            raise CheckpointError(f"cannot read the weights of {directory} ({type(e).__name__}: {e}); the files "
                                  "may be truncated or corrupt: download them again") from e
    _warn_if_not_finite(bad)
    model.load_state_dict(state, strict=True, assign=True)
    model.source = source
    return model


def _convert(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A file's tensor in ``dtype`` on ``device``: itself if it already is (and is aligned as torch's own
    memory is), else a copy made a slice at a time, each slice's file pages let go once copied (so the
    two are never held whole at once)."""
    if tensor.dtype == dtype and tensor.device == device and tensor.data_ptr() % _ALIGNMENT == 0:
        return tensor
    value = torch.empty(tensor.shape, dtype=dtype, device=device)
    source, target = tensor.reshape(-1), value.view(-1)
    for start in range(0, source.numel(), _SLICE):
        target[start:start + _SLICE].copy_(source[start:start + _SLICE])
        _let_go(source[start:start + _SLICE])
    return value


_SLICE = 1 << 23  # values per slice when converting: 32 MiB of float32
# torch allocates CPU memory 64-byte aligned; a matmul reading a less aligned operand (a tensor at its
# offset in the file) may take another kernel path and round differently, so such a tensor is copied:
# the same weights must give the same bits whether loaded, built or copied.
_ALIGNMENT = 64


def _let_go(tensor: torch.Tensor) -> None:
    """Tell the kernel that a memory-mapped tensor's pages are not needed (Linux; elsewhere a no-op).

    They stay correct (a later read maps them in again from the file): this only keeps the
    process from holding the file's pages and their converted copy at once.
    """
    if tensor.device.type != "cpu" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
    try:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
    except (OSError, AttributeError):
        pass
