"""Text generation: a KV cache, sampling, streaming, and taps and edits live at every step.

The model runs the prompt once (the prefill), then one new position per step. Each step's keys
and values go into a ``KVCache`` (``kv_cache.py``) so that a step costs one position's work, not
the whole sequence's. Taps and edits work as in ``model.run``: an edit is applied at every forward
call (the prefill and each step), each time to the tensor of the positions computed in that call,
so a position-wise edit (scale, add a vector, silence a head's keys) gives exactly what the same
edit gives in a full forward over the final sequence. Edits that mix positions or depend on the
sequence length (``noise_neurons``, which draws noise of the call's shape) see one position at a
time and do not equal their full-forward version; a replacement tensor is refused (EditError).
Each forward call has a step number, which an edit may ask for (``def edit(x, *, step)``): 0 for
the prefill over the prompt (whose padding ``mask`` it may ask for too), i for the call that runs
the i-th new token; ``edits.during`` limits edits to the prompt, the new tokens or given steps.

Read top to bottom: how the next token is chosen (``Decoding``, ``sample``), the checks before
anything runs (``Plan``), ``generate`` and ``stream``, then the loop. ``compile=True`` swaps the
loop's forward for the compiled one of ``fast_decode.py``; nothing else changes.

Shapes: B batch, S prompt length, N new tokens, T = S + N, V vocabulary.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .config import END_OF_TEXT_ID, is_integer
from .errors import EditError, InputError
from .fast_decode import CompiledStep, one_at_a_time
from .inputs import as_tokens, check_tokens
from .kv_cache import KVCache
from .memory import check_budget
from .taps import NO_TAPS, QUERY_KEY_TAPS, Edit, TapCall
from .trace import Trace

if TYPE_CHECKING:
    from .model import GPT

@dataclass(frozen=True)
class Decoding:
    """How the next token is chosen: greedy at ``temperature`` 0, else sampled after ``top_k`` and
    ``top_p`` filtering. ``seed``: row b draws from its own generator seeded ``seed + b`` (or
    ``seed[b]`` for a list), so a row's sample does not depend on the other rows. With
    ``stop_at_eos`` a row that emits ``eos_id`` is done. Checked when built (InputError); what
    depends on the batch and the model is checked by ``check_for``."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | Sequence[int] | None = None
    stop_at_eos: bool = False
    eos_id: int = END_OF_TEXT_ID

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (not is_integer(k) or k < 1):
            raise InputError(f"top_k must be an integer >= 1 or None, got {k!r}")
        if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1):
            raise InputError(f"top_p must be a number in (0, 1] or None, got {p!r}")
        self._check_seeds(batch=1)
        if not isinstance(self.stop_at_eos, bool):
            raise InputError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")

    def _check_seeds(self, batch: int) -> None:
        """Every seed an integer that leaves room for ``seed + b`` over a batch of ``batch`` rows."""
        seeds = self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]
        if self.seed is not None and not all(is_integer(s) and 0 <= s < 2**63 - batch for s in seeds):
            raise InputError(f"seed must be an integer in [0, 2**63) or a list of them (one per row), or None; "
                             f"got {self.seed!r}")

    def check_for(self, batch: int, vocab_size: int) -> None:
        """Raise InputError for a setting that does not fit a batch of ``batch`` rows or the vocabulary."""
        self._check_seeds(batch)
        if isinstance(self.seed, (list, tuple)) and len(self.seed) != batch:
            raise InputError(f"seed is a list of {len(self.seed)} seeds for a batch of {batch} prompts; "
                             "give one per row")
        if self.stop_at_eos and not (is_integer(self.eos_id) and 0 <= self.eos_id < vocab_size):
            raise InputError(f"eos_id {self.eos_id!r} is outside the vocabulary [0, {vocab_size}); "
                             "pass the id that ends a text for this model")

    def generators(self, batch: int, device: torch.device) -> list[torch.Generator] | None:
        """One seeded generator per row, or None (the global one) without a seed."""
        if self.seed is None:
            return None
        seeds = self.seed if isinstance(self.seed, (list, tuple)) else [self.seed + b for b in range(batch)]
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]  # NumPy's ints as Python's


