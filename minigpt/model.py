"""GPT-2, the whole forward pass, with every tap where its quantity is born.

Read top to bottom: Attention, MLP, Block, GPT. Each ``taps(name, x)`` call is a named point
that a caller may record or replace (see ``taps.py``); with nothing asked it returns ``x``.
Shapes: B batch, S sequence, D d_model, H heads, d d_head, M d_mlp, V vocabulary.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ACTIVATIONS, OFFICIAL, GPTConfig
from .errors import InputError
from .inputs import as_tokens, check_keep_options, check_tokens
from .memory import check_budget, estimate_trace_bytes
from .taps import NO_TAPS, Edit, Taps, Trace, resolve_edits, select, tap_names

if TYPE_CHECKING:
    from .generate import KVCache


class Attention(nn.Module):
    """Causal multi-head self-attention; ``qkv`` is GPT-2's fused c_attn, ``out`` its c_proj."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.out = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.attn_pdrop)
        inverse_layer = layer + 1 if cfg.scale_attn_by_inverse_layer_idx else 1
        self.scale = 1 / (math.sqrt(self.d_head) * inverse_layer)
        self.layer, self.prefix = layer, f"blocks.{layer}.attn."

    def forward(self, x: torch.Tensor, taps: Taps, cache: KVCache | None = None) -> torch.Tensor:
        """[B, S, D] (the ln1 output) -> [B, S, D], attention's write to the residual (before dropout).

        With a ``cache`` (generation), x holds only the newest S positions; their queries attend over
        the K >= S cached positions too.
        """
        B, S, _ = x.shape
        p = self.prefix
        # c_attn's output columns are [Q | K | V], each split head by head.
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, self.d_head).unbind(2)
        q, k, v = taps(p + "q", q), taps(p + "k", k), taps(p + "v", v)  # [B, S, H, d]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, d]
        mask = None  # None: plain causal attention among these S positions
        if cache is not None:
            # Store the new keys and values; attend over those of every position so far.
            k, v, mask = cache.update(self.layer, k, v)  # [B, H, K, d] twice, mask [S, K] (True = may look)
        if taps.wants(p + "scores") or taps.wants(p + "pattern"):
            # The pattern is wanted, so compute it in the open.
            scores = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, Q, K]
            visible = torch.ones(S, S, dtype=torch.bool, device=x.device).tril() if mask is None else mask
            scores = taps(p + "scores", scores.masked_fill(~visible, float("-inf")))
            pattern = taps(p + "pattern", scores.softmax(dim=-1))
            z = self.dropout(pattern) @ v
        else:
            # Same maths, fused: the pattern is never materialised.
            drop = self.dropout.p if self.training else 0.0
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scale, dropout_p=drop)
        z = taps(p + "z", z.transpose(1, 2))  # [B, S, H, d]
        delta = self.out(z.flatten(2))
        if taps.wants(p + "heads"):
            # Split c_proj by head: head h writes z[..., h, :] @ W_O[h]; the bias belongs to no head.
            w_o = self.out.weight.T.view(self.n_head, self.d_head, -1)  # [H, d, D]
            heads = taps(p + "heads", torch.einsum("bshd,hdm->bshm", z, w_o))  # [B, S, H, D]
            if p + "heads" in taps.edits:
                delta = heads.sum(dim=2) + self.out.bias
        return delta


class MLP(nn.Module):
    """Two layers with GELU between; ``fc`` is GPT-2's c_fc, ``proj`` its c_proj."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.d_mlp)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.proj = nn.Linear(cfg.d_mlp, cfg.n_embd)
        self.prefix = f"blocks.{layer}.mlp."

    def forward(self, x: torch.Tensor, taps: Taps) -> torch.Tensor:
        """[B, S, D] (the ln2 output) -> [B, S, D], through M neurons."""
        pre = taps(self.prefix + "pre", self.fc(x))  # [B, S, M]
        post = taps(self.prefix + "post", self.act(pre))
        return self.proj(post)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg, layer)
        self.dropout = nn.Dropout(cfg.resid_pdrop)
        self.prefix = f"blocks.{layer}."

    def forward(self, x: torch.Tensor, taps: Taps, cache: KVCache | None = None) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]: resid_post = resid_pre + attn_delta + mlp_delta."""
        p = self.prefix
        x = taps(p + "resid_pre", x)
        attn_delta = taps(p + "attn_delta", self.dropout(self.attn(taps(p + "ln1", self.ln1(x)), taps, cache)))
        x = taps(p + "resid_mid", x + attn_delta)
        mlp_delta = taps(p + "mlp_delta", self.dropout(self.mlp(taps(p + "ln2", self.ln2(x)), taps)))
        return taps(p + "resid_post", x + mlp_delta)


