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
(minigpt.files), then committed by renaming state.json into place; only then are the previous step's files removed.
Killed at any moment, DIR holds a whole committed checkpoint (the new one or the one before), never
two steps mixed. Nothing here is pickled.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import files
from ..errors import CheckpointError, TrainingError
from ..files import file_sha256, write_atomically
from ..weights import CONFIG_FILE, WEIGHTS_FILE, from_hf_state_dict, read_safetensors, save_pretrained

STATE_FORMAT = "minigpt-train/2"


def state_path(out: Path) -> Path:
    return out / "training" / "state.json"


def save(out: Path, model, optimizer: torch.optim.Optimizer, state: dict, rank: int, world: int) -> None:
    """Write and commit the checkpoint of ``state['step']`` (every rank calls this; rank 0 commits)."""
    training, step = out / "training", state["step"]
    training.mkdir(parents=True, exist_ok=True)
    _save_tensors(training / f"rng-{step}-rank{rank}.safetensors", _rng_state(model.unembedding.device))
    if world > 1:
        torch.distributed.barrier()  # every rank's generator is on disk
    if rank != 0:
        return
    staging = training / f"model-{step}"
    save_pretrained(model, staging)  # config.json + model.safetensors, each written atomically
    files.commit(staging / WEIGHTS_FILE, training / f"model-{step}.safetensors")
    _save_tensors(training / f"optimizer-{step}.safetensors", _optimizer_tensors(optimizer))
    written = [f"model-{step}.safetensors", f"optimizer-{step}.safetensors",
               *(f"rng-{step}-rank{r}.safetensors" for r in range(world))]
    committed = {**state, "format": STATE_FORMAT, "world_size": world, "param_groups": _param_groups(optimizer),
                 "config_json": files.read_json(staging / CONFIG_FILE, TrainingError, "train again"),
                 "files": {name: file_sha256(training / name) for name in written}}
    files.write_json(state_path(out), committed)
    _export(out, training / f"model-{step}.safetensors", staging / CONFIG_FILE)
    staging.rmdir()
    for stale in [*training.glob("*-*.safetensors"), *training.glob("model-*/*")]:  # older steps, a killed save's
        if stale.name not in committed["files"]:
            stale.unlink(missing_ok=True)


def load_state(out: Path, check: bool = True) -> dict | None:
    """The committed state.json of ``out``, its files checked; None when there is no checkpoint yet."""
    path = state_path(out)
    if not path.exists():
        return None
    damaged = "the checkpoint is damaged: train into a new --out"
    state = files.read_json(path, TrainingError, damaged)
    try:
        if state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{path} is not a minigpt training state ({STATE_FORMAT}); train into a new --out")
        listed = dict(state["files"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TrainingError(f"{path} cannot be read ({type(e).__name__}: {e}); {damaged}") from e
    for name, digest in listed.items() if check else ():
        where = out / "training" / name
        if not where.is_file() or file_sha256(where) != digest:
            raise TrainingError(f"{where} is missing or does not match {path}; the checkpoint was changed after it "
                                "was written and cannot be trusted: train into a new --out")
    return state


def restore(out: Path, state: dict, model, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Put the checkpoint's weights, optimizer state and this rank's random generator in place."""
    training, step = out / "training", state["step"]
    try:
        saved = read_safetensors(training / f"model-{step}.safetensors")
        weights = from_hf_state_dict(saved, model.cfg, type(model).parameter_shapes)
    except CheckpointError as e:
        raise TrainingError(f"the checkpoint of step {step} in {out} does not fit this model: {e}") from e
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(weights[name])
    tensors = load_file(training / f"optimizer-{step}.safetensors")
    optimizer.load_state_dict(_optimizer_state(tensors, state["param_groups"]))
    rng = load_file(training / f"rng-{step}-rank{rank}.safetensors")
    torch.set_rng_state(rng["cpu"])
    device = model.unembedding.device
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def _export(out: Path, weights: Path, config: Path) -> None:
    """The committed weights as DIR/model.safetensors (a hard link, else a copy) and DIR/config.json."""
    def place(path: Path) -> None:
        try:
            os.link(weights, path)
        except OSError:  # a filesystem without hard links
            Path(path).write_bytes(weights.read_bytes())

    write_atomically(out / WEIGHTS_FILE, place)
    files.commit(config, out / CONFIG_FILE)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat names: ``{index}.exp_avg``, ``{index}.exp_avg_sq``, ``{index}.step``."""
    return {f"{index}.{key}": value.detach().cpu().contiguous()
            for index, entry in optimizer.state_dict()["state"].items() for key, value in entry.items()}


def _param_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
            for group in optimizer.state_dict()["param_groups"]]


def _optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in param_groups]
    return {"state": state, "param_groups": groups}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomically(path, lambda temporary: save_file(tensors, temporary))