Sampling = Decoding  # the former name, kept for one release


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
        ids = logits.argmax(dim=-1)
        _check_finite(logits.gather(-1, ids[:, None]).squeeze(-1))  # NaN and +inf win argmax; -inf only in a row of them
        return ids
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
    _check_finite(probs)  # NaN or +inf logits, or a row all -inf, give NaN here: multinomial would fail on them
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_finite(values: torch.Tensor) -> None:
    """InputError unless every value (per row [B, ...]) is finite: the model's logits gave no distribution."""
    bad = ~torch.isfinite(values).flatten(1).all(dim=-1) if values.dim() > 1 else ~torch.isfinite(values)
    if bad.any():
        raise InputError(f"the next-token logits of row {bad.nonzero()[0].item()} are not finite (NaN, +inf, or -inf "
                         "for every token), so no token can be chosen; the weights or an edit made them: check "
                         "the weights (model(tokens).isfinite().all()) and the edits")


@dataclass(frozen=True)
class Plan:
    """One generation call, every argument checked: what the decoding loop runs."""

    tokens: torch.Tensor  # [B, S] the prompts, padded on the right
    mask: torch.Tensor | None  # [B, S], True = real token; None when every token is real
    max_new_tokens: int
    decoding: Decoding
    request: TapCall  # what each forward call records and edits
    compile: bool = False

    def check(self, model: GPT) -> None:
        """Refuse taps, edits or padding under ``compile``, a replacement tensor as an edit (EditError), and a
        call whose trace would not fit in memory."""
        if self.compile and (self.request.wanted or self.mask is not None):
            what = ("taps and edits run in eager mode" if self.request.wanted
                    else "it takes prompts of equal length only")
            raise InputError(f"compile=True runs the plain model and {what}: drop compile=True")
        replaced = [name for name, edit in self.request.edits.items() if isinstance(edit, torch.Tensor)]
        if replaced:  # it would stand in for the prompt's positions, then for each new one: never what was meant
            raise EditError(f"the edit of {replaced[0]!r} is a tensor; generation runs the prompt, then one position "
                            "at a time, and a fixed tensor fits none of those calls alike: give a function instead "
                            "(e.g. lambda x: x + delta, or one of minigpt.edits)")
        B, S = self.tokens.shape
        check_budget(model, self.request, B, S + self.max_new_tokens, prompt=S)


