"""Saving a model as HuggingFace's ``save_pretrained`` does, which both libraries load."""
from __future__ import annotations

from pathlib import Path

import torch

from ..files import write_atomically, write_json
from .names import to_hf_state_dict
from .reading import CONFIG_FILE, WEIGHTS_FILE


def save_pretrained(model, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (a GPT) as HuggingFace's ``save_pretrained`` does: config.json + model.safetensors.

    The names are save_pretrained's (``transformer.h.0.attn.c_attn.weight``, Conv1D weights [in, out]),
    the unembedding left out as it is tied, so ``GPT2LMHeadModel.from_pretrained(directory)`` and
    ``GPT.from_pretrained(directory)`` both load it. ``dtype``: store in another dtype (e.g. bfloat16).
    Each file is written under a temporary name and renamed, so a file under its name is whole.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in model.state_dict().items()}
    write_atomically(directory / WEIGHTS_FILE, lambda path: save_file(
        to_hf_state_dict(state, model.cfg.n_layer, official=False), path, metadata={"format": "pt"}))
    write_json(directory / CONFIG_FILE, {**model.cfg.to_hf(), "torch_dtype": str(dtype or model.unembedding.dtype)[6:]})
    return directory
