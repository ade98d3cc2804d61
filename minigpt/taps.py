"""The tap vocabulary, and what one call records and edits.

A tap is a named point of the forward pass. ``model.py`` passes every intermediate tensor
through ``taps(name, x)``; the ``Taps`` object of that call decides whether the tensor is
replaced by an edit and whether it is kept. With nothing asked, a tap is one set lookup.
"""
from __future__ import annotations

import fnmatch
import inspect
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from .errors import EditError, MiniGPTWarning, TapError, closest
from .inputs import check_keep_options

Edit = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor
# Sequence positions a run keeps: a slice, a list, "last" (each row's last real token), or None (all).
Positions = slice | list[int] | str | None


@dataclass(frozen=True)
class TapInfo:
    """One tap: its name, shape (B batch, S seq, Q/K query/key positions, H heads, D d_model,
    d d_head, M d_mlp, V vocab), what it holds, and whether it is computed only when asked for
    (it costs extra work, or takes attention off its fused path)."""

    name: str
    shape: str
    meaning: str
    on_demand: bool = False


# The vocabulary, in the order the forward pass meets the taps. Block taps are named blocks.{L}.{name}.
MODEL_TAPS_BEFORE = [
    TapInfo("embed", "B S D", "token embedding"),
    TapInfo("pos_embed", "B S D", "position embedding"),
]
BLOCK_TAPS = [
    TapInfo("resid_pre", "B S D", "residual stream entering the block (= embed + pos_embed for block 0)"),
    TapInfo("ln1.scale", "B S 1", "LayerNorm 1's scale 1/sqrt(var + eps) per position", on_demand=True),
    TapInfo("ln1", "B S D", "LayerNorm 1 output, the input of attention"),
    TapInfo("attn.q", "B S H d", "queries"),
    TapInfo("attn.k", "B S H d", "keys"),
    TapInfo("attn.v", "B S H d", "values"),
    TapInfo("attn.scores", "B H Q K", "q.k / sqrt(d), causally masked with -inf, before softmax", on_demand=True),
    TapInfo("attn.pattern", "B H Q K", "softmax of the scores", on_demand=True),
    TapInfo("attn.z", "B S H d", "each head's pattern-weighted sum of values"),
    TapInfo("attn.heads", "B S H D", "each head's own write to the residual (z @ W_O per head, no bias)",
            on_demand=True),
    TapInfo("attn_delta", "B S D", "what attention adds to the residual (output projection + bias)"),
    TapInfo("resid_mid", "B S D", "resid_pre + attn_delta"),
    TapInfo("ln2.scale", "B S 1", "LayerNorm 2's scale 1/sqrt(var + eps) per position", on_demand=True),
    TapInfo("ln2", "B S D", "LayerNorm 2 output, the input of the MLP"),
    TapInfo("mlp.pre", "B S M", "MLP neurons before GELU"),
    TapInfo("mlp.post", "B S M", "MLP neurons after GELU"),
    TapInfo("mlp_delta", "B S D", "what the MLP adds to the residual (output projection + bias)"),
    TapInfo("resid_post", "B S D", "resid_mid + mlp_delta, the block's output"),
]
MODEL_TAPS_AFTER = [
    TapInfo("ln_f.scale", "B S 1", "the final LayerNorm's scale 1/sqrt(var + eps) per position", on_demand=True),
    TapInfo("ln_f", "B S D", "final LayerNorm output (HuggingFace's last hidden state)"),
    TapInfo("logits", "B S V", "ln_f @ embed.weight.T"),
]
_ALL = MODEL_TAPS_BEFORE + BLOCK_TAPS + MODEL_TAPS_AFTER
# Suffixes of the on-demand taps (a block tap's full name ends with one of them).
ON_DEMAND = tuple(info.name for info in _ALL if info.on_demand)
# Taps shaped [B, H, Q, K]: their second axis is not the sequence, so ``positions`` keeps them whole.
QUERY_KEY_TAPS = tuple(info.name for info in _ALL if info.shape == "B H Q K")
_SHAPES = {info.name: info.shape.split() for info in _ALL}


def tap_shape(name: str) -> list[str]:
    """A tap's axes by letter, from the table: ``tap_shape('blocks.3.attn.z')`` -> ['B', 'S', 'H', 'd']."""
    return _SHAPES[re.sub(r"^blocks\.\d+\.", "", name)]


