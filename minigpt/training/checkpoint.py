"""A training checkpoint: what it takes to go on exactly, and the model in HuggingFace's layout.

    DIR/training/model-{step}.safetensors        the weights at that step (save_pretrained's layout)
    DIR/training/optimizer-{step}.safetensors    AdamW's moments and step counts, one tensor each
    DIR/training/rng-{step}-rank{R}.safetensors  each process's random generator (dropout)
    DIR/training/state.json                      the step, the settings, the loss log, and the sha256
                                                 of the step's files: written last, it is the commit
    DIR/config.json, DIR/model.safetensors       the committed weights where HF's save_pretrained puts
                                                 them (a hard link to model-{step} where the filesystem
                                                 allows), so transformers and minigpt load DIR as it is

A checkpoint is written beside the previous one under new names, each file flushed to disk
(minigpt.files), then committed by renaming state.json into place; then DIR's model.safetensors and
config.json become the new step's (``export``) and the previous step's files are removed (``tidy``).
Killed at any moment, DIR holds a whole committed checkpoint (the new one or the one before), never
two steps mixed; killed between the commit and the export, DIR's model.safetensors is the step before
until the next run, which makes it the committed one before anything else; meanwhile
``GPT.from_pretrained(DIR)`` (and so every minigpt command) loads the committed step's own files
(minigpt/run_layout.py knows where they are). A checkpoint with NaN or inf in its
weights or AdamW's state is never written, and one that cannot be written (a full disk, a file-size
limit) leaves nothing of itself. Nothing here is pickled.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import files
from ..run_layout import holds_weights, state_path, step_weights
from ..errors import CheckpointError, TrainingError
from ..files import file_sha256, write_atomically
from ..weights import CONFIG_FILE, WEIGHTS_FILE, from_hf_state_dict, read_safetensors, save_pretrained
from . import verify

STATE_FORMAT = "minigpt-train/2"
# Every name save writes in DIR/training (besides state.json), and its staging directory model-{step}/.
STEP_FILE = re.compile(r"(model|optimizer)-[0-9]+\.safetensors|rng-[0-9]+-rank[0-9]+\.safetensors")
STAGING = re.compile(r"model-[0-9]+")
_WRITE_FAILURES = (OSError, SafetensorError)  # safetensors reports a full disk as its own error


def step_files(step: int, world: int) -> list[str]:
    """The names of step ``step``'s files in DIR/training, for ``world`` processes."""
    return [f"model-{step}.safetensors", f"optimizer-{step}.safetensors",
            *(f"rng-{step}-rank{r}.safetensors" for r in range(world))]


def last_good(out: Path, step: int | None) -> str:
    """Where the last committed checkpoint is, for messages."""
    if step is None:
        return f"no checkpoint had been written into {out} yet"
    return f"the last good checkpoint, step {step}, is in {out} (training/, model.safetensors) as it was"


def save(out: Path, model, optimizer: torch.optim.Optimizer, state: dict, rank: int, world: int,
         committed: int | None = None) -> None:
    """Write and commit the checkpoint of ``state['step']`` (every rank calls this; rank 0 commits).

    ``committed``: the step of the checkpoint on disk now, named when this one cannot be written.
    """
    step = state["step"]
    bad = verify.non_finite(model, optimizer)
    if bad is not None:
        raise TrainingError(f"training diverged: the {bad} holds NaN or inf after step {step}, so its checkpoint "
                            f"is not written; {last_good(out, committed)}. Lower --lr, raise --warmup or set "
                            "--grad-clip, and train into a new --out (--init from the last good checkpoint)")
    try:
        state_now = _write(out, model, optimizer, state, rank, world)
    except _WRITE_FAILURES as e:
        if _step_on_disk(out) != step:  # not committed: nothing of it may stay
            _remove_step(out / "training", step, rank, world)
        raise TrainingError(f"cannot write the checkpoint of step {step} into {out / 'training'} ({e}); nothing of "
                            f"it is kept and {last_good(out, committed)}: free some space (or raise the file-size "
                            "limit, ulimit -f) and run the same command again, which goes on from there") from e
    if state_now is None:
        return
    try:
        export(out, state_now)
    except _WRITE_FAILURES as e:
        raise TrainingError(f"the checkpoint of step {step} is committed, but {out / WEIGHTS_FILE} could not be "
                            f"made its copy ({e}); free some space and run the same command again: it makes the "
                            "export first") from e
    tidy(out, state_now)


