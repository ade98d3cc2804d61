"""Patching and ablation: ``patch``, ``zero_ablate``, ``mean_ablate``, and where they act (positions, heads).

``positions`` count along the sequence axis (S, or the query axis Q of ``attn.scores/pattern``) in each
row's real tokens: on a padded batch (the run's ``mask``, bound by ``TapCall``; see ``edit_dict``),
-1 and ``"last"`` are each row's last real token, a negative index counts from each row's last real
token, a slice is taken of each row's real tokens (so its negative bounds count from the row's end),
and a position a shorter row lacks leaves that row alone. Each row then gets what it gets run alone.
Real tokens are found by the mask, so padding on the left (an ``attention_mask`` may give it) counts
the same way. An index outside the padded length is an EditError. A source ``Trace`` with padding is
counted the same way, row by row, in its own real tokens. ``positions=None`` acts everywhere,
padding included.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy
import torch

from .checks import is_integer
from .edit_dict import Edits
from .errors import EditError, TapError
from .taps import select, tap_axes, tap_names, tap_shape
from .trace import Trace

# Which positions or heads an edit acts on: one index, a slice, a list (negative = from the end), or None (all).
Chosen = int | slice | Sequence[int] | None
# Where patching and mean ablation read their values: a recorded trace, {tap name: tensor}, or one tensor.
Source = Trace | Mapping[str, torch.Tensor] | torch.Tensor
Patterns = str | Sequence[str]
# Each row's real positions, in order (a padded batch); None: every position of every row is real.
Rows = list[list[int]] | None


def integral(t: torch.Tensor) -> bool:
    """Whether a tensor's dtype holds indices: an integer dtype (never a float, complex or bool)."""
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def checked_slice(chosen: slice, what: str) -> slice:
    """``chosen`` if its bounds and step are integers (or None) and the step is not 0; else EditError."""
    parts = (chosen.start, chosen.stop, chosen.step)
    if not all(part is None or is_integer(part) for part in parts) or chosen.step == 0:
        raise EditError(f"{what}={chosen!r}: a slice's start, stop and step must be integers or None, and the step "
                        "not 0; e.g. slice(0, None, 2)")
    return chosen


def check_chosen(chosen: Chosen | str, what: str) -> Chosen:
    """Positions or heads as an edit takes them, checked when the edit is made: None, an integer, a slice
    of integers, or a list, tuple or 1-D tensor of integers (NumPy's too); never a bool or a float.
    Positions may also be ``"last"``: each row's last real token, the same as -1."""
    if what == "positions" and isinstance(chosen, str) and chosen == "last":
        return -1
    if chosen is None or is_integer(chosen):
        return chosen
    if isinstance(chosen, slice):
        return checked_slice(chosen, what)
    if isinstance(chosen, torch.Tensor):
        picks_ok = integral(chosen) and chosen.dim() <= 1 and chosen.layout == torch.strided
    else:
        picks_ok = isinstance(chosen, (list, tuple, range, numpy.ndarray)) and all(is_integer(i) for i in chosen)
    if not picks_ok:
        last = ", 'last' (each row's last real token)" if what == "positions" else ""
        raise EditError(f"{what}={chosen!r}: give an integer, a slice, a list of integers or a 1-D integer tensor "
                        f"(negative ones count from the end){last}, or None for all; a bool or a float is not an index")
    return chosen


