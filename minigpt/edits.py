"""Built-in edits: the lecture notes' interventions (docs/NOTES.md), patching and ablation, an SAE
spliced in, as ``Edits`` dicts. This module is the facade: ``Edits``, ``combine`` and ``during`` live in
``edit_dict.py``, ``patch``, ``zero_ablate`` and ``mean_ablate`` in ``patching.py``.

An ``Edits`` is a plain ``{tap name or pattern: edit}`` dict (pass it as ``model.run(..., edits=...)``)
whose ``|`` merges in order: where both sides edit the same key, the left edit runs first and the
right one gets its result, so ``zero_head_keys(3, 1) | zero_head_keys(3, 2)`` zeroes both heads.
Any function (tensor -> same-shaped tensor) or replacement tensor is an edit too. A function may ask
for more, and the run gives it, once per forward call:

- a second positional parameter without a default: the tap's name, ``edit(x, name)``, which lets one
  function serve a glob pattern tap by tap (``patch`` does this);
- a keyword-only ``mask``: the run's real tokens, bool [B, S] (True = real; padding on the right as
  ``run`` lays out texts of different lengths, anywhere with an ``attention_mask``), or None when
  every token is real;
- a keyword-only ``step``: which forward call this is: 0 for ``run`` and for generation's prefill
  over the prompt, i for the call that runs the i-th new token (``during`` uses it).

Head-shaped taps are those with an H axis in ``minigpt.describe``'s table (``attn.q/k/v/z`` and
``attn.heads`` [B, S, H, .], ``attn.scores/pattern`` [B, H, Q, K]); ``positions`` count along the
sequence axis (S, or the query axis Q of scores and patterns), in each row's real tokens: on a
padded batch -1 and ``"last"`` are each row's last real token, a slice is taken of each row's real
tokens, and each row gets what it would alone (``patching.py`` says the whole rule).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_int
from .edit_dict import Edits, _then, combine, during  # noqa: F401 (_then: see below)
from .errors import EditError
from .patching import (Chosen, Patterns, Source, check_chosen, checked_slice, integral, mean_ablate, patch,
                       zero_ablate)

__all__ = ["Chosen", "Edits", "Neurons", "Patterns", "Source", "add_vector", "combine", "during", "gaussian",
           "mean_ablate", "neuron_index", "noise_neurons", "patch", "sae", "scale_block", "zero_ablate",
           "zero_head_keys"]
# Private names that lived here before the split (and _then above), kept for whoever imported them.
_integral, _checked_slice, _check_chosen = integral, checked_slice, check_chosen

Neurons = str | slice | Sequence[int] | torch.Tensor


# ---------------------------------------------------------------------------------------------
# The notes' interventions (docs/NOTES.md: zero a head's keys, noise into MLP neurons, scale a block)


def zero_head_keys(block: int, head: int) -> Edits:
    """Set the keys of one head to zero (tap ``blocks.{block}.attn.k`` [B, S, H, d])."""
    return zero_ablate(f"blocks.{block}.attn.k", heads=head)


def neuron_index(neurons: Neurons, d_mlp: int) -> torch.Tensor | slice:
    """'even', 'odd', 'all', a slice, or explicit indices -> an index into the last axis (checked: EditError)."""
    index = _neuron_choice(neurons)
    if isinstance(index, torch.Tensor) and index.numel() and (index.min() < 0 or index.max() >= d_mlp):
        raise EditError(f"neuron indices must lie in [0, {d_mlp}), got {index.min().item()}..{index.max().item()}")
    return index


def _neuron_choice(neurons: Neurons) -> torch.Tensor | slice:
    """``neuron_index`` before the layer's width is known: the name, slice or integer indices checked."""
    named = {"even": slice(0, None, 2), "odd": slice(1, None, 2), "all": slice(None)}
    if isinstance(neurons, str):
        if neurons not in named:
            raise EditError(f"unknown neuron set {neurons!r}; use 'even', 'odd', 'all', a slice or indices")
        return named[neurons]
    if isinstance(neurons, slice):
        return checked_slice(neurons, "neurons")
    try:
        index = torch.as_tensor(neurons)
    except Exception as e:  # torch's TypeError, ValueError or RuntimeError for what holds no numbers
        raise EditError(f"neurons must be 'even', 'odd', 'all', a slice or integer indices, got {neurons!r} ({e})") from None
    if not integral(index) or index.dim() > 1:
        raise EditError(f"neuron indices must be integers (a list or a 1-D integer tensor), got {neurons!r}; a float "
                        "or a bool is not an index (round it yourself: int(i))")
    return index.long()


