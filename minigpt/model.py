"""GPT-2, the whole forward pass, with every tap where its quantity is born.

Read top to bottom: Attention, MLP, Block, GPT. Each ``taps(name, x)`` call is a named point
that a caller may record or replace (see ``taps.py``); with nothing asked it returns ``x``.
Shapes: B batch, S sequence, D d_model, H heads, d d_head, M d_mlp, V vocabulary.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ACTIVATIONS, OFFICIAL, GPTConfig
from .errors import InputError
from .generate import KVCache, generate, stream
from .inputs import as_tokens, check_tokens, check_values
from .memory import check_budget, estimate_trace_bytes
from .taps import NO_TAPS, Edit, Positions, Taps, tap_names
from .trace import Trace


class Attention(nn.Module):
    """Causal multi-head self-attention; ``qkv`` is GPT-2's fused c_attn, ``out`` its c_proj."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.out = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = nn.Dropout(cfg.attn_pdrop)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        # Some GPT-2 variants also divide the scores by the layer's number (1-based).
        layer_divisor = layer + 1 if cfg.scale_attn_by_inverse_layer_idx else 1
        self.scale = 1 / (math.sqrt(self.d_head) * layer_divisor)
        self.layer, self.prefix = layer, f"blocks.{layer}.attn."

    def forward(self, x: torch.Tensor, taps: Taps, cache: KVCache | None = None) -> torch.Tensor:
        """[B, S, D] (the ln1 output) -> [B, S, D], attention's write to the residual.

        With a ``cache`` (generation), x holds only the newest S positions; their queries attend over
        the K >= S cached positions too.
        """
        B, S, _ = x.shape
        p = self.prefix
        # c_attn's output columns are [Q | K | V], each split head by head.
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, self.d_head).unbind(2)
        q = taps(p + "q", q)  # [B, S, H, d]
        k = taps(p + "k", k)
        v = taps(p + "v", v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, d]
        visible = None  # None: plain causal attention among these S positions
        if cache is not None:
            k, v, visible = cache.update(self.layer, k, v)  # [B, H, K, d] twice; visible [S, K]
        if taps.wants(p + "scores") or taps.wants(p + "pattern"):
            z = self.attend_in_the_open(q, k, v, visible, taps)
        else:
            z = self.attend_fused(q, k, v, visible)
        z = taps(p + "z", z.transpose(1, 2))  # [B, S, H, d]
        delta = self.out(z.flatten(2))
        if taps.wants(p + "heads"):
            delta = self.split_by_head(z, delta, taps)
        return self.resid_dropout(delta)

    def attend_in_the_open(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                           taps: Taps) -> torch.Tensor:
        """q [B, H, Q, d], k and v [B, H, K, d] -> z [B, H, Q, d], with scores and pattern as tensors."""
        if visible is None:
            visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = (q @ k.transpose(-2, -1)) * self.scale
        scores = taps(self.prefix + "scores", scores.masked_fill(~visible, float("-inf")))  # [B, H, Q, K]
        pattern = taps(self.prefix + "pattern", scores.softmax(dim=-1))
        return self.attn_dropout(pattern) @ v

    def attend_fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     visible: torch.Tensor | None) -> torch.Tensor:
        """The same maths in one fused kernel: the pattern is never materialised."""
        dropout = self.attn_dropout.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None,
                                              scale=self.scale, dropout_p=dropout)

    def split_by_head(self, z: torch.Tensor, delta: torch.Tensor, taps: Taps) -> torch.Tensor:
        """Each head's write z[..., h, :] @ W_O[h] -> tap ``attn.heads`` [B, S, H, D]; the bias belongs to no head.

        Returns the attention output: ``delta`` unless the heads were edited, then their sum + bias.
        """
        w_o = self.out.weight.T.view(self.n_head, self.d_head, -1)  # [H, d, D]
        heads = taps(self.prefix + "heads", torch.einsum("bshd,hdm->bshm", z, w_o))
        if taps.edited(self.prefix + "heads"):
            return heads.sum(dim=2) + self.out.bias
        return delta  # only recorded: c_proj's own sum, so that recording changes no bit


