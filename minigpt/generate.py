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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import END_OF_TEXT_ID, is_integer
from .errors import InputError
from .memory import check_budget
from .taps import NO_TAPS, Edit, Taps
from .trace import Trace

if TYPE_CHECKING:
    from .model import GPT


class KVCache:
    """The keys and values of every position run so far, per block, in preallocated buffers.

    One buffer [B, H, capacity, d] per block for keys, one for values. ``extend(n)`` is called once per forward call (it
    returns the positions [n] of the new tokens and prepares their attention mask); ``update`` is
    called by each block's attention to store its new keys and values and get those of all
    positions back.

    Two modes. Dynamic (default): the length is a Python int and attention sees the K = length
    positions held. Static (``static=True``, for ``torch.compile`` and CUDA graphs): every shape is
    fixed, attention always sees all ``capacity`` slots with the empty ones masked out, and the
    length lives in a device tensor, so one compiled graph serves every step without a host sync.
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
        self.positions = self.mask = None

    def extend(self, n: int) -> torch.Tensor:
        """Positions [n] of the n tokens about to run; sets the mask [n, K] they attend with."""
        if self.static:
            self.positions = self.next + self.slots[:n]
            self.next += n
            keys = self.slots
        else:
            if self.length + n > self.capacity:
                raise InputError(f"the cache holds {self.capacity} positions and {self.length} are used; "
                                 f"{n} more do not fit: make a larger cache")
            self.positions = self.slots[self.length:self.length + n]
            self.length += n
            keys = self.slots[:self.length]
        # A query sees its own position and every earlier one.
        self.mask = self.positions[:, None] >= keys
        return self.positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store keys and values [B, H, n, d] of the new positions; return all of them [B, H, K, d] and the mask."""
        keys, values = self.keys[layer], self.values[layer]
        if self.static:
            keys[:, :, self.positions] = k
            values[:, :, self.positions] = v
            return keys, values, self.mask
        start = self.length - k.shape[2]
        keys[:, :, start:self.length] = k
        values[:, :, start:self.length] = v
        return keys[:, :, :self.length], values[:, :, :self.length], self.mask


