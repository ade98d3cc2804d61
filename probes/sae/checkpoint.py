"""An SAE training checkpoint, and the metrics log that follows it.

    DIR/training/step-{step}.safetensors   the SAE's parameters, the tokens since each latent fired,
                                           Adam's moments and steps (``optimizer.*``) and torch's random state
    DIR/training/state.json                the step, what the run is (settings, tap, rows), Adam's settings
                                           and the step file's sha256: written last, it is the commit
    DIR/sae_weights.safetensors, cfg.json  the committed SAE (``SAE.load(DIR)``, SAELens's layout)
    DIR/metrics.jsonl                      a line per step, cut back to the checkpoint when a run resumes

Each file is written under a temporary name, flushed and renamed (minigpt.files); the previous
step's file is removed only once the new state.json is in place, so a run killed at any moment
leaves one whole checkpoint. Where the batches stand is the step (the order is a function of the
seed and the epoch), so the step is the batch cursor. Nothing is pickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minigpt.errors import TrainingError
from minigpt.files import checked_file, file_sha256, read_json, write_atomically, write_json
from minigpt.training.checkpoint import optimizer_state, optimizer_tensors, param_groups_of

from .model import PARAMETERS, SAE

STATE_FORMAT = "minigpt-sae-train/1"
METRICS_FILE = "metrics.jsonl"
WAY_OUT = "train into a new directory, or remove DIR/training to start this one again"


def save(out: Path, sae: SAE, optimizer: torch.optim.Optimizer, state: dict, identity: dict, rank: int,
         world: int) -> None:
    """Commit the checkpoint of ``state['step']`` (rank 0 writes; the others hold the same state)."""
    if rank != 0:
        return
    training, step = out / "training", state["step"]
    training.mkdir(parents=True, exist_ok=True)
    tensors = {**{name: getattr(sae, name).detach().cpu().contiguous() for name in PARAMETERS},
               "since_fired": state["since_fired"], "rng": torch.get_rng_state(),
               **{f"optimizer.{key}": value for key, value in optimizer_tensors(optimizer).items()}}
    name = f"step-{step}.safetensors"
    write_atomically(training / name, lambda temporary: save_file(tensors, temporary))
    write_json(training / "state.json", {"format": STATE_FORMAT, "step": step, "identity": identity,
                                         "world_size": world, "param_groups": param_groups_of(optimizer),
                                         "file": name, "sha256": file_sha256(training / name)})
    for stale in training.glob("step-*.safetensors"):  # older steps, a killed save's
        if stale.name != name:
            stale.unlink(missing_ok=True)
    sae.save(out)


def resume(out: Path, identity: dict, sae: SAE, optimizer: torch.optim.Optimizer) -> dict | None:
    """Load ``out``'s checkpoint into ``sae`` and ``optimizer`` and return {step, since_fired}; None if there is none.

    TrainingError if it is another run's (other settings, tap or rows) or its files do not match state.json.
    """
    path = out / "training" / "state.json"
    if not path.exists():
        return None
    saved = read_json(path, TrainingError, WAY_OUT)
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not an SAE training state ({STATE_FORMAT}); {WAY_OUT}")
    differing = [k for k in identity if json.dumps(saved["identity"].get(k), sort_keys=True)
                 != json.dumps(identity[k], sort_keys=True)]
    if differing:
        raise TrainingError(f"{out} holds an SAE training run with other {', '.join(differing)}; give the same "
                            f"to resume it, or {WAY_OUT}")
    file = checked_file(out / "training" / str(saved["file"]), out / "training", TrainingError,
                        what="SAE checkpoint", way_out=WAY_OUT)
    if file_sha256(file) != saved["sha256"]:
        raise TrainingError(f"{file} is not the file {path} committed (its sha256 differs); {WAY_OUT}")
    tensors = load_file(str(file))
    with torch.no_grad():
        for name in PARAMETERS:
            getattr(sae, name).copy_(tensors[name])
    optimizer.load_state_dict(optimizer_state({k.removeprefix("optimizer."): v for k, v in tensors.items()
                                                if k.startswith("optimizer.")}, saved["param_groups"]))
    torch.set_rng_state(tensors["rng"])
    return {"step": saved["step"], "since_fired": tensors["since_fired"].clone()}


class Metrics:
    """``DIR/metrics.jsonl``: a JSON line per step, flushed as written; a resumed run's log is first
    cut back to the checkpoint's step, so it ends as the uninterrupted run's does."""

    def __init__(self, out: Path, step: int, *, write: bool = True):
        self.path, self.write = out / METRICS_FILE, write
        if not write:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
        text = "".join(line + "\n" for line in kept)
        write_atomically(self.path, lambda temporary: temporary.write_text(text, encoding="utf-8"))

    def append(self, entry: dict) -> None:
        if self.write:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
