"""Attention, seen: one run's attention patterns, logit lens and direct logit attribution as one page.

``write_attention_view(model, text, path)`` runs the model once and writes a single HTML file
that shows, for every layer and head, the attention pattern [Q, K] over the tokens (hover a cell
to read its weight, pick the layer and head), and beside it, at the query position chosen, the
logit lens (every residual state read through ln_f and the unembedding) and the direct logit
attribution of the model's prediction (every head, attention bias and MLP; ln_f's scale frozen).

The page is self-contained: its script, styles and data (JSON) are inlined and it makes no network
request, so it opens from disk. Numbers are kept to 4 significant digits and the sequence is
capped at ``MAX_TOKENS``: the patterns grow as n_layer * n_head * S^2 / 2 weights of about 9 bytes
each (pydoc-tiny's 32 heads at 128 tokens: 2.4 MB; GPT-2 small's 144 at 64 tokens: 2.7 MB).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from minigpt import GPT, Trace
from minigpt.checks import check_int
from minigpt.errors import InputError
from minigpt.files import write_atomically

from ._common import (RESIDUAL_TAPS, decode_text, ln_f_own_stats, record, residual_labels, residual_states,
                      single_sequence, unembedding)
from .attention_page import render_attention_view

MAX_TOKENS = 128   # the page holds n_layer * n_head * S^2 / 2 weights
SIGNIFICANT = 4    # digits kept of every number on the page
PATTERN = "attn.pattern"
ATTRIBUTION_TAPS = ["embed", "pos_embed", "blocks.*.attn.heads", "blocks.*.attn_delta", "blocks.*.mlp_delta",
                    "ln_f.scale"]


def attention_pattern(trace: Trace, layer: int) -> torch.Tensor:
    """Block ``layer``'s attention pattern of a one-sequence trace: [H, Q, K] (softmax weights, rows sum to 1).

    Needs the tap ``blocks.{layer}.attn.pattern`` (record ``taps=['blocks.*.attn.pattern']``).
    """
    pattern = trace[f"blocks.{layer}.{PATTERN}"]  # [B, H, Q, K]
    if pattern.shape[0] != 1:
        raise InputError(f"the attention view and plot read one sequence, this trace holds a batch of "
                         f"{pattern.shape[0]}; run one text (or index the batch: trace[name][i:i + 1])")
    return pattern[0]


def rounded(values: torch.Tensor | list | float) -> list | float | None:
    """Values as (nested) Python floats to ``SIGNIFICANT`` digits; non-finite ones as None (strict JSON)."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, list):
        return [rounded(v) for v in values]
    return float(f"{values:.{SIGNIFICANT}g}") if math.isfinite(values) else None


def view_data(model: GPT, inputs: str | list | torch.Tensor, *, k: int = 5) -> dict:
    """Everything the page shows, from one run on ``inputs`` (one text or one sequence of ids), as JSON-able lists.

    patterns[L][h][q]: block L head h's weights of query q over keys 0..q (the causal half; the rest is 0).
    lens: the top ``k`` tokens and the prediction's probability per residual state, at every position.
    attribution: the direct contribution of every part to the logit of the model's prediction, per position.
    """
    tokens = single_sequence(model, inputs)
    S = tokens.shape[1]
    if S > MAX_TOKENS:
        raise InputError(f"the attention view holds at most {MAX_TOKENS} tokens (its page grows as tokens²), got "
                         f"{S}; pass a shorter text or its first {MAX_TOKENS} ids: "
                         f"model.tokenizer.encode(text)[:{MAX_TOKENS}]")
    k = check_int(k, "k", 1, model.cfg.vocab_size)
    cfg = model.cfg
    taps = [f"blocks.*.{PATTERN}", *RESIDUAL_TAPS, *ATTRIBUTION_TAPS]
    # Stored in float64 (exact for any model dtype): the attribution's algebra runs in float64 as in probes.attribution
    logits, trace = record(model, tokens, taps, store_dtype=torch.float64)
    predicted = logits.argmax(-1)  # [S]
    ids = tokens[0].tolist()
    lens = _lens(model, trace, predicted, k)
    attribution = _attribution(model, trace, predicted, logits)
    shown = sorted({*ids, *predicted.tolist(), *(i for row in lens["top_ids"] for state in row for i in state)})
    return {
        "model": getattr(model, "provenance", ""), "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "ids": ids, "tokens": [decode_text(model, [i]) for i in ids],
        "strings": {str(i): decode_text(model, [i]) for i in shown},
        "patterns": [[[rounded(row[:q + 1]) for q, row in enumerate(head)] for head in attention_pattern(trace, layer)]
                     for layer in range(cfg.n_layer)],
        "lens": lens, "attribution": attribution,
    }


