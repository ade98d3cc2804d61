"""The tap vocabulary, and what one call records and edits.

A tap is a named point of the forward pass. ``model.py`` passes every intermediate tensor
through ``taps(name, x)``; this module decides, per call, whether that tensor is replaced by
an edit and whether it is kept in the trace. With nothing asked, a tap is one set lookup.
"""
from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from .errors import EditError, MiniGPTWarning, TapError, closest

# Name -> (shape, where it sits). The order is the order in which the forward pass meets them.
# Shapes use: B batch, S seq (Q query, K key positions), H heads, D d_model, d d_head, M d_mlp, V vocab.
MODEL_TAPS_BEFORE = {
    "embed": ("B S D", "token embedding"),
    "pos_embed": ("B S D", "position embedding"),
}
BLOCK_TAPS = {
    "resid_pre": ("B S D", "residual stream entering the block (= embed + pos_embed for block 0)"),
    "ln1": ("B S D", "LayerNorm 1 output, the input of attention"),
    "attn.q": ("B S H d", "queries"),
    "attn.k": ("B S H d", "keys"),
    "attn.v": ("B S H d", "values"),
    "attn.scores": ("B H Q K", "q.k / sqrt(d), causally masked with -inf, before softmax"),
    "attn.pattern": ("B H Q K", "softmax of the scores"),
    "attn.z": ("B S H d", "each head's pattern-weighted sum of values"),
    "attn.heads": ("B S H D", "each head's own write to the residual (z @ W_O per head, no bias)"),
    "attn_delta": ("B S D", "what attention adds to the residual (output projection + bias)"),
    "resid_mid": ("B S D", "resid_pre + attn_delta"),
    "ln2": ("B S D", "LayerNorm 2 output, the input of the MLP"),
    "mlp.pre": ("B S M", "MLP neurons before GELU"),
    "mlp.post": ("B S M", "MLP neurons after GELU"),
    "mlp_delta": ("B S D", "what the MLP adds to the residual (output projection + bias)"),
    "resid_post": ("B S D", "resid_mid + mlp_delta, the block's output"),
}
MODEL_TAPS_AFTER = {
    "ln_f": ("B S D", "final LayerNorm output (HuggingFace's last hidden state)"),
    "logits": ("B S V", "ln_f @ embed.weight.T"),
}
# Taps that exist only if asked for: they cost extra work or force the unfused attention path.
ON_DEMAND = ("attn.heads", "attn.scores", "attn.pattern")


def tap_names(n_layer: int) -> list[str]:
    """Every tap of a model with ``n_layer`` blocks, in forward order."""
    blocks = [f"blocks.{layer}.{name}" for layer in range(n_layer) for name in BLOCK_TAPS]
    return [*MODEL_TAPS_BEFORE, *blocks, *MODEL_TAPS_AFTER]


