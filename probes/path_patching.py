"""Path patching (the IOI paper's): how much of a metric flows from sender heads into receiver heads' q, k or v.

With ``frozen="clean"`` (the paper's way): run the clean and the corrupt input, recording every
head's output (``attn.z``, the head's part of the input of W_O); then run the clean input once more
with the senders' outputs patched from the corrupt run and every other head's output frozen at the
clean run's, recording the receivers' q, k or v; then a last clean run with only those q, k or v
patched in. The metric of that run says what the corrupt senders do to the output through the
receivers alone. ``frozen="corrupt"`` swaps the roles (the corrupt run is the base, the senders come
from the clean run). MLPs and LayerNorms are recomputed in every run; a sender at or after a
receiver's layer reaches none of its inputs. Shapes: L n_layer, H heads, B batch, S sequence, V vocabulary.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from minigpt import GPT, Trace, edits
from minigpt.checks import check_choice, check_int, is_integer
from minigpt.errors import InputError

Head = tuple[int, int]  # (layer, head)
# A metric: the logits [B, S, V] of one run -> a number (a float or a 0-d tensor), e.g. a logit difference.
Metric = Callable[[torch.Tensor], torch.Tensor | float]
QKV = ("q", "k", "v")


def logit_difference(answer: int, wrong: int, position: int = -1) -> Metric:
    """The metric logits [B, S, V] -> mean over the batch of logit[answer] - logit[wrong] at ``position``."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, position, answer] - logits[:, position, wrong]).mean()

    return metric


def path_patch(model: GPT, clean: object, corrupt: object, senders: Head | Sequence[Head],
               receivers: Head | Sequence[Head], metric: Metric, *, receiver_inputs: str | Sequence[str] = "q",
               frozen: str = "clean") -> float:
    """The metric after patching the path senders -> receivers' ``receiver_inputs`` (see the module's text).

    clean, corrupt: inputs of one shape (text, ids or int tensors [B, S]); senders, receivers: one
    (layer, head) or a list; receiver_inputs: "q", "k", "v" or several of them.
    """
    base, source, receivers, inputs = _checked(model, clean, corrupt, receivers, receiver_inputs, frozen)
    base_z, source_z = _head_outputs(model, base), _head_outputs(model, source)
    return _metrics(model, base, base_z, source_z, [_heads(model, senders, "senders")], receivers, inputs, metric)[0]


def path_patch_sweep(model: GPT, clean: object, corrupt: object, receivers: Head | Sequence[Head], metric: Metric,
                     *, receiver_inputs: str | Sequence[str] = "q", frozen: str = "clean",
                     senders_per_run: int = 8) -> torch.Tensor:
    """``path_patch`` with each single head as the sender: the metric per sender head, [L, H] (float64).

    ``senders_per_run`` senders share one run (the batch repeated that many times): fewer, larger runs;
    lower it if the memory guard refuses a run (its logits are [senders_per_run * B, S, V]).
    """
    base, source, receivers, inputs = _checked(model, clean, corrupt, receivers, receiver_inputs, frozen)
    check_int(senders_per_run, "senders_per_run", 1, way_out="1 runs one sender at a time")
    base_z, source_z = _head_outputs(model, base), _head_outputs(model, source)
    heads = [[(layer, head)] for layer in range(model.cfg.n_layer) for head in range(model.cfg.n_head)]
    found: list[float] = []
    for start in range(0, len(heads), senders_per_run):
        found += _metrics(model, base, base_z, source_z, heads[start:start + senders_per_run], receivers, inputs,
                          metric)
    return torch.tensor(found, dtype=torch.float64).view(model.cfg.n_layer, model.cfg.n_head)