def _write(out: Path, model, optimizer, state: dict, rank: int, world: int) -> dict | None:
    """The step's files, then state.json (the commit); the state committed (None on the other ranks)."""
    training, step = out / "training", state["step"]
    training.mkdir(parents=True, exist_ok=True)
    _save_tensors(training / f"rng-{step}-rank{rank}.safetensors", _rng_state(model.unembedding.device))
    if world > 1:
        torch.distributed.barrier()  # every rank's generator is on disk
    if rank != 0:
        return None
    staging = training / f"model-{step}"
    save_pretrained(model, staging)  # config.json + model.safetensors, each written atomically
    files.commit(staging / WEIGHTS_FILE, step_weights(out, step))
    _save_tensors(training / f"optimizer-{step}.safetensors", optimizer_tensors(optimizer))
    committed = {**state, "format": STATE_FORMAT, "world_size": world, "param_groups": param_groups_of(optimizer),
                 "config_json": files.read_json(staging / CONFIG_FILE, TrainingError, "train again"),
                 "files": {name: file_sha256(training / name) for name in step_files(step, world)}}
    files.write_json(state_path(out), committed)
    return committed


def load_state(out: Path, check: bool = True, max_bytes: int | None = None) -> dict | None:
    """The committed state.json of ``out``, every field checked; None when there is no checkpoint yet.

    ``check``: also each listed file, a regular file inside DIR/training (of at most ``max_bytes``)
    whose sha256 is the one listed.
    """
    path = state_path(out)
    if not os.path.lexists(path):
        return None
    training = out / "training"
    state = files.read_json(files.checked_file(path, training, TrainingError, what="training run",
                                               way_out=verify.DAMAGED), TrainingError, verify.DAMAGED)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not a minigpt training state ({STATE_FORMAT}); train into a new --out")
    verify.state_fields(state, path, step_files)
    for name, digest in state["files"].items() if check else ():
        where = _checked(training / name, training, max_bytes)
        if file_sha256(where) != digest:
            raise TrainingError(f"{where} does not match {path}; the checkpoint was changed after it "
                                "was written and cannot be trusted: train into a new --out")
    return state


def _checked(path: Path, training: Path, max_bytes: int | None) -> Path:
    """``path``, a regular file inside ``training`` of at most ``max_bytes``, looked at before it is opened."""
    real = files.checked_file(path, training, TrainingError, what="training run",
                              way_out="it is missing or was changed after it was written: train into a new --out")
    size = os.stat(real).st_size
    if max_bytes is not None and size > max_bytes:
        raise TrainingError(f"{path} holds {size:,} bytes, more than this model's checkpoint files can "
                            f"({max_bytes:,}); {verify.DAMAGED}")
    return real


def file_limit(model) -> int:
    """The most bytes a checkpoint file of ``model`` can hold: AdamW's two moments per weight, and room for headers."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2**24


def restore(out: Path, state: dict, model, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Put the checkpoint's weights, optimizer state and this rank's random generator in place, each checked."""
    training, step = out / "training", state["step"]
    limit = file_limit(model)
    path = _checked(training / f"model-{step}.safetensors", training, limit)
    try:
        saved = read_safetensors(path)
        verify.weights(saved, path)
        weights = from_hf_state_dict(saved, model.cfg, type(model).parameter_shapes)
    except CheckpointError as e:
        raise TrainingError(f"the checkpoint of step {step} in {out} does not fit this model: {e}") from e
    params = model.state_dict()
    for name, param in params.items():
        if weights[name].dtype != param.dtype:
            raise verify.bad(path, name, str(param.dtype), weights[name].dtype)
    verify.param_groups(state["param_groups"], param_groups_of(optimizer), state_path(out))
    path = _checked(training / f"optimizer-{step}.safetensors", training, limit)
    tensors = _load(path)
    verify.optimizer_tensors(tensors, [p for g in optimizer.param_groups for p in g["params"]], path)
    path = _checked(training / f"rng-{step}-rank{rank}.safetensors", training, limit)
    rng = _load(path)
    device = model.unembedding.device
    verify.rng_tensors(rng, device, path)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    optimizer.load_state_dict(optimizer_state(tensors, state["param_groups"]))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise TrainingError(f"{path} is not a readable safetensors file ({e}); {verify.DAMAGED}") from e


