"""Direct logit attribution (beyond the notes, docs/NOTES.md section 5): who writes the predicted token's logit.

The residual before ln_f is a sum of parts: token and position embeddings, and per block each
head's write (``attn.heads``), the attention output bias, and the MLP's delta. ln_f is affine
once its scale is frozen at the value it had in this run:

    ln_f(x) = (x - mean(x)) / sigma * gamma + beta,   sigma = sqrt(var(x) + eps)

so the logit of token t is exactly  sum_i (p_i - mean(p_i)) / sigma . (gamma * W_U[t])  +  beta . W_U[t].
Each term is one part's direct contribution; they sum to the logit up to float rounding. Only
the scale sigma is shared (taken from the whole residual); state it when quoting the parts.
The algebra is the trace's (``Trace.decomposed_residual``, ``logit_attribution``,
``ln_f_bias_attribution``); this probe names the parts and checks the sum.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minigpt import GPT

from minigpt.errors import InputError

from ._common import Finding, Result, check_index, float_eps, record_rows, row_columns, sequences, token_text


@dataclass
class Attribution(Result):
    """Contributions (float64) to the logit of ``target_id`` at ``position``."""

    position: int
    target_id: int                # the model's prediction at that position
    target_token: str
    logit: float                  # the model's logit for it
    scale: float                  # sigma, the frozen ln_f scale of the residual at that position
    names: list[str]              # in order: embed, pos_embed, b{L}.h{h}, b{L}.attn_bias, b{L}.mlp, ln_f.bias
    contributions: torch.Tensor   # [parts] each part's direct contribution
    heads: torch.Tensor           # [n_layer, n_head]
    attn_bias: torch.Tensor       # [n_layer]
    mlp: torch.Tensor             # [n_layer]
    embed: float
    pos_embed: float
    ln_f_bias: float              # beta . W_U[t], the part no component writes
    sum_error: float              # |sum of contributions - logit|

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k parts with the largest |contribution|, largest first."""
        order = self.contributions.abs().argsort(descending=True)[:k]
        return [(self.names[i], self.contributions[i].item()) for i in order.tolist()]


def attribute(model: GPT, inputs: str | list | torch.Tensor, *, position: int = -1,
              target: int | Sequence[int] | None = None,
              attention_mask: torch.Tensor | None = None) -> Attribution | list[Attribution]:
    """Split the logit of ``target`` (default: the model's prediction) at ``position`` into direct parts.

    One sequence -> an Attribution. A batch of B > 1 rows (texts or id lists of any lengths, or ids
    [B, S] with an ``attention_mask``) -> a list of B from one forward: ``position`` counts among each
    row's real tokens (-1: each row's last); ``target`` one id for every row or one per row.
    """
    cfg = model.cfg
    n = cfg.n_layer
    tokens, mask = sequences(model, inputs, attention_mask)
    indices, columns = row_columns(mask, position)
    last = f"blocks.{n - 1}.resid_post"
    taps = ["embed", "pos_embed", "blocks.*.attn.heads", "blocks.*.attn_delta", "blocks.*.mlp_delta", last,
            "ln_f.scale"]
    # Only the positions read are kept (row r's is read[r] among them). Stored in float64 (exact for
    # any model dtype), so the trace's algebra below runs in float64.
    kept = sorted(set(columns))
    logits, trace = record_rows(model, tokens, taps, mask, positions=kept, store_dtype=torch.float64)
    rows = torch.arange(len(columns))
    at = logits[rows, columns]  # [B, V]: each row's logits at the position read
    targets = _targets(target, at, cfg.vocab_size)

    # embed, pos_embed, then per block each head's write, attention's output bias (no head's), the MLP.
    parts = trace.decomposed_residual(heads=True)[0]  # [2 + n (H + 2), B, kept, D]
    names = ["embed", "pos_embed"] + [f"b{i}.{p}" for i in range(n)
                                      for p in [*(f"h{h}" for h in range(cfg.n_head)), "attn_bias", "mlp"]]
    # ln_f made linear, its scale frozen at this run's (the trace's direct logit attribution).
    read = [kept.index(column) for column in columns]
    contributions = trace.logit_attribution(parts, model, targets)[:, rows, read]  # [parts, B]
    ln_f_bias = trace.ln_f_bias_attribution(model, targets)[rows, read]  # [B]
    # sigma as quoted beside the parts, in float64 from the recorded residual.
    sigma = (trace[last][rows, read].var(dim=-1, unbiased=False) + model.ln_f.eps).sqrt()
    results = [_attribution_row(model, names, contributions[:, row], ln_f_bias[row].item(), sigma[row].item(),
                                at[row, targets[row]].item(), indices[row], int(targets[row]))
               for row in range(len(columns))]
    return results[0] if len(results) == 1 else results


def _targets(target: int | Sequence[int] | None, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The token attributed in each row -> ids [B]: the row's prediction (argmax of ``logits`` [B, V]),
    one id for all rows, or one per row; InputError for an id outside the vocabulary or a wrong count."""
    if target is None:
        return logits.argmax(dim=-1)
    if isinstance(target, Sequence) and not isinstance(target, str):
        if len(target) != len(logits):
            raise InputError(f"target gives {len(target)} ids for {len(logits)} rows; give one id for every row, "
                             "one per row, or None (each row's prediction)")
        return torch.tensor([check_index("target", t, vocab_size) for t in target])
    return torch.tensor([check_index("target", target, vocab_size)] * len(logits))


def _attribution_row(model: GPT, names: list[str], contributions: torch.Tensor, ln_f_bias: float, sigma: float,
                     logit: float, position: int, target: int) -> Attribution:
    """One row's Attribution from its contributions [parts] (float64), ln_f's bias term, the scale and the logit."""
    cfg = model.cfg
    total = contributions.sum().item() + ln_f_bias
    per_block = contributions[2:].view(cfg.n_layer, cfg.n_head + 2)
    result = Attribution(
        position=position, target_id=target, target_token=token_text(model, [target])[0], logit=logit,
        scale=sigma, names=names + ["ln_f.bias"],
        contributions=torch.cat([contributions, torch.tensor([ln_f_bias], dtype=torch.float64)]),
        heads=per_block[:, :cfg.n_head], attn_bias=per_block[:, cfg.n_head], mlp=per_block[:, cfg.n_head + 1],
        embed=contributions[0].item(), pos_embed=contributions[1].item(), ln_f_bias=ln_f_bias,
        sum_error=abs(total - logit))
    tol = max(1e-4, 4 * float_eps(model)) * max(1.0, abs(logit))  # the model's own logit carries its rounding
    (name, value), = result.top(1)
    result.findings = [
        Finding("sum", "the parts sum to the logit (ln_f's scale frozen at this run's value)", result.sum_error <= tol,
                f"logit {logit:.4f}, sum of parts {total:.4f}, ln_f scale sigma = {result.scale:.4g}"),
        Finding("largest", "largest direct contribution to the predicted token's logit", None,
                f"to {result.target_token}: {name} {value:+.3f}",
                needs_trained=True),
    ]
    return result
