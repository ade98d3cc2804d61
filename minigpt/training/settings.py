"""``Settings``: what a training run is, each field a ``minigpt train`` option, checked when built;
``check_fits``: whether its step fits in memory, told before the model is built."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from ..checks import check_choice, check_float, check_int
from ..config import GPTConfig
from ..errors import TrainingError
from ..memory import check_training_fits, training_bytes
from ..weights.names import least_values
from .data import SHORTEST_REPEAT

# The window order seeds a 64-bit generator with seed * 1_000_003 + epoch (training/data.py's Order):
# below 2**44, that leaves room for 2**59 epochs.
MAX_SEED = 2**44 - 1


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """What a training run is (each field is also a ``minigpt train`` option); a run resumed over the
    same ``out`` must be given the same. Checked when built: TrainingError lists every bad field."""

    steps: int = _knob(1000, "optimizer steps")
    batch_size: int = _knob(8, "windows per forward, in each process")
    grad_accum: int = _knob(1, "forwards per optimizer step, in each process (gradient accumulation)")
    context: int = _knob(256, "tokens per window")
    lr: float = _knob(6e-4, "peak learning rate, reached at the end of the warm-up")
    min_lr: float = _knob(6e-5, "where the cosine ends (at step --steps, one past the last)")
    warmup: int = _knob(100, "steps of linear warm-up")
    weight_decay: float = _knob(0.1, "AdamW's weight decay, on matrices and embeddings only")
    beta1: float = _knob(0.9, "AdamW's beta1")
    beta2: float = _knob(0.95, "AdamW's beta2")
    grad_clip: float = _knob(1.0, "largest gradient norm (0: no clipping)")
    dropout: float | None = _knob(None, "embedding/attention/residual dropout (default: the config's)")
    val_fraction: float = _knob(0.05, "fraction of the documents held out for the validation loss")
    eval_every: int = _knob(100, "steps between validation losses (and at the last step)")
    eval_windows: int = _knob(64, "validation windows per evaluation")
    seed: int = _knob(0, "seed of the initial weights, the split, the window order and dropout")
    precision: str = _knob("auto", "bf16 autocast of the forward: 'auto' (on a GPU only), 'bf16' (on any device: "
                           "faster on CPUs with AMX or AVX-512 bf16), 'fp32' (never)")
    repeat: float = _knob(0.0, "fraction of the training windows that write a prefix of themselves twice (its length "
                          "drawn from 8 to context/2), so that copying pays (meant for induction heads; at "
                          "docs-small's budget none formed: docs/SWEEP.md); validation windows never repeat")
    repeat_tokens: str = _knob("text", "what a repeating window writes twice: 'text' (its own first tokens) or "
                               "'random' (ids drawn uniformly from the vocabulary, then its text: only the copy "
                               "predicts them)")

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                checked = _RULES[f.name](value, f.name)
            except TrainingError as e:
                problems.append(str(e))
                continue
            if type(value) not in (int, float, type(None)):  # NumPy's numbers as Python's: the run's JSON holds them
                object.__setattr__(self, f.name, checked)
        if not problems and self.min_lr > self.lr:
            problems.append(f"min_lr ({self.min_lr!r}) must be <= lr ({self.lr!r}): the cosine decays from lr to "
                            f"min_lr; with a small --lr give --min-lr too (e.g. a tenth of it: {self.lr / 10:g})")
        if not problems and self.repeat and self.context < 2 * SHORTEST_REPEAT:
            problems.append(f"repeat needs a context of at least {2 * SHORTEST_REPEAT} tokens (a window writes a "
                            f"prefix of {SHORTEST_REPEAT} or more twice), got {self.context}: give a longer "
                            "--context or --repeat 0")
        if problems:
            raise TrainingError("bad training settings: " + "; ".join(problems))

    def autocast(self, device: torch.device | str) -> bool:
        """Whether the forward runs under bf16 autocast on ``device``."""
        return self.precision == "bf16" or (self.precision == "auto" and torch.device(device).type == "cuda")

    def global_batch(self, world: int) -> int:
        """Windows per optimizer step, all processes together."""
        return self.batch_size * self.grad_accum * world


def _size(low: int) -> Callable[[object, str], int]:
    return lambda value, name: check_int(value, name, low, error=TrainingError)


def _rate(value: object, name: str) -> float:
    return check_float(value, name, low=0, error=TrainingError)


def _below_one(value: object, name: str) -> float:
    """A beta: in [0, 1) (at 1, AdamW's averages would never move)."""
    if check_float(value, name, 0, 1, error=TrainingError) == 1:
        raise TrainingError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _held_out(value: object, name: str) -> float:
    if check_float(value, name, 0, 1, error=TrainingError) in (0, 1):
        raise TrainingError(f"{name} must be in (0, 1): some text must be held out, got {value!r}")
    return float(value)


def _dropout(value: object, name: str) -> float | None:
    return None if value is None else check_float(value, name, 0, 1, way_out="or None: the config's",
                                                  error=TrainingError)


PRECISIONS = ("auto", "bf16", "fp32")
REPEAT_TOKENS = ("text", "random")
CHOICES = {"precision": PRECISIONS, "repeat_tokens": REPEAT_TOKENS}  # the fields whose values are named


def _fraction(value: object, name: str) -> float:
    return check_float(value, name, 0, 1, error=TrainingError)


def _precision(value: object, name: str) -> str:
    return check_choice(value, name, PRECISIONS, error=TrainingError)


def _repeat_tokens(value: object, name: str) -> str:
    return check_choice(value, name, REPEAT_TOKENS, error=TrainingError)


def _seed(value: object, name: str) -> int:
    return check_int(value, name, 0, MAX_SEED, error=TrainingError)


# The rule of each field, by name.
_RULES: dict[str, Callable[[object, str], object]] = {
    **dict.fromkeys(("steps", "batch_size", "grad_accum", "context", "eval_every", "eval_windows"), _size(1)),
    "warmup": _size(0), **dict.fromkeys(("lr", "min_lr", "weight_decay", "grad_clip"), _rate),
    "beta1": _below_one, "beta2": _below_one, "dropout": _dropout, "val_fraction": _held_out, "seed": _seed,
    "precision": _precision, "repeat": _fraction, "repeat_tokens": _repeat_tokens}


def check_fits(s: Settings, cfg: GPTConfig, device: torch.device) -> None:
    """Refuse (MemoryBudgetError), before the model is built, a model of ``cfg`` whose training step
    with ``s`` would not fit in the memory free on ``device``: an absurd config (n_layer=10**9), a
    batch too big. Counts at least the weights, gradients and AdamW states (``least_values``), one
    micro-batch's activations (bf16 under autocast) and the step's windows."""
    device = torch.device(device)
    parts = training_bytes(cfg, least_values(cfg), s.batch_size, s.context, s.grad_accum,
                           2 if s.autocast(device) else 4)
    check_training_fits(parts, device, "use a smaller --batch-size or --context (more --grad-accum keeps the "
                        "global batch), fewer --grad-accum if the step's windows are the most, or a smaller model (--size)")