def select(patterns: str | Iterable[str], names: list[str]) -> list[str]:
    """Expand tap names and glob patterns (``blocks.*.resid_post``) into names, in forward order.

    Raises TapError for an unknown name, a block that does not exist, or a pattern that matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    elif not isinstance(patterns, Iterable):
        raise TapError(f"taps must be a tap name, a glob pattern or a list of them, got "
                       f"{type(patterns).__name__} {patterns!r}")
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TapError(f"tap names are strings, got {type(pattern).__name__} {pattern!r}; "
                           "write e.g. 'blocks.0.resid_post' or 'blocks.*.attn.pattern'")
        if any(c in pattern for c in "*?["):
            hits = fnmatch.filter(names, pattern)
            if not hits:
                raise TapError(f"tap pattern {pattern!r} matches no tap{_no_such_block(pattern, names)}"
                               f"{closest(pattern, names)} {_LIST_HINT}")
            chosen.update(hits)
        elif pattern in names:
            chosen.add(pattern)
        else:
            raise TapError(f"unknown tap {pattern!r}{_no_such_block(pattern, names)}{closest(pattern, names)} "
                           f"{_LIST_HINT}")
    return [n for n in names if n in chosen]


_LIST_HINT = "(model.tap_names lists every tap; minigpt.describe(n_layer) says what each holds)"


def _no_such_block(pattern: str, names: list[str]) -> str:
    """': block 99 does not exist (blocks 0..3)' when ``pattern`` names a block past the last one."""
    match = re.match(r"blocks\.(\d+)\.", pattern)
    n_layer = sum(n.endswith(".resid_pre") for n in names)
    if match and int(match.group(1)) >= n_layer:
        return f": block {int(match.group(1))} does not exist, this model has blocks 0..{n_layer - 1}"
    return ""


def resolve_edits(edits: Mapping[str, Edit] | None, names: list[str]) -> dict[str, Edit]:
    """``{name or pattern: edit}`` -> ``{tap name: edit}``, checked before anything runs.

    Raises EditError for something that is not a mapping of functions or tensors, and for a tap
    that two patterns both edit (which one should win is not ours to guess); TapError as ``select``.
    """
    if edits is None:
        return {}
    if not isinstance(edits, Mapping):
        raise EditError(f"edits must be a dict {{tap name or pattern: function or tensor}}, got "
                        f"{type(edits).__name__}; e.g. edits={{'blocks.0.resid_post': lambda x: 2 * x}}")
    resolved: dict[str, Edit] = {}
    source: dict[str, str] = {}
    for pattern, edit in edits.items():
        if not (callable(edit) or isinstance(edit, torch.Tensor)):
            raise EditError(f"the edit for {pattern!r} is a {type(edit).__name__}; an edit is a function "
                            "(tensor -> tensor of the same shape) or a replacement tensor")
        for name in select(pattern, names):
            if name in resolved:
                raise EditError(f"tap {name!r} is edited twice, by {source[name]!r} and by {pattern!r}; "
                                "merge them with minigpt.edits.combine (which runs them in order) or narrow the patterns")
            resolved[name], source[name] = edit, pattern
    return resolved


Edit = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor


class Taps:
    """What one forward call records and edits; called at every tap by the model.

    ``record``: exact tap names to keep. ``edits``: exact tap name -> edit, where an edit is a
    function (tensor -> tensor of the same shape, dtype and device) or a tensor to put in place.
    The value recorded at a tap is the value the rest of the forward uses (after its edit).
    Recorded tensors are detached unless ``grad`` is true; ``to``/``dtype`` move or cast them
    (e.g. to the CPU from a GPU run, or to bfloat16) and ``positions`` keeps only those sequence
    positions of taps whose second axis is the sequence.
    """

    def __init__(self, record: Iterable[str] = (), edits: Mapping[str, Edit] | None = None, *,
                 grad: bool = False, to: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, positions: slice | list[int] | None = None):
        self.record = frozenset(record)
        self.edits = dict(edits or {})
        self.wanted = self.record | self.edits.keys()
        self.grad, self.to, self.dtype, self.positions = grad, to, dtype, positions
        self.trace: dict[str, torch.Tensor] = {}

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.wanted:
            return x
        if name in self.edits:
            edit = self.edits[name]
            # A function may edit its input in place, and that input can be a tensor already in
            # the trace (resid_pre of block L+1 is resid_post of block L): give it a copy then.
            if self.trace and not isinstance(edit, torch.Tensor):
                x = x.clone()
            x = apply_edit(name, edit, x)
        if name in self.record:
            self.trace[name] = self._keep(name, x)
        return x

    def _keep(self, name: str, x: torch.Tensor) -> torch.Tensor:
        kept = x if self.grad else x.detach()
        if self.positions is not None and not name.endswith(("attn.scores", "attn.pattern")):
            kept = kept[:, self.positions]
        if self.to is not None or self.dtype is not None:
            kept = kept.to(device=self.to, dtype=self.dtype)
        if not self.grad and kept.untyped_storage().size() > kept.numel() * kept.element_size():
            # A view would keep its whole parent alive (q is a third of qkv, a slice of positions a
            # sliver of the tap): copy, so the trace holds what nbytes_estimate says and no more.
            # (An untyped storage's size() is its bytes; nbytes() would break torch.compile's graph.)
            kept = kept.clone()
        return kept


NO_TAPS = Taps()


def apply_edit(name: str, edit: Edit, x: torch.Tensor) -> torch.Tensor:
    """Run one edit at tap ``name`` and check that its result can replace ``x``.

    An exception raised by the edit itself propagates unchanged, with a note naming the tap.
    A result that is not a tensor of ``x``'s shape, dtype and device raises EditError;
    NaN or inf values (other than -inf in ``attn.scores``) warn with MiniGPTWarning.
    """
    if isinstance(edit, torch.Tensor):
        new = edit
    elif callable(edit):
        try:
            new = edit(x)
        except Exception as e:
            e.add_note(f"(raised by the edit at tap {name!r})")
            raise
    else:
        raise EditError(f"the edit at tap {name!r} is a {type(edit).__name__}; an edit is a function "
                        "(tensor -> tensor of the same shape) or a replacement tensor")
    what = "replacement tensor" if new is edit else "result of the edit"
    if not isinstance(new, torch.Tensor):
        raise EditError(f"the edit at tap {name!r} returned {type(new).__name__}, not a tensor; "
                        f"an edit must return a tensor shaped like its input {tuple(x.shape)}")
    if new.shape != x.shape:
        raise EditError(f"the {what} at tap {name!r} has shape {tuple(new.shape)} but the tap has "
                        f"shape {tuple(x.shape)}; an edit must keep the shape (see minigpt.describe)")
    if new.dtype != x.dtype or new.device != x.device:
        raise EditError(f"the {what} at tap {name!r} is {new.dtype} on {new.device} but the tap "
                        f"is {x.dtype} on {x.device}; convert the result with .to(x)")
    if not torch.compiler.is_compiling():
        _warn_if_not_finite(name, new)
    return new


def _warn_if_not_finite(name: str, x: torch.Tensor) -> None:
    """MiniGPTWarning if an edit's result holds NaN or inf (the rest of the forward would carry them)."""
    if name.endswith("attn.scores"):
        # -inf is legitimate in attention scores: it is how a key is masked out. But +inf, or a
        # query whose every key is -inf, makes the softmax NaN.
        bad = torch.isnan(x) | torch.isposinf(x)
        if bad.any() or torch.isneginf(x).all(dim=-1).any():
            warnings.warn(f"the edit at tap {name!r} produced NaN or +inf scores, or masked every key of a "
                          "query with -inf; the attention pattern will hold NaN. Mask keys with -inf but "
                          "leave each query at least one", MiniGPTWarning, stacklevel=2)
    elif not torch.isfinite(x).all():
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        warnings.warn(f"the edit at tap {name!r} produced {n_nan} NaN and {n_inf} inf values; the rest of "
                      "the forward and the logits will carry them. Check the edit for a division by zero "
                      "or an overflow (warnings.simplefilter('error', MiniGPTWarning) turns this into an error)",
                      MiniGPTWarning, stacklevel=2)


