"""Built-in edits: the lecture notes' interventions, as ``{tap name: function}`` dicts.

Merge them with ``|``, or with ``combine`` when two of them edit the same tap, and pass the
result as ``model.run(..., edits=...)``. Any function tensor -> same-shaped tensor, or a
replacement tensor, is an edit too; these are just named.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import EditError
from .taps import Edit

Neurons = str | slice | Sequence[int] | torch.Tensor


def zero_head_keys(block: int, head: int) -> dict[str, Edit]:
    """Set the keys of one head to zero (tap ``blocks.{block}.attn.k`` [B, S, H, d])."""

    def edit(k: torch.Tensor) -> torch.Tensor:
        if not 0 <= head < k.shape[2]:
            raise EditError(f"head {head} does not exist: block {block} has heads 0..{k.shape[2] - 1}")
        k = k.clone()
        k[:, :, head] = 0
        return k

    return {f"blocks.{block}.attn.k": edit}


def neuron_index(neurons: Neurons, d_mlp: int) -> torch.Tensor | slice:
    """'even', 'odd', 'all', a slice, or explicit indices -> an index into the last axis."""
    named = {"even": slice(0, None, 2), "odd": slice(1, None, 2), "all": slice(None)}
    if isinstance(neurons, str):
        if neurons not in named:
            raise EditError(f"unknown neuron set {neurons!r}; use 'even', 'odd', 'all', a slice or indices")
        return named[neurons]
    if isinstance(neurons, slice):
        return neurons
    index = torch.as_tensor(neurons, dtype=torch.long)
    if index.numel() and (index.min() < 0 or index.max() >= d_mlp):
        raise EditError(f"neuron indices must lie in [0, {d_mlp}), got {index.min().item()}..{index.max().item()}")
    return index


def gaussian(shape: torch.Size | tuple[int, ...], mean: float, std: float, seed: int,
             like: torch.Tensor) -> torch.Tensor:
    """Seeded N(mean, std^2) noise with ``like``'s dtype and device (same seed, same numbers)."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device) * std + mean


def noise_neurons(block: int, neurons: Neurons = "even", mean: float = 10.0, std: float = 1.0,
                  seed: int = 0) -> dict[str, Edit]:
    """Replace chosen MLP neurons after GELU (tap ``blocks.{block}.mlp.post``) by Gaussian noise.

    The notes' exercise: every even neuron, mean 10 (far outside the real distribution).
    The noise is drawn anew from ``seed`` at each call, so a run is reproducible.
    """

    def edit(post: torch.Tensor) -> torch.Tensor:
        index = neuron_index(neurons, post.shape[-1])
        post = post.clone()
        chosen = post[..., index]
        post[..., index] = gaussian(chosen.shape, mean, std, seed, post)
        return post

    return {f"blocks.{block}.mlp.post": edit}


def scale_block(block: int, factor: float) -> dict[str, Edit]:
    """Multiply a block's output (tap ``blocks.{block}.resid_post``) by ``factor``."""
    return {f"blocks.{block}.resid_post": lambda x: x * factor}


def add_vector(tap: str, vector: torch.Tensor) -> dict[str, Edit]:
    """Add a vector (e.g. a steering direction [D]) to a tap, broadcast over batch and sequence."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        return x + vector.to(x)

    return {tap: edit}


def combine(*edit_dicts: dict[str, Edit]) -> dict[str, Edit]:
    """Merge edit dicts; edits on the same tap run in the order given (``|`` would keep only the last).

    ``combine(zero_head_keys(3, 1), zero_head_keys(3, 2))`` zeroes both heads' keys.
    """
    merged: dict[str, Edit] = {}
    for edits in edit_dicts:
        for tap, edit in edits.items():
            merged[tap] = _then(merged[tap], edit) if tap in merged else edit
    return merged


def _then(first: Edit, second: Edit) -> Edit:
    def both(x: torch.Tensor) -> torch.Tensor:
        for edit in (first, second):
            x = edit if isinstance(edit, torch.Tensor) else edit(x)
        return x

    return both
