"""The last layer is different: HF's ``hidden_states[-1]`` has been through ``ln_f`` (docs/NOTES.md, section 2).

For every block i but the last, ``hidden_states[i + 1]`` is the block's output ``resid_post[i]``
(difference exactly 0). For the last block they differ, and ``ln_f(resid_post[last])`` gives
``hidden_states[-1]`` back (0 again): the raw last residual exists only at the block's own tap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minigpt import GPT

from ._common import Finding, Result, float_eps, hidden_stack, ln_f_own_stats, max_abs, record, single_sequence


@dataclass
class FinalNorm(Result):
    """Differences between HF-style hidden states and the block-output taps (max |.| over tokens x dims)."""

    labels: list[str]            # 'b0'..'b{n-1}'
    block_diff: torch.Tensor     # [n] max |hidden_states[i + 1] - resid_post[i]|
    penultimate_diff: float | None  # block_diff[-2]; None for a 1-block model
    last_diff: float             # block_diff[-1]: clearly not 0
    ln_f_diff: float             # max |ln_f(resid_post[-1]) - hidden_states[-1]|: 0 again
    raw_last_std: float          # std of the last block's raw output
    normalised_last_std: float   # std of hidden_states[-1]
    raw_last_max: float          # max |raw output|
    normalised_last_max: float   # max |hidden_states[-1]|


def check_final_norm(model: GPT, inputs: str | list | torch.Tensor) -> FinalNorm:
    """Compare hidden_states[i + 1] with resid_post[i] for every block, then ln_f(last) with hidden_states[-1]."""
    n = model.cfg.n_layer
    tokens = single_sequence(model, inputs)
    _, trace = record(model, tokens, ["blocks.*.resid_pre", "blocks.*.resid_post", "ln_f"])
    hidden = hidden_stack(trace)
    posts = trace.stack("resid_post")[:, 0]  # [n, S, D]
    block_diff = torch.tensor([max_abs(hidden[i + 1] - posts[i]) for i in range(n)])
    raw, normalised = posts[-1], hidden[-1]
    result = FinalNorm(
        labels=[f"b{i}" for i in range(n)], block_diff=block_diff,
        penultimate_diff=block_diff[-2].item() if n > 1 else None, last_diff=block_diff[-1].item(),
        ln_f_diff=max_abs(ln_f_own_stats(model, raw) - normalised), raw_last_std=raw.std().item(),
        normalised_last_std=normalised.std().item(), raw_last_max=max_abs(raw), normalised_last_max=max_abs(normalised))
    result.findings = _findings(result, float_eps(model))
    return result


def _findings(f: FinalNorm, eps: float) -> list[Finding]:
    n = len(f.labels)
    if n > 1:
        earlier = f.block_diff[:-1]
        same = Finding("earlier_equal",
                       "for every block but the last, the block's output IS hidden_states[i+1] (difference exactly 0)",
                       bool((earlier == 0).all()),
                       f"penultimate block b{n - 2}: {f.penultimate_diff:.3g}; largest over blocks b0..b{n - 2}: "
                       f"{earlier.max().item():.3g}")
    else:
        same = Finding.untestable("earlier_equal", "for every block but the last, the block's output IS "
                                  "hidden_states[i+1]", "a 1-block model has no block before the last")
    clearly = max(1e-3, 1e-3 * f.raw_last_max)
    differs = Finding("last_differs", "for the last block they differ", f.last_diff > clearly,
                      f"max |hidden_states[-1] - resid_post[{n - 1}]| = {f.last_diff:.4g}")
    tol = 16 * eps * max(1.0, f.normalised_last_max)
    again = Finding("ln_f_restores",
                    "ln_f(last block's output) = hidden_states[-1] (difference 0 again)", f.ln_f_diff <= tol,
                    f"max difference {f.ln_f_diff:.3g}")
    normalised = Finding("normalised", "so hidden_states[-1] is normalised by ln_f, not the raw residual",
                         bool(differs.holds and again.holds),
                         f"std of the raw last output {f.raw_last_std:.4g} vs {f.normalised_last_std:.4g} after ln_f")
    return [same, differs, again, normalised]
