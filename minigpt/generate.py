"""Text generation: a KV cache, sampling, streaming, and taps and edits live at every step.

The model runs the prompt once (the prefill), then one new position per step. Each step's keys
and values go into a ``KVCache`` so that a step costs one position's work, not the whole sequence's.
Taps and edits work as in ``model.run``: an edit is applied at every forward call (the prefill and
each step), each time to the tensor of the positions computed in that call, so a position-wise
edit (scale, add a vector, silence a head's keys) gives exactly what the same edit gives in a full
forward over the final sequence. Edits that mix positions or depend on the sequence length (a
replacement tensor, ``noise_neurons``, which draws noise of the call's shape) see one position at a
time and do not equal their full-forward version.

Shapes: B batch, S prompt length, N new tokens, T = S + N, V vocabulary.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import END_OF_TEXT_ID, is_integer
from .errors import InputError
from .inputs import as_tokens, check_tokens
from .memory import check_budget
from .taps import NO_TAPS, QUERY_KEY_TAPS, Edit, Taps
from .trace import Trace

if TYPE_CHECKING:
    from .model import GPT


class KVCache:
    """The keys and values of every position run so far, per block, in preallocated buffers.

    One buffer [B, H, capacity, d] per block for keys, one for values. ``extend(n)`` is called once
    per forward call (it returns the positions of the new tokens and what they may see);
    ``update`` is called by each block's attention to store its new keys and values and get those
    of all positions back.

    Two modes. Dynamic (default): the length is a Python int and attention sees the K = length
    positions held. Static (``static=True``, for ``torch.compile`` and CUDA graphs): every shape is
    fixed, attention always sees all ``capacity`` slots with the empty ones masked out, and the
    length lives in a device tensor, so one compiled graph serves every step without a host sync.
    A padded batch (a ``mask`` given to ``extend``, dynamic mode only) keeps per row which slots
    hold real tokens and the position of its next token, so each row runs as it would alone.
    """

    def __init__(self, cfg, batch: int, capacity: int, *, dtype: torch.dtype, device: torch.device | str,
                 static: bool = False):
        # Separate tensors per block (not views of one): a compiled graph then updates each in place.
        shape = (batch, cfg.n_head, capacity, cfg.d_head)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.capacity, self.static = capacity, static
        self.length = 0  # positions held (dynamic mode; static mode leaves the count to the caller)
        self.next = torch.zeros(1, dtype=torch.long, device=device)  # the same count on the device (static)
        self.slots = torch.arange(capacity, device=device)
        self.positions: torch.Tensor | None = None  # [n] of the latest extend (static mode)
        self.real: torch.Tensor | None = None  # [B, capacity]: slots holding real tokens (padded batches)
        self.next_position: torch.Tensor | None = None  # [B]: position of each row's next token (padded batches)

    def extend(self, n: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the n tokens about to run ([n], or [B, n] for a padded batch) and what they
        may see: bool [n, K], or [B, 1, n, K] for a padded batch. ``mask`` [B, n]: True = real token."""
        if self.static:
            if mask is not None:
                raise InputError("the static cache (compile=True on a GPU) takes prompts of equal length only")
            self.positions = self.next + self.slots[:n]
            self.next += n
            return self.positions, self.positions[:, None] >= self.slots  # its own position and earlier ones
        if self.length + n > self.capacity:
            raise InputError(f"the cache holds {self.capacity} positions and {self.length} are used; "
                             f"{n} more do not fit: make a larger cache")
        slots = self.slots[self.length:self.length + n]
        self.length += n
        keys = self.slots[:self.length]
        if mask is None and self.real is None:
            return slots, slots[:, None] >= keys
        if self.real is None:
            self.real = torch.zeros(mask.shape[0], self.capacity, dtype=torch.bool, device=mask.device)
            self.next_position = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        if mask is None:
            mask = torch.ones(self.real.shape[0], n, dtype=torch.bool, device=self.real.device)
        self.real[:, slots] = mask
        positions = (self.next_position[:, None] + mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        self.next_position += mask.sum(dim=-1)
        # As padded_layout in model.py: real keys up to the query; a padding query sees itself.
        visible = (slots[:, None] >= keys) & self.real[:, None, None, :self.length] | (slots[:, None] == keys)
        return positions, visible

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys and values [B, H, n, d] of the new positions; return those of all positions [B, H, K, d]."""
        keys, values = self.keys[layer], self.values[layer]
        if self.static:
            keys[:, :, self.positions] = k
            values[:, :, self.positions] = v
            return keys, values
        start = self.length - k.shape[2]
        keys[:, :, start:self.length] = k
        values[:, :, start:self.length] = v
        return keys[:, :, :self.length], values[:, :, :self.length]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at ``temperature`` 0, else sampled after ``top_k`` and
    ``top_p`` filtering. ``seed``: row b draws from its own generator seeded ``seed + b`` (or
    ``seed[b]`` for a list), so a row's sample does not depend on the other rows."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | Sequence[int] | None = None
    stop_at_eos: bool = False
    eos_id: int = END_OF_TEXT_ID

    def check(self, vocab_size: int, batch: int) -> None:
        """Raise InputError for a setting out of range."""
        t, k, p, seed = self.temperature, self.top_k, self.top_p, self.seed
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (not is_integer(k) or k < 1):
            raise InputError(f"top_k must be an integer >= 1 or None, got {k!r}")
        if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1):
            raise InputError(f"top_p must be a number in (0, 1] or None, got {p!r}")
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        if seed is not None and not all(is_integer(s) and 0 <= s < 2**63 - batch for s in seeds):
            raise InputError(f"seed must be an integer in [0, 2**63) or a list of them (one per row), or None; "
                             f"got {seed!r}")
        if isinstance(seed, (list, tuple)) and len(seed) != batch:
            raise InputError(f"seed is a list of {len(seed)} seeds for a batch of {batch} prompts; give one per row")
        if not isinstance(self.stop_at_eos, bool):
            raise InputError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")
        if self.stop_at_eos and not (is_integer(self.eos_id) and 0 <= self.eos_id < vocab_size):
            raise InputError(f"eos_id {self.eos_id!r} is outside the vocabulary [0, {vocab_size}); "
                             "pass the id that ends a text for this model")

    def generators(self, batch: int, device: torch.device) -> list[torch.Generator] | None:
        """One seeded generator per row, or None (the global one) without a seed."""
        if self.seed is None:
            return None
        seeds = self.seed if isinstance(self.seed, (list, tuple)) else [self.seed + b for b in range(batch)]
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def check_room(prompt_len: int, max_new_tokens: int, n_positions: int) -> None:
    """The prompt and the new tokens must fit the context; say how to make them fit."""
    if not is_integer(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prompt_len + max_new_tokens > n_positions:
        fixes = [f"ask for at most {n_positions - prompt_len} new tokens"] if prompt_len < n_positions else []
        if max_new_tokens < n_positions:
            keep = n_positions - max_new_tokens
            fixes.append(f"keep only the last {keep} prompt tokens (tokens[:, -{keep}:])")
        fix = " or ".join(fixes) or f"ask for fewer than {n_positions} new tokens and shorten the prompt to fit"
        raise InputError(f"a {prompt_len}-token prompt plus {max_new_tokens} new tokens is longer than the "
                         f"model's context of {n_positions} positions; {fix}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Next-token logits [B, V] -> ids [B]: greedy at temperature 0, else sampled.

    The order is HuggingFace's: divide by the temperature, keep the top_k largest, then keep
    the smallest set of most likely tokens whose probability reaches top_p. ``generator``: one
    for the batch, or a list of one per row.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    # In float64 (a tiny temperature or top_p would round to 0 in float32), shifted so the largest is 0
    # before dividing: a tiny temperature gives -inf, never +inf or NaN, and acts as greedy.
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token when the more likely ones before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prepare(model: GPT, prompt: str | Sequence | torch.Tensor, max_new_tokens: int, sampling: Sampling,
            taps: str | Iterable[str], edits: Mapping[str, Edit] | None, compile: bool,
            attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, Taps]:
    """Check every argument before anything runs: the prompt as ids [B, S] and its padding mask
    [B, S] (None if every token is real), and what to record and edit."""
    tokens, mask = as_tokens(prompt, model.cfg, model.unembedding.device, lambda: model.tokenizer,
                             attention_mask=attention_mask)
    check_tokens(tokens, model.cfg)
    sampling.check(model.cfg.vocab_size, tokens.shape[0])
    if model.training:
        raise InputError("the model is in train mode: generation never uses dropout, and it will not switch the "
                         "model to eval mode behind your back (another thread may be training it); call "
                         "model.eval() first, and model.train() after if you are training")
    check_room(tokens.shape[1], max_new_tokens, model.cfg.n_positions)
    request = Taps.request(model.tap_names, taps, edits, seq=tokens.shape[1])
    if compile and (request.wanted or mask is not None):
        what = "taps and edits run in eager mode" if request.wanted else "it takes prompts of equal length only"
        raise InputError(f"compile=True runs the plain model and {what}: drop compile=True")
    check_budget(model, request, tokens.shape[0], tokens.shape[1] + max_new_tokens, prompt=tokens.shape[1])
    return tokens, mask, request


def stream(model: GPT, prompt: str | Sequence | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
           stop_at_eos: bool = False, eos_id: int = END_OF_TEXT_ID, edits: Mapping[str, Edit] | None = None,
           compile: bool = False, attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """``model.stream(...)``: ``generate`` one step at a time. Checks everything first, then returns an
    iterator over the new ids [B] of each step, as each is chosen (for taps, use ``generate``)."""
    sampling = Sampling(temperature, top_k, top_p, seed, stop_at_eos, eos_id)
    tokens, mask, request = prepare(model, prompt, max_new_tokens, sampling, (), edits, compile, attention_mask)
    return _decode(model, tokens, mask, max_new_tokens, sampling, request, compile, None)


def _decode(model: GPT, tokens: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int, sampling: Sampling,
            request: Taps, compile: bool, steps: list | None) -> Iterator[torch.Tensor]:
    """The generation loop: prefill the prompt [B, S], then sample, yield and run one position at a time.

    With ``steps`` (a list), each forward call's trace is appended to it, and the last token is
    run too so that the traces cover it.
    """
    if compile:
        # The compiled step and its static cache are the model's, shared by every call: one at a time.
        lock = model.__dict__.setdefault("_compiled_lock", threading.Lock())
        if not lock.acquire(blocking=False):
            raise InputError("another generation with compile=True is running on this model (its compiled step and "
                             "cache serve one call at a time); wait for it, or generate without compile=True")
        try:
            yield from _decode_steps(model, tokens, mask, max_new_tokens, sampling, request, compile, steps)
        finally:
            lock.release()
    else:
        yield from _decode_steps(model, tokens, mask, max_new_tokens, sampling, request, compile, steps)


def _decode_steps(model: GPT, tokens: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int,
                  sampling: Sampling, request: Taps, compile: bool, steps: list | None) -> Iterator[torch.Tensor]:
    B, S = tokens.shape
    device, dtype = model.unembedding.device, model.unembedding.dtype
    record = steps is not None and bool(request.record)
    generator = sampling.generators(B, device)
    if compile:
        cache, step = compiled_decoder(model, B, S + max_new_tokens)
    else:
        cache, step = KVCache(model.cfg, B, S + max_new_tokens, dtype=dtype, device=device), None
    # The prompt's next-token logits are at each row's last real token (padding may follow it).
    last = torch.full((B,), S - 1, device=device) if mask is None else S - 1 - mask.flip(-1).int().argmax(-1)

    warm = False  # has the compiled step run once in this loop?

    def forward(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the next positions [B, n] with this call's taps and edits; logits [B, n, V]."""
        nonlocal warm
        # Only around the call: a generator's suspended state must not leak into the caller's.
        with torch.inference_mode():
            if step is not None and tokens.shape[1] == 1:
                # Once warm, nothing its guards check can change within this loop: skip them.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=warm):
                    logits = step(tokens, cache)
                warm = True
                return logits[:, None]
            # A fresh Taps per call: each holds the trace of the positions it ran.
            taps = Taps(request.record, request.edits) if request.wanted else NO_TAPS
            logits = model(tokens, taps, cache, mask=mask)
        if record:
            steps.append(taps.trace)
        return logits

    logits = forward(tokens, mask)[torch.arange(B, device=device), last]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        new = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)  # [B]
        if sampling.stop_at_eos:
            new = new.masked_fill(done, sampling.eos_id)  # a finished row repeats the end token
            done |= new == sampling.eos_id
        yield new
        final = i + 1 == max_new_tokens or (sampling.stop_at_eos and bool(done.all()))
        if not final or record:
            logits = forward(new[:, None])[:, -1]
        if final:
            break


