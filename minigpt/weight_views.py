"""The model's weights per head and per layer, in TransformerLens's conventions (``x @ W`` reads left to right).

minigpt stores attention as GPT-2 does: ``blocks.L.attn.qkv`` (one Linear D -> 3D whose output columns
are [Q | K | V], each split head by head) and ``blocks.L.attn.out`` (Linear D -> D); the MLP as
``mlp.fc`` (D -> M) and ``mlp.proj`` (M -> D). These functions show the same numbers the way circuit
analysis reads them: ``x @ W_Q(model)[l, h] + b_Q(model)[l, h]`` is head h's query at layer l, as
``blocks.l.attn.q[..., h, :]`` records it. Shapes: L n_layer, H heads, D d_model, d d_head,
M d_mlp, V vocabulary, P n_positions.

With ``layer`` given, each function returns a VIEW of that layer's parameter (no copy: writing into it
writes the model, and gradients flow back); with ``layer=None`` the layers are stacked, which is a
copy (separate parameters cannot share one tensor). ``W_E``, ``W_pos`` and ``W_U`` are always views.
Each takes the model first, so that ``GPT`` can carry them as properties (``W_Q = property(W_Q)``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .checks import check_int
from .config import GPTConfig
from .errors import InputError

# A minigpt GPT (not imported: model.py may import this module).
Model = nn.Module


def check_model(model: object) -> Model:
    """``model`` if it is a minigpt GPT (it has a GPTConfig ``cfg``, ``embed``, ``pos_embed``, ``blocks``)."""
    if not (isinstance(model, nn.Module) and isinstance(getattr(model, "cfg", None), GPTConfig)
            and all(hasattr(model, part) for part in ("embed", "pos_embed", "blocks", "ln_f"))):
        raise InputError(f"expected a minigpt GPT, got {type(model).__name__}; build one with GPT.from_pretrained "
                         "or GPT.random")
    return model


def _per_layer(model: Model, layer: int | None, view: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """``view(block)`` for one layer (a view), or stacked over the layers (a copy) when ``layer`` is None."""
    blocks = check_model(model).blocks
    if layer is None:
        return torch.stack([view(block) for block in blocks])
    return view(blocks[check_int(layer, "layer", 0, len(blocks) - 1, way_out="or None for every layer")])


def _qkv_weight(block: nn.Module, which: int) -> torch.Tensor:
    """[H, D, d]: Q (0), K (1) or V (2) of one block. qkv.weight is [3D, D] = [(3, H, d), D]."""
    attn = block.attn
    return attn.qkv.weight.view(3, attn.n_head, attn.d_head, -1)[which].transpose(-2, -1)


def _qkv_bias(block: nn.Module, which: int) -> torch.Tensor:
    """[H, d]: Q (0), K (1) or V (2) bias of one block."""
    attn = block.attn
    return attn.qkv.bias.view(3, attn.n_head, attn.d_head)[which]


def W_Q(model: Model, layer: int | None = None) -> torch.Tensor:
    """Query weights: [L, H, D, d], or [H, D, d] for one layer (a view)."""
    return _per_layer(model, layer, lambda block: _qkv_weight(block, 0))


def W_K(model: Model, layer: int | None = None) -> torch.Tensor:
    """Key weights: [L, H, D, d], or [H, D, d] for one layer (a view)."""
    return _per_layer(model, layer, lambda block: _qkv_weight(block, 1))


def W_V(model: Model, layer: int | None = None) -> torch.Tensor:
    """Value weights: [L, H, D, d], or [H, D, d] for one layer (a view)."""
    return _per_layer(model, layer, lambda block: _qkv_weight(block, 2))


def W_O(model: Model, layer: int | None = None) -> torch.Tensor:
    """Output weights: [L, H, d, D], or [H, d, D] for one layer (a view); ``z[h] @ W_O[l, h]`` is head h's write."""
    def view(block: nn.Module) -> torch.Tensor:
        return block.attn.out.weight.T.view(block.attn.n_head, block.attn.d_head, -1)
    return _per_layer(model, layer, view)


def b_Q(model: Model, layer: int | None = None) -> torch.Tensor:
    """Query biases: [L, H, d], or [H, d] for one layer (a view)."""
    return _per_layer(model, layer, lambda block: _qkv_bias(block, 0))


def b_K(model: Model, layer: int | None = None) -> torch.Tensor:
    """Key biases: [L, H, d], or [H, d] for one layer (a view)."""
    return _per_layer(model, layer, lambda block: _qkv_bias(block, 1))


def b_V(model: Model, layer: int | None = None) -> torch.Tensor:
    """Value biases: [L, H, d], or [H, d] for one layer (a view)."""
    return _per_layer(model, layer, lambda block: _qkv_bias(block, 2))


def b_O(model: Model, layer: int | None = None) -> torch.Tensor:
    """Attention output biases: [L, D], or [D] for one layer (the parameter itself); it belongs to no head."""
    return _per_layer(model, layer, lambda block: block.attn.out.bias)


def W_in(model: Model, layer: int | None = None) -> torch.Tensor:
    """MLP input weights: [L, D, M], or [D, M] for one layer (a view); ``x @ W_in + b_in`` is ``mlp.pre``."""
    return _per_layer(model, layer, lambda block: block.mlp.fc.weight.T)


def b_in(model: Model, layer: int | None = None) -> torch.Tensor:
    """MLP input biases: [L, M], or [M] for one layer (the parameter itself)."""
    return _per_layer(model, layer, lambda block: block.mlp.fc.bias)


def W_out(model: Model, layer: int | None = None) -> torch.Tensor:
    """MLP output weights: [L, M, D], or [M, D] for one layer (a view)."""
    return _per_layer(model, layer, lambda block: block.mlp.proj.weight.T)


def b_out(model: Model, layer: int | None = None) -> torch.Tensor:
    """MLP output biases: [L, D], or [D] for one layer (the parameter itself)."""
    return _per_layer(model, layer, lambda block: block.mlp.proj.bias)


def W_E(model: Model) -> torch.Tensor:
    """Token embedding [V, D] (the parameter itself)."""
    return check_model(model).embed.weight


def W_pos(model: Model) -> torch.Tensor:
    """Position embedding [P, D] (the parameter itself)."""
    return check_model(model).pos_embed.weight


def W_U(model: Model) -> torch.Tensor:
    """Unembedding [D, V]: ``ln_f @ W_U`` are the logits. GPT-2 ties it: a view of ``W_E`` transposed."""
    return check_model(model).embed.weight.T