class MLP(nn.Module):
    """Two layers with GELU between; ``fc`` is GPT-2's c_fc, ``proj`` its c_proj."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.d_mlp)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.proj = nn.Linear(cfg.d_mlp, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.resid_pdrop)
        self.prefix = f"blocks.{layer}.mlp."

    def forward(self, x: torch.Tensor, taps: Taps) -> torch.Tensor:
        """[B, S, D] (the ln2 output) -> [B, S, D], through M neurons."""
        pre = taps(self.prefix + "pre", self.fc(x))  # [B, S, M]
        post = taps(self.prefix + "post", self.act(pre))
        return self.dropout(self.proj(post))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention, then the MLP, each adding to the residual stream."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg, layer)
        self.prefix = f"blocks.{layer}."

    def forward(self, x: torch.Tensor, taps: Taps, cache: KVCache | None = None) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]: resid_post = resid_pre + attn_delta + mlp_delta."""
        p = self.prefix
        x = taps(p + "resid_pre", x)
        attn_in = taps(p + "ln1", self.ln1(x))
        attn_delta = taps(p + "attn_delta", self.attn(attn_in, taps, cache))
        x = x + attn_delta
        x = taps(p + "resid_mid", x)
        mlp_in = taps(p + "ln2", self.ln2(x))
        mlp_delta = taps(p + "mlp_delta", self.mlp(mlp_in, taps))
        x = x + mlp_delta
        x = taps(p + "resid_post", x)
        return x


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
        logits = taps("logits", F.linear(x, self.unembedding))  # [B, S, V]
        return logits

    @property
    def unembedding(self) -> torch.Tensor:
        """W_U [V, D]: row t turns a final (ln_f) vector into token t's logit; tied to the token embedding."""
        return self.embed.weight

    # -- The API: everything below calls forward(); none of it is maths. -------------------------

    def run(self, inputs: str | Sequence | torch.Tensor, taps: str | Iterable[str] = (),
            edits: Mapping[str, Edit] | None = None, *, grad: bool = False,
            to: torch.device | str | None = None, dtype: torch.dtype | None = None,
            positions: Positions = None) -> tuple[torch.Tensor, Trace]:
        """Run once, recording ``taps`` (names or glob patterns) and applying ``edits`` -> (logits [B, S, V], trace).

        inputs: text, a list of ids, a list of equal-length lists, or an int tensor [S] or [B, S].
        edits: tap name or pattern -> function (tensor -> same-shaped tensor) or replacement tensor, for
        this call only. The trace's tensors are detached unless ``grad=True``; ``to``, ``dtype`` and
        ``positions`` shape what it keeps (see Taps).
        """
        tokens = as_tokens(inputs, self.cfg, self.unembedding.device, lambda: self.tokenizer)  # checked in forward
        call = Taps.request(self.tap_names, taps, edits, seq=tokens.shape[1], grad=grad, to=to, dtype=dtype,
                            positions=positions)
        check_budget(self, call, *tokens.shape)
        with torch.set_grad_enabled(grad):
            logits = self(tokens, call)
        return logits, Trace(call.trace, self.cfg.n_layer)

    # Generation (KV cache, sampling, taps and edits at every step) and the memory estimate live in
    # their own modules; these are their functions as methods: model.generate(prompt, 20, temperature=0).
    generate, stream, estimate_trace_bytes = generate, stream, estimate_trace_bytes

    def tokens(self, inputs: str | Sequence | torch.Tensor) -> torch.Tensor:
        """Text, ids or a tensor -> checked int64 tensor [B, S] on the model's device."""
        tokens = as_tokens(inputs, self.cfg, self.unembedding.device, lambda: self.tokenizer)
        check_values(tokens, self.cfg)
        return tokens

    @property
    def tokenizer(self):
        """GPT-2's BPE (a tiktoken Encoding): ``.encode(text)``, ``.decode(ids)``."""
        from .tokenizer import gpt2_tokenizer
        return gpt2_tokenizer()

    @classmethod
    def parameter_shapes(cls, cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape for ``cfg``, without allocating any weight."""
        with torch.device("meta"):
            return {name: tuple(p.shape) for name, p in cls(cfg).state_dict().items()}

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> GPT:
        """Load a GPT-2 checkpoint (hub name or local directory with config.json + safetensors)."""
        from .weights import load_model

        return load_model(cls, name_or_dir, dtype=dtype, device=device)

    @classmethod
    def random(cls, size: str | GPTConfig = "gpt2", *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> GPT:
        """A GPT-2 of an official size (or any config) with seeded random weights, as HF initialises them."""
        if isinstance(size, str) and size not in OFFICIAL:
            raise InputError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(OFFICIAL)}")
        model = cls(OFFICIAL[size] if isinstance(size, str) else size)
        generator = torch.Generator().manual_seed(seed)
        # GPT-2's init: N(0, 0.02), the residual projections shrunk by sqrt(2 * n_layer); biases 0, LayerNorm 1.
        projection_std = 0.02 / math.sqrt(2 * model.cfg.n_layer)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    std = projection_std if name.endswith(("out.weight", "proj.weight")) else 0.02
                    param.normal_(0.0, std, generator=generator)
        model.source = f"RANDOM weights (seed {seed}), {size if isinstance(size, str) else 'custom'} shape"
        return model.to(dtype=dtype, device=device)