@dataclass(frozen=True)
class TapInfo:
    name: str
    shape: str
    meaning: str


def describe(n_layer: int) -> Iterator[TapInfo]:
    """(name, shape, meaning) for every tap, in forward order: the tap map as data."""
    groups = {**MODEL_TAPS_BEFORE, **MODEL_TAPS_AFTER}
    for name in tap_names(n_layer):
        short = name.split(".", 2)[2] if name.startswith("blocks.") else name
        shape, meaning = BLOCK_TAPS.get(short) or groups[name]
        yield TapInfo(name, shape, meaning)


class Trace(Mapping[str, torch.Tensor]):
    """Read-only mapping from tap name to the tensor recorded in one call."""

    def __init__(self, tensors: dict[str, torch.Tensor], n_layer: int):
        self._tensors = dict(tensors)
        self.n_layer = n_layer

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise TapError(f"tap {name!r} was not recorded in this run{closest(name, self._tensors)}; "
                           f"ask for it with run(..., taps=[{name!r}])") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Trace({', '.join(f'{k}: {tuple(v.shape)}' for k, v in self._tensors.items())})"

    def stack(self, tap: str) -> torch.Tensor:
        """One block tap across all blocks: ``stack('resid_post')`` -> [n_layer, *shape]."""
        return torch.stack([self[f"blocks.{layer}.{tap}"] for layer in range(self.n_layer)])

    def hidden_states(self) -> tuple[torch.Tensor, ...]:
        """What HuggingFace's ``output_hidden_states=True`` returns: n_layer + 1 tensors [B, S, D].

        Block 0's input, the output of every block but the last, then ``ln_f`` (so the last one is
        normalised, unlike ``blocks.{last}.resid_post``). A block's output is ``blocks.L.resid_post``,
        or where that was not recorded ``blocks.L+1.resid_pre``: the same tensor unless an edit
        changed that block input. Record ``taps=['blocks.*.resid_pre', 'ln_f']`` (or ``resid_post``).
        """
        states, missing = [], []
        for options in [["blocks.0.resid_pre"]] + [
                [f"blocks.{layer}.resid_post", f"blocks.{layer + 1}.resid_pre"] for layer in range(self.n_layer - 1)
        ] + [["ln_f"]]:
            found = next((self._tensors[n] for n in options if n in self._tensors), None)
            states.append(found)
            if found is None:
                missing.append(options[-1])
        if missing:
            raise TapError(f"hidden_states() needs taps {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                           "run with taps=['blocks.*.resid_pre', 'ln_f']")
        return tuple(states)


def nbytes_estimate(names: Iterable[str], batch: int, seq: int, cfg, bytes_per_value: int,
                    positions: slice | list[int] | None = None) -> dict[str, int]:
    """Bytes each recorded tap will hold for a [batch, seq] run (the memory guard's arithmetic).

    ``positions`` (as in Taps) shrinks the sequence axis of the taps shaped [B, S, ...]; the
    attention scores and pattern [B, H, Q, K] are always kept whole.
    """
    kept = seq if positions is None else len(range(seq)[positions] if isinstance(positions, slice) else positions)
    sizes = {"B": batch, "Q": seq, "K": seq, "H": cfg.n_head, "D": cfg.n_embd,
             "d": cfg.d_head, "M": cfg.d_mlp, "V": cfg.vocab_size}
    shapes = {i.name: i.shape.split() for i in describe(cfg.n_layer)}
    return {n: math.prod(kept if axis == "S" else sizes[axis] for axis in shapes[n]) * bytes_per_value
            for n in names}
