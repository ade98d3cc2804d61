"""``model.run``: one forward pass that records the asked taps and applies the edits -> (logits, trace).

The options are checked once (``Keep``, ``TapCall``) and the memory guard consulted before the forward
runs; model.py holds the forward itself.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from .checks import UNSET, check_bool, renamed_keyword
from .errors import InputError
from .inputs import as_tokens
from .memory import check_budget
from .taps import Edit, Keep, Positions, StopForward, TapCall, TapFilter, select_until
from .trace import Trace

if TYPE_CHECKING:
    from .model import GPT


def run(model: GPT, inputs: str | Sequence | torch.Tensor, taps: TapFilter | Iterable[TapFilter] = (),
        edits: Mapping[str, Edit] | None = None, *, attention_mask: torch.Tensor | None = None,
        grad: bool = False, to: torch.device | str | None = None, store_dtype: torch.dtype | None = None,
        keep_positions: Positions = None, stop_at: str | None = None, logits: bool = True,
        dtype: torch.dtype | None = UNSET, positions: Positions = UNSET) -> tuple[torch.Tensor | None, Trace]:
    """Run once, recording ``taps`` and applying ``edits`` -> (logits [B, S, V], trace).

    taps: tap names, glob patterns, predicates of the name (``lambda name: name.endswith("resid_post")``),
    or a list of them.

    inputs: text, ids, a list of texts or of id lists (any lengths: padded on the right, see
    trace.mask), or an int tensor [S] or [B, S] (with an HF-style ``attention_mask`` [B, S] if padded).
    edits: tap name or pattern -> function (tensor -> same-shaped tensor) or replacement tensor, for
    this call only. The trace's tensors are detached unless ``grad=True``; ``to`` (a device),
    ``store_dtype`` and ``keep_positions`` (``"last"``: each row's last real token) shape what it
    keeps (see Keep). ``stop_at``: end the forward after that tap; the logits are then None.
    ``logits=False``: the same, ending after ``ln_f`` (the [V, D] unembedding is never computed, nor
    counted by the memory guard) -> (None, trace); the tap ``logits`` asked for by name or edited
    is then an InputError, and a glob or predicate leaves it out.
    ``dtype`` and ``positions`` are the old names of ``store_dtype`` and ``keep_positions`` (deprecated).
    """
    store_dtype = renamed_keyword(store_dtype, dtype, ("store_dtype", "dtype"))
    keep_positions = renamed_keyword(keep_positions, positions, ("keep_positions", "positions"))
    tokens, mask = as_tokens(inputs, model.cfg, model.unembedding.device, lambda: model.tokenizer,
                             attention_mask=attention_mask)  # the ids' values are checked in forward
    stop_at = _stop_before_logits(taps, edits, stop_at, logits)
    keep = Keep(select_until(taps, model.tap_names, stop_at), keep_positions=keep_positions,
                store_dtype=store_dtype, device=to, grad=grad, stop_at=stop_at)
    call = TapCall.build(model.tap_names, keep, edits, seq=tokens.shape[1], mask=mask)
    check_budget(model, call, *tokens.shape)
    logits = None
    with torch.set_grad_enabled(grad), contextlib.suppress(StopForward):
        logits = model(tokens, call, mask=mask)
    real = mask if mask is not None else torch.ones_like(tokens, dtype=torch.bool)
    return logits, Trace(call.trace, model.cfg.n_layer, real)



def _stop_before_logits(taps: TapFilter | Iterable[TapFilter], edits: Mapping[str, Edit] | None,
                        stop_at: str | None, logits: bool) -> str | None:
    """run's ``stop_at`` once ``logits`` is weighed: with ``logits=False``, ``ln_f`` unless it stops earlier.

    Raises InputError where ``logits=False`` contradicts the call: the tap ``logits`` named in ``taps``,
    in ``edits`` or as ``stop_at`` (a glob or predicate that matches it simply leaves it out).
    """
    check_bool(logits, "logits")
    if logits:
        return stop_at
    named = taps == "logits" or (isinstance(taps, (list, tuple, set, frozenset)) and "logits" in taps)
    if named or stop_at == "logits" or (isinstance(edits, Mapping) and "logits" in edits):
        where = "taps" if named else "stop_at" if stop_at == "logits" else "edits"
        raise InputError(f"logits=False skips the unembedding, but {where} asks for the tap 'logits'; leave "
                         "logits=True (the default) to compute it, or drop 'logits' from " + where)
    return stop_at or "ln_f"
