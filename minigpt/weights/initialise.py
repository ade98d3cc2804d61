"""A model without a checkpoint: GPT-2's seeded random initialisation, or shapes only (the meta device)."""
from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode

from ..config import OFFICIAL, GPTConfig
from ..errors import InputError
from ..inputs import check_placement, check_seed


class _SkipInit(TorchFunctionMode):
    """While active (in this thread only), torch.nn.init's functions leave their tensor as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]  # every init function's first argument
        return func(*args, **kwargs)


def parameter_shapes(model_class: type, cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """``GPT.parameter_shapes``: parameter name -> shape for ``cfg``, without allocating any weight."""
    return {name: tuple(p.shape) for name, p in build_on_meta(model_class, cfg).state_dict().items()}


def random_model(model_class: type, size: str | GPTConfig = "gpt2", *, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.nn.Module:
    """``GPT.random``: a GPT-2 of an official size (or any config) with seeded random weights, as HF
    initialises them (and as ``minigpt train`` starts)."""
    check_placement(dtype, device)
    seed = check_seed(seed)
    if not (isinstance(size, GPTConfig) or (isinstance(size, str) and size in OFFICIAL)):
        raise InputError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(OFFICIAL)}, or pass a GPTConfig")
    model = model_class(OFFICIAL[size] if isinstance(size, str) else size)
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
    model.provenance = f"RANDOM weights (seed {seed}), {size if isinstance(size, str) else 'custom'} shape"
    return model.to(dtype=dtype, device=device)


def build_on_meta(model_class: type, cfg: GPTConfig) -> torch.nn.Module:
    """``model_class(cfg)`` on the meta device (shapes, no memory), its initialisation skipped.

    There are no values to initialise; and the first ``normal_`` on a meta tensor in a process
    imports torch._dynamo (about 1 s and 80 MiB), a cost a load has no reason to pay.
    """
    with torch.device("meta"), _SkipInit():
        return model_class(cfg)
