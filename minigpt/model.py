"""GPT-2, the whole forward pass, with every tap where its quantity is born.

Read top to bottom: Attention, MLP, Block, GPT. Each ``tap(name, x)`` call is a named point
that a caller may record or replace (``tap`` is the call's ``TapCall``, see ``taps.py``); with
nothing asked it returns ``x``.
Shapes: B batch, S sequence, D d_model, H heads, d d_head, M d_mlp, V vocabulary.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .circuits import full_ov_circuit, ov_circuit, qk_circuit
from .config import ACTIVATIONS, GPTConfig
from .generate import generate, stream
from .inputs import check_tokens, str_tokens, token_id, tokens
from .kv_cache import KVCache
from .memory import estimate_trace_bytes
from .running import run
from .taps import NO_TAPS, TapCall, tap_names
from .weight_views import W_E, W_in, W_K, W_O, W_out, W_pos, W_Q, W_U, W_V, b_in, b_K, b_O, b_out, b_Q, b_V
from .weights import load_model, parameter_shapes, random_model, save_pretrained


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

    def forward(self, x: torch.Tensor, tap: TapCall, visible: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """[B, S, D] (the ln1 output) -> [B, S, D], attention's write to the residual.

        visible: bool [S, K] or [B, 1, S, K], True where a query may look at a key; None for plain
        causal attention. With a ``cache`` (generation), x holds only the newest S positions; their
        queries attend over the K >= S cached positions too.
        """
        B, S, _ = x.shape
        p = self.prefix
        # c_attn's output columns are [Q | K | V], each split head by head.
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, self.d_head).unbind(2)
        q = tap(p + "q", q)  # [B, S, H, d]
        k = tap(p + "k", k)
        v = tap(p + "v", v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, d]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, H, K, d]: every position so far
        if tap.wants(p + "scores") or tap.wants(p + "pattern"):
            z = self.attend_in_the_open(q, k, v, visible, tap)
        else:
            z = self.attend_fused(q, k, v, visible)
        z = tap(p + "z", z.transpose(1, 2))  # [B, S, H, d]
        delta = self.out(z.flatten(2))
        if tap.wants(p + "heads"):
            delta = self.split_by_head(z, delta, tap)
        return self.resid_dropout(delta)

    def attend_in_the_open(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                           tap: TapCall) -> torch.Tensor:
        """q [B, H, Q, d], k and v [B, H, K, d] -> z [B, H, Q, d], with scores and pattern as tensors."""
        if visible is None:
            visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = (q @ k.transpose(-2, -1)) * self.scale
        scores = tap(self.prefix + "scores", scores.masked_fill(~visible, float("-inf")))  # [B, H, Q, K]
        pattern = tap(self.prefix + "pattern", scores.softmax(dim=-1))
        return self.attn_dropout(pattern) @ v

    def attend_fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     visible: torch.Tensor | None) -> torch.Tensor:
        """The same maths in one fused kernel: the pattern is never materialised."""
        dropout = self.attn_dropout.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None,
                                              scale=self.scale, dropout_p=dropout)

    def split_by_head(self, z: torch.Tensor, delta: torch.Tensor, tap: TapCall) -> torch.Tensor:
        """Each head's write z[..., h, :] @ W_O[h] -> tap ``attn.heads`` [B, S, H, D]; the bias belongs to no head.

        Returns the attention output: ``delta`` unless the heads were edited, then their sum + bias.
        """
        w_o = self.out.weight.T.view(self.n_head, self.d_head, -1)  # [H, d, D]
        heads = tap(self.prefix + "heads", torch.einsum("bshd,hdm->bshm", z, w_o))
        if tap.edited(self.prefix + "heads"):
            return heads.sum(dim=2) + self.out.bias
        return delta  # only recorded: c_proj's own sum, so that recording changes no bit


class LayerNorm(nn.LayerNorm):
    """(x - mean) * scale * weight + bias, scale = 1 / sqrt(var + eps): PyTorch's fused kernel, unless
    the tap ``{name}.scale`` [B, S, 1] is recorded or edited (freezing it, for one), then in the open."""

    def __init__(self, cfg: GPTConfig, name: str):
        super().__init__(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.scale_tap = name + ".scale"

    def forward(self, x: torch.Tensor, tap: TapCall = NO_TAPS) -> torch.Tensor:
        """[B, S, D] -> [B, S, D], each position normalised over D."""
        if not tap.wants(self.scale_tap):
            return super().forward(x)
        centred = x - x.mean(dim=-1, keepdim=True)
        scale = tap(self.scale_tap, (centred.pow(2).mean(dim=-1, keepdim=True) + self.eps).rsqrt())
        return centred * scale * self.weight + self.bias


class MLP(nn.Module):
    """Two layers with GELU between; ``fc`` is GPT-2's c_fc, ``proj`` its c_proj."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.d_mlp)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.proj = nn.Linear(cfg.d_mlp, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.resid_pdrop)
        self.prefix = f"blocks.{layer}.mlp."

    def forward(self, x: torch.Tensor, tap: TapCall) -> torch.Tensor:
        """[B, S, D] (the ln2 output) -> [B, S, D], through M neurons."""
        pre = tap(self.prefix + "pre", self.fc(x))  # [B, S, M]
        post = tap(self.prefix + "post", self.act(pre))
        return self.dropout(self.proj(post))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention, then the MLP, each adding to the residual stream."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = LayerNorm(cfg, f"blocks.{layer}.ln1")
        self.attn = Attention(cfg, layer)
        self.ln2 = LayerNorm(cfg, f"blocks.{layer}.ln2")
        self.mlp = MLP(cfg, layer)
        self.prefix = f"blocks.{layer}."

    def forward(self, x: torch.Tensor, tap: TapCall, visible: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]: resid_post = resid_pre + attn_delta + mlp_delta."""
        p = self.prefix
        x = tap(p + "resid_pre", x)
        attn_in = tap(p + "ln1", self.ln1(x, tap))
        attn_delta = tap(p + "attn_delta", self.attn(attn_in, tap, visible, cache))
        x = x + attn_delta
        x = tap(p + "resid_mid", x)
        mlp_in = tap(p + "ln2", self.ln2(x, tap))
        mlp_delta = tap(p + "mlp_delta", self.mlp(mlp_in, tap))
        x = x + mlp_delta
        x = tap(p + "resid_post", x)
        return x


def padded_layout(S: int, mask: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each token's position id ([S], or [B, S] with a mask) and what it may see (None = plain causal).

    With padding (mask [B, S], True = real token), a real token takes the position it would have
    alone (HF's cumsum - 1) and sees the real tokens up to itself: visible [B, 1, S, S]. A padding
    query sees only itself (a query with no key at all would give NaN); its output is never used.
    """
    if mask is None:
        return torch.arange(S, device=device), None
    position_ids = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    itself = torch.eye(S, dtype=torch.bool, device=device)
    return position_ids, (causal & mask[:, None, None, :]) | itself


