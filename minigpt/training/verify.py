"""What a resumed run reads, checked before it is trusted, and what a checkpoint may hold.

Every field of ``state.json`` is checked for type and range, and every tensor of the step's files
for its name, shape and dtype against the model and optimizer being resumed, and for NaN and inf
(a checkpoint never holds them: ``non_finite`` is asked before one is written). A problem is a
TrainingError naming the file and the field, never a raw error from deep inside torch.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from ..checks import is_integer
from ..config import GPTConfig
from ..errors import CheckpointError, TrainingError

DAMAGED = "the checkpoint is damaged: train into a new --out"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Flags torch sets from the device (fused on a GPU): a saved group may differ from a new one in them.
_DEVICE_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def bad(path: Path, field: str, wanted: str, got: object) -> TrainingError:
    """The error for ``field`` of ``path`` holding ``got`` where ``wanted`` was expected."""
    shown = repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return TrainingError(f"{path}: {field} must be {wanted}, got {shown}; {DAMAGED}")


def state_fields(state: object, path: Path, names_of_step: Callable[[int, int], list[str]]) -> dict:
    """``state`` (state.json's value) with every field checked; ``names_of_step(step, world)`` -> its files."""
    if not isinstance(state, dict):
        raise bad(path, "the whole file", "a JSON object", state)
    settings = state.get("settings")
    if not isinstance(settings, dict) or not (is_integer(settings.get("steps")) and settings["steps"] >= 1):
        raise bad(path, "settings", "an object with steps a positive integer", settings)
    step, world, log = state.get("step"), state.get("world_size"), state.get("log")
    if not (is_integer(step) and 1 <= step <= settings["steps"]):
        raise bad(path, "step", f"an integer in [1, {settings['steps']}] (the settings' steps)", step)
    if not (is_integer(world) and world >= 1):
        raise bad(path, "world_size", "a positive integer", world)
    if not isinstance(log, list) or len(log) != step:
        raise bad(path, "log", f"a list of {step} entries (one per step)", log)
    for i, entry in enumerate(log):
        log_entry(entry, i, path)
    listed = state.get("files")
    expected = set(names_of_step(step, world))
    if not isinstance(listed, dict) or set(listed) != expected:
        raise bad(path, "files", f"an object naming exactly {sorted(expected)}", listed)
    for name, digest in listed.items():
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise bad(path, f"files[{name!r}]", "a sha256 (64 hex digits)", digest)
    config_json = state.get("config_json")
    try:
        # Exactly what save_pretrained wrote for the float32 model (the export's config.json is made from it).
        cfg = GPTConfig.from_hf(config_json) if isinstance(config_json, dict) else None
        fits = cfg is not None and asdict(cfg) == state.get("config") and \
            config_json == {**cfg.to_hf(), "torch_dtype": "float32"}
    except (CheckpointError, TypeError, ValueError, KeyError):
        fits = False
    if not fits:
        raise bad(path, "config_json", "the config.json of the model in field 'config'", config_json)
    groups = state.get("param_groups")
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
        raise bad(path, "param_groups", "a list of objects (AdamW's parameter groups)", groups)
    return state


# A step's log entry: the keys of a step trained and of one skipped (a NaN loss); an evaluation step adds
# val_loss and (rank 0) a text sample, the last step val_loss_full and the baselines (a dict of numbers).
_TRAINED, _SKIPPED = {"step", "loss", "lr", "grad_norm", "tokens_per_s"}, {"step", "lr", "skipped"}
_EVALUATION = {"val_loss": "number", "val_loss_full": "number", "sample": "text", "baselines": "numbers"}


def log_entry(entry: object, i: int, path: Path) -> None:
    """``log[i]`` as the training loop writes it: step i + 1, its keys, finite numbers (a skipped step's reason,
    an evaluation's sample as text, the baselines as numbers)."""
    if not (isinstance(entry, dict) and is_integer(entry.get("step")) and entry["step"] == i + 1):
        raise bad(path, f"log[{i}]", f"an object with step {i + 1}", entry)
    keys = _SKIPPED if "skipped" in entry else _TRAINED
    if not keys <= set(entry) <= keys | set(_EVALUATION):
        raise bad(path, f"log[{i}]", f"an object with keys {sorted(keys)} (and {', '.join(_EVALUATION)})",
                  sorted(entry))
    for key in set(entry) - {"step"}:
        kind = "text" if key == "skipped" else _EVALUATION.get(key, "number")
        if not _is(kind, entry[key]):
            raise bad(path, f"log[{i}].{key}", {"number": "a finite number", "text": "a text",
                                                "numbers": "an object of finite numbers"}[kind], entry[key])


def _is(kind: str, value: object) -> bool:
    """Whether ``value`` is a finite number, a text, or an object whose leaves are finite numbers."""
    if kind == "text":
        return isinstance(value, str)
    if kind == "numbers":
        return isinstance(value, dict) and all(isinstance(k, str) and _is("numbers" if isinstance(v, dict)
                                                                          else "number", v) for k, v in value.items())
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def param_groups(saved: list[dict], ours: list[dict], path: Path) -> None:
    """The saved optimizer groups must be the ones ``make_optimizer`` builds, as save wrote them."""
    if len(saved) != len(ours):
        raise bad(path, "param_groups", f"{len(ours)} groups", saved)
    for i, (group, mine) in enumerate(zip(saved, ours)):
        if set(group) != set(mine):
            raise bad(path, f"param_groups[{i}]", f"an object with keys {sorted(mine)}", sorted(group))
        lr = group["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr >= 0):
            raise bad(path, f"param_groups[{i}].lr", "a finite number >= 0", lr)
        for key, value in group.items():
            if key in _DEVICE_FLAGS:
                if value is not None and not isinstance(value, bool):
                    raise bad(path, f"param_groups[{i}].{key}", "true, false or null", value)
            elif key != "lr" and value != mine[key]:
                raise bad(path, f"param_groups[{i}].{key}", repr(mine[key]), value)


def weights(saved: dict[str, torch.Tensor], path: Path) -> None:
    """No NaN or inf in the checkpoint's weights."""
    for name, tensor in saved.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise bad(path, name, "finite (no NaN or inf)", "a tensor holding NaN or inf")


def optimizer_tensors(tensors: dict[str, torch.Tensor], params: list[torch.Tensor], path: Path) -> None:
    """AdamW's flat tensors (``{i}.exp_avg``, ``{i}.exp_avg_sq`` [shape of parameter i], ``{i}.step`` [])
    for every parameter, or for none (no update applied yet): dtypes those of the parameters, all finite."""
    expected = {}
    for i, p in enumerate(params):
        expected.update({f"{i}.exp_avg": (p.shape, p.dtype), f"{i}.exp_avg_sq": (p.shape, p.dtype),
                         f"{i}.step": (torch.Size([]), torch.float32)})
    if tensors and set(tensors) != set(expected):
        unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise bad(path, "the tensor names", f"AdamW's for {len(params)} parameters (missing {missing[:4]})",
                  unknown[:4] or sorted(tensors)[:4])
    for name, tensor in tensors.items():
        shape, dtype = expected[name]
        if tensor.shape != shape or tensor.dtype != dtype:
            raise bad(path, name, f"{dtype} of shape {list(shape)}", f"{tensor.dtype} of shape {list(tensor.shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise bad(path, name, "finite (no NaN or inf)", "a tensor holding NaN or inf")


def rng_tensors(tensors: dict[str, torch.Tensor], device: torch.device, path: Path) -> None:
    """A random generator's state: ``cpu`` as torch.get_rng_state gives it, ``cuda`` too if the run was on a GPU."""
    allowed = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        allowed["cuda"] = torch.cuda.get_rng_state(device)
    if "cpu" not in tensors or not set(tensors) <= {"cpu", "cuda"}:
        raise bad(path, "the tensor names", "'cpu' (and 'cuda' for a run on a GPU)", sorted(tensors))
    for name, tensor in tensors.items():
        mine = allowed.get(name)
        if mine is not None and (tensor.dtype != mine.dtype or tensor.shape != mine.shape):
            raise bad(path, name, f"{mine.dtype} of shape {list(mine.shape)}",
                      f"{tensor.dtype} of shape {list(tensor.shape)}")


def non_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The first weight or AdamW moment holding NaN or inf, by name (None if all are finite)."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return f"weight {name}"
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and not bool(torch.isfinite(value).all()):
                return f"AdamW's {key} of {name}"
    return None
