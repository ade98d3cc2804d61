"""The tap table: every tap's name, shape and meaning, in the order the forward pass meets them.

``model.py`` passes each of these through ``tap(name, x)``; ``taps.py`` selects them by name or
pattern and says what a call records and edits at them.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TapInfo:
    """One tap: its name, shape (B batch, S seq, Q/K query/key positions, H heads, D d_model,
    d d_head, M d_mlp, V vocab), what it holds, and whether it is computed only when asked for
    (it costs extra work, or takes attention off its fused path)."""

    name: str
    shape: str
    meaning: str
    on_demand: bool = False


# The vocabulary, in the order the forward pass meets the taps. Block taps are named blocks.{L}.{name}.
MODEL_TAPS_BEFORE = [
    TapInfo("embed", "B S D", "token embedding"),
    TapInfo("pos_embed", "B S D", "position embedding"),
]
BLOCK_TAPS = [
    TapInfo("resid_pre", "B S D", "residual stream entering the block (= embed + pos_embed for block 0)"),
    TapInfo("ln1.scale", "B S 1", "LayerNorm 1's scale 1/sqrt(var + eps) per position", on_demand=True),
    TapInfo("ln1", "B S D", "LayerNorm 1 output, the input of attention"),
    TapInfo("attn.q", "B S H d", "queries"),
    TapInfo("attn.k", "B S H d", "keys"),
    TapInfo("attn.v", "B S H d", "values"),
    TapInfo("attn.scores", "B H Q K", "q.k / sqrt(d), causally masked with -inf, before softmax", on_demand=True),
    TapInfo("attn.pattern", "B H Q K", "softmax of the scores", on_demand=True),
    TapInfo("attn.z", "B S H d", "each head's pattern-weighted sum of values"),
    TapInfo("attn.heads", "B S H D", "each head's own write to the residual (z @ W_O per head, no bias)",
            on_demand=True),
    TapInfo("attn_delta", "B S D", "what attention adds to the residual (output projection + bias)"),
    TapInfo("resid_mid", "B S D", "resid_pre + attn_delta"),
    TapInfo("ln2.scale", "B S 1", "LayerNorm 2's scale 1/sqrt(var + eps) per position", on_demand=True),
    TapInfo("ln2", "B S D", "LayerNorm 2 output, the input of the MLP"),
    TapInfo("mlp.pre", "B S M", "MLP neurons before GELU"),
    TapInfo("mlp.post", "B S M", "MLP neurons after GELU"),
    TapInfo("mlp_delta", "B S D", "what the MLP adds to the residual (output projection + bias)"),
    TapInfo("resid_post", "B S D", "resid_mid + mlp_delta, the block's output"),
]
MODEL_TAPS_AFTER = [
    TapInfo("ln_f.scale", "B S 1", "the final LayerNorm's scale 1/sqrt(var + eps) per position", on_demand=True),
    TapInfo("ln_f", "B S D", "final LayerNorm output (HuggingFace's last hidden state)"),
    TapInfo("logits", "B S V", "ln_f @ embed.weight.T"),
]
_ALL = MODEL_TAPS_BEFORE + BLOCK_TAPS + MODEL_TAPS_AFTER
# Suffixes of the on-demand taps (a block tap's full name ends with one of them).
ON_DEMAND = tuple(info.name for info in _ALL if info.on_demand)
# Taps shaped [B, H, Q, K]: their second axis is not the sequence, so ``keep_positions`` keeps them whole.
QUERY_KEY_TAPS = tuple(info.name for info in _ALL if info.shape == "B H Q K")
_SHAPES = {info.name: info.shape.split() for info in _ALL}


def tap_shape(name: str) -> list[str]:
    """A tap's axes by letter, from the table: ``tap_shape('blocks.3.attn.z')`` -> ['B', 'S', 'H', 'd']."""
    return _SHAPES[re.sub(r"^blocks\.\d+\.", "", name)]


def tap_axes(name: str) -> tuple[int, int | None]:
    """A tap's sequence axis (S, or Q for scores and patterns) and head axis (H, or None if it has none)."""
    shape = tap_shape(name)
    sequence = shape.index("S") if "S" in shape else shape.index("Q")
    return sequence, shape.index("H") if "H" in shape else None


def describe(n_layer: int) -> Iterator[TapInfo]:
    """Every tap of a model with ``n_layer`` blocks, in forward order, with its shape and meaning."""
    yield from MODEL_TAPS_BEFORE
    for layer in range(n_layer):
        for info in BLOCK_TAPS:
            yield TapInfo(f"blocks.{layer}.{info.name}", info.shape, info.meaning, info.on_demand)
    yield from MODEL_TAPS_AFTER


def tap_names(n_layer: int) -> list[str]:
    """Every tap name of a model with ``n_layer`` blocks, in forward order."""
    return [info.name for info in describe(n_layer)]
