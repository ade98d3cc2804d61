"""Distributions of hidden-state activations across layers (docs/NOTES.md, section 4).

Works on HF's hidden states (embeddings, the block outputs, and ln_f's output last), with the
first token left out by default (it has no context and carries abnormal values): the values by
token index and by dimension, the covariance and R^2 matrices between layers (each layer
flattened over tokens x dimensions, layers as variables), and histograms on shared bins.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minigpt import GPT

from ._common import Finding, Result, check_within, hidden_labels, hidden_stack, record, single_sequence


@dataclass
class Distributions(Result):
    """L = n_layer + 1 hidden states; 'used' values are tokens first_token.. of every dimension."""

    labels: list[str]           # 'emb', 'b0'..'b{n-2}', 'ln_f'
    states: torch.Tensor        # [L, S, D] every value (first token included)
    first_token: int            # 1 when the first token is left out of the statistics, else 0
    covariance: torch.Tensor    # [L, L] covariance between layers over the used values (ddof 1, like np.cov)
    r2: torch.Tensor            # [L, L] squared Pearson correlation
    bin_edges: torch.Tensor     # [bins + 1] shared by every layer
    counts: torch.Tensor        # [L, bins] histogram of the used values per layer
    std: torch.Tensor           # [L] std of the used values
    tail: torch.Tensor          # [L] 99.9th percentile of |used values|: how wide the tails reach
    first_token_max: torch.Tensor  # [L] max |value| at token 0
    rest_max: torch.Tensor      # [L] max |value| at tokens 1..

    def by_token(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter data (token index, value) of one layer, tokens first_token.. -> two [N] tensors."""
        values = self.states[layer, self.first_token:]
        index = torch.arange(self.first_token, self.states.shape[1]).repeat_interleave(values.shape[1])
        return index, values.flatten()

    def by_dimension(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter data (dimension, value) of one layer, tokens first_token.. -> two [N] tensors."""
        values = self.states[layer, self.first_token:]
        return torch.arange(values.shape[1]).repeat(values.shape[0]), values.flatten()


def measure_distributions(model: GPT, inputs: str | list | torch.Tensor, *, skip_first: bool = True,
                          bins: int = 120) -> Distributions:
    """Statistics of the n_layer + 1 hidden states of one text (first token left out if ``skip_first``)."""
    bins = check_within("bins", bins, 1, 100_000, integer=True)
    tokens = single_sequence(model, inputs)
    _, trace = record(model, tokens, ["blocks.*.resid_pre", "ln_f"])
    states = hidden_stack(trace)  # [L, S, D]
    first = 1 if skip_first and states.shape[1] > 1 else 0
    used = states[:, first:].flatten(1).double()  # [L, N]
    centred = used - used.mean(dim=1, keepdim=True)
    cov = centred @ centred.T / max(used.shape[1] - 1, 1)
    scale = cov.diagonal().sqrt()
    r2 = (cov / (scale[:, None] * scale[None, :]).clamp_min(1e-300)) ** 2
    low, high = used.min().item(), used.max().item()
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    counts = torch.stack([torch.histogram(row, bins=edges).hist for row in used])
    tail = torch.stack([torch.quantile(row.abs().float(), 0.999) for row in used]).double()
    nan = torch.full((len(states),), float("nan"))
    rest = states[:, 1:].flatten(1).abs().amax(dim=1) if states.shape[1] > 1 else nan
    result = Distributions(
        labels=hidden_labels(model.cfg.n_layer), states=states, first_token=first, covariance=cov, r2=r2,
        bin_edges=edges, counts=counts, std=used.std(dim=1), tail=tail,
        first_token_max=states[:, 0].abs().amax(dim=1), rest_max=rest)
    result.findings = _findings(result)
    return result


def _mean_off_diagonal(block: torch.Tensor) -> float:
    mask = ~torch.eye(len(block), dtype=torch.bool)
    return block[mask].mean().item() if mask.any() else float("nan")


def _findings(d: Distributions) -> list[Finding]:
    L, S = len(d.labels), d.states.shape[1]
    findings = []
    if S > 1:
        ratio = (d.first_token_max / d.rest_max.clamp_min(1e-30))[1:-1]  # blocks only: emb and ln_f are fine
        worst = ratio.max().item() if len(ratio) else float("nan")
        findings.append(Finding("first_token",
                                "the first token is abnormal (no context): far larger values than the rest",
                                worst >= 3 if len(ratio) else None,
                                f"max |value| at token 0 vs the other tokens: up to x{worst:.3g} in the blocks",
                                needs_trained=True))
    middle = d.r2[1:-1, 1:-1]
    if len(middle) >= 2:
        others = torch.ones(L, dtype=torch.bool)
        others[0] = others[-1] = False
        edge = max(d.r2[0, others].mean().item(), d.r2[-1, others].mean().item())
        inner = _mean_off_diagonal(middle)
        findings.append(Finding("shared_variance",
                                "the embeddings and the last layer share little variance with the rest; "
                                "the middle blocks share a lot", edge < 0.75 * inner,
                                f"mean R^2 with the middle blocks: embeddings {d.r2[0, others].mean():.3f}, last "
                                f"{d.r2[-1, others].mean():.3f}; among the middle blocks {inner:.3f}",
                                needs_trained=True))
        adjacent = middle.diagonal(1).mean().item()
        far = middle[torch.ones_like(middle, dtype=torch.bool).triu(2)]
        gradual = adjacent > far.mean().item() if far.numel() else None
        # Architectural: each state is the previous one plus a write, so states drift apart with distance
        # on any weights: random weights of pydoc-tiny's shape give neighbours 0.95 vs 0.85 for blocks two or
        # more apart (seeds 0-2), of GPT-2 small's 0.78-0.79 vs 0.40-0.42; pydoc-tiny 0.944 vs 0.747.
        findings.append(Finding("gradual",
                                "the middle blocks change gradually: neighbours share more than distant blocks "
                                "(the residual stream's sum, on any weights)",
                                gradual, f"mean R^2 of neighbouring middle blocks {adjacent:.3f}, of blocks two "
                                f"or more apart {far.mean().item() if far.numel() else float('nan'):.3f}"))
    if L >= 3:
        peak = int(d.tail[1:-1].argmax()) + 1
        widen = bool(d.tail[0] < d.tail[L // 2] and d.tail[-1] < d.tail[peak])
        findings.append(Finding("tails", "the tails are narrow at the embeddings, widen with depth, and narrow again "
                                "at the last layer", widen,
                                f"99.9th percentile of |value|: embeddings {d.tail[0]:.3g}, {d.labels[L // 2]} "
                                f"{d.tail[L // 2]:.3g}, widest {d.labels[peak]} {d.tail[peak]:.3g}, last (ln_f) "
                                f"{d.tail[-1]:.3g}", needs_trained=True))
    return findings
