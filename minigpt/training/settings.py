"""``Settings``: what a training run is, each field a ``minigpt train`` option, checked when built."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..config import is_integer
from ..errors import TrainingError


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

    def __post_init__(self) -> None:
        problems = _not_numbers(self) or _out_of_range(self)
        if problems:
            raise TrainingError("bad training settings: " + "; ".join(problems))

    def global_batch(self, world: int) -> int:
        """Windows per optimizer step, all processes together."""
        return self.batch_size * self.grad_accum * world


# Which rule each field follows (``dropout`` may also be None: the config's own).
_POSITIVE_INTEGERS = ("steps", "batch_size", "grad_accum", "context", "eval_every", "eval_windows")
_NOT_NEGATIVE = ("warmup", "lr", "min_lr", "weight_decay", "grad_clip")
_INTEGERS = ("warmup", "seed")
_BETAS = ("beta1", "beta2")


def _not_numbers(s: Settings) -> list[str]:
    """A problem for each field that is not a number (checked first: the ranges compare numbers)."""
    return [f"{f.name} must be a number, got {getattr(s, f.name)!r}" for f in fields(s)
            if not (f.name == "dropout" and s.dropout is None)
            and (isinstance(getattr(s, f.name), bool) or not isinstance(getattr(s, f.name), (int, float)))]


def _out_of_range(s: Settings) -> list[str]:
    """A problem for each field outside its range, saying the range."""
    v = {f.name: getattr(s, f.name) for f in fields(s)}
    problems = [f"{n} must be a positive integer, got {v[n]!r}" for n in _POSITIVE_INTEGERS
                if not (is_integer(v[n]) and v[n] >= 1)]
    problems += [f"{n} must be >= 0, got {v[n]!r}" for n in _NOT_NEGATIVE if not v[n] >= 0]
    problems += [f"{n} must be an integer, got {v[n]!r}" for n in _INTEGERS if not is_integer(v[n])]
    problems += [f"{n} must be in [0, 1), got {v[n]!r}" for n in _BETAS if not 0 <= v[n] < 1]
    if not 0 < s.val_fraction < 1:
        problems.append(f"val_fraction must be in (0, 1): some text must be held out, got {s.val_fraction!r}")
    if s.dropout is not None and not 0 <= s.dropout <= 1:
        problems.append(f"dropout must be in [0, 1], got {s.dropout!r}")
    return problems