class GPT(nn.Module):
    """GPT-2 with named taps. ``model(tokens)`` -> logits; ``model.run(...)`` -> (logits, trace)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embed = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.tap_names = tap_names(cfg.n_layer)
        self.source = "untrained (initialised) weights"
        # Memory guard for run(): "auto" = half the memory free where the trace goes, bytes, or None (off).
        self.trace_budget_bytes: int | str | None = "auto"
        self.eval()  # dropout only when asked for with .train()

    def forward(self, tokens: torch.Tensor, taps: Taps = NO_TAPS, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, S] (int) -> logits [B, S, V].

        With a ``cache`` (see generate.py) the tokens continue the sequence it holds: they take
        the next S positions and attend over the cached keys and values as well as their own.
        """
        check_tokens(tokens, self.cfg)
        B, S = tokens.shape
        positions = torch.arange(S, device=tokens.device) if cache is None else cache.extend(S)
        embed = taps("embed", self.embed(tokens))  # [B, S, D]
        pos_embed = taps("pos_embed", self.pos_embed(positions).expand(B, S, -1))
        x = self.dropout(embed + pos_embed)
        for block in self.blocks:
            x = block(x, taps, cache)
        x = taps("ln_f", self.ln_f(x))
        return taps("logits", F.linear(x, self.unembedding))

    def run(self, inputs: str | Sequence | torch.Tensor, taps: str | Iterable[str] = (),
            edits: Mapping[str, Edit] | None = None, *, grad: bool = False,
            to: torch.device | str | None = None, dtype: torch.dtype | None = None,
            positions: slice | list[int] | None = None) -> tuple[torch.Tensor, Trace]:
        """Run once, recording ``taps`` (names or glob patterns) and applying ``edits``.

        inputs: text, a list of ids, a list of equal-length lists, or an int tensor [S] or [B, S].
        edits: tap name or pattern -> function (tensor -> same-shaped tensor) or replacement tensor.
        The edits last for this call only. Returns logits [B, S, V] and a read-only Trace whose
        tensors are detached unless ``grad=True``; ``to``, ``dtype`` and ``positions`` shape what
        is kept (see Taps).
        """
        tokens = self.tokens(inputs)
        record = select(taps, self.tap_names) if taps else []
        resolved = resolve_edits(edits, self.tap_names)
        check_keep_options(grad, to, dtype, positions, tokens.shape[1])
        check_budget(self, record, *tokens.shape, dtype or self.embed.weight.dtype, positions=positions, device=to)
        call = Taps(record, resolved, grad=grad, to=to, dtype=dtype, positions=positions)
        with torch.set_grad_enabled(grad):
            logits = self(tokens, call)
        return logits, Trace(call.trace, self.cfg.n_layer)

    def generate(self, prompt: str | Sequence | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_at_eos: bool = False, eos_id: int = 50256, taps: str | Iterable[str] = (),
                 edits: Mapping[str, Edit] | None = None, compile: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, Trace]:
        """Continue ``prompt`` (text, ids, or a tensor [B, S]) with a KV cache; returns ids [B, S + N].

        The ids are the prompt followed by the N <= max_new_tokens new ones. ``temperature=0`` is
        greedy; otherwise sample after ``top_k``/``top_p`` filtering, from ``seed`` if given. With
        ``stop_at_eos`` a row that emits ``eos_id`` repeats it, and generation stops when all rows
        have. ``edits`` stay in force at every step. With ``taps``, returns ``(ids, trace)`` where
        the trace equals that of a full forward over the returned ids (attention scores/patterns
        [B, H, T, T] included, future keys at -inf/0). ``compile=True``: each step through
        ``torch.compile`` (a static cache and CUDA graphs on a GPU), no taps or edits; the first
        call compiles (seconds). See generate.py.
        """
        from .generate import generate

        return generate(self, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop_at_eos=stop_at_eos, eos_id=eos_id, taps=taps, edits=edits, compile=compile)

    def stream(self, prompt: str | Sequence | torch.Tensor, max_new_tokens: int, **settings) -> Iterator[torch.Tensor]:
        """``generate`` one step at a time: yields the new ids [B] as each is chosen (taps: use generate)."""
        from .generate import stream

        return stream(self, prompt, max_new_tokens, **settings)

    def tokens(self, inputs: str | Sequence | torch.Tensor) -> torch.Tensor:
        """Text, ids or a tensor -> validated int64 tensor [B, S] on the model's device."""
        return as_tokens(inputs, self.cfg, self.embed.weight.device, lambda: self.tokenizer)

    def estimate_trace_bytes(self, taps: str | Iterable[str], batch: int, seq: int, *,
                             dtype: torch.dtype | None = None, positions: slice | list[int] | None = None) -> int:
        """Bytes the tensors recorded by ``run(..., taps=taps)`` on ``batch`` x ``seq`` tokens will hold."""
        return estimate_trace_bytes(self, taps, batch, seq, dtype=dtype, positions=positions)

    @property
    def unembedding(self) -> torch.Tensor:
        """W_U [V, D]: row t turns a final (ln_f) vector into token t's logit; tied to the token embedding."""
        return self.embed.weight

    @property
    def tokenizer(self):
        """GPT-2's BPE (a tiktoken Encoding): ``.encode(text)``, ``.decode(ids)``."""
        from .tokenizer import gpt2_tokenizer

        return gpt2_tokenizer()

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> GPT:
        """Load a GPT-2 checkpoint (hub name or local directory with config.json + safetensors)."""
        from .weights import load_checkpoint

        cfg, state, source = load_checkpoint(name_or_dir)
        model = cls(cfg).to(dtype=dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        model.source = source
        return model.to(device)

    @classmethod
    def random(cls, size: str | GPTConfig = "gpt2", *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> GPT:
        """A GPT-2 of an official size (or any config) with seeded random weights, as HF initialises them."""
        if isinstance(size, str):
            if size not in OFFICIAL:
                raise InputError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(OFFICIAL)}")
            cfg = OFFICIAL[size]
        else:
            cfg = size
        generator = torch.Generator().manual_seed(seed)
        model = cls(cfg)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                else:  # GPT-2 shrinks the residual projections by sqrt(2 * n_layer)
                    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("out.weight", "proj.weight")) else 0.02
                    param.normal_(0.0, std, generator=generator)
        model.source = f"RANDOM weights (seed {seed}), {size if isinstance(size, str) else 'custom'} shape"
        return model.to(dtype=dtype, device=device)