class GPT(nn.Module):
    """GPT-2 with named taps. ``model(tokens)`` -> logits; ``model.run(...)`` -> (logits, trace)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embed = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg, "ln_f")
        self.tap_names = tap_names(cfg.n_layer)
        self.provenance = "untrained (initialised) weights"  # what the weights are and where they came from
        # Memory guard for run(): "auto" = half the memory free where the trace goes, bytes, or None (off).
        self.trace_budget_bytes: int | str | None = "auto"
        self.eval()  # dropout only when asked for with .train()

    def forward(self, tokens: torch.Tensor, tap: TapCall = NO_TAPS, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] (int) -> logits [B, S, V].

        mask [B, S] (True = real token) for a padded batch. With a ``cache`` (kv_cache.py) the
        tokens continue the sequences it holds and attend over its keys and values too.
        """
        check_tokens(tokens, self.cfg)
        B, S = tokens.shape
        position_ids, visible = cache.extend(S, mask) if cache is not None else padded_layout(S, mask, tokens.device)
        embed = tap("embed", self.embed(tokens))  # [B, S, D]
        pos_embed = tap("pos_embed", self.pos_embed(position_ids).expand(B, S, -1))
        x = self.dropout(embed + pos_embed)
        for block in self.blocks:
            x = block(x, tap, visible, cache)
        x = tap("ln_f", self.ln_f(x, tap))
        logits = tap("logits", F.linear(x, self.unembedding))  # [B, S, V]
        return logits

    @property
    def unembedding(self) -> torch.Tensor:
        """[V, D] (= ``W_U.T``): row t turns a final (ln_f) vector into token t's logit; tied to the token embedding."""
        return self.embed.weight

    # -- The API: everything below calls forward(); none of it is maths. -------------------------

    # One recorded and edited run (running.py), generation (KV cache, sampling, taps and edits at every
    # step), the memory estimate and the tokenizer's conveniences live in their own modules; these are
    # their functions as methods.
    run, generate, stream, estimate_trace_bytes = run, generate, stream, estimate_trace_bytes
    tokens, str_tokens, token_id = tokens, str_tokens, token_id

    @property
    def source(self) -> str:
        """The old name of ``provenance`` (deprecated; reading or setting it warns)."""
        warnings.warn("model.source is renamed model.provenance", DeprecationWarning, stacklevel=2)
        return self.provenance

    @source.setter
    def source(self, text: str) -> None:
        # 3: past nn.Module.__setattr__, which hands a plain attribute to this setter.
        warnings.warn("model.source is renamed model.provenance", DeprecationWarning, stacklevel=3)
        self.provenance = text

    @property
    def tokenizer(self):
        """GPT-2's BPE (a tiktoken Encoding): ``.encode(text)``, ``.decode(ids)``."""
        from .tokenizer import gpt2_tokenizer
        return gpt2_tokenizer()

    # Checkpoints (loading, saving) and GPT-2's random initialisation live in the weights package; these are
    # its functions as methods: GPT.from_pretrained(dir), GPT.random("gpt2", seed=0), model.save_pretrained(dir).
    from_pretrained, random = classmethod(load_model), classmethod(random_model)
    parameter_shapes, save_pretrained = classmethod(parameter_shapes), save_pretrained

    # Weights per head and per layer in TransformerLens's conventions (weight_views.py: each also takes
    # layer= for a one-layer view), and the heads' circuits kept factored (circuits.py).
    W_Q, W_K, W_V, W_O = property(W_Q), property(W_K), property(W_V), property(W_O)
    b_Q, b_K, b_V, b_O = property(b_Q), property(b_K), property(b_V), property(b_O)
    W_in, b_in, W_out, b_out = property(W_in), property(b_in), property(W_out), property(b_out)
    W_E, W_pos, W_U = property(W_E), property(W_pos), property(W_U)
    OV, QK = property(ov_circuit), property(qk_circuit)
    full_ov_circuit = full_ov_circuit