def gaussian(shape: torch.Size | tuple[int, ...], mean: float, std: float, seed: int,
             like: torch.Tensor) -> torch.Tensor:
    """Seeded N(mean, std^2) noise with ``like``'s dtype and device (same seed, same numbers)."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device) * std + mean


def noise_neurons(block: int, neurons: Neurons = "even", mean: float = 10.0, std: float = 1.0,
                  seed: int = 0) -> Edits:
    """Replace chosen MLP neurons after GELU (tap ``blocks.{block}.mlp.post``) by Gaussian noise.

    The notes' exercise: every even neuron, mean 10 (far outside the real distribution).
    The noise is drawn anew from ``seed`` at each call, so a run is reproducible.
    """
    _neuron_choice(neurons)  # a float or bool index refused now, not truncated at the first run
    seed = check_int(seed, "seed", -2**63, 2**64 - 1, error=EditError)  # a generator's range, Python's ints only

    def edit(post: torch.Tensor) -> torch.Tensor:
        index = neuron_index(neurons, post.shape[-1])
        chosen = post[..., index]
        post[..., index] = gaussian(chosen.shape, mean, std, seed, post)
        return post

    return Edits({f"blocks.{block}.mlp.post": edit})


def scale_block(block: int, factor: float) -> Edits:
    """Multiply a block's output (tap ``blocks.{block}.resid_post``) by ``factor``."""
    return Edits({f"blocks.{block}.resid_post": lambda x: x * factor})


def add_vector(tap: str, vector: torch.Tensor) -> Edits:
    """Add a vector (e.g. a steering direction [D]) to a tap, broadcast over batch and sequence."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        return x + vector.to(x)

    return Edits({tap: edit})


# ---------------------------------------------------------------------------------------------
# A sparse autoencoder spliced into a run


def sae(sae: object, tap: str, *, error_term: bool = False) -> Edits:
    """Edits for ``model.run``/``generate`` that put ``sae.decode(sae.encode(x))`` in place of tap ``tap``.

    Duck-typed: any object with ``encode`` ([..., d_in] -> [..., d_sae]) and ``decode`` (back) serves,
    SAELens's SAEs too. The tap's axes after batch and sequence ([B, S, *row]) are flattened into
    d_in and back; the input goes in the dtype and device of ``sae.W_enc`` where it has one, and the
    reconstruction comes back in the tap's. ``error_term=True`` adds the SAE's error ``x - x_hat``
    (detached, so gradients reach the latents through the reconstruction only): the run's values are
    then the clean run's, up to float rounding.
    """
    if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
        raise EditError(f"edits.sae takes an SAE with encode and decode methods, got {type(sae).__name__}; "
                        "e.g. probes.sae.SAE.load(DIR) or a SAELens SAE")
    weights = getattr(sae, "W_enc", None)

    def edit(x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(2) if x.dim() > 2 else x
        if isinstance(weights, torch.Tensor):
            if rows.shape[-1] != weights.shape[0]:
                raise EditError(f"the SAE reads rows of {weights.shape[0]} values, but tap {tap!r} has "
                                f"{rows.shape[-1]} per token (shape {tuple(x.shape)}); splice it at the tap it was "
                                f"trained on ({getattr(sae, 'hook_name', None) or 'its hook_name'})")
            rows = rows.to(dtype=weights.dtype, device=weights.device)
        x_hat = sae.decode(sae.encode(rows)).to(dtype=x.dtype, device=x.device).reshape(x.shape)
        return x_hat + (x - x_hat).detach() if error_term else x_hat

    return Edits({tap: edit})