def checked_prompt(model: GPT, prompt: str | Sequence | torch.Tensor, attention_mask: torch.Tensor | None,
                   max_new_tokens: int, decoding: Decoding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt as ids [B, S] and its padding mask [B, S] (None if every token is real), checked with
    what depends on it: the decoding settings for its batch, the room left in the context, eval mode."""
    tokens, mask = as_tokens(prompt, model.cfg, model.unembedding.device, lambda: model.tokenizer,
                             attention_mask=attention_mask)
    check_tokens(tokens, model.cfg)
    decoding.check_for(tokens.shape[0], model.cfg.vocab_size)
    if model.training:
        raise InputError("the model is in train mode: generation never uses dropout, and it will not switch the "
                         "model to eval mode behind your back (another thread may be training it); call "
                         "model.eval() first, and model.train() after if you are training")
    check_room(tokens.shape[1], max_new_tokens, model.cfg.n_positions)
    return tokens, mask


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
    step (``edits.during`` limits them to the prompt, the new tokens or given steps). With ``taps``, returns ``(ids, trace)`` where the trace equals that of a full forward over
    the returned ids (attention scores/patterns [B, H, T, T] included, future keys at -inf/0).
    ``compile=True``: each step through ``torch.compile`` (a static cache and CUDA graphs on a GPU),
    no taps, edits or padding; the first call compiles (seconds).
    """
    decoding = Decoding(temperature, top_k, top_p, seed, stop_at_eos, eos_id)
    tokens, mask = checked_prompt(model, prompt, attention_mask, max_new_tokens, decoding)
    request = TapCall.request(model.tap_names, taps, edits, seq=tokens.shape[1])
    plan = Plan(tokens, mask, max_new_tokens, decoding, request, compile)
    plan.check(model)
    steps: list[dict[str, torch.Tensor]] = []
    new = list(_decode(model, plan, steps))
    ids = torch.cat([tokens, torch.stack(new, dim=1)], dim=1) if new else tokens
    real = torch.ones_like(ids, dtype=torch.bool)
    trace = join_steps(steps) if plan.request.to_record else {}
    if mask is not None:  # real tokens first, as run() lays out a batch of different lengths
        real[:, :tokens.shape[1]] = mask
        order = (~real).int().argsort(dim=-1, stable=True)  # [B, T]: real slots first, in order
        ids, real = ids.gather(1, order).masked_fill(~real.gather(1, order), eos_id), real.gather(1, order)
        trace = {name: _reorder(name, t, order) for name, t in trace.items()}
    if not plan.request.to_record:
        return ids
    return ids, Trace(trace, model.cfg.n_layer, real)


def stream(model: GPT, prompt: str | Sequence | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
           stop_at_eos: bool = False, eos_id: int = END_OF_TEXT_ID, edits: Mapping[str, Edit] | None = None,
           compile: bool = False, attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """``model.stream(...)``: ``generate`` one step at a time. Checks everything first, then returns an
    iterator over the new ids [B] of each step, as each is chosen (for taps, use ``generate``)."""
    decoding = Decoding(temperature, top_k, top_p, seed, stop_at_eos, eos_id)
    tokens, mask = checked_prompt(model, prompt, attention_mask, max_new_tokens, decoding)
    request = TapCall.request(model.tap_names, (), edits, seq=tokens.shape[1])
    plan = Plan(tokens, mask, max_new_tokens, decoding, request, compile)
    plan.check(model)
    return _decode(model, plan, None)


def _decode(model: GPT, plan: Plan, steps: list | None) -> Iterator[torch.Tensor]:
    """The generation loop: prefill the prompt [B, S], then sample, yield and run one position at a time.

    With ``steps`` (a list), each forward call's trace is appended to it, and the last token is
    run too so that the traces cover it. ``compile=True`` holds the model's compiled step for the loop.
    """
    # A generator: the compiled step is taken at the first token, and given back when the loop ends or is dropped.
    with one_at_a_time(model) if plan.compile else contextlib.nullcontext():
        yield from _decode_steps(model, plan, steps)


def _decode_steps(model: GPT, plan: Plan, steps: list | None) -> Iterator[torch.Tensor]:
    """``_decode``'s loop: the forward chosen once (eager over a ``KVCache``, or compiled), then the steps."""
    B, S = plan.tokens.shape
    device, decoding = model.unembedding.device, plan.decoding
    record = steps is not None and bool(plan.request.to_record)
    if plan.compile:
        forward = CompiledStep(model, B, S + plan.max_new_tokens)
    else:
        cache = KVCache(model.cfg, B, S + plan.max_new_tokens, dtype=model.unembedding.dtype, device=device)
        forward = EagerStep(model, cache, plan.request, steps if record else None)
    generator = decoding.generators(B, device)
    # The prompt's next-token logits are at each row's last real token (padding may follow it).
    last = torch.full((B,), S - 1, device=device) if plan.mask is None else S - 1 - plan.mask.flip(-1).int().argmax(-1)
    logits = forward(plan.tokens, plan.mask)[torch.arange(B, device=device), last]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(plan.max_new_tokens):
        new = sample(logits, decoding.temperature, decoding.top_k, decoding.top_p, generator)  # [B]
        if decoding.stop_at_eos:
            new = new.masked_fill(done, decoding.eos_id)  # a finished row repeats the end token
            done |= new == decoding.eos_id
        yield new
        final = i + 1 == plan.max_new_tokens or (decoding.stop_at_eos and bool(done.all()))
        if not final or record:
            logits = forward(new[:, None])[:, -1]
        if final:
            break


class EagerStep:
    """The loop's forward: the next positions [B, n] through the model over the cache, with the call's
    taps and edits -> logits [B, n, V]. With ``steps`` (a list), each call's trace is appended to it."""

    def __init__(self, model: GPT, cache: KVCache, request: TapCall, steps: list | None):
        self.model, self.cache, self.request, self.steps = model, cache, request, steps
        self.calls = 0  # forward calls so far: the prefill is step 0, the call running new token i step i

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # Only around the call: a generator's suspended state must not leak into the caller's.
        with torch.inference_mode():
            # A fresh TapCall per call: each holds the trace of the positions it ran, and its edits know the step.
            taps = self.request.at_step(self.calls, mask) if self.request.wanted else NO_TAPS
            logits = self.model(tokens, taps, self.cache, mask=mask)
            self.calls += 1
        if self.steps is not None:
            self.steps.append(taps.trace)
        return logits


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
