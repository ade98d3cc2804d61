"""What every probe shares: one-sequence input, recording on the CPU in float32 (float64 for a
float64 model), labels, findings."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from minigpt import GPT, Trace
from minigpt.config import is_integer
from minigpt.errors import InputError, MiniGPTError
from minigpt.inputs import as_tokens, check_values
from minigpt.taps import Edit


@dataclass(frozen=True)
class Finding:
    """One claim of the lecture notes (docs/NOTES.md), checked on this model and text.

    Three states: ``holds`` True or False, or None for a measurement that claims nothing (e.g.
    the KL after an edit). ``testable`` False (with ``holds`` None) says the claim cannot be tested
    on this model, the reason in ``detail`` (e.g. no block after the edited one): not the same as
    failing. ``needs_trained`` marks claims about what training produced: random weights of the
    same shape do NOT show them (tests/test_findings_calibration.py checks it over several seeds),
    while the others follow from the architecture (or GPT-2's initialisation) alone.
    """

    key: str             # short stable id within its probe, e.g. 'law' or 'ln_f_restores'
    claim: str
    holds: bool | None
    detail: str
    needs_trained: bool = False
    testable: bool = True

    @classmethod
    def untestable(cls, key: str, claim: str, reason: str, needs_trained: bool = False) -> "Finding":
        """A claim this model cannot test, ``reason`` saying why."""
        return cls(key, claim, None, f"not testable on this model: {reason}", needs_trained, testable=False)

    @property
    def mark(self) -> str:
        """'holds', 'does NOT hold', 'not testable' or 'measured'."""
        if not self.testable:
            return "not testable"
        return {True: "holds", False: "does NOT hold", None: "measured"}[self.holds]

    def line(self) -> str:
        return f"{self.claim}: {self.mark} ({self.detail})"


def verdict_of(findings: Iterable[Finding]) -> str:
    """The findings as one short text, one claim per sentence."""
    return " ".join(f.line() + "." for f in findings)


@dataclass(kw_only=True)
class Result:
    """What every probe returns: its numbers (the subclass's fields) and the notes' claims, checked."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The findings as one paragraph."""
        return verdict_of(self.findings)


def single_sequence(model: GPT, inputs: str | list | torch.Tensor) -> torch.Tensor:
    """Text, ids or a tensor -> int tensor [1, S]; probes read one sequence at a time."""
    tokens = model.tokens(inputs)
    if tokens.shape[0] != 1:
        raise InputError(f"probes read one sequence, got a batch of {tokens.shape[0]}; "
                         "pass one text or one list of ids (loop over the batch to probe each)")
    return tokens


def sequences(model: GPT, inputs: str | list | torch.Tensor, attention_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence or a batch (texts or id lists of any lengths, a tensor [B, S] with ``attention_mask``)
    -> (ids [B, S], mask [B, S], True = real token), for the probes that read several rows."""
    tokens, mask = as_tokens(inputs, model.cfg, model.unembedding.device, lambda: model.tokenizer,
                             attention_mask=attention_mask)
    check_values(tokens, model.cfg)
    return tokens, torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask


def row_columns(mask: torch.Tensor, position: int) -> tuple[list[int], list[int]]:
    """``position`` counted among each row's real tokens (negative: from its last) -> (the index among
    them, the column of ``mask`` [B, S]) per row; InputError naming the row whose tokens are too few."""
    indices, columns = [], []
    for row, real in enumerate(mask):
        where = real.nonzero().flatten().tolist()
        index = check_index("position" if len(mask) == 1 else f"position (row {row})", position, len(where))
        indices.append(index)
        columns.append(where[index])
    return indices, columns


def record(model: GPT, tokens: torch.Tensor, taps: list[str], edits: Mapping[str, Edit] | None = None,
           positions: list[int] | None = None, store_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Trace]:
    """Run once: logits [S, V] in ``work_dtype(model)`` and a trace of tensors [1, ...], on the CPU.

    ``positions`` keeps only those sequence positions in the trace (the logits keep all);
    ``store_dtype``: the trace's dtype (default ``work_dtype(model)``).
    """
    logits, trace = record_rows(model, tokens, taps, edits=edits, positions=positions, store_dtype=store_dtype)
    return logits[0], trace


def record_rows(model: GPT, tokens: torch.Tensor, taps: list[str], mask: torch.Tensor | None = None, *,
                edits: Mapping[str, Edit] | None = None, positions: list[int] | None = None,
                store_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Trace]:
    """``record`` for a batch: logits [B, S, V]; ``mask`` [B, S] for padded rows (all True: none)."""
    dtype = work_dtype(model)
    padded = mask if mask is not None and not bool(mask.all()) else None
    logits, trace = model.run(tokens, taps=taps, edits=edits, attention_mask=padded, to="cpu",
                              store_dtype=store_dtype or dtype, keep_positions=positions)
    return logits.detach().to("cpu", dtype), trace


def work_dtype(model: GPT) -> torch.dtype:
    """float32, or float64 for a float64 model: exact for every dtype the model may run in."""
    return torch.float64 if model.unembedding.dtype == torch.float64 else torch.float32


RESIDUAL_TAPS = ["blocks.0.resid_pre", "blocks.*.resid_post"]


def residual_states(trace: Trace) -> torch.Tensor:
    """The raw residual stream of the trace's one sequence: embeddings, then every block's output -> [n_layer + 1, S, D]."""
    return trace.accumulated_residual()[:, 0]


def hidden_stack(trace: Trace) -> torch.Tensor:
    """HuggingFace's hidden states (the last one after ln_f) of the trace's one sequence -> [n_layer + 1, S, D]."""
    return torch.stack(trace.hidden_states())[:, 0]


def residual_labels(n_layer: int) -> list[str]:
    """Names of the raw residual states: 'emb', then 'b{i}' = output of block i."""
    return ["emb"] + [f"b{i}" for i in range(n_layer)]


def hidden_labels(n_layer: int) -> list[str]:
    """Names of HF's hidden states: 'emb', 'b0'..'b{n-2}', then 'ln_f' (= ln_f of the last block's output)."""
    return ["emb"] + [f"b{i}" for i in range(n_layer - 1)] + ["ln_f"]


def ln_f_own_stats(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """The model's own final LayerNorm on x [..., D], each vector with its own statistics (the logit lens).

    Runs in the model's dtype and device, returns [..., D] on the CPU in work_dtype. Unlike the trace's
    ``ln_f_frozen`` (the run's recorded scale, linear), this is ln_f as the model would apply it.
    Running the module itself, in its own dtype, makes the result bit-equal to the ``ln_f`` tap.
    """
    return Trace.ln_f_own_stats(x, model).detach().to("cpu", work_dtype(model))


def unembedding(model: GPT) -> torch.Tensor:
    """The model's W_U [V, D], on the CPU in work_dtype."""
    return model.unembedding.detach().to("cpu", work_dtype(model))


def float_eps(model: GPT) -> float:
    """Machine epsilon of the model's dtype (sets how close 'equal' must be)."""
    return torch.finfo(model.unembedding.dtype).eps


def token_text(model: GPT, ids: Iterable[int]) -> list[str]:
    """Each id as readable text (repr of its decoded string), or '#id' without a tokenizer."""
    ids = [int(i) for i in ids]
    try:
        tok = model.tokenizer
        return [repr(tok.decode([i])) for i in ids]
    except (MiniGPTError, KeyError, ValueError):
        return [f"#{i}" for i in ids]


def decode_text(model: GPT, ids: list[int]) -> str:
    """The ids as text, or '#id #id ...' without a tokenizer."""
    try:
        return model.tokenizer.decode([int(i) for i in ids])
    except (MiniGPTError, KeyError, ValueError):
        return " ".join(f"#{int(i)}" for i in ids)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two same-sized tensors (flattened, float64)."""
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denom) if denom > 0 else float("nan")


def max_abs(x: torch.Tensor) -> float:
    return float(x.abs().max().item()) if x.numel() else 0.0


def check_index(what: str, value: int, count: int) -> int:
    """``value`` as an index into ``count`` things, negative ones counted from the end as in Python.

    Out of range is refused (InputError naming the argument and its range), never clamped.
    """
    if not is_integer(value):
        raise InputError(f"{what} must be an integer, got {value!r}")
    if not -count <= value < count:
        raise InputError(f"{what} {value} is out of range: this model and input have {count} "
                         f"(valid: 0..{count - 1}, or -{count}..-1 from the end)")
    return value % count


def check_within(what: str, value: float, low: float, high: float = math.inf, *, integer: bool = False) -> float:
    """``value`` if it is a number (an integer if ``integer``) in [low, high], else InputError naming the range."""
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        wanted = "an integer" if integer else "a number"
        upper = f" and at most {high:g}" if math.isfinite(high) else ""
        raise InputError(f"{what} must be {wanted} of at least {low:g}{upper}, got {value!r}")
    return value