def export(out: Path, state: dict) -> None:
    """Make DIR/model.safetensors and config.json those of ``state``'s step (a hard link, else a copy);
    nothing is written where they already are."""
    weights = step_weights(out, state["step"])
    if not holds_weights(out / WEIGHTS_FILE, weights, state["files"][weights.name]):
        def place(path: Path) -> None:
            path.unlink(missing_ok=True)  # this process's own temporary name, left by a killed one of the same id
            try:
                os.link(weights, path)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(weights, path)

        write_atomically(out / WEIGHTS_FILE, place)
    try:
        config = files.read_json(out / CONFIG_FILE, TrainingError, "")
    except TrainingError:
        config = None  # missing or not JSON: written again
    if config != state["config_json"]:
        files.write_json(out / CONFIG_FILE, state["config_json"])  # save_pretrained's bytes: one writer


def tidy(out: Path, state: dict | None) -> None:
    """Remove from DIR/training what minigpt wrote there and no longer needs: the step files and staging
    directories of other steps than ``state``'s (older ones, a killed save's), and killed writers'
    temporaries (in DIR too). A file of any other name is left as it is."""
    kept = set(state["files"]) if state else set()
    training = out / "training"
    files.remove_temporaries(out, lambda name: name in (WEIGHTS_FILE, CONFIG_FILE))
    if not training.is_dir():
        return
    files.remove_temporaries(training, lambda name: name == "state.json" or STEP_FILE.fullmatch(name))
    for entry in training.iterdir():
        if STEP_FILE.fullmatch(entry.name) and entry.name not in kept and entry.is_file():
            entry.unlink(missing_ok=True)
        elif STAGING.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            _remove_staging(entry)


def _remove_staging(staging: Path) -> None:
    """save_pretrained's files in a staging directory, then the directory if nothing else is in it."""
    ours = (WEIGHTS_FILE, CONFIG_FILE)
    files.remove_temporaries(staging, lambda name: name in ours)
    for name in ours:
        if (staging / name).is_file():
            (staging / name).unlink()
    if not any(staging.iterdir()):
        staging.rmdir()


def _remove_step(training: Path, step: int, rank: int, world: int) -> None:
    """What this rank wrote of an uncommitted step ``step`` (rank 0: all but the other ranks' generators)."""
    mine = f"rng-{step}-rank{rank}.safetensors"
    for name in step_files(step, world) if rank == 0 else [mine]:
        if not name.startswith("rng-") or name == mine:
            (training / name).unlink(missing_ok=True)
    if rank == 0 and (training / f"model-{step}").is_dir():
        _remove_staging(training / f"model-{step}")


def _step_on_disk(out: Path) -> int | None:
    """The step state.json names now, without checking anything else (None if there is none or it is unreadable)."""
    try:
        state = files.read_json(state_path(out), TrainingError, "")
    except TrainingError:
        return None
    return state.get("step") if isinstance(state, dict) else None


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat names: ``{index}.exp_avg``, ``{index}.exp_avg_sq``, ``{index}.step``."""
    return {f"{index}.{key}": value.detach().cpu().contiguous()
            for index, entry in optimizer.state_dict()["state"].items() for key, value in entry.items()}


def param_groups_of(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
            for group in optimizer.state_dict()["param_groups"]]


def optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in param_groups]
    return {"state": state, "param_groups": groups}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomically(path, lambda temporary: save_file(tensors, temporary))
