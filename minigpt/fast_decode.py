"""Fast decoding for ``generate(compile=True)``: a compiled one-token step, and what it needs.

Not needed to understand generation (``generate.py`` and ``kv_cache.py`` are): this is the same
step made fast. On a GPU the step runs as a CUDA graph over a ``StaticKVCache`` whose shapes never
change; on a CPU it runs compiled over the plain ``KVCache``, at batch 1 with one-row linear layers
rewritten (``RowDot``) where that measures faster. The compiled step and its cache belong to the
model, so one call uses them at a time (``one_at_a_time``). ``CompiledStep`` is what the generation loop calls.

Shapes: B batch, H heads, d d_head, n the positions of one forward call, V vocabulary.
"""
from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import InputError
from .kv_cache import KVCache
from .taps import NO_TAPS

if TYPE_CHECKING:
    from .model import GPT


class StaticKVCache(KVCache):
    """A KV cache whose every shape is fixed, for ``torch.compile`` and CUDA graphs.

    Attention always sees all ``capacity`` slots, the empty ones masked out, and the count of
    positions held lives in a device tensor (``next``), so one compiled graph serves every step
    without a host sync. ``length`` stays 0: the caller keeps the count. Prompts of equal length only.
    """

    def __init__(self, cfg, batch: int, capacity: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, batch, capacity, dtype=dtype, device=device)
        self.next = torch.zeros(1, dtype=torch.long, device=device)  # positions held, on the device
        self.positions: torch.Tensor | None = None  # [n] of the latest extend

    def extend(self, n: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the n tokens about to run [n] and what they may see: bool [n, capacity]."""
        if mask is not None:
            raise InputError("the static cache (compile=True on a GPU) takes prompts of equal length only")
        self.positions = self.next + self.slots[:n]
        self.next += n
        return self.positions, self.positions[:, None] >= self.slots  # its own position and earlier ones

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys and values [B, H, n, d] of the new positions; return every slot's [B, H, capacity, d]."""
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.positions] = k
        values[:, :, self.positions] = v
        return keys, values


@contextmanager
def one_at_a_time(model: GPT) -> Iterator[None]:
    """Hold the model's compiled step and cache for one call; refuse a second call while it runs."""
    lock = model.__dict__.setdefault("_compiled_lock", threading.Lock())
    if not lock.acquire(blocking=False):
        raise InputError("another generation with compile=True is running on this model (its compiled step and "
                         "cache serve one call at a time); wait for it, or generate without compile=True")
    try:
        yield
    finally:
        lock.release()


class CompiledStep:
    """The generation loop's forward for ``compile=True``: the prompt runs eagerly (no taps), each
    single new token through the compiled step. Called as ``step(tokens [B, n], mask) -> logits [B, n, V]``."""

    def __init__(self, model: GPT, batch: int, length: int):
        self.model = model
        self.cache, self.compiled = compiled_decoder(model, batch, length)
        self.warm = False  # has the compiled step run once in this call?

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # Only around the call: a generator's suspended state must not leak into the caller's.
        with torch.inference_mode():
            if tokens.shape[1] != 1:
                return self.model(tokens, NO_TAPS, self.cache, mask=mask)
            # Once warm, nothing its guards check can change within this call: skip them.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=self.warm):
                logits = self.compiled(tokens, self.cache)
            self.warm = True
            return logits[:, None]


