"""Built-in edits: the lecture notes' interventions (docs/NOTES.md), patching and ablation, as ``Edits`` dicts.

An ``Edits`` is a plain ``{tap name or pattern: edit}`` dict (pass it as ``model.run(..., edits=...)``)
whose ``|`` merges in order: where both sides edit the same key, the left edit runs first and the
right one gets its result, so ``zero_head_keys(3, 1) | zero_head_keys(3, 2)`` zeroes both heads.
Any function (tensor -> same-shaped tensor) or replacement tensor is an edit too; a function whose
second parameter has no default is called as ``edit(x, tap_name)``, which lets one function serve a
glob pattern tap by tap (``patch`` does this).

Head-shaped taps are those with an H axis in ``minigpt.describe``'s table (``attn.q/k/v/z`` and
``attn.heads`` [B, S, H, .], ``attn.scores/pattern`` [B, H, Q, K]); ``positions`` count along the
sequence axis (S, or the query axis Q of scores and patterns).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy
import torch

from .checks import check_int, is_integer
from .errors import EditError, TapError
from .taps import Edit, select, takes_tap_name, tap_axes, tap_names, tap_shape
from .trace import Trace

Neurons = str | slice | Sequence[int] | torch.Tensor
# Which positions or heads an edit acts on: one index, a slice, a list (negative = from the end), or None (all).
Chosen = int | slice | Sequence[int] | None
# Where patching and mean ablation read their values: a recorded trace, {tap name: tensor}, or one tensor.
Source = Trace | Mapping[str, torch.Tensor] | torch.Tensor
Patterns = str | Sequence[str]


class Edits(dict):
    """``{tap name or pattern: edit}``, as every built-in returns it; ``|`` chains edits on the same key in order.

    ``a | b``, ``plain_dict | b``, ``a | plain_dict`` and ``a |= b`` all run, for a key both sides
    edit, the left edit first and the right one on its result (``combine``). Two plain dicts merged
    with ``|`` stay Python's (the last edit of a key wins): use ``combine`` for those, or start from
    ``Edits()``. Patterns that differ but hit the same tap (``blocks.*.k`` and ``blocks.0.k``) are
    not merged here; ``run`` refuses them, naming both.
    """

    def __or__(self, other: Mapping[str, Edit]) -> Edits:
        return combine(self, other) if isinstance(other, Mapping) else NotImplemented

    def __ror__(self, other: Mapping[str, Edit]) -> Edits:
        return combine(other, self) if isinstance(other, Mapping) else NotImplemented

    def __ior__(self, other: Mapping[str, Edit]) -> Edits:
        merged = combine(self, other)
        self.clear()
        self.update(merged)
        return self

    def copy(self) -> Edits:
        return Edits(self)

    def __repr__(self) -> str:
        return f"Edits({dict.__repr__(self)})"


def combine(*edit_dicts: Mapping[str, Edit]) -> Edits:
    """Merge edit dicts; edits on the same key run in the order given (what ``Edits``' ``|`` does).

    ``combine(zero_head_keys(3, 1), zero_head_keys(3, 2))`` zeroes both heads' keys; it also merges
    plain dicts, whose own ``|`` would keep only the last edit of a key. An edit that takes the tap
    name (``def edit(x, name)``) still gets it inside the chain.
    """
    merged = Edits()
    for edits in edit_dicts:
        if not isinstance(edits, Mapping):
            raise EditError(f"combine takes edit dicts {{tap name or pattern: edit}}, got {type(edits).__name__}")
        for tap, edit in edits.items():
            merged[tap] = _then(merged[tap], edit) if tap in merged else edit
    return merged


def _then(first: Edit, second: Edit) -> Edit:
    """One edit that runs ``first``, then ``second`` on its result, passing the tap name to those that take it."""
    # Decided now, not per call: inspecting a signature inside a compiled forward would break its graph.
    steps = [(edit, isinstance(edit, torch.Tensor), takes_tap_name(edit)) for edit in (first, second)]

    def both(x: torch.Tensor, name: str) -> torch.Tensor:
        for step, (edit, is_tensor, takes_name) in enumerate(steps):
            if is_tensor:
                x = edit
                continue
            if step > 0:
                x = x.clone()  # each function gets a copy it may change in place, as run() gives the first one
            x = edit(x, name) if takes_name else edit(x)
        return x

    return both


# ---------------------------------------------------------------------------------------------
# The notes' interventions (docs/NOTES.md: zero a head's keys, noise into MLP neurons, scale a block)


def zero_head_keys(block: int, head: int) -> Edits:
    """Set the keys of one head to zero (tap ``blocks.{block}.attn.k`` [B, S, H, d])."""
    return zero_ablate(f"blocks.{block}.attn.k", heads=head)


def neuron_index(neurons: Neurons, d_mlp: int) -> torch.Tensor | slice:
    """'even', 'odd', 'all', a slice, or explicit indices -> an index into the last axis (checked: EditError)."""
    index = _neuron_choice(neurons)
    if isinstance(index, torch.Tensor) and index.numel() and (index.min() < 0 or index.max() >= d_mlp):
        raise EditError(f"neuron indices must lie in [0, {d_mlp}), got {index.min().item()}..{index.max().item()}")
    return index


def _neuron_choice(neurons: Neurons) -> torch.Tensor | slice:
    """``neuron_index`` before the layer's width is known: the name, slice or integer indices checked."""
    named = {"even": slice(0, None, 2), "odd": slice(1, None, 2), "all": slice(None)}
    if isinstance(neurons, str):
        if neurons not in named:
            raise EditError(f"unknown neuron set {neurons!r}; use 'even', 'odd', 'all', a slice or indices")
        return named[neurons]
    if isinstance(neurons, slice):
        return _checked_slice(neurons, "neurons")
    try:
        index = torch.as_tensor(neurons)
    except Exception as e:  # torch's TypeError, ValueError or RuntimeError for what holds no numbers
        raise EditError(f"neurons must be 'even', 'odd', 'all', a slice or integer indices, got {neurons!r} ({e})") from None
    if not _integral(index) or index.dim() > 1:
        raise EditError(f"neuron indices must be integers (a list or a 1-D integer tensor), got {neurons!r}; a float "
                        "or a bool is not an index (round it yourself: int(i))")
    return index.long()


def _integral(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _checked_slice(chosen: slice, what: str) -> slice:
    """``chosen`` if its bounds and step are integers (or None) and the step is not 0; else EditError."""
    parts = (chosen.start, chosen.stop, chosen.step)
    if not all(part is None or is_integer(part) for part in parts) or chosen.step == 0:
        raise EditError(f"{what}={chosen!r}: a slice's start, stop and step must be integers or None, and the step "
                        "not 0; e.g. slice(0, None, 2)")
    return chosen


def _check_chosen(chosen: Chosen, what: str) -> Chosen:
    """Positions or heads as an edit takes them, checked when the edit is made: None, an integer, a slice
    of integers, or a list, tuple or 1-D tensor of integers (NumPy's too); never a bool or a float."""
    if chosen is None or is_integer(chosen):
        return chosen
    if isinstance(chosen, slice):
        return _checked_slice(chosen, what)
    if isinstance(chosen, torch.Tensor):
        picks_ok = _integral(chosen) and chosen.dim() <= 1 and chosen.layout == torch.strided
    else:
        picks_ok = isinstance(chosen, (list, tuple, range, numpy.ndarray)) and all(is_integer(i) for i in chosen)
    if not picks_ok:
        raise EditError(f"{what}={chosen!r}: give an integer, a slice, a list of integers or a 1-D integer tensor "
                        "(negative ones count from the end), or None for all; a bool or a float is not an index")
    return chosen


def gaussian(shape: torch.Size | tuple[int, ...], mean: float, std: float, seed: int,
             like: torch.Tensor) -> torch.Tensor:
    """Seeded N(mean, std^2) noise with ``like``'s dtype and device (same seed, same numbers)."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device) * std + mean


def noise_neurons(block: int, neurons: Neurons = "even", mean: float = 10.0, std: float = 1.0,
                  seed: int = 0) -> Edits:
    """Replace chosen MLP neurons after GELU (tap ``blocks.{block}.mlp.post``) by Gaussian noise.

    The notes' exercise: every even neuron, mean 10 (far outside the real distribution).
    The noise is drawn anew from ``seed`` at each call, so a run is reproducible.
    """
    _neuron_choice(neurons)  # a float or bool index refused now, not truncated at the first run
    seed = check_int(seed, "seed", -2**63, 2**64 - 1, error=EditError)  # a generator's range, Python's ints only

    def edit(post: torch.Tensor) -> torch.Tensor:
        index = neuron_index(neurons, post.shape[-1])
        chosen = post[..., index]
        post[..., index] = gaussian(chosen.shape, mean, std, seed, post)
        return post

    return Edits({f"blocks.{block}.mlp.post": edit})


def scale_block(block: int, factor: float) -> Edits:
    """Multiply a block's output (tap ``blocks.{block}.resid_post``) by ``factor``."""
    return Edits({f"blocks.{block}.resid_post": lambda x: x * factor})


def add_vector(tap: str, vector: torch.Tensor) -> Edits:
    """Add a vector (e.g. a steering direction [D]) to a tap, broadcast over batch and sequence."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        return x + vector.to(x)

    return Edits({tap: edit})


# ---------------------------------------------------------------------------------------------
# Patching and ablation


def patch(source: Source, taps: Patterns, *, positions: Chosen = None, heads: Chosen = None) -> Edits:
    """Put values recorded in another run in place: activation patching.

    source: a ``Trace`` (each tap matched by ``taps`` takes its own recorded tensor, so
    ``patch(clean, "blocks.*.resid_pre")`` patches every block), a ``{tap name: tensor}`` dict, or one
    tensor shaped like the tap. ``positions``: only those sequence positions (query positions of
    ``attn.scores``/``attn.pattern``), counted in each run, so -1 is the last token of both even
    when their lengths differ; ``heads``: only those heads of a head-shaped tap. The source must
    match the tap's shape (a source of batch 1 serves every row); the lengths may differ when
    ``positions`` are chosen. Raises TapError if a source trace lacks a tap; EditError (naming the
    tap and both shapes) at run time if the shapes do not fit.
    """
    if source is None:
        raise EditError("patch needs a source: the Trace of the run to patch from (run(..., taps=...)), a "
                        "{tap name: tensor} dict or a tensor shaped like the tap; to zero a tap use zero_ablate")
    positions, heads = _check_chosen(positions, "positions"), _check_chosen(heads, "heads")
    patterns = _patterns(taps)
    _check_recorded(source, patterns, "patch")

    def put(x: torch.Tensor, name: str) -> torch.Tensor:
        recorded = _batch_of(_recorded_at(source, name).to(x), x)
        recorded = _align(recorded, x, name, positions)
        region = _region(x, name, positions, heads)
        return recorded.clone() if region is None else torch.where(region, recorded, x)

    return Edits({pattern: put for pattern in patterns})


def zero_ablate(taps: Patterns, *, positions: Chosen = None, heads: Chosen = None) -> Edits:
    """Set a tap to zero: everywhere, at chosen ``positions``, or for chosen ``heads`` of a head-shaped tap."""
    positions, heads = _check_chosen(positions, "positions"), _check_chosen(heads, "heads")

    def zero(x: torch.Tensor, name: str) -> torch.Tensor:
        region = _region(x, name, positions, heads)
        return torch.zeros_like(x) if region is None else x.masked_fill(region, 0)

    return Edits({pattern: zero for pattern in _patterns(taps)})


def mean_ablate(taps: Patterns, source: Source | None = None, *, positions: Chosen = None, heads: Chosen = None,
                per_position: bool = False) -> Edits:
    """Replace a tap (or chosen ``positions``/``heads`` of it) by its mean.

    The mean is over the batch and the positions of ``source``: a ``Trace`` (padding left out, by its
    ``mask``; each tap matched by ``taps`` takes the mean of its own recorded tensor), a
    ``{tap name: tensor}`` dict or one tensor [B, S, ...] (every entry counts), or None: the batch being
    run. ``per_position=True`` averages over the batch only, one mean per position (the source's
    length must then equal the run's). ``attn.scores``/``attn.pattern`` are always averaged per query
    position, since a query's pattern belongs to its position.
    """
    positions, heads = _check_chosen(positions, "positions"), _check_chosen(heads, "heads")
    patterns = _patterns(taps)
    recorded = _check_recorded(source, patterns, "mean_ablate")
    # Tap name -> the source's mean, computed once: now for a trace (so that a compiled forward
    # meets no data-dependent branch), at the first call for a tensor or dict.
    means = {name: _mean(source[name], source.mask, name, per_position) for name in recorded}

    def ablate(x: torch.Tensor, name: str) -> torch.Tensor:
        if source is None:
            mean = _mean(x, None, name, per_position)
        else:
            if name not in means:
                means[name] = _mean(_recorded_at(source, name), None, name, per_position)
            mean = means[name].to(x)
        if not _broadcasts(mean.shape, x.shape):
            raise EditError(f"mean_ablate at tap {name!r}: the source's mean has shape {tuple(mean.shape)}, which does "
                            f"not fit the tap's shape {tuple(x.shape)}; with per_position=True the source must have "
                            "the run's length")
        mean = mean.expand(x.shape)
        region = _region(x, name, positions, heads)
        return mean.clone() if region is None else torch.where(region, mean, x)

    return Edits({pattern: ablate for pattern in patterns})


def _patterns(taps: Patterns) -> list[str]:
    patterns = [taps] if isinstance(taps, str) else list(taps) if isinstance(taps, Sequence) else None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TapError(f"taps must be a tap name, a glob pattern or a list of them, got {taps!r}; "
                       "e.g. 'blocks.3.resid_pre' or 'blocks.*.attn.z'")
    return patterns


def _check_recorded(source: Source | None, patterns: list[str], what: str) -> list[str]:
    """The taps a source trace is read at; refuse, before anything runs, one that lacks any of them."""
    if source is None or isinstance(source, torch.Tensor):
        return []
    if not isinstance(source, Mapping):
        raise EditError(f"{what} takes a Trace, a {{tap name: tensor}} dict or a tensor as its source, "
                        f"got {type(source).__name__}")
    if isinstance(source, Trace):
        wanted = select(patterns, tap_names(source.n_layer))
        missing = [name for name in wanted if name not in source]
        if missing:
            raise TapError(f"{what}: the source trace did not record {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                           f"record them in the source run: run(..., taps={patterns!r})")
        return wanted
    return []


def _recorded_at(source: Source, name: str) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    if name not in source:
        raise TapError(f"the source holds no tensor for tap {name!r} (it has {list(source)[:5]}); "
                       f"record it in the source run: run(..., taps=[{name!r}])")
    return source[name]


def _batch_of(recorded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A source of batch 1 stands for every row; another batch size must be the run's."""
    if recorded.dim() == x.dim() and recorded.shape[0] == 1 and x.shape[0] > 1:
        return recorded.expand(x.shape[0], *recorded.shape[1:])
    return recorded


def _align(recorded: torch.Tensor, x: torch.Tensor, name: str, positions: Chosen) -> torch.Tensor:
    """The source laid out like ``x``: itself, or (other lengths) its chosen positions put at the run's."""
    if recorded.shape == x.shape:
        return recorded
    axis, _ = tap_axes(name)
    only_the_length_differs = recorded.dim() == x.dim() and all(
        r == t for a, (r, t) in enumerate(zip(recorded.shape, x.shape)) if a != axis)
    if positions is None or not only_the_length_differs:
        raise EditError(f"patch at tap {name!r}: the source has shape {tuple(recorded.shape)} but the tap has shape "
                        f"{tuple(x.shape)}; patch from a run of the same batch size (or batch 1) and length, or choose "
                        "positions= (counted in each run, so -1 is the last token of both)")
    into = _indices(positions, x.shape[axis], name, "position")
    taken = _indices(positions, recorded.shape[axis], name + " (in the source)", "position")
    if len(into) != len(taken):
        raise EditError(f"patch at tap {name!r}: positions={positions!r} picks {len(taken)} positions of the source "
                        f"but {len(into)} of the run; give explicit positions that exist in both")
    taken_values = recorded.index_select(axis, torch.tensor(taken, device=x.device))
    return x.index_copy(axis, torch.tensor(into, device=x.device), taken_values)


def _indices(chosen: Chosen, length: int, name: str, what: str) -> list[int]:
    """Positions or heads as a list of indices in [0, length), checked."""
    if isinstance(chosen, slice):
        return list(range(length))[chosen]
    if isinstance(chosen, torch.Tensor):
        chosen = chosen.tolist()
    picks = [chosen] if is_integer(chosen) else list(chosen)
    for pick in picks:
        if not is_integer(pick) or not -length <= pick < length:
            raise EditError(f"{what} {pick!r} does not exist: tap {name!r} has {what}s 0..{length - 1} "
                            "(negative ones count from the end)")
    return [pick % length for pick in picks]


def _region(x: torch.Tensor, name: str, positions: Chosen, heads: Chosen) -> torch.Tensor | None:
    """Bool, broadcastable to ``x``: True where the edit acts (the chosen positions and heads); None = everywhere."""
    sequence, head = tap_axes(name)
    if heads is not None and head is None:
        raise EditError(f"heads={heads!r} given for tap {name!r} (shape {' '.join(tap_shape(name))}), which has no "
                        "head axis; heads= works on attn.q, .k, .v, .z, .heads, .scores and .pattern")
    region = None
    for axis, chosen, what in ((sequence, positions, "position"), (head, heads, "head")):
        if chosen is None:
            continue
        picked = torch.zeros(x.shape[axis], dtype=torch.bool, device=x.device)
        picked[_indices(chosen, x.shape[axis], name, what)] = True
        picked = picked.view([-1 if a == axis else 1 for a in range(x.dim())])
        region = picked if region is None else region & picked
    return region


def _mean(x: torch.Tensor, mask: torch.Tensor | None, name: str, per_position: bool) -> torch.Tensor:
    """The mean of ``x`` over the batch (and the sequence unless per position), real tokens only; keepdim."""
    sequence, _ = tap_axes(name)
    axes = (0,) if per_position or sequence != 1 else (0, 1)
    if mask is None or bool(mask.all()):
        return x.mean(dim=axes, keepdim=True)
    if mask.shape != x.shape[:1] + x.shape[sequence:sequence + 1]:
        raise EditError(f"mean_ablate at tap {name!r}: the source trace holds {tuple(x.shape)} but its mask is "
                        f"{tuple(mask.shape)} (recorded with keep_positions=?), so its padding cannot be told apart; "
                        "record the source at every position")
    real = mask.to(x.device).view([x.shape[a] if a in (0, sequence) else 1 for a in range(x.dim())])
    # where(), not a product: a padded position may hold -inf (scores), and -inf * 0 is NaN.
    total = torch.where(real, x, 0).sum(dim=axes, keepdim=True)
    return total / real.sum(dim=axes, keepdim=True).to(x.dtype)


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    return len(shape) == len(target) and all(s in (1, t) for s, t in zip(shape, target))
