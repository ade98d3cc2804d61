"""An SAE spliced into a run: the tap's value replaced by the SAE's reconstruction of it."""
from __future__ import annotations

import torch

from minigpt.edits import Edits
from minigpt.errors import EditError


def splice(sae, tap: str, *, error_term: bool = False) -> Edits:
    """Edits for ``model.run``/``generate`` that put ``sae.decode(sae.encode(x))`` in place of tap ``tap``.

    Duck-typed: any object with ``encode`` ([..., d_in] -> [..., d_sae]) and ``decode`` (back) serves,
    SAELens's SAEs too. The tap's axes after batch and sequence ([B, S, *row]) are flattened into
    d_in and back; the input goes in the dtype and device of ``sae.W_enc`` where it has one, and the
    reconstruction comes back in the tap's. ``error_term=True`` adds the SAE's error ``x - x_hat``
    (detached, so gradients reach the latents through the reconstruction only): the run's values are
    then the clean run's, up to float rounding.
    """
    if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
        raise EditError(f"splice takes an SAE with encode and decode methods, got {type(sae).__name__}; "
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
