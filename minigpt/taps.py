"""Choosing taps, and what one call keeps, records and edits.

A tap is a named point of the forward pass (``tap_table.py`` lists them). ``model.py`` passes every intermediate tensor
through ``tap(name, x)``; the ``TapCall`` object of that call decides whether the tensor is
replaced by an edit and whether it is kept. With nothing asked, a tap is one set lookup.
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from .checks import check_bool, check_device, check_floating_dtype, is_integer
from .edit_dict import Edit, apply_edit, bind_edit, takes_tap_name  # noqa: F401 (takes_tap_name lived here)
from .errors import EditError, InputError, TapError, closest
from .tap_table import (  # noqa: F401 (the table lived here: importers of these names from taps keep working)
    BLOCK_TAPS, MODEL_TAPS_AFTER, MODEL_TAPS_BEFORE, ON_DEMAND, QUERY_KEY_TAPS, TapInfo, describe, tap_axes,
    tap_names, tap_shape)

# What run(..., taps=) takes: a tap name, a glob pattern, a predicate of the name (True = record), or a list of them.
TapFilter = str | Callable[[str], bool]
# Sequence positions a run keeps: a slice, a list, "last" (each row's last real token), or None (all).
Positions = slice | list[int] | str | None


def select(patterns: TapFilter | Iterable[TapFilter], names: list[str]) -> list[str]:
    """Expand tap names, glob patterns (``blocks.*.resid_post``) and predicates into names, in forward order.

    A predicate is a function of a tap name returning True for the taps it selects
    (``lambda name: name.endswith("resid_post")``); a list may mix the three. Raises TapError for
    an unknown name, a block that does not exist, or a pattern or predicate that matches nothing.
    """
    if isinstance(patterns, str) or callable(patterns):
        patterns = [patterns]
    elif not isinstance(patterns, Iterable):
        raise TapError(f"taps must be a tap name, a glob pattern or a list of them (or a predicate: a function of "
                       f"the name), got {type(patterns).__name__} {patterns!r}")
    chosen: set[str] = set()
    for pattern in patterns:
        if callable(pattern):
            hits = _predicate_hits(pattern, names)
        elif not isinstance(pattern, str):
            raise TapError(f"tap names are strings, got {type(pattern).__name__} {pattern!r}; "
                           "write e.g. 'blocks.0.resid_post' or 'blocks.*.attn.pattern'")
        else:
            is_glob = any(c in pattern for c in "*?[")
            hits = fnmatch.filter(names, pattern) if is_glob else [pattern] if pattern in names else []
            if not hits:
                what = "tap pattern {!r} matches no tap" if is_glob else "unknown tap {!r}"
                raise TapError(f"{what.format(pattern)}{_no_such_block(pattern, names)}{closest(pattern, names)} "
                               f"{_LIST_HINT}")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _predicate_hits(predicate: Callable[[str], bool], names: list[str]) -> list[str]:
    """The names a tap predicate selects; TapError if it selects none or answers other than True/False."""
    hits = []
    for name in names:
        try:
            answer = predicate(name)
        except Exception as e:
            e.add_note(f"(raised by the tap predicate {predicate!r} given the name {name!r})")
            raise
        if not isinstance(answer, bool):
            raise TapError(f"the tap predicate {predicate!r} returned {answer!r} for {name!r}; a predicate takes a tap "
                           "name and returns True (record it) or False")
        hits += [name] * answer
    if not hits:
        raise TapError(f"the tap predicate {predicate!r} selects no tap {_LIST_HINT}")
    return hits


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

    The edits are as given: ``TapCall`` gives each function what it asks for (``edit_dict.bind_edit``).
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
            resolved[name], source[name] = edit, pattern
    return resolved


class StopForward(Exception):
    """Raised by a tap to end the forward pass early (``run(..., stop_at=tap)``)."""


@dataclass(frozen=True)
class Keep:
    """What a run keeps, checked once when built; ``run`` builds one from its keywords.

    ``names``: the exact tap names to record, in forward order (``select_until`` resolves patterns).
    ``keep_positions``: the sequence positions kept of taps whose second axis is the sequence (a slice,
    a list of ints, ``"last"``: each row's last real token, or None: all). ``store_dtype``: the
    floating dtype the kept tensors are cast to (None: the model's). ``device``: where they are moved
    (run's ``to=``; None: where the forward ran). ``grad``: keep them on the autograd graph (then none
    of the three copying options may be set). ``stop_at``: the tap after which the forward ends.
    Raises InputError (TapError for names) naming the option, its valid values and what to do.
    """

    names: tuple[str, ...] = ()
    keep_positions: Positions = None
    store_dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    grad: bool = False
    stop_at: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))  # frozen: the one normalisation, at birth
        bad = [n for n in self.names if not isinstance(n, str)]
        if bad or not (self.stop_at is None or isinstance(self.stop_at, str)):
            raise TapError(f"tap names are strings, got {(bad or [self.stop_at])[0]!r}; write e.g. "
                           f"'blocks.0.resid_post' {_LIST_HINT}")
        check_bool(self.grad, "grad")
        if self.device is not None:
            check_device(self.device, "to")
        if self.store_dtype is not None:
            check_floating_dtype(self.store_dtype, "store_dtype", "recorded activations are kept in a floating "
                                 "dtype, e.g. torch.float16 or torch.bfloat16 (None keeps the model's)")
        copying = {"keep_positions": self.keep_positions, "store_dtype": self.store_dtype, "to": self.device}
        copies = [f"{name}={value!r}" for name, value in copying.items() if value is not None]
        if self.grad and copies:
            # The trace must hold the very tensors the forward goes on with, or no gradient reaches them.
            raise InputError(f"grad=True with {', '.join(copies)}: these keep a copy that the rest of the forward "
                             "does not use, so no gradient would reach it; drop them and slice, move or cast "
                             "the trace's tensors after computing the gradients")
        positions = self.keep_positions
        if not (positions is None or positions == "last" or isinstance(positions, slice) or (
                isinstance(positions, (list, tuple, range)) and all(is_integer(p) for p in positions))):
            raise InputError(f"keep_positions must be a slice or a list of ints (e.g. [-1] for the last token), or "
                             f"'last' (each row's last real token), got {positions!r}")

    def check_fits(self, seq: int) -> None:
        """Raise InputError unless ``keep_positions`` keeps at least one position, all of them in a ``seq``-token input."""
        positions = self.keep_positions
        if positions is None or positions == "last":
            return
        if isinstance(positions, slice):
            try:
                kept = range(seq)[positions]
            except (TypeError, ValueError) as e:
                raise InputError(f"keep_positions={positions!r} is not a usable slice ({e})") from None
        else:
            kept = positions
            wrong = [p for p in positions if not -seq <= p < seq]
            if wrong:
                raise InputError(f"keep_positions {wrong[:5]} do not exist in a {seq}-token input; give positions "
                                 f"in [{-seq}, {seq}) (negative ones count from the end)")
        if len(kept) == 0:
            raise InputError(f"keep_positions={positions!r} keeps no position of a {seq}-token input; "
                             "leave keep_positions=None to keep them all")

    def position_index(self, mask: torch.Tensor | None) -> slice | list[int] | torch.Tensor | None:
        """``keep_positions`` as an index of the sequence axis: ``"last"`` becomes each row's last real token
        (the last True of ``mask`` [B, S]: an index [B], one position per row; [-1] without a mask)."""
        if self.keep_positions != "last":
            return self.keep_positions
        return [-1] if mask is None else mask.shape[-1] - 1 - mask.flip(-1).int().argmax(dim=-1)


class TapCall:
    """What one forward call records and edits; called at every tap by the model (``tap(name, x)``).

    ``keep``: what it keeps (a ``Keep``; or tap names, with Keep's other fields by keyword:
    ``TapCall(names, stop_at=...)``). ``edits``: exact tap name -> edit, where an edit is a function
    (tensor -> tensor of the same shape, dtype and device) or a tensor to put in place. A function
    gets a copy of the tensor, which it may change in place, and what it asks for: the tap's name, the
    ``mask`` and the ``step`` (``edit_dict.bind_edit``). The value recorded at a tap is the value the
    rest of the forward uses (after its edit). ``mask`` [B, S]: a padded batch's real tokens, for
    ``keep_positions="last"`` and the edits (None: every token real). ``step``: which forward call
    of a generation this is (0: ``run``, or the prefill over the prompt). ``TapCall.build`` makes one
    for a model and an input, every argument checked; ``TapCall.request`` also resolves the tap patterns.

    ``sink``: instead of keeping recorded tensors in ``trace``, call ``sink(name, x)`` with each one
    (the value the forward goes on with, whole: keep_positions/store_dtype/device do not apply). The
    sink must not change ``x``; it copies what it wants into memory of its own, e.g. buffers it
    reuses from batch to batch (``minigpt.harvest`` does), so that recording allocates nothing.
    """

    def __init__(self, keep: Keep | Iterable[str] = (), edits: Mapping[str, Edit] | None = None, *,
                 mask: torch.Tensor | None = None, sink: Callable[[str, torch.Tensor], None] | None = None,
                 step: int = 0, **fields: object):
        if isinstance(keep, Keep) and fields:
            raise TypeError(f"TapCall takes a Keep or tap names with Keep's fields, not both: put {list(fields)} "
                            "in the Keep")
        keep = keep if isinstance(keep, Keep) else Keep(tuple(keep), **fields)
        self.keep = keep
        self.to_record = dict.fromkeys(keep.names)  # ordered, for the memory guard's message
        self.given_edits = dict(edits or {})  # as given, for ``at_step``
        self.edits = {name: bind_edit(edit, name, mask=mask, step=step) for name, edit in self.given_edits.items()}
        self.stop_at = keep.stop_at
        self.wanted = self.to_record.keys() | self.edits.keys() | ({keep.stop_at} if keep.stop_at else set())
        # Read once here, not from ``keep`` at each tap: the forward calls this object at every tap.
        self.grad, self.device, self.store_dtype = keep.grad, keep.device, keep.store_dtype
        self.positions, self.sink = keep.position_index(mask), sink
        self.trace: dict[str, torch.Tensor] = {}

    @classmethod
    def build(cls, tap_names: list[str], keep: Keep, edits: Mapping[str, Edit] | None = None, *,
              seq: int, mask: torch.Tensor | None = None) -> TapCall:
        """What ``run`` asks for, checked: the edits resolved against the model's ``tap_names`` and
        none after ``keep.stop_at``, and ``keep`` usable on a ``seq``-token input (``mask`` [B, seq]
        for a padded batch). Raises TapError, EditError or InputError."""
        resolved = resolve_edits(edits, tap_names)
        if keep.stop_at is not None:
            late = [n for n in resolved if tap_names.index(n) > tap_names.index(keep.stop_at)]
            if late:
                raise EditError(f"edits at {late[:3]} come after stop_at={keep.stop_at!r}, where the forward ends, "
                                "so they would never run; stop later, or leave them out")
        keep.check_fits(seq)
        return cls(keep, resolved, mask=mask)

    @classmethod
    def request(cls, tap_names: list[str], taps: str | Iterable[str] = (), edits: Mapping[str, Edit] | None = None,
                *, seq: int, mask: torch.Tensor | None = None, **fields: object) -> TapCall:
        """``build`` from tap patterns: ``taps`` resolved (``select_until``) into a ``Keep`` with ``fields``
        (keep_positions, store_dtype, device, grad, stop_at)."""
        keep = Keep(select_until(taps, tap_names, fields.get("stop_at")), **fields)
        return cls.build(tap_names, keep, edits, seq=seq, mask=mask)

    def at_step(self, step: int, mask: torch.Tensor | None = None) -> TapCall:
        """A fresh call for generation's forward call ``step`` (0: the prefill, whose ``mask`` [B, S] says
        which prompt tokens are real; i: the i-th new token): the same taps, the edits given that step."""
        return TapCall(self.to_record, self.given_edits, mask=mask, step=step)

    @property
    def record(self) -> dict[str, None]:
        """Deprecated name of ``to_record`` (kept one release)."""
        warnings.warn("TapCall.record is renamed TapCall.to_record", DeprecationWarning, stacklevel=2)
        return self.to_record

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
        if name in self.to_record:
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
        if self.device is not None or self.store_dtype is not None:
            kept = kept.to(device=self.device, dtype=self.store_dtype)
        if not self.grad and kept.untyped_storage().size() > kept.numel() * kept.element_size():
            # A view would keep its whole parent alive (q is a third of qkv, a slice of positions a
            # sliver of the tap): copy, so the trace holds what the memory guard's estimate says.
            # (An untyped storage's size() is its bytes; nbytes() would break torch.compile's graph.)
            kept = kept.clone()
        return kept


Taps = TapCall  # the old name, kept one release


def select_until(patterns: TapFilter | Iterable[TapFilter], names: list[str], stop_at: str | None) -> list[str]:
    """``select(patterns, names)`` (nothing for no patterns), cut after ``stop_at``: the taps to record.

    Raises TapError for a ``stop_at`` that is not a tap, and for taps asked for by exact name after
    it (they would never run); taps a glob matches after it are left out.
    """
    record = select(patterns, names) if patterns else []
    if stop_at is None:
        return record
    if not isinstance(stop_at, str) or stop_at not in names:
        raise TapError(f"stop_at={stop_at!r} is not a tap name{closest(str(stop_at), names)}; give one exact "
                       f"name, e.g. stop_at='blocks.3.resid_post' {_LIST_HINT}")
    last = names.index(stop_at)
    exact = {p for p in ([patterns] if isinstance(patterns, str) or callable(patterns) else patterns)
             if isinstance(p, str)}
    late = [n for n in record if n in exact and names.index(n) > last]
    if late:
        raise TapError(f"taps {late[:3]} come after stop_at={stop_at!r}, where the forward ends, so they would "
                       "never run; stop later, or leave them out")
    return [n for n in record if names.index(n) <= last]


NO_TAPS = TapCall()