def patch(source: Source, taps: Patterns, *, positions: Chosen | str = None, heads: Chosen = None) -> Edits:
    """Put values recorded in another run in place: activation patching.

    source: a ``Trace`` (each tap matched by ``taps`` takes its own recorded tensor, so
    ``patch(clean, "blocks.*.resid_pre")`` patches every block), a ``{tap name: tensor}`` dict, or one
    tensor shaped like the tap. ``positions``: only those sequence positions (query positions of
    ``attn.scores``/``attn.pattern``), counted in each run and each row's real tokens, so -1 (or
    ``"last"``) is the last token of both even when their lengths differ; ``heads``: only those heads
    of a head-shaped tap. The source must match the tap's shape (a source of batch 1 serves every
    row); the lengths may differ when ``positions`` are chosen. Raises TapError if a source trace
    lacks a tap; EditError (naming the tap and both shapes) at run time if the shapes do not fit.
    """
    if source is None:
        raise EditError("patch needs a source: the Trace of the run to patch from (run(..., taps=...)), a "
                        "{tap name: tensor} dict or a tensor shaped like the tap; to zero a tap use zero_ablate")
    positions, heads = check_chosen(positions, "positions"), check_chosen(heads, "heads")
    patterns = _patterns(taps)
    _check_recorded(source, patterns, "patch")
    # The source's padding, read now (not inside a compiled forward): its rows' real positions.
    padded = isinstance(source, Trace) and source.mask is not None and not bool(source.mask.all())
    source_rows = real_positions(source.mask) if padded else None

    def put(x: torch.Tensor, name: str, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        recorded = _recorded_at(source, name).to(x)
        axis, _ = tap_axes(name)
        # The source trace's mask describes this tensor unless it was recorded with keep_positions.
        fits = source_rows is not None and (len(source_rows), source.mask.shape[1]) == (
            recorded.shape[0], recorded.shape[axis])
        recorded = _batch_of(recorded, x)
        if positions is None or (mask is None and not fits):
            recorded = _align(recorded, x, name, positions)
        else:
            rows = source_rows if fits else None
            recorded = _align_rows(recorded, x, name, positions, real_positions(mask), rows)
        region = _region(x, name, positions, heads, mask)
        return recorded.clone() if region is None else torch.where(region, recorded, x)

    return Edits({pattern: put for pattern in patterns})


def zero_ablate(taps: Patterns, *, positions: Chosen | str = None, heads: Chosen = None) -> Edits:
    """Set a tap to zero: everywhere, at chosen ``positions``, or for chosen ``heads`` of a head-shaped tap."""
    positions, heads = check_chosen(positions, "positions"), check_chosen(heads, "heads")

    def zero(x: torch.Tensor, name: str, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        region = _region(x, name, positions, heads, mask)
        return torch.zeros_like(x) if region is None else x.masked_fill(region, 0)

    return Edits({pattern: zero for pattern in _patterns(taps)})


def mean_ablate(taps: Patterns, source: Source | None = None, *, positions: Chosen | str = None,
                heads: Chosen = None, per_position: bool = False) -> Edits:
    """Replace a tap (or chosen ``positions``/``heads`` of it) by its mean.

    The mean is over the batch and the positions of ``source``: a ``Trace`` (padding left out, by its
    ``mask``; each tap matched by ``taps`` takes the mean of its own recorded tensor), a
    ``{tap name: tensor}`` dict or one tensor [B, S, ...] (every entry counts), or None: the batch being
    run (its padding left out). ``per_position=True`` averages over the batch only, one mean per
    position (the source's length must then equal the run's). ``attn.scores``/``attn.pattern`` are
    always averaged per query position, since a query's pattern belongs to its position.
    """
    positions, heads = check_chosen(positions, "positions"), check_chosen(heads, "heads")
    patterns = _patterns(taps)
    recorded = _check_recorded(source, patterns, "mean_ablate")
    # Tap name -> the source's mean, computed once: now for a trace (so that a compiled forward
    # meets no data-dependent branch), at the first call for a tensor or dict.
    means = {name: _mean(source[name], source.mask, name, per_position) for name in recorded}

    def ablate(x: torch.Tensor, name: str, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        if source is None:
            mean = _mean(x, mask, name, per_position)
        else:
            if name not in means:
                means[name] = _mean(_recorded_at(source, name), None, name, per_position)
            mean = means[name].to(x)
        if not _broadcasts(mean.shape, x.shape):
            raise EditError(f"mean_ablate at tap {name!r}: the source's mean has shape {tuple(mean.shape)}, which does "
                            f"not fit the tap's shape {tuple(x.shape)}; with per_position=True the source must have "
                            "the run's length")
        mean = mean.expand(x.shape)
        region = _region(x, name, positions, heads, mask)
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


def _check_fits(recorded: torch.Tensor, x: torch.Tensor, name: str, positions: Chosen) -> int:
    """The sequence axis, if the source can be laid out like ``x``: the same shape, or (with positions
    chosen) one that differs in length only; else EditError naming both shapes."""
    axis, _ = tap_axes(name)
    only_the_length_differs = recorded.dim() == x.dim() and all(
        r == t for a, (r, t) in enumerate(zip(recorded.shape, x.shape)) if a != axis)
    if recorded.shape != x.shape and (positions is None or not only_the_length_differs):
        raise EditError(f"patch at tap {name!r}: the source has shape {tuple(recorded.shape)} but the tap has shape "
                        f"{tuple(x.shape)}; patch from a run of the same batch size (or batch 1) and length, or choose "
                        "positions= (counted in each run, so -1 is the last token of both)")
    return axis


def _align(recorded: torch.Tensor, x: torch.Tensor, name: str, positions: Chosen) -> torch.Tensor:
    """The source laid out like ``x``: itself, or (other lengths) its chosen positions put at the run's."""
    axis = _check_fits(recorded, x, name, positions)
    if recorded.shape == x.shape:
        return recorded
    into = _indices(positions, x.shape[axis], name, "position")
    taken = _indices(positions, recorded.shape[axis], name + " (in the source)", "position")
    if len(into) != len(taken):
        raise EditError(f"patch at tap {name!r}: positions={positions!r} picks {len(taken)} positions of the source "
                        f"but {len(into)} of the run; give explicit positions that exist in both")
    taken_values = recorded.index_select(axis, torch.tensor(taken, device=x.device))
    return x.index_copy(axis, torch.tensor(into, device=x.device), taken_values)


def _align_rows(recorded: torch.Tensor, x: torch.Tensor, name: str, positions: Chosen, rows: Rows,
                source_rows: Rows) -> torch.Tensor:
    """``_align`` row by row: each row's chosen positions, counted in its real tokens (``rows``) and in
    those of its source row (``source_rows``; None: every position real), take the source's values."""
    axis = _check_fits(recorded, x, name, positions)
    into = _positions_in(positions, x.shape[axis], rows, name, x.shape[0])
    if source_rows is not None and len(source_rows) == 1:
        source_rows = source_rows * x.shape[0]  # a source of batch 1 serves every row
    taken = _positions_in(positions, recorded.shape[axis], source_rows, name + " (in the source)", x.shape[0])
    for row, (run_picks, source_picks) in enumerate(zip(into, taken)):
        if len(run_picks) != len(source_picks):
            raise EditError(f"patch at tap {name!r}: positions={positions!r} picks {len(source_picks)} positions of "
                            f"the source but {len(run_picks)} of the run in row {row} (counted in each row's real "
                            "tokens); give positions that exist in both")
    batch = torch.tensor([row for row, picks in enumerate(into) for _ in picks], dtype=torch.long, device=x.device)
    flat_into, flat_taken = ([p for picks in chosen for p in picks] for chosen in (into, taken))
    out = x.movedim(axis, 1).clone()
    out[batch, torch.tensor(flat_into, dtype=torch.long, device=x.device)] = recorded.movedim(axis, 1)[
        batch, torch.tensor(flat_taken, dtype=torch.long, device=x.device)]
    return out.movedim(1, axis)


def real_positions(mask: torch.Tensor | None) -> Rows:
    """mask [B, S] (True = real token) -> each row's real positions in order; None stays None."""
    return None if mask is None else [[p for p, real in enumerate(row) if real] for row in mask.tolist()]


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


def _positions_in(chosen: Chosen, length: int, rows: Rows, name: str, batch: int) -> list[list[int]]:
    """The chosen positions of each of ``batch`` rows, counted in its real positions (``rows``; None: all
    ``length`` of them). Checked against ``length``; a position a shorter row lacks is left out there."""
    flat = _indices(chosen, length, name, "position")
    if rows is None:
        return [flat] * batch
    if isinstance(chosen, torch.Tensor):
        chosen = chosen.tolist()
    if isinstance(chosen, slice):
        return [real[chosen] for real in rows]
    picks = [chosen] if is_integer(chosen) else list(chosen)
    return [[real[p] for p in picks if -len(real) <= p < len(real)] for real in rows]


def _region(x: torch.Tensor, name: str, positions: Chosen, heads: Chosen,
            mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bool, broadcastable to ``x``: True where the edit acts (the chosen positions, counted in each row's
    real tokens by ``mask`` [B, S], and heads); None = everywhere."""
    sequence, head = tap_axes(name)
    if heads is not None and head is None:
        raise EditError(f"heads={heads!r} given for tap {name!r} (shape {' '.join(tap_shape(name))}), which has no "
                        "head axis; heads= works on attn.q, .k, .v, .z, .heads, .scores and .pattern")
    region = None
    if positions is not None and mask is None:
        region = torch.zeros(x.shape[sequence], dtype=torch.bool, device=x.device)
        region[_indices(positions, x.shape[sequence], name, "position")] = True
        region = region.view([-1 if a == sequence else 1 for a in range(x.dim())])
    elif positions is not None:
        rows = _positions_in(positions, x.shape[sequence], real_positions(mask), name, x.shape[0])
        region = torch.zeros(x.shape[0], x.shape[sequence], dtype=torch.bool, device=x.device)
        for row, picks in enumerate(rows):
            region[row, picks] = True
        region = region.view([x.shape[0] if a == 0 else -1 if a == sequence else 1 for a in range(x.dim())])
    if heads is not None:
        picked = torch.zeros(x.shape[head], dtype=torch.bool, device=x.device)
        picked[_indices(heads, x.shape[head], name, "head")] = True
        picked = picked.view([-1 if a == head else 1 for a in range(x.dim())])
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
    # At least 1: a position that no row has real (left padding) takes 0, not 0/0.
    return total / real.sum(dim=axes, keepdim=True).clamp(min=1).to(x.dtype)


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    return len(shape) == len(target) and all(s in (1, t) for s, t in zip(shape, target))