def tap_axes(name: str) -> tuple[int, int | None]:
    """A tap's sequence axis (S, or Q for scores and patterns) and head axis (H, or None if it has none)."""
    shape = tap_shape(name)
    sequence = shape.index("S") if "S" in shape else shape.index("Q")
    return sequence, shape.index("H") if "H" in shape else None


def describe(n_layer: int) -> Iterator[TapInfo]:
    """Every tap of a model with ``n_layer`` blocks, in forward order, with its shape and meaning."""
    yield from MODEL_TAPS_BEFORE
    for layer in range(n_layer):
        for info in BLOCK_TAPS:
            yield TapInfo(f"blocks.{layer}.{info.name}", info.shape, info.meaning, info.on_demand)
    yield from MODEL_TAPS_AFTER


def tap_names(n_layer: int) -> list[str]:
    """Every tap name of a model with ``n_layer`` blocks, in forward order."""
    return [info.name for info in describe(n_layer)]


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
        is_glob = any(c in pattern for c in "*?[")
        hits = fnmatch.filter(names, pattern) if is_glob else [pattern] if pattern in names else []
        if not hits:
            what = "tap pattern {!r} matches no tap" if is_glob else "unknown tap {!r}"
            raise TapError(f"{what.format(pattern)}{_no_such_block(pattern, names)}{closest(pattern, names)} "
                           f"{_LIST_HINT}")
        chosen.update(hits)
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

    A function whose second positional parameter has no default is called as ``edit(x, tap_name)``.
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
                raise EditError(f"tap {name!r} is edited twice, by {source[name]!r} and by {pattern!r}; narrow the "
                                "patterns so that each tap has one, and chain several edits of one tap under one key "
                                "(minigpt.edits.combine, or | of built-in edits, runs them in order)")
            resolved[name], source[name] = _with_name(edit, name), pattern
    return resolved


