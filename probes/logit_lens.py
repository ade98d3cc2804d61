"""The logit lens (beyond the notes, docs/NOTES.md section 5): read every residual state with ln_f and the unembedding.

At one position, each state (embeddings, then every block's raw output) is passed through the
model's own ``ln_f`` and multiplied by W_U, as if the model stopped there. At the last block
this is exactly the model's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minigpt import GPT

from ._common import (RESIDUAL_TAPS, Finding, Result, check_within, decode_text, float_eps, ln_f_own_stats, record_rows,
                      residual_labels, row_columns, sequences, token_text, unembedding)


@dataclass
class LogitLens(Result):
    """L = n_layer + 1 states ('emb', 'b0'..'b{n-1}'), read at ``position``."""

    labels: list[str]
    position: int                 # non-negative index of the position read
    context: str                  # the tokens up to and including that position, as text
    top_ids: torch.Tensor         # [L, k] most probable next tokens per state
    top_probs: torch.Tensor       # [L, k]
    top_tokens: list[list[str]]   # [L][k] decoded ('#id' without a tokenizer)
    target_id: int                # the model's own prediction (argmax of its logits)
    target_token: str
    target_prob: torch.Tensor     # [L] probability each state gives that prediction
    target_rank: torch.Tensor     # [L] its rank (0 = top) in each state's distribution
    kl_to_final: torch.Tensor     # [L] KL(final || this state's distribution), nats
    final_max_diff: float         # max |lens at the last block - model logits|: 0 up to rounding


def lens(model: GPT, inputs: str | list | torch.Tensor, *, position: int = -1, k: int = 5,
         attention_mask: torch.Tensor | None = None) -> LogitLens | list[LogitLens]:
    """ln_f + unembedding on every residual state at ``position`` (default the last).

    One sequence -> a LogitLens. A batch of B > 1 rows (texts or id lists of any lengths, or ids
    [B, S] with an ``attention_mask``) -> a list of B, one forward for all: ``position`` counts
    among each row's real tokens (-1: each row's last).
    """
    tokens, mask = sequences(model, inputs, attention_mask)
    indices, columns = row_columns(mask, position)
    k = check_within("k", k, 1, model.cfg.vocab_size, integer=True)
    logits, trace = record_rows(model, tokens, RESIDUAL_TAPS, mask)
    states = trace.accumulated_residual()  # [L, B, S, D]
    results = [_lens_row(model, states[:, row, column], logits[row, column], indices[row],
                         tokens[row][mask[row]][:indices[row] + 1].tolist(), k)
               for row, column in enumerate(columns)]
    return results[0] if len(results) == 1 else results


def _lens_row(model: GPT, states: torch.Tensor, final: torch.Tensor, position: int, context: list[int],
              k: int) -> LogitLens:
    """One row's lens: its residual states [L, D] and the model's logits [V] at the position read."""
    lens_logits = ln_f_own_stats(model, states) @ unembedding(model).T  # [L, V]
    logprobs = lens_logits.double().log_softmax(-1)
    target = int(final.argmax())
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    final_logprobs = final.double().log_softmax(-1)
    kl = (final_logprobs.exp() * (final_logprobs - logprobs)).sum(-1)
    target_logit = lens_logits[:, target:target + 1]
    result = LogitLens(
        labels=residual_labels(model.cfg.n_layer), position=position, context=decode_text(model, context),
        top_ids=top.indices, top_probs=top.values.exp().float(),
        top_tokens=[token_text(model, row) for row in top.indices.tolist()], target_id=target,
        target_token=token_text(model, [target])[0], target_prob=logprobs[:, target].exp().float(),
        target_rank=(lens_logits > target_logit).sum(-1), kl_to_final=kl.float(),
        final_max_diff=(lens_logits[-1] - final).abs().max().item())
    tol = 64 * float_eps(model) * max(1.0, final.abs().max().item())  # the model's own rounding
    result.findings = [
        Finding("final_equals_logits", "the lens at the last block is the model's own output",
                result.final_max_diff <= tol, f"max |lens logits - model logits| = {result.final_max_diff:.3g}"),
        Finding("emerges", "the prediction takes shape gradually through the blocks", None,
                f"{result.target_token}: {_rise(result)}", needs_trained=True),
    ]
    return result


def _rise(r: LogitLens) -> str:
    first_top = next((r.labels[i] for i in range(len(r.labels)) if r.target_rank[i] == 0), None)
    return (f"probability {r.target_prob[0]:.3g} at the embeddings, {r.target_prob[len(r.labels) // 2]:.3g} at "
            f"{r.labels[len(r.labels) // 2]}, {r.target_prob[-1]:.3g} at the end; first top-1 at "
            f"{first_top or 'no state'}")

