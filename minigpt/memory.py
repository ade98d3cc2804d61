"""The memory guard: what a run's recorded taps will hold, and whether that fits."""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checks import UNSET, renamed_keyword
from .config import GPTConfig, is_integer
from .errors import InputError, MemoryBudgetError
from .taps import QUERY_KEY_TAPS, Positions, TapCall, describe, tap_shape

if TYPE_CHECKING:
    from .model import GPT


def nbytes_estimate(names: Iterable[str], batch: int, seq: int, cfg: GPTConfig, bytes_per_value: int,
                    positions: Positions | torch.Tensor = None) -> dict[str, int]:
    """Bytes each recorded tap will hold for a [batch, seq] run (the memory guard's arithmetic).

    ``positions`` (a run's ``keep_positions``) shrinks the sequence axis of the taps shaped [B, S, ...]; the
    attention scores and pattern [B, H, Q, K] are always kept whole.
    """
    if positions is None:
        kept = seq
    elif isinstance(positions, (str, torch.Tensor)):  # "last", or its index [B]: one position per row
        kept = 1
    else:
        kept = len(range(seq)[positions] if isinstance(positions, slice) else positions)
    sizes = {"B": batch, "Q": seq, "K": seq, **axis_sizes(cfg)}
    shapes = {info.name: info.shape.split() for info in describe(cfg.n_layer)}
    return {n: math.prod(kept if axis == "S" else sizes[axis] for axis in shapes[n]) * bytes_per_value
            for n in names}


def axis_sizes(cfg: GPTConfig) -> dict[str, int]:
    """The size of each model-fixed axis letter of the tap table (H heads, D d_model, d d_head, M d_mlp, V vocab)."""
    return {"1": 1, "H": cfg.n_head, "D": cfg.n_embd, "d": cfg.d_head, "M": cfg.d_mlp, "V": cfg.vocab_size}


def row_shape(name: str, cfg: GPTConfig) -> tuple[int, ...]:
    """The shape of one token's values at a tap shaped [B, S, ...]: ``blocks.0.attn.q`` -> (H, d)."""
    sizes = axis_sizes(cfg)
    return tuple(sizes[axis] for axis in tap_shape(name)[2:])


def estimate_trace_bytes(model: GPT, taps: str | Iterable[str], batch: int, seq: int, *,
                         store_dtype: torch.dtype | None = None, keep_positions: Positions = None,
                         dtype: torch.dtype | None = UNSET, positions: Positions = UNSET) -> int:
    """Bytes the tensors recorded by ``run(..., taps=taps)`` on ``batch`` x ``seq`` tokens will hold.

    ``taps`` as in run (names or globs); ``store_dtype`` and ``keep_positions`` as in run (``dtype``
    and ``positions``: their old names, deprecated). Exact for the recorded values (numel x
    itemsize); with ``grad=True`` the autograd graph holds more.
    """
    store_dtype = renamed_keyword(store_dtype, dtype, ("store_dtype", "dtype"))
    keep_positions = renamed_keyword(keep_positions, positions, ("keep_positions", "positions"))
    for name, value in (("batch", batch), ("seq", seq)):
        if not is_integer(value) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    call = TapCall.request(model.tap_names, taps, seq=seq, store_dtype=store_dtype, keep_positions=keep_positions)
    itemsize = (store_dtype or model.unembedding.dtype).itemsize
    return sum(nbytes_estimate(call.to_record, batch, seq, model.cfg, itemsize, keep_positions).values())


def forward_bytes(cfg: GPTConfig, batch: int, seq: int, itemsize: int, *, grad: bool = False,
                  explicit_attention: bool = False, keys: int | None = None, logits: bool = True) -> int:
    """Bytes the forward pass itself holds at its peak, beyond the weights and the trace.

    The logits [B, S, V] and one block's temporaries (qkv, the attention output, the MLP's two
    [B, S, M]), plus scores and pattern [B, H, S, K] when attention runs in the open; with ``grad``
    the autograd graph keeps every block's. ``keys``: positions attended over (a cache's), else S.
    ``logits=False``: a forward that stops before the unembedding. An estimate on the safe side, for
    the guard, not an exact count.
    """
    keys = seq if keys is None else keys
    block = batch * seq * (8 * cfg.n_embd + 2 * cfg.d_mlp)
    if explicit_attention:
        block += 2 * batch * cfg.n_head * seq * keys
    blocks_held = cfg.n_layer if grad else 1
    return itemsize * (batch * seq * cfg.vocab_size * logits + blocks_held * block)