def _lens(model: GPT, trace: Trace, predicted: torch.Tensor, k: int) -> dict:
    """The logit lens at every position (as probes.logit_lens.lens at one): per position, per state, the top k."""
    states = residual_states(trace)  # [L, S, D]
    w_u = unembedding(model)
    top_ids, top_probs, target = [], [], []
    for state in states:  # one state at a time: [S, V] rather than [L, S, V] in memory
        logprobs = (ln_f_own_stats(model, state) @ w_u.T).double().log_softmax(-1)  # [S, V]
        top = logprobs.topk(k, dim=-1)
        top_ids.append(top.indices)
        top_probs.append(top.values.exp())
        target.append(logprobs.gather(-1, predicted[:, None])[:, 0].exp())
    return {"labels": residual_labels(model.cfg.n_layer), "top_ids": _by_position(top_ids).tolist(),
            "top_probs": rounded(_by_position(top_probs)), "predicted_prob": rounded(_by_position(target))}


def _by_position(per_state: list[torch.Tensor]) -> torch.Tensor:
    """L tensors [S, ...] -> one [S, L, ...]: the page reads a position's states together."""
    return torch.stack(per_state).transpose(0, 1)


def _attribution(model: GPT, trace: Trace, predicted: torch.Tensor, logits: torch.Tensor) -> dict:
    """Direct logit attribution of each position's prediction (as probes.attribution.attribute at one position).

    parts: embed, pos_embed, then per block its heads' writes, the attention output bias and the MLP.
    """
    parts = trace.decomposed_residual(heads=True)[0]  # [P, 1, S, D]
    targets = predicted[None]  # [1, S]: each position's own prediction
    contributions = trace.logit_attribution(parts, model, targets)[:, 0]  # [P, S]
    ln_f_bias = trace.ln_f_bias_attribution(model, targets)[0]  # [S]
    logit = logits.gather(-1, predicted[:, None])[:, 0].double()  # [S]
    return {"target": predicted.tolist(), "logit": rounded(logit), "parts": rounded(contributions.T),
            "ln_f_bias": rounded(ln_f_bias), "sigma": rounded(1 / trace["ln_f.scale"][0, :, 0]),
            "sum_error": rounded((contributions.sum(0) + ln_f_bias - logit).abs())}


def page_json(data: dict) -> str:
    """``data`` as JSON safe inside a <script> element: '<', '>' and '&' written as \\u escapes.

    Those characters occur only inside JSON strings, where the escapes mean the same, so a token
    such as '</script>' can neither end the element nor open another.
    """
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def write_attention_view(model: GPT, inputs: str | list | torch.Tensor, path: str | Path, *, k: int = 5) -> Path:
    """Run ``model`` on ``inputs`` (one text or one sequence of ids, at most MAX_TOKENS); write the page to ``path``.

    k: how many top tokens the logit lens lists per state. Returns the path written (atomically).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; give the HTML file to write, e.g. {path / 'attention.html'}")
    data = view_data(model, inputs, k=k)
    meta = (f"{data['model'] or 'a model'}: {data['n_layer']} blocks of {data['n_head']} heads, "
            f"{len(data['ids'])} tokens")
    page = render_attention_view(page_json(data), title=f"attention: {''.join(data['tokens'])[:60]}", meta=meta)
    write_atomically(path, lambda temporary: temporary.write_bytes(page.encode("utf-8")))
    return path
