"""Where a ``minigpt train`` run keeps its committed model, known once for the writer and the readers.

The trainer (training/checkpoint.py) commits a step by renaming DIR/training/state.json into place,
then exports that step's weights as DIR/model.safetensors and config.json. The loader
(weights/loading.py) reads a run's directory through ``committed_model``, so every command sees the
step state.json commits, even when a run was killed between the commit and the export.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import files
from .config import is_integer
from .errors import CheckpointError

TRAINING_DIR = "training"
STATE_FILE = "state.json"


def state_path(out: Path) -> Path:
    """DIR/training/state.json: written last, it is a checkpoint's commit."""
    return Path(out) / TRAINING_DIR / STATE_FILE


def step_weights(out: Path, step: int) -> Path:
    """DIR/training/model-{step}.safetensors: step ``step``'s weights in save_pretrained's layout."""
    return Path(out) / TRAINING_DIR / f"model-{step}.safetensors"


@dataclass(frozen=True)
class Committed:
    """The model a run's state.json commits: its step, weights file, that file's sha256 and config.json."""

    step: int
    weights: Path
    sha256: str
    config_json: dict


def committed_model(out: Path) -> Committed | None:
    """The committed model of the training run in ``out``; None when ``out`` holds no state.json.

    Reads only what the loader needs (the trainer checks the rest when it resumes); a state.json
    that lacks it raises CheckpointError naming the field.
    """
    path = state_path(out)
    if not os.path.lexists(path):
        return None
    damaged = f"the training run in {out} is damaged; load one of its exports saved elsewhere, or train again"
    state = files.read_json(files.checked_file(path, Path(out) / TRAINING_DIR, CheckpointError, what="training run",
                                               way_out=damaged), CheckpointError, damaged)
    step = state.get("step") if isinstance(state, dict) else None
    if not (is_integer(step) and step >= 1):
        raise CheckpointError(f"{path}: 'step' must be a positive integer, got {step!r}; {damaged}")
    weights = step_weights(out, step)
    listed = state.get("files")
    digest = listed.get(weights.name) if isinstance(listed, dict) else None
    config_json = state.get("config_json")
    if not isinstance(digest, str) or not isinstance(config_json, dict):
        raise CheckpointError(f"{path} must list the sha256 of {weights.name} under 'files' and the model's "
                              f"config under 'config_json'; {damaged}")
    return Committed(step, weights, digest, config_json)


def holds_weights(export: Path, weights: Path, digest: str) -> bool:
    """Whether ``export`` (DIR/model.safetensors) is a regular file with ``weights``' bytes: the same
    file (the trainer's hard link), or one whose sha256 is ``digest`` (a copy, where links are not allowed)."""
    try:
        if not stat.S_ISREG(os.lstat(export).st_mode):
            return False
        return os.path.samefile(export, weights) or files.file_sha256(export) == digest
    except OSError:
        return False