def _metrics(model: GPT, base: torch.Tensor, base_z: Trace, source_z: Trace, sender_sets: list[list[Head]],
             receivers: list[Head], inputs: list[str], metric: Metric) -> list[float]:
    """The metric of each sender set's path, all sets in one pair of runs (one batch copy per set)."""
    copies, batch = len(sender_sets), base.shape[0]
    tokens = base.repeat(copies, 1)
    # Every head before the last receiver's layer frozen at the base run, but each copy's senders.
    frozen = {}
    for layer in range(max(layer for layer, _ in receivers)):
        name = f"blocks.{layer}.attn.z"
        z = base_z[name].repeat(copies, 1, 1, 1)  # [copies * B, S, H, d]
        for i, senders in enumerate(sender_sets):
            for head in (h for l, h in senders if l == layer):
                z[i * batch:(i + 1) * batch, :, head] = source_z[name][:, :, head]
        frozen[name] = z
    targets = {f"blocks.{layer}.attn.{x}": sorted({h for l, h in receivers if l == layer})
               for layer in sorted({layer for layer, _ in receivers}) for x in inputs}
    last = max(targets, key=model.tap_names.index)
    _, sent = model.run(tokens, taps=list(targets), edits=edits.patch(frozen, list(frozen)) if frozen else None,
                        stop_at=last)
    logits, _ = model.run(tokens, edits=edits.combine(*(edits.patch(sent, name, heads=heads)
                                                        for name, heads in targets.items())))
    return [_number(metric(logits[i * batch:(i + 1) * batch])) for i in range(copies)]


def _head_outputs(model: GPT, tokens: torch.Tensor) -> Trace:
    """Every head's output (``blocks.*.attn.z`` [B, S, H, d]) in one run of ``tokens``."""
    return model.run(tokens, taps="blocks.*.attn.z")[1]


def _checked(model: GPT, clean: object, corrupt: object, receivers: Head | Sequence[Head],
             receiver_inputs: str | Sequence[str],
             frozen: str) -> tuple[torch.Tensor, torch.Tensor, list[Head], list[str]]:
    """(base tokens, source tokens, receivers, receiver inputs) checked; InputError naming what does not fit."""
    check_choice(frozen, "frozen", ["clean", "corrupt"])
    inputs = [receiver_inputs] if isinstance(receiver_inputs, str) else list(receiver_inputs)
    if not inputs:
        raise InputError("receiver_inputs names none of 'q', 'k', 'v'; give one or several of them")
    for x in inputs:
        check_choice(x, "each of receiver_inputs", QKV)
    runs = []
    for what, inputs_of in (("clean", clean), ("corrupt", corrupt)):
        tokens, mask = model.tokens(inputs_of, return_mask=True)
        if not mask.all():
            raise InputError(f"the {what} input has rows of different lengths; path patching compares position by "
                             "position, so give rows of one length (tokens [B, S])")
        runs.append(tokens)
    if runs[0].shape != runs[1].shape:
        raise InputError(f"the clean input has shape {tuple(runs[0].shape)} but the corrupt one "
                         f"{tuple(runs[1].shape)}; path patching needs inputs of one shape [B, S]")
    base, source = runs if frozen == "clean" else runs[::-1]
    return base, source, _heads(model, receivers, "receivers"), sorted(set(inputs), key=QKV.index)


def _heads(model: GPT, heads: Head | Sequence[Head], what: str) -> list[Head]:
    """One (layer, head) or a non-empty list of them, each inside the model."""
    listed = [heads] if isinstance(heads, tuple) and len(heads) == 2 and all(map(is_integer, heads)) else heads
    if not isinstance(listed, (list, tuple)) or not listed:
        raise InputError(f"{what} must be a (layer, head) pair or a non-empty list of them, got {heads!r}")
    found = []
    for pair in listed:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise InputError(f"each of {what} is a (layer, head) pair, got {pair!r}")
        found.append((check_int(pair[0], f"the layer of {what} {pair!r}", 0, model.cfg.n_layer - 1),
                      check_int(pair[1], f"the head of {what} {pair!r}", 0, model.cfg.n_head - 1)))
    return found


def _number(value: torch.Tensor | float) -> float:
    """A metric's value as a float; InputError for anything but one number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    raise InputError(f"the metric must return one number (a float or a 1-element tensor), got {shape}; "
                     "reduce over the batch, e.g. .mean()")