def check_budget(model: GPT, call: TapCall, batch: int, seq: int, *, prompt: int | None = None) -> None:
    """Refuse, before allocating, a call that would not fit: a trace over ``trace_budget_bytes``, or
    (budget "auto") a whole call over the memory free now.

    ``trace_budget_bytes``: a number of bytes the recorded taps may hold, None (no guard), or "auto"
    (the default): the trace may take half of the memory free right now where it goes (``call.keep.device``,
    else the model's device), and the whole call (trace, the forward's own activations and logits,
    and for generation the KV cache and the per-step traces) 90% of it, so that a call asking for
    more than the machine can hold fails here with a message instead of being killed by the
    out-of-memory killer halfway. Where free memory cannot be read (not Linux, not CUDA), "auto"
    does not limit. ``prompt``: for generation, the prompt's length (``seq`` is prompt + new tokens).
    """
    budget = model.trace_budget_bytes
    if not (budget is None or budget == "auto" or ((is_integer(budget) or isinstance(budget, float)) and budget >= 0)):
        raise InputError(f"model.trace_budget_bytes must be a number of bytes, 'auto' or None, got {budget!r}")
    if budget is None:
        return
    cfg, itemsize, keep = model.cfg, model.unembedding.dtype.itemsize, call.keep
    sizes = nbytes_estimate(keep.names, batch, seq, cfg, (keep.store_dtype or model.unembedding.dtype).itemsize,
                            keep.keep_positions)
    trace = sum(sizes.values())
    where = torch.device(keep.device) if keep.device is not None else model.unembedding.device
    free = available_memory(where) if budget == "auto" else None
    if budget == "auto":
        if free is None:
            return
        budget, why = free // 2, f"half the {fmt_bytes(free)} free on {where} now (trace_budget_bytes='auto')"
    else:
        why = "model.trace_budget_bytes"
    if trace > budget:
        worst = sorted(sizes, key=sizes.get, reverse=True)[:3]
        raise MemoryBudgetError(
            f"recording {len(keep.names)} taps for {batch}x{seq} tokens would hold {fmt_bytes(trace)}, over the "
            f"budget of {fmt_bytes(budget)} ({why}); the largest are "
            f"{', '.join(f'{n} ({fmt_bytes(sizes[n])})' for n in worst)}. {_WAY_OUT}")
    if free is None:
        return
    explicit = any(call.wants(n) for n in call.wanted if n.endswith(QUERY_KEY_TAPS))
    parts = {"the trace": trace}
    if prompt is None:
        # A run that stops before the unembedding (stop_at, or run's logits=False) never holds the logits.
        logits = keep.stop_at in (None, "logits")
        what = "the forward's activations" + (" and logits" if logits else "")
        parts[what] = forward_bytes(cfg, batch, seq, itemsize, grad=keep.grad, explicit_attention=explicit,
                                    logits=logits)
    else:  # generation: the prefill, the cache, and the per-step traces joined into one (a second copy)
        parts["the trace"] = 2 * trace
        parts["the prompt's forward"] = forward_bytes(cfg, batch, prompt, itemsize, explicit_attention=explicit)
        parts["the KV cache"] = 2 * cfg.n_layer * batch * seq * cfg.n_embd * itemsize
    total = sum(parts.values())
    if total > 0.9 * free:
        raise MemoryBudgetError(
            f"this call on {batch}x{seq} tokens would need about {fmt_bytes(total)} ("
            + ", ".join(f"{what} {fmt_bytes(n)}" for what, n in parts.items() if n)
            + f"), more than the {fmt_bytes(free)} free on {where} now (trace_budget_bytes='auto' keeps 10% spare). "
            f"Use a smaller batch or fewer tokens, or {_WAY_OUT[0].lower()}{_WAY_OUT[1:]}")


def training_bytes(cfg: GPTConfig, values: int, batch: int, context: int, grad_accum: int,
                   activation_itemsize: int) -> dict[str, int]:
    """Bytes one training step holds at its peak, by part, for a model of ``values`` float32 values.

    The weights, their gradients and AdamW's two states (4 bytes a value each), one micro-batch's
    activations kept for the backward (``forward_bytes`` with ``grad``) and the step's windows
    ([grad_accum * batch, context + 1] int64, all taken at the start of the step).
    """
    return {"the weights": 4 * values, "their gradients": 4 * values, "AdamW's two states": 8 * values,
            "one micro-batch's activations": forward_bytes(cfg, batch, context, activation_itemsize, grad=True),
            "the step's windows": 8 * grad_accum * batch * (context + 1)}


def check_training_fits(parts: dict[str, int], device: torch.device, way_out: str) -> None:
    """Refuse (MemoryBudgetError), before anything is allocated, a training step whose ``parts``
    (``training_bytes``) add up to more than 90% of the memory free on ``device`` now.
    Where free memory cannot be read (not Linux, not CUDA), nothing is refused."""
    free = available_memory(torch.device(device))
    total = sum(parts.values())
    if free is not None and total > 0.9 * free:
        raise MemoryBudgetError(
            f"training would need about {fmt_bytes(total)} ("
            + ", ".join(f"{what} {fmt_bytes(n)}" for what, n in parts.items())
            + f"), more than 90% of the {fmt_bytes(free)} free on {device} now; {way_out}")


# A harvest's own bookkeeping beside the forward and the shard buffers (the writer thread, the
# document being tokenized, the open file): about 4 MiB measured with GPT-2 small, counted as 8
# (by minigpt.harvest.guard, and by the harvest bench's bound).
HARVEST_BOOKKEEPING_BYTES = 8 * 2**20


_WAY_OUT = ("Record fewer taps, fewer positions (keep_positions=[-1]) or a smaller batch, record in a lower "
            "dtype (store_dtype=torch.bfloat16), or set model.trace_budget_bytes (None turns the guard off)")


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` now (None where that cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    found = []
    try:  # Linux: what the kernel says can be allocated without swapping
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemAvailable:"))
        found.append(kib * 1024)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    # A container's own limit (cgroup v2, then v1) is often far below the machine's memory.
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            found.append(int(Path(limit).read_text()) - int(Path(usage).read_text()))
        except (OSError, ValueError):  # absent, or "max" (no limit)
            pass
    return max(0, min(found)) if found else None


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
