"""An SAE spliced into a run: the tap's value replaced by the SAE's reconstruction of it."""
from __future__ import annotations

from minigpt.edits import Edits

import torch


def splice(sae, tap: str, *, error_term: bool = False) -> Edits:
    """Edits for ``model.run``/``generate`` that put ``sae.decode(sae.encode(x))`` in place of tap ``tap``.

    Duck-typed: any object with ``encode`` ([..., d_in] -> [..., d_sae]) and ``decode`` (back) serves,
    SAELens's SAEs too. The tap's axes after batch and sequence ([B, S, *row]) are flattened into
    d_in and back; the input goes in the dtype and device of ``sae.W_enc`` where it has one, and the
    reconstruction comes back in the tap's. ``error_term=True`` adds the SAE's error ``x - x_hat``
    (detached, so gradients reach the latents through the reconstruction only): the run's values are
    then the clean run's, up to float rounding.
    """
    weights = getattr(sae, "W_enc", None)

    def edit(x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(2) if x.dim() > 2 else x
        if isinstance(weights, torch.Tensor):
            rows = rows.to(dtype=weights.dtype, device=weights.device)
        x_hat = sae.decode(sae.encode(rows)).to(dtype=x.dtype, device=x.device).reshape(x.shape)
        return x_hat + (x - x_hat).detach() if error_term else x_hat

    return Edits({tap: edit})