def generate(model: GPT, prompt: str | Sequence | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
             stop_at_eos: bool = False, eos_id: int = END_OF_TEXT_ID, taps: str | Iterable[str] = (),
             edits: Mapping[str, Edit] | None = None, compile: bool = False,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, Trace]:
    """Continue ``prompt`` with a KV cache; returns ids [B, S + N], the prompt followed by N <= max_new_tokens new ones.

    ``model.generate(...)``. ``prompt``: text, ids, a tensor [B, S], or a batch of texts or id lists
    of different lengths (or a tensor with an HF-style ``attention_mask``): each row is continued
    exactly as it would be alone, and comes back with its real tokens first (its prompt, then its
    new tokens), padded on the right with ``eos_id``; the trace's ``mask`` says which are real.
    ``temperature=0`` is greedy; otherwise sample after ``top_k``/``top_p`` filtering; with a
    ``seed``, row b draws from its own generator seeded ``seed + b`` (or ``seed[b]`` for a list),
    so it samples what it would alone with that seed. With ``stop_at_eos`` a row that emits
    ``eos_id`` repeats it, and generation stops when all rows have. ``edits`` stay in force at every
    step. With ``taps``, returns ``(ids, trace)`` where the trace equals that of a full forward over
    the returned ids (attention scores/patterns [B, H, T, T] included, future keys at -inf/0).
    ``compile=True``: each step through ``torch.compile`` (a static cache and CUDA graphs on a GPU),
    no taps, edits or padding; the first call compiles (seconds).
    """
    sampling = Sampling(temperature, top_k, top_p, seed, stop_at_eos, eos_id)
    tokens, mask, request = prepare(model, prompt, max_new_tokens, sampling, taps, edits, compile, attention_mask)
    steps: list[dict[str, torch.Tensor]] = []
    new = list(_decode(model, tokens, mask, max_new_tokens, sampling, request, compile, steps))
    ids = torch.cat([tokens, torch.stack(new, dim=1)], dim=1) if new else tokens
    real = torch.ones_like(ids, dtype=torch.bool)
    trace = join_steps(steps) if request.record else {}
    if mask is not None:  # real tokens first, as run() lays out a batch of different lengths
        real[:, :tokens.shape[1]] = mask
        order = (~real).int().argsort(dim=-1, stable=True)  # [B, T]: real slots first, in order
        ids, real = ids.gather(1, order).masked_fill(~real.gather(1, order), eos_id), real.gather(1, order)
        trace = {name: _reorder(name, t, order) for name, t in trace.items()}
    if not request.record:
        return ids
    return ids, Trace(trace, model.cfg.n_layer, real)


