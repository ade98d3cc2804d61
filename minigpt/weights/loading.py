"""``GPT.from_pretrained``: a checkpoint (a local directory, a shipped model or a hub name), checked and
loaded memory-mapped.

config.json and the files' headers are checked first (``names.plan``); the model is then built on
the meta device (no memory) and each parameter is the file's own memory-mapped tensor (or, where
the dtype or device differs, its converted copy), so a load costs about the weights' bytes.
"""
from __future__ import annotations

import ctypes
import mmap
import re
from contextlib import ExitStack
from pathlib import Path

import torch

from .. import files, run_layout
from ..config import GPTConfig
from ..errors import CheckpointError
from ..files import file_sha256, read_json
from ..inputs import check_placement
from .hub import hub_directory
from .initialise import build_on_meta, parameter_shapes
from .names import check_twins, finite, plan, warn_if_not_finite
from .reading import CONFIG_FILE, WEIGHTS_FILE, checked_file, read_config, read_header, weight_files

# Trained models that come with minigpt (made by scripts/train_docs.py and train_small.py), by the name that loads them.
SHIPPED = {name: Path(__file__).parent.parent / "assets" / name for name in ("docs-small", "pydoc-tiny")}
# Beside each shipped model: the sha256 of its files, checked on every load (``verified_shipped``).
CHECKSUMS = "SHA256SUMS"
_CHECKSUM_LINE = re.compile(r"(?P<sha256>[0-9a-f]{64}) [ *](?P<name>[A-Za-z0-9_.-]+)")
_REINSTALL = "reinstall minigpt (pip install --force-reinstall minigpt-taps)"
# Ends the ``source`` of every shipped model, so that whoever shows a model can tell (the report's banner).
SHIPPED_MARK = "shipped with minigpt; NOT OpenAI's GPT-2"


def shipped_description(name: str) -> str:
    """What a shipped model is, from the TRAINING.json beside it: a label no one can take for OpenAI's GPT-2."""
    try:
        record = read_json(SHIPPED[name] / "TRAINING.json", CheckpointError, "reinstall minigpt")
        cfg, corpus = record["config"], record["corpus"]
        sources = " and ".join(source["name"] for source in corpus.get("sources", [])) or "Python 3.11 documentation"
        whole = record.get("validation_loss_as_shipped_all_windows")
        loss = (f"validation loss {whole:.2f}, an interpolated bigram {record['baselines']['bigram_interpolated']:.2f}"
                if whole is not None else f"validation loss {record['final_validation_loss']:.2f}")
        return (f"{name}: a small GPT-2 ({cfg['n_layer']} blocks, d_model {cfg['n_embd']}, "
                f"{record['parameters'] / 1e6:.1f}M parameters) trained by minigpt on the {sources} ({loss}), "
                f"{SHIPPED_MARK}")
    except (CheckpointError, ValueError, KeyError, TypeError, AttributeError):
        return f"{name}: a small model trained by minigpt, {SHIPPED_MARK}"


def write_checksums(directory: Path, names: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE, "TRAINING.json")) -> None:
    """DIR/SHA256SUMS for a model to ship: the sha256 of each of ``names``, in the format
    ``verified_shipped`` checks (``sha256sum -c`` reads it too)."""
    files.write_atomically(Path(directory) / CHECKSUMS, lambda path: path.write_text(
        "".join(f"{file_sha256(Path(directory) / name)}  {name}\n" for name in sorted(names)), encoding="utf-8"))


