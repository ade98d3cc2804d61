"""The first token as an attention sink (beyond the notes, docs/NOTES.md section 5).

Trained GPT-2s park attention on position 0 when a head has nothing to read, and the first
position's residual grows far larger than the others'. Measured per block: each head's mean
attention weight on position 0 (over the queries after it), against uniform attention's, and the
norm of position 0's residual state against the median norm of the other positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minigpt import GPT
from minigpt.errors import InputError

from ._common import RESIDUAL_TAPS, Finding, Result, record, residual_labels, residual_states, single_sequence

# Where the findings draw the line (measurements at ``_findings``).
SINK_MASS = 0.5     # a block's mean attention on position 0, over its heads
SINK_OVER_UNIFORM = 3.0
NORM_RATIO = 3.0    # position 0's residual norm over the median of the others'


@dataclass
class AttentionSink(Result):
    """n = n_layer blocks, H heads, S tokens (S >= 2)."""

    mass: torch.Tensor        # [n, H] mean attention weight on position 0 over the queries 1..S-1
    uniform: float            # the same for uniform attention: mean over q = 1..S-1 of 1 / (q + 1)
    labels: list[str]         # residual states: 'emb', 'b0'..'b{n-1}'
    first_norm: torch.Tensor  # [n + 1] norm of position 0's residual state
    rest_norm: torch.Tensor   # [n + 1] median norm of the other positions' states

    @property
    def block_mass(self) -> torch.Tensor:
        """[n] each block's mass on position 0, averaged over its heads."""
        return self.mass.mean(dim=1)

    @property
    def norm_ratio(self) -> torch.Tensor:
        """[n + 1] first_norm / rest_norm."""
        return self.first_norm / self.rest_norm.clamp_min(1e-30)


def attention_sink(model: GPT, inputs: str | list | torch.Tensor) -> AttentionSink:
    """Attention on position 0 per block and head, and position 0's residual norm against the rest's."""
    tokens = single_sequence(model, inputs)
    if tokens.shape[1] < 2:
        raise InputError(f"the attention sink needs at least 2 tokens (a query after position 0), got "
                         f"{tokens.shape[1]}; pass a longer text")
    _, trace = record(model, tokens, ["blocks.*.attn.pattern", *RESIDUAL_TAPS])
    patterns = trace.stack("attn.pattern")[:, 0].double()  # [n, H, S, S]
    states = residual_states(trace).double()                # [n + 1, S, D]
    norms = states.norm(dim=-1)                             # [n + 1, S]
    S = tokens.shape[1]
    result = AttentionSink(
        mass=patterns[:, :, 1:, 0].mean(dim=-1).float(),
        uniform=(1 / torch.arange(2, S + 1, dtype=torch.float64)).mean().item(),
        labels=residual_labels(model.cfg.n_layer), first_norm=norms[:, 0].float(),
        rest_norm=norms[:, 1:].median(dim=1).values.float())
    result.findings = _findings(result)
    return result


def _findings(r: AttentionSink) -> list[Finding]:
    # Random weights attend almost uniformly: on the README's 63-token text, random weights of pydoc-tiny's
    # shape (seeds 0-2) put 0.060 on position 0 in every block, uniform's 0.060, and position 0's norm is
    # x1.01-1.27 the others'. pydoc-tiny (minutes of training) shows neither: 0.083 at most, x1.11. The lines
    # (half the attention, 3x uniform; 3x the norm) sit far above random weights' values.
    mass = r.block_mass
    top = int(mass.argmax())
    sink = Finding("sink", "some block parks its attention on the first token (an attention sink)",
                   bool(mass[top] >= SINK_MASS and mass[top] >= SINK_OVER_UNIFORM * r.uniform),
                   f"heaviest block b{top}: mean weight {mass[top]:.3f} on position 0 (uniform attention: "
                   f"{r.uniform:.3f}); its heaviest head h{int(r.mass[top].argmax())} {r.mass[top].max():.3f}",
                   needs_trained=True)
    ratio = r.norm_ratio[1:]  # the blocks' outputs: the embeddings have no context to grow from
    worst = int(ratio.argmax())
    norm = Finding("first_norm", "the first position's residual is far larger than the others'",
                   bool(ratio[worst] >= NORM_RATIO),
                   f"norm of position 0 over the others' median: up to x{ratio[worst]:.3g} (at b{worst}); "
                   f"x{r.norm_ratio[0]:.3g} at the embeddings", needs_trained=True)
    return [sink, norm]