def compiled_decoder(model: GPT, batch: int, length: int) -> tuple[KVCache, Callable]:
    """A KV cache for ``length`` positions and a compiled one-token step (compiled once, then reused).

    GPU: a static cache (capacity rounded up to a multiple of 256, at most the context, so that
    few shapes are ever compiled) and mode="reduce-overhead", i.e. CUDA graphs: one graph launch
    per token. Each shape keeps its cache, whose buffers keep their addresses, so its graph is
    never re-recorded. CPU: no graphs to replay, so the dynamic cache (attention reads only the
    positions held) under ``dynamic=True``, one graph for every length; at batch 1, one-row linear
    layers as row-by-row dot products (``RowDot``) where that measures faster on this CPU
    (``rowdot_pays``). The step: tokens [B, 1] -> logits [B, V].
    """
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    made = model.__dict__.setdefault("_decoders", {})
    if device.type != "cuda":
        rows = batch == 1 and rowdot_pays(model.unembedding)
        if ("cpu", rows) not in made:
            def cpu_step(tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
                with RowDot() if rows else contextlib.nullcontext():
                    return model(tokens, NO_TAPS, cache)[:, -1]

            # Store rather than recompute: else inductor would redo ln_f (or GELU) for every weight row.
            made["cpu", rows] = torch.compile(cpu_step, dynamic=True, fullgraph=True,
                                              options={"realize_cpu_opcount_threshold": 1} if rows else None)
        return KVCache(model.cfg, batch, length, dtype=dtype, device=device), made["cpu", rows]
    capacity = min(model.cfg.n_positions, -(-length // 256) * 256)
    key = (batch, capacity, device, dtype)
    if key not in made:
        cache = StaticKVCache(model.cfg, batch, capacity, dtype=dtype, device=device)
        for buffer in (*cache.keys, *cache.values, cache.next):
            torch._dynamo.mark_static_address(buffer)

        def step(tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
            return model(tokens, NO_TAPS, cache)[:, -1]

        made[key] = cache, torch.compile(step, mode="reduce-overhead", fullgraph=True)
    cache, step = made[key]
    cache.next.zero_()  # old keys and values stay in the buffers, but the mask hides them
    return cache, step


# rowdot_pays's verdicts: (weight shape, dtype, threads) -> whether RowDot is faster.
ROWDOT_VERDICTS: dict[tuple, bool] = {}


def rowdot_pays(weight: torch.Tensor, calls: int = 9) -> bool:
    """Whether RowDot's compiled one-row product beats the BLAS library's on this CPU, for ``weight``
    [out, in] (the unembedding, most of a decode step's bytes): measured once per shape, dtype and
    thread count, the two alternating ``calls`` times, medians compared (RowDot must win by 5%).

    The answer depends on the CPU: on the AMD EPYC measured, MKL read a one-row product's weights at
    about half the memory bandwidth and the compiled step with RowDot decoded 2.5x as fast as eager;
    on an Intel Xeon with AMX, MKL was the faster (compiled, 21 tokens/s without RowDot against 19
    with it at one thread)."""
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key not in ROWDOT_VERDICTS:
        with torch.inference_mode():
            row = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
            rowdot = torch.compile(lambda w, x: (w * x).sum(-1), dynamic=False, fullgraph=True)
            ways = {"blas": lambda: F.linear(row, weight), "rowdot": lambda: rowdot(weight, row)}
            times: dict[str, list[float]] = {name: [] for name in ways}
            for call in range(calls + 1):  # the first round warms both (and compiles rowdot)
                for name, way in ways.items():
                    started = time.perf_counter()
                    way()
                    if call:
                        times[name].append(time.perf_counter() - started)
        ROWDOT_VERDICTS[key] = statistics.median(times["rowdot"]) < 0.95 * statistics.median(times["blas"])
    return ROWDOT_VERDICTS[key]


class RowDot(TorchFunctionMode):
    """Inside a compiled CPU step: a linear layer on one row as one dot product per weight row.

    nn.Linear keeps weights [out, in]; for a single input row MKL reads them at well under the
    memory bandwidth on some CPUs (about 17 GB/s where a plain read runs at 37+ on an AMD EPYC), while
    inductor compiles ``(w * x).sum(-1)`` into one vectorised pass over the rows that reaches it. On
    others MKL is the faster: ``rowdot_pays`` measures which.
    Batches of several rows keep MKL's matrix product, which reuses each weight across the rows.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].shape[:-1].numel() == 1:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = (weight * x.reshape(1, -1)).sum(-1)  # [out]
            if bias is not None:
                y = y + bias
            return y.reshape(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)
