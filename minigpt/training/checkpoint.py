"""A training checkpoint: the model in HuggingFace's layout, plus what it takes to go on exactly.

    DIR/config.json, DIR/model.safetensors    the model, as save_pretrained writes it (transformers
                                              and minigpt both load DIR as it is)
    DIR/training/optimizer.safetensors        AdamW's moments and step counts, one tensor each
    DIR/training/rng-rank{R}.safetensors      each process's random generator (dropout)
    DIR/training/state.json                   the step, the settings, the loss log, and the sha256
                                              of every file above: written last, it is the commit

Nothing here is pickled. A run killed while writing leaves files whose hashes do not match
state.json, and going on from them is refused rather than silently mixing two steps.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError
from ..weights import CONFIG_FILE, WEIGHTS_FILE, save_pretrained

STATE_FORMAT = "minigpt-train/1"


def state_path(out: Path) -> Path:
    return out / "training" / "state.json"


def save(out: Path, model, optimizer: torch.optim.Optimizer, state: dict, rank: int, world: int) -> None:
    """Write the checkpoint of ``state['step']`` (every rank calls this; rank 0 writes the shared files)."""
    training = out / "training"
    training.mkdir(parents=True, exist_ok=True)
    _save_tensors(training / f"rng-rank{rank}.safetensors", _rng_state())
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return
    save_pretrained(model, out)
    _save_tensors(training / "optimizer.safetensors", _optimizer_tensors(optimizer))
    files = [CONFIG_FILE, WEIGHTS_FILE, "training/optimizer.safetensors",
             *(f"training/rng-rank{r}.safetensors" for r in range(world))]
    state = {**state, "format": STATE_FORMAT, "world_size": world, "param_groups": _param_groups(optimizer),
             "sha256": {name: _sha256(out / name) for name in files}}
    temporary = training / f".state.json.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, state_path(out))


def load_state(out: Path) -> dict | None:
    """state.json of ``out``, checked against the files it names; None when there is no checkpoint yet."""
    path = state_path(out)
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainingError(f"{path} cannot be read ({e}); the checkpoint is damaged: train into a new --out") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not a minigpt training state ({STATE_FORMAT}); train into a new --out")
    for name, digest in state["sha256"].items():
        if not (out / name).is_file() or _sha256(out / name) != digest:
            raise TrainingError(f"{out / name} is missing or does not match {path} (a run stopped while writing "
                                "its checkpoint?); the checkpoint cannot be trusted: train into a new --out")
    return state


def restore(out: Path, state: dict, model, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Put the checkpoint's weights, optimizer state and this rank's random generator in place."""
    from ..weights import read_safetensors, from_hf_state_dict

    saved = read_safetensors(out / WEIGHTS_FILE)
    weights = from_hf_state_dict(saved, model.cfg, type(model).parameter_shapes)
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(weights[name])
    tensors = load_file(out / "training" / "optimizer.safetensors")
    optimizer.load_state_dict(_optimizer_state(tensors, state["param_groups"]))
    rng = load_file(out / "training" / f"rng-rank{rank}.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
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
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(temporary))
    os.replace(temporary, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