def check_settings(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   seed: int | None) -> None:
    """Raise InputError for a sampling setting out of range."""
    if not is_integer(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not is_integer(top_k) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if seed is not None and not is_integer(seed):
        raise InputError(f"seed must be an integer or None, got {seed!r}")


def check_room(prompt_len: int, max_new_tokens: int, n_positions: int) -> None:
    """The prompt and the new tokens must fit the context; say how to make them fit."""
    if prompt_len + max_new_tokens > n_positions:
        fixes = [f"ask for at most {n_positions - prompt_len} new tokens"] if prompt_len < n_positions else []
        if max_new_tokens < n_positions:
            keep = n_positions - max_new_tokens
            fixes.append(f"keep only the last {keep} prompt tokens (tokens[:, -{keep}:])")
        fix = " or ".join(fixes) or f"ask for fewer than {n_positions} new tokens and shorten the prompt to fit"
        raise InputError(f"a {prompt_len}-token prompt plus {max_new_tokens} new tokens is longer than the "
                         f"model's context of {n_positions} positions; {fix}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next-token logits [B, V] -> ids [B]: greedy at temperature 0, else sampled.

    The order is HuggingFace's: divide by the temperature, keep the top_k largest, then keep
    the smallest set of most likely tokens whose probability reaches top_p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token when the more likely ones before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def prepare(model: GPT, prompt: str | Sequence | torch.Tensor, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, seed: int | None, stop_at_eos: bool, eos_id: int,
            taps: str | Iterable[str], edits: Mapping[str, Edit] | None, compile: bool) -> tuple[torch.Tensor, Taps]:
    """Check every argument before anything runs; the prompt as ids [B, S] and what to record and edit."""
    tokens = model.tokens(prompt)
    check_settings(max_new_tokens, temperature, top_k, top_p, seed)
    check_room(tokens.shape[1], max_new_tokens, model.cfg.n_positions)
    if stop_at_eos and not (is_integer(eos_id) and 0 <= eos_id < model.cfg.vocab_size):
        raise InputError(f"eos_id {eos_id!r} is outside the vocabulary [0, {model.cfg.vocab_size}); "
                         "pass the id that ends a text for this model")
    request = Taps.request(model.tap_names, taps, edits, seq=tokens.shape[1])
    if compile and request.wanted:
        raise InputError("compile=True runs the plain model; taps and edits run in eager mode: drop compile=True")
    check_budget(model, request, tokens.shape[0], tokens.shape[1] + max_new_tokens)
    return tokens, request


def stream(model: GPT, prompt: str | Sequence | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stop_at_eos: bool = False, eos_id: int = END_OF_TEXT_ID, edits: Mapping[str, Edit] | None = None,
           compile: bool = False) -> Iterator[torch.Tensor]:
    """``model.stream(...)``: ``generate`` one step at a time. Checks everything first, then returns an
    iterator over the new ids [B] of each step, as each is chosen (for taps, use ``generate``)."""
    tokens, request = prepare(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, eos_id,
                              (), edits, compile)
    return _decode(model, tokens, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, eos_id,
                   request, compile, None)


def _decode(model: GPT, tokens: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, seed: int | None, stop_at_eos: bool, eos_id: int, request: Taps,
            compile: bool, steps: list | None) -> Iterator[torch.Tensor]:
    """The generation loop: prefill the prompt [B, S], then sample, yield and run one position at a time.

    With ``steps`` (a list), each forward call's trace is appended to it, and the last token is
    run too so that the traces cover it.
    """
    B, S = tokens.shape
    device, dtype = model.unembedding.device, model.unembedding.dtype
    record = steps is not None and bool(request.record)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    if compile:
        cache, step = compiled_decoder(model, B, S + max_new_tokens)
    else:
        cache, step = KVCache(model.cfg, B, S + max_new_tokens, dtype=dtype, device=device), None

    warm = False  # has the compiled step run once in this loop?

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        """Run the next positions [B, n] with this call's taps and edits; logits [B, V] of the last one."""
        nonlocal warm
        # Only around the call: a generator's suspended state must not leak into the caller's.
        was_training = model.training
        if was_training:
            model.eval()  # generation never uses dropout
        try:
            with torch.inference_mode():
                if step is not None and tokens.shape[1] == 1:
                    # Once warm, nothing its guards check can change within this loop: skip them.
                    with torch.compiler.set_stance(skip_guard_eval_unsafe=warm):
                        logits = step(tokens, cache)
                    warm = True
                    return logits
                # A fresh Taps per call: each holds the trace of the positions it ran.
                taps = Taps(request.record, request.edits) if request.wanted else NO_TAPS
                logits = model(tokens, taps, cache)[:, -1]
        finally:
            if was_training:
                model.train()
        if record:
            steps.append(taps.trace)
        return logits

    logits = forward(tokens)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        new = sample(logits, temperature, top_k, top_p, generator)  # [B]
        if stop_at_eos:
            new = new.masked_fill(done, eos_id)  # a finished row repeats the end token
            done |= new == eos_id
        yield new
        last = i + 1 == max_new_tokens or (stop_at_eos and bool(done.all()))
        if not last or record:
            logits = forward(new[:, None])
        if last:
            break


def generate(model: GPT, prompt: str | Sequence | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_at_eos: bool = False, eos_id: int = END_OF_TEXT_ID, taps: str | Iterable[str] = (),
             edits: Mapping[str, Edit] | None = None, compile: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, Trace]:
    """Continue ``prompt`` (text, ids, or a tensor [B, S]) with a KV cache; returns ids [B, S + N].

    ``model.generate(...)``. The ids are the prompt followed by the N <= max_new_tokens new ones.
    ``temperature=0`` is greedy; otherwise sample after ``top_k``/``top_p`` filtering, from ``seed``
    if given. With ``stop_at_eos`` a row that emits ``eos_id`` repeats it, and generation stops
    when all rows have. ``edits`` stay in force at every step. With ``taps``, returns ``(ids,
    trace)`` where the trace equals that of a full forward over the returned ids (attention
    scores/patterns [B, H, T, T] included, future keys at -inf/0). ``compile=True``: each step
    through ``torch.compile`` (a static cache and CUDA graphs on a GPU), no taps or edits; the
    first call compiles (seconds).
    """
    tokens, request = prepare(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, eos_id,
                              taps, edits, compile)
    steps: list[dict[str, torch.Tensor]] = []
    new = list(_decode(model, tokens, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, eos_id,
                       request, compile, steps))
    ids = torch.cat([tokens, torch.stack(new, dim=1)], dim=1) if new else tokens
    if not request.record:
        return ids
    return ids, Trace(join_steps(steps), model.cfg.n_layer)


def join_steps(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-call traces -> one trace over all positions, as a full forward over them would record.

    Position-wise taps [B, n, ...] are concatenated along the positions. Attention scores and
    patterns [B, H, n, K] have a key axis that grows with each step: they are padded to the final
    length with what the causal mask puts there (-inf in scores, 0 in patterns), then concatenated.
    """
    joined = {}
    for name in steps[0]:
        parts = [step[name] for step in steps]
        if name.endswith(("attn.scores", "attn.pattern")):
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