def _reorder(name: str, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A trace tensor in the cache's slot order -> real tokens first: the sequence axis ([B, T, ...]),
    or both query and key axes of attention scores and patterns [B, H, T, T]."""
    if name.endswith(QUERY_KEY_TAPS):
        B, H, T, _ = x.shape
        rows = order[:, None, :, None].expand(B, H, T, T)
        return x.gather(2, rows).gather(3, order[:, None, None, :].expand(B, H, T, T))
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def join_steps(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-call traces -> one trace over all positions, as a full forward over them would record.

    Position-wise taps [B, n, ...] are concatenated along the positions. Attention scores and
    patterns [B, H, n, K] have a key axis that grows with each step: they are padded to the final
    length with what the causal mask puts there (-inf in scores, 0 in patterns), then concatenated.
    """
    joined = {}
    for name in steps[0]:
        parts = [step[name] for step in steps]
        if name.endswith(QUERY_KEY_TAPS):
            total = parts[-1].shape[-1]
            fill = float("-inf") if name.endswith("scores") else 0.0
            joined[name] = torch.cat([F.pad(p, (0, total - p.shape[-1]), value=fill) for p in parts], dim=2)
        else:
            joined[name] = torch.cat(parts, dim=1)
    return joined


def compiled_decoder(model: GPT, batch: int, length: int) -> tuple[KVCache, Callable]:
    """A KV cache for ``length`` positions and a compiled one-token step (compiled once, then reused).

    GPU: a static cache (capacity rounded up to a multiple of 256, at most the context, so that
    few shapes are ever compiled) and mode="reduce-overhead", i.e. CUDA graphs: one graph launch
    per token. Each shape keeps its cache, whose buffers keep their addresses, so its graph is
    never re-recorded. CPU: no graphs to replay, so the dynamic cache (attention reads only the
    positions held) under ``dynamic=True``, one graph for every length, with one-row linear
    layers as row-by-row dot products (``RowDot``).
    """
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    made = model.__dict__.setdefault("_decoders", {})
    if device.type != "cuda":
        if "cpu" not in made:
            def cpu_step(tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
                with RowDot():
                    return model(tokens, NO_TAPS, cache)[:, -1]

            # Store rather than recompute: else inductor would redo ln_f (or GELU) for every weight row.
            made["cpu"] = torch.compile(cpu_step, dynamic=True, fullgraph=True,
                                        options={"realize_cpu_opcount_threshold": 1})
        return KVCache(model.cfg, batch, length, dtype=dtype, device=device), made["cpu"]
    capacity = min(model.cfg.n_positions, -(-length // 256) * 256)
    key = (batch, capacity, device, dtype)
    if key not in made:
        cache = KVCache(model.cfg, batch, capacity, dtype=dtype, device=device, static=True)
        for buffer in (*cache.keys, *cache.values, cache.next):
            torch._dynamo.mark_static_address(buffer)

        def step(tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
            return model(tokens, NO_TAPS, cache)[:, -1]

        made[key] = cache, torch.compile(step, mode="reduce-overhead", fullgraph=True)
    cache, step = made[key]
    cache.next.zero_()  # old keys and values stay in the buffers, but the mask hides them
    return cache, step


class RowDot(TorchFunctionMode):
    """Inside a compiled CPU step: a linear layer on one row as one dot product per weight row.

    nn.Linear keeps weights [out, in]; for a single input row MKL reads them at well under the
    memory bandwidth (about 17 GB/s where a plain read runs at 37+ on the machine measured), while
    inductor compiles ``(w * x).sum(-1)`` into one vectorised pass over the rows that reaches it.
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