def verified_shipped(name: str) -> Path:
    """The directory of the shipped model ``name``, once each file its SHA256SUMS lists has that sha256.

    SHA256SUMS is ``sha256sum``'s format ("HEX  NAME" a line) and must list config.json and the
    weights; a changed, truncated or missing file is a CheckpointError before anything is loaded.
    """
    directory = SHIPPED[name]
    sums = files.checked_file(directory / CHECKSUMS, directory, CheckpointError, what="shipped model",
                              way_out=_REINSTALL)
    if sums.stat().st_size > 2**16:  # a line per file: a few hundred bytes
        raise CheckpointError(f"{sums} holds {sums.stat().st_size:,} bytes, not a list of checksums; {_REINSTALL}")
    lines = sums.read_text(encoding="utf-8", errors="replace").splitlines()
    listed = [_CHECKSUM_LINE.fullmatch(line) for line in lines if line.strip()]
    if not all(listed) or not {CONFIG_FILE, WEIGHTS_FILE} <= {m["name"] for m in listed}:
        raise CheckpointError(f"{sums} must list the sha256 of {CONFIG_FILE} and {WEIGHTS_FILE}, a line "
                              f"'HEX  NAME' each; {_REINSTALL}")
    for match in listed:
        path = files.checked_file(directory / match["name"], directory, CheckpointError,
                                  what="shipped model", way_out=_REINSTALL)
        found = file_sha256(path)
        if found != match["sha256"]:
            raise CheckpointError(f"{path} has sha256 {found}, not the {match['sha256']} recorded in {sums}: the "
                                  f"shipped model's files were changed or damaged; {_REINSTALL}")
    return directory


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
        directory = verified_shipped(str(name_or_dir))
        return directory, directory, shipped_description(str(name_or_dir))
    snapshot = hub_directory(str(name_or_dir))
    # The hub's cache links each snapshot's files to blobs/ beside snapshots/: the repository's folder is the root.
    return snapshot, snapshot.parent.parent, f"weights of {name_or_dir} (HuggingFace hub)"



def load_model(model_class: type, name_or_dir: str | Path, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """``GPT.from_pretrained``: ``model_class`` (GPT) with the weights of a checkpoint (hub name or local
    directory with config.json + safetensors), at about their bytes.

    config.json and the files' headers are checked first (``plan``); the model is built on the
    meta device, and each parameter becomes the file's memory-mapped tensor as it is (a Conv1D
    weight as its transposed view), or its copy in ``dtype`` on ``device``, whose file pages are
    let go at once. NaN and inf are looked for in the weights as they will be used.
    """
    device = check_placement(dtype, device)
    directory, root, source = locate(name_or_dir)
    cfg, paths, source = _checkpoint_files(directory, root, source)
    with ExitStack() as stack:
        header, where = read_header(paths, stack)
        chosen, twins = plan(header, cfg, lambda c: parameter_shapes(model_class, c))
        model = build_on_meta(model_class, cfg)
        try:
            check_twins((a, where[a].get_tensor(a), b, where[b].get_tensor(b)) for a, b in twins)
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
    warn_if_not_finite(bad)
    model.load_state_dict(state, strict=True, assign=True)
    model.provenance = source
    return model


def _checkpoint_files(directory: Path, root: Path, source: str) -> tuple[GPTConfig, list[Path], str]:
    """(config, the weight files, the source) of a checkpoint directory. A ``minigpt train`` run's
    directory gives the step its state.json commits: its export (DIR/model.safetensors, config.json)
    when that is the committed step, else the step's own files (a run killed between its commit and
    its export, or read while the trainer writes a checkpoint)."""
    for _attempt in range(2):  # the trainer may commit a newer step and remove this one meanwhile: look again
        committed = run_layout.committed_model(directory)
        if committed is None or _exported(directory, committed):
            break
        try:
            weights = checked_file(committed.weights, root)
            if file_sha256(weights) != committed.sha256:
                raise CheckpointError(f"{weights} does not have the sha256 that {run_layout.state_path(directory)} "
                                      "commits: the run was changed after it was written; train again")
        except (CheckpointError, OSError):
            if run_layout.committed_model(directory) != committed:
                continue
            raise
        return (GPTConfig.from_hf(committed.config_json), [weights],
                f"{source}, step {committed.step} as committed ({committed.weights.name}; the run's export "
                "lags it until `minigpt train` runs over it again)")
    config = directory / CONFIG_FILE
    if not (config.exists() or config.is_symlink()):
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; a GPT-2 checkpoint directory holds "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    return read_config(checked_file(config, root)), weight_files(directory, root), source


def _exported(directory: Path, committed: run_layout.Committed) -> bool:
    """Whether the run's DIR/model.safetensors holds the committed step's weights and config.json its config."""
    if not run_layout.holds_weights(directory / WEIGHTS_FILE, committed.weights, committed.sha256):
        return False
    try:
        return read_json(directory / CONFIG_FILE, CheckpointError, "") == committed.config_json
    except CheckpointError:
        return False


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