def takes_tap_name(edit: Edit) -> bool:
    """Whether an edit function asks for the tap's name: its second positional parameter has no default."""
    if isinstance(edit, torch.Tensor):
        return False
    try:
        parameters = list(inspect.signature(edit).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: called with the tensor only
        return False
    positional = [q for q in parameters if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 and positional[1].default is inspect.Parameter.empty


def _with_name(edit: Edit, name: str) -> Edit:
    """``edit`` as a one-argument function, given the tap's name if it asks for it (``def edit(x, name)``)."""
    if not takes_tap_name(edit):
        return edit

    def with_name(x: torch.Tensor) -> torch.Tensor:
        return edit(x, name)

    return with_name


class StopForward(Exception):
    """Raised by a tap to end the forward pass early (``run(..., stop_at=tap)``)."""


class Taps:
    """What one forward call records and edits; called at every tap by the model.

    ``record``: exact tap names to keep. ``edits``: exact tap name -> edit, where an edit is a
    function (tensor -> tensor of the same shape, dtype and device) or a tensor to put in place.
    A function gets a copy of the tensor, which it may change in place. The value recorded at a
    tap is the value the rest of the forward uses (after its edit). Recorded tensors are detached
    unless ``grad`` is true; ``to``/``dtype`` move or cast them (e.g. to the CPU from a GPU run, or
    to bfloat16) and ``positions`` keeps only those sequence positions of taps whose second axis is
    the sequence (an index tensor [B]: one position per row). ``stop_at``: the forward ends after
    this tap. ``Taps.request`` builds one from patterns and checks everything first.

    ``sink``: instead of keeping recorded tensors in ``trace``, call ``sink(name, x)`` with each one
    (the value the forward goes on with, whole: ``to``/``dtype``/``positions`` do not apply). The sink
    must not change ``x``; it copies what it wants into memory of its own, e.g. buffers it reuses
    from batch to batch (``minigpt.harvest`` does), so that recording allocates nothing.
    """

    def __init__(self, record: Iterable[str] = (), edits: Mapping[str, Edit] | None = None, *,
                 grad: bool = False, to: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 positions: slice | list[int] | torch.Tensor | None = None, stop_at: str | None = None,
                 sink: Callable[[str, torch.Tensor], None] | None = None):
        self.record = dict.fromkeys(record)  # ordered, for the memory guard's message
        self.edits = dict(edits or {})
        self.stop_at = stop_at
        self.wanted = self.record.keys() | self.edits.keys() | ({stop_at} if stop_at else set())
        self.grad, self.to, self.dtype, self.positions, self.sink = grad, to, dtype, positions, sink
        self.trace: dict[str, torch.Tensor] = {}

    @classmethod
    def request(cls, names: list[str], taps: str | Iterable[str] = (), edits: Mapping[str, Edit] | None = None, *,
                seq: int, mask: torch.Tensor | None = None, grad: bool = False,
                to: torch.device | str | None = None, dtype: torch.dtype | None = None,
                positions: Positions = None, stop_at: str | None = None,
                sink: Callable[[str, torch.Tensor], None] | None = None) -> Taps:
        """What ``run`` asks for, checked: tap patterns and edits resolved against ``names``, the keep
        options valid for a ``seq``-token input (``mask`` [B, seq] for a padded batch), and the taps
        after ``stop_at`` left out. Raises TapError, EditError or InputError."""
        record = select(taps, names) if taps else []
        resolved = resolve_edits(edits, names)
        check_keep_options(grad, to, dtype, positions, seq)
        if stop_at is not None:
            record = _until(stop_at, names, record, taps, resolved)
        if positions == "last":
            # Each row's last real token (the last True of its mask), as an index [B].
            positions = [-1] if mask is None else seq - 1 - mask.flip(-1).int().argmax(dim=-1)
        return cls(record, resolved, grad=grad, to=to, dtype=dtype, positions=positions, stop_at=stop_at, sink=sink)

    def wants(self, name: str) -> bool:
        """Whether the tap ``name`` is recorded or edited in this call (or is where it stops)."""
        return name in self.wanted

    def edited(self, name: str) -> bool:
        """Whether the tap ``name`` is edited in this call."""
        return name in self.edits

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.wanted:
            return x
        if name in self.edits:
            x = apply_edit(name, self.edits[name], x)
        if name in self.record:
            if self.grad and not x.requires_grad:
                # Nothing before this tap needs a gradient (a frozen model): start the graph here.
                x = x.detach().requires_grad_()
            if self.sink is not None:
                self.sink(name, x)
            else:
                self.trace[name] = self._keep(name, x)
        if name == self.stop_at:
            raise StopForward
        return x

    def _keep(self, name: str, x: torch.Tensor) -> torch.Tensor:
        kept = x if self.grad else x.detach()
        if isinstance(self.positions, torch.Tensor) and not name.endswith(QUERY_KEY_TAPS):
            kept = kept[torch.arange(kept.shape[0], device=kept.device), self.positions.to(kept.device)][:, None]
        elif self.positions is not None and not name.endswith(QUERY_KEY_TAPS):
            kept = kept[:, self.positions]
        if self.to is not None or self.dtype is not None:
            kept = kept.to(device=self.to, dtype=self.dtype)
        if not self.grad and kept.untyped_storage().size() > kept.numel() * kept.element_size():
            # A view would keep its whole parent alive (q is a third of qkv, a slice of positions a
            # sliver of the tap): copy, so the trace holds what the memory guard's estimate says.
            # (An untyped storage's size() is its bytes; nbytes() would break torch.compile's graph.)
            kept = kept.clone()
        return kept


def _until(stop_at: str, names: list[str], record: list[str], asked: str | Iterable[str],
           edits: Mapping[str, Edit]) -> list[str]:
    """The recorded taps up to ``stop_at``; refuse taps asked for by name, and edits, that would never run."""
    if not isinstance(stop_at, str) or stop_at not in names:
        raise TapError(f"stop_at={stop_at!r} is not a tap name{closest(str(stop_at), names)}; give one exact "
                       f"name, e.g. stop_at='blocks.3.resid_post' {_LIST_HINT}")
    last = names.index(stop_at)
    exact = {asked} if isinstance(asked, str) else set(asked)
    late = [n for n in record if n in exact and names.index(n) > last]
    late_edits = [n for n in edits if names.index(n) > last]
    if late or late_edits:
        what = f"taps {late[:3]}" if late else f"edits at {late_edits[:3]}"
        raise (TapError if late else EditError)(
            f"{what} come after stop_at={stop_at!r}, where the forward ends, so they would never run; "
            "stop later, or leave them out")
    return [n for n in record if names.index(n) <= last]


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
            # A copy: the edit may change it in place, and x may be a tensor the caller owns or the
            # trace holds (resid_pre of block L+1 is resid_post of block L).
            new = edit(x.clone())
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
