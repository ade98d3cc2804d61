"""What an edit is: a function or a replacement tensor, how a call gives a function what it asks for,
``Edits`` (a dict whose ``|`` chains edits in order), ``during`` (edits limited to some forward calls),
and ``apply_edit``, which runs one edit at a tap and checks its result.

An edit function takes the tap's tensor and returns one of the same shape. It may ask for more:
a second positional parameter without a default gets the tap's name (``def edit(x, name)``), a
keyword-only ``mask`` the call's real tokens (bool [B, S], True = real; None when every token is
real), a keyword-only ``step`` which forward call this is (0 for ``model.run`` and for generation's
prefill over the prompt, i for the call that runs the i-th new token). ``bind_edit`` gives each
what it asks for once per forward call, so the forward itself never inspects a signature.
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch

from .checks import is_integer
from .errors import EditError, MiniGPTWarning
from .tap_table import tap_axes

Edit = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor


def takes_tap_name(edit: Edit) -> bool:
    """Whether an edit function asks for the tap's name: its second positional parameter has no default."""
    return asks_for(edit)[0]


def asks_for(edit: Edit) -> tuple[bool, bool, bool]:
    """What an edit function asks for: (the tap's name, the call's ``mask``, the call's ``step``)."""
    if isinstance(edit, torch.Tensor):
        return False, False, False
    try:
        parameters = list(inspect.signature(edit).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: called with the tensor only
        return False, False, False
    positional = [q for q in parameters if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    keyword_only = {q.name for q in parameters if q.kind == q.KEYWORD_ONLY}
    takes_name = len(positional) >= 2 and positional[1].default is inspect.Parameter.empty
    return takes_name, "mask" in keyword_only, "step" in keyword_only


def bind_edit(edit: Edit, name: str, *, mask: torch.Tensor | None = None, step: int = 0) -> Edit:
    """``edit`` as a one-argument function (or the tensor itself), given what it asks for: the tap's
    ``name``, the call's ``mask`` [B, S] (None: every token real) and ``step``."""
    if not any(asks_for(edit)):
        return edit
    call = _full_call(edit)

    def bound(x: torch.Tensor) -> torch.Tensor:
        return call(x, name, mask, step)

    return bound


def _full_call(edit: Callable) -> Callable[[torch.Tensor, str, torch.Tensor | None, int], torch.Tensor]:
    """``edit`` as ``f(x, name, mask, step)``, passing on what it asks for (decided now: inspecting a
    signature inside a compiled forward would break its graph)."""
    takes_name, takes_mask, takes_step = asks_for(edit)

    def call(x: torch.Tensor, name: str, mask: torch.Tensor | None, step: int) -> torch.Tensor:
        extra = {"mask": mask} if takes_mask else {}
        if takes_step:
            extra["step"] = step
        return edit(x, name, **extra) if takes_name else edit(x, **extra)

    return call


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
    plain dicts, whose own ``|`` would keep only the last edit of a key. An edit that asks for the tap
    name, the mask or the step still gets them inside the chain.
    """
    merged = Edits()
    for edits in _edit_dicts(edit_dicts, "combine"):
        for tap, edit in edits.items():
            merged[tap] = _then(merged[tap], edit) if tap in merged else edit
    return merged


def _edit_dicts(edit_dicts: Iterable[object], what: str) -> Iterable[Mapping[str, Edit]]:
    for edits in edit_dicts:
        if not isinstance(edits, Mapping):
            raise EditError(f"{what} takes edit dicts {{tap name or pattern: edit}}, got {type(edits).__name__}")
        yield edits


def _then(first: Edit, second: Edit) -> Edit:
    """One edit that runs ``first``, then ``second`` on its result, passing each what it asks for."""
    steps = [edit if isinstance(edit, torch.Tensor) else _full_call(edit) for edit in (first, second)]

    def both(x: torch.Tensor, name: str, *, mask: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        for i, edit in enumerate(steps):
            if isinstance(edit, torch.Tensor):
                x = edit
                continue
            if i > 0:
                x = x.clone()  # each function gets a copy it may change in place, as run() gives the first one
            x = edit(x, name, mask, step)
        return x

    return both


def during(edits: Mapping[str, Edit], when: str | Iterable[int]) -> Edits:
    """``edits`` limited to some forward calls of ``generate``/``stream``: ``when`` is ``"prompt"`` (the
    prefill, and there only each row's real prompt tokens), ``"new"`` (the calls that run new tokens:
    the first new token is still chosen from the unedited prompt) or step numbers (0 = the prefill,
    i = the call that runs the i-th new token). ``model.run`` is one call over its input: step 0.

    Works on ragged batches (every row runs its i-th new token in call i). A replacement tensor is
    refused (EditError): give a function.
    """
    if isinstance(when, str) and when in ("prompt", "new"):
        steps = None
    elif isinstance(when, Iterable) and not isinstance(when, (str, bytes)):
        steps = list(when)
        if not all(is_integer(s) and s >= 0 for s in steps):
            raise EditError(f"during(..., {when!r}): steps are integers >= 0 (0 = the prefill over the prompt, i = the "
                            "call that runs the i-th new token)")
        steps = frozenset(int(s) for s in steps)
    else:
        raise EditError(f"during(..., {when!r}): give 'prompt', 'new', or a list of steps (0 = the prefill over the "
                        "prompt, i = the call that runs the i-th new token), e.g. during(steer, 'new')")
    (edits,) = _edit_dicts([edits], "during")
    tensors = [tap for tap, edit in edits.items() if isinstance(edit, torch.Tensor)]
    if tensors:
        raise EditError(f"during: the edit of {tensors[0]!r} is a tensor, which fits no call of generation alike; "
                        "give a function instead (e.g. lambda x: x + delta)")
    return Edits({tap: _only_at(edit, when if steps is None else steps) for tap, edit in edits.items()})


def _only_at(edit: Edit, when: str | frozenset[int]) -> Edit:
    """``edit`` where ``when`` (see ``during``) holds for the call, the tensor unchanged elsewhere."""
    call = _full_call(edit)

    def gated(x: torch.Tensor, name: str, *, mask: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        active = step == 0 if when == "prompt" else step > 0 if when == "new" else step in when
        if not active:
            return x
        prefill_with_padding = step == 0 and mask is not None
        edited = call(x.clone() if prefill_with_padding else x, name, mask, step)  # x: apply_edit's copy
        if not prefill_with_padding or not isinstance(edited, torch.Tensor) or edited.shape != x.shape:
            return edited  # apply_edit refuses a result of the wrong shape, naming the tap
        axis, _ = tap_axes(name)  # the sequence axis: 1, or 2 (the queries) for scores and patterns
        real = mask.to(x.device).view([x.shape[a] if a in (0, axis) else 1 for a in range(x.dim())])
        return torch.where(real, edited, x)  # the prefill's padding stays as it was

    return gated


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
