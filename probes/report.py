"""The one-command report: every probe on one text, as PNG figures, index.html and report.json.

``build_report(model, text, out_dir)`` writes::

    out_dir/index.html    every figure with a one-line caption and the checked claims beside it
    out_dir/report.json   every number, table and verdict the page shows (same source as the page)
    out_dir/*.png         the figures

The page and the JSON are rendered from the same section records, so they cannot disagree.
"""
from __future__ import annotations

import datetime
import html
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minigpt import GPT
from minigpt.errors import InputError

from ._common import Finding, decode_text, single_sequence
from .attribution import attribute
from .distributions import measure_distributions
from .final_norm import check_final_norm
from .interventions import intervene
from .logit_lens import lens
from .reconstruction import reconstruct

Progress = Callable[[str], None]


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list]


@dataclass
class Shown:
    """One figure on the page: its PNG, a one-line caption, and the claims shown beside it."""

    file: str
    caption: str
    findings: list[Finding] = field(default_factory=list)


@dataclass
class Section:
    """One probe on the page: what it does, its figures, its checked claims, its tables and raw numbers."""

    id: str
    title: str
    intro: str
    figures: list[Shown] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # every claim of the section
    tables: list[Table] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def is_random(model: GPT) -> bool:
    """Whether the model carries random (untrained) weights, as its ``source`` says."""
    source = getattr(model, "source", "")
    return "RANDOM" in source or "untrained" in source


def stderr_progress() -> Progress:
    """Print '[  1.2s] message' lines on stderr."""
    start = time.perf_counter()
    return lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _json_ready(value):
    """Tensors to lists, non-finite floats to None (strict JSON), recursively."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "—"}[value]
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.4g}"
    return str(value)


def build_report(model: GPT, text: str | list | torch.Tensor, out_dir: str | Path, *, block: int | None = None,
                 head: int | None = None,
                 top_fraction: float = 0.01, random_weights: bool | None = None,
                 progress: Progress | None = None, dpi: int = 100) -> dict:
    """Run every probe on ``text`` and write the report into ``out_dir``; returns the JSON payload.

    random_weights: whether to flag the weights as random on the page (default: read from model.source).
    """
    from . import plots  # matplotlib only when figures are made

    say = progress or stderr_progress()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory for the report")
    tokens = single_sequence(model, text)
    out.mkdir(parents=True, exist_ok=True)
    random_weights = is_random(model) if random_weights is None else random_weights
    n, S = model.cfg.n_layer, tokens.shape[1]
    started = time.perf_counter()
    say(f"report on {S} tokens with {getattr(model, 'source', 'a model')}; writing to {out}/")

    def save(fig, name: str) -> str:
        with warnings.catch_warnings():  # tokens in scripts the default font lacks are drawn as boxes
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(out / name, dpi=dpi)
        return name

    sections = []
    steps = 6

    say(f"[1/{steps}] reconstruction law and consecutive-block correlation")
    r = reconstruct(model, tokens, top_fraction=top_fraction)
    i, j = r.pair
    sections.append(Section(
        "reconstruction", "1. Rebuilding each block from its input and its two deltas",
        "Each block adds two vectors to the residual stream: attention's output (attn_delta) and the MLP's "
        "output (mlp_delta). So block L's input plus those two deltas must give block L+1's input, which is "
        "also HuggingFace's hidden_states[L+1]. The scatter plots every value of one block's output against "
        "the next block's output; the largest values (mostly at the first token) are left out so the rest "
        "can be read.",
        [Shown(save(plots.plot_reconstruction(r), "reconstruction.png"),
               f"Left: error of input + attn_delta + mlp_delta per block. Middle: Pearson r between consecutive "
               f"states. Right: {r.labels[i]} vs {r.labels[j]}, top {r.top_fraction:.0%} magnitudes left out.",
               r.findings)],
        r.findings,
        [Table("Per block", ["block", "max abs error vs next input", "relative error", "max abs error vs "
                             "hidden_states[L+1]", "Pearson r (next state)", "r, outliers left out"],
               [[f"b{b}", r.max_abs_error_next[b].item(), r.rel_error_next[b].item(), r.max_abs_error_hidden[b].item(),
                 r.pearson_r[b].item(), r.pearson_r_kept[b].item()] for b in range(n)])],
        {"pair": [r.labels[i], r.labels[j]], "n_points": r.n_points, "n_left_out": r.n_left_out,
         "range_all": r.range_all, "range_kept": r.range_kept, "outliers": r.outliers, "top_fraction": r.top_fraction}))

    say(f"[2/{steps}] the final LayerNorm")
    f = check_final_norm(model, tokens)
    sections.append(Section(
        "final_norm", "2. The last hidden state is different: ln_f",
        "HuggingFace's output_hidden_states gives n_layer + 1 tensors: the embeddings, then each block's output. "
        "But the last one has already been through the final LayerNorm ln_f (the one applied before the "
        "unembedding), so it is not what the last block wrote. The raw last residual exists only at the "
        "block's own output (tap blocks.L.resid_post).",
        [Shown(save(plots.plot_final_norm(f), "final_norm.png"),
               "Max |hidden_states[i+1] − block i's output| per block; the green bar compares ln_f(last block's "
               "output) with hidden_states[−1].", f.findings)],
        f.findings,
        [Table("Differences", ["comparison", "max |difference|"],
               [[f"hidden_states[{b + 1}] vs output of b{b}", f.block_diff[b].item()] for b in range(n)]
               + [["ln_f(last output) vs hidden_states[-1]", f.ln_f_diff],
                  ["std of the raw last output", f.raw_last_std], ["std of hidden_states[-1]", f.normalised_last_std]])],
        {"penultimate_diff": f.penultimate_diff, "last_diff": f.last_diff, "ln_f_diff": f.ln_f_diff}))

    say(f"[3/{steps}] four interventions (5 forward passes)")
    iv = intervene(model, tokens, block=block, head=head)
    named = {item.name: [Finding(f"{item.name}.{x.key}", x.claim, x.holds, x.detail, x.needs_trained)
                         for x in item.findings] for item in iv.results}
    figures = [Shown(save(plots.plot_interventions_overview(iv), "interventions_overview.png"),
                     f"Std of every layer after each edit at block {iv.block}, divided by the clean run's "
                     "(1 = unchanged).")]
    for item in iv.results:
        figures.append(Shown(save(plots.plot_intervention(iv, item.name), f"intervention_{item.name}.png"),
                             f"{item.title}: std and mean |value| per layer, clean (blue) vs edited (red).",
                             named[item.name]))
    last = n  # index of the last block's raw output among iv.labels
    sections.append(Section(
        "interventions", f"3. Interventions at block {iv.block} and their downstream impact",
        f"Four edits made inside the forward pass, each in its own run: (1) set the keys of head {iv.head} of "
        f"block {iv.block} to zero, so that head attends uniformly; (2) replace the even-numbered MLP neurons "
        f"of block {iv.block} (after GELU) by Gaussian noise of mean 10, far outside their usual range; "
        f"(3, 4) multiply block {iv.block}'s whole output by 0.1 and by 10. The impact is read from the spread "
        "(std) of every later layer compared with the clean run, and from the change in the next-token "
        "distribution (KL divergence, top-1 token). Layers: emb = embeddings, bN = block N's raw output, "
        "ln_f = the normalised last hidden state HuggingFace returns.",
        figures, [x for item in iv.results for x in named[item.name]],
        [Table("Impact of each edit", ["edit", "KL at last token (nats)", "mean KL over tokens", "top-1 clean",
                                       "top-1 edited", "tokens whose top-1 changed", f"std ratio at b{iv.block}",
                                       f"std ratio at b{n - 1}", "std ratio after ln_f"],
               [[item.title, item.kl_last, item.kl_mean, item.top1_clean, item.top1_edited,
                 f"{item.top1_changed_fraction:.0%}", item.std_ratio[iv.block + 1].item(),
                 item.std_ratio[last].item(), item.std_ratio[-1].item()] for item in iv.results]),
         Table("Std per layer", ["layer", "clean", *(item.name for item in iv.results)],
               [[label, iv.clean_std[k].item(), *(item.std[k].item() for item in iv.results)]
                for k, label in enumerate(iv.labels)])],
        {"labels": iv.labels, "block": iv.block, "head": iv.head, "clean_std": iv.clean_std,
         "clean_mean_abs": iv.clean_mean_abs, "clean_post_gelu_near_zero": iv.clean_post_gelu_near_zero,
         "edits": {item.name: {"title": item.title, "std": item.std, "mean_abs": item.mean_abs,
                               "std_ratio": item.std_ratio, "kl_last": item.kl_last, "kl_mean": item.kl_mean,
                               "top1_clean": item.top1_clean, "top1_edited": item.top1_edited,
                               "top1_changed": item.top1_changed,
                               "top1_changed_fraction": item.top1_changed_fraction} for item in iv.results}}))

    say(f"[4/{steps}] activation distributions, covariance and R^2 between layers")
    d = measure_distributions(model, tokens)
    skipped = "the first token left out" if d.first_token else "every token"

    def about(*keys: str) -> list[Finding]:
        return [x for x in d.findings if x.key in keys]

    sections.append(Section(
        "distributions", "4. Distributions of activations across layers",
        f"The n_layer + 1 hidden states (emb, the block outputs, and ln_f's output last, as HuggingFace returns "
        f"them) looked at as clouds of numbers, with {skipped} (it has no context and carries abnormal values). "
        "The covariance and R² matrices treat each layer as one variable over all token × dimension values.",
        [Shown(save(plots.plot_by_token(d), "values_by_token.png"),
               f"Activation value against token index for a few layers ({skipped}).", about("first_token")),
         Shown(save(plots.plot_by_dimension(d), "values_by_dimension.png"),
               "Activation value against dimension: a few dimensions stand out in trained models."),
         Shown(save(plots.plot_layer_matrices(d), "layer_matrices.png"),
               "Covariance and R² between every pair of layers.", about("shared_variance", "gradual")),
         Shown(save(plots.plot_histograms(d), "histograms.png"),
               "Histograms of each layer's values on shared bins with a log y axis (tails), and their width per "
               "layer.", about("tails"))],
        d.findings,
        [Table("Per layer", ["layer", "std", "99.9th pct |value|", "max |value| at token 0", "max |value| elsewhere"],
               [[d.labels[k], d.std[k].item(), d.tail[k].item(), d.first_token_max[k].item(), d.rest_max[k].item()]
                for k in range(len(d.labels))])],
        {"labels": d.labels, "first_token": d.first_token, "covariance": d.covariance, "r2": d.r2,
         "bin_edges": d.bin_edges, "counts": d.counts}))

    say(f"[5/{steps}] logit lens")
    ll = lens(model, tokens)
    sections.append(Section(
        "logit_lens", "5. Logit lens (beyond the notes)",
        f"Every residual state at the last token is decoded as if the model stopped there: through ln_f and "
        f"the unembedding. It shows at which depth the final prediction {ll.target_token} emerges.",
        [Shown(save(plots.plot_logit_lens(ll), "logit_lens.png"),
               f"Left: probability of the final prediction per layer. Right: top {ll.top_probs.shape[1]} tokens "
               "per layer.", ll.findings)],
        ll.findings,
        [Table("Per layer", ["layer", f"p({ll.target_token})", "rank", "KL(final || layer)", "top tokens"],
               [[ll.labels[k], ll.target_prob[k].item(), int(ll.target_rank[k]), ll.kl_to_final[k].item(),
                 ", ".join(f"{t} {p:.2f}" for t, p in zip(ll.top_tokens[k], ll.top_probs[k].tolist()))]
                for k in range(len(ll.labels))])],
        {"labels": ll.labels, "position": ll.position, "target_token": ll.target_token, "target_id": ll.target_id,
         "target_prob": ll.target_prob, "target_rank": ll.target_rank, "kl_to_final": ll.kl_to_final,
         "top_tokens": ll.top_tokens, "top_probs": ll.top_probs, "final_max_diff": ll.final_max_diff}))

    say(f"[6/{steps}] direct logit attribution")
    a = attribute(model, tokens)
    sections.append(Section(
        "attribution", "6. Direct logit attribution (beyond the notes)",
        f"The logit of the predicted token {a.target_token} is split exactly into the direct contributions of "
        f"the embeddings, every attention head, every attention output bias and every MLP. ln_f is made linear "
        f"by freezing its scale at this run's value σ = {a.scale:.4g}; its bias adds a constant term.",
        [Shown(save(plots.plot_attribution(a), "attribution.png"),
               "Left: each head's direct contribution to the logit. Right: attention and MLP per block.",
               a.findings)],
        a.findings,
        [Table("Largest parts", ["part", "contribution"], [[name, value] for name, value in a.top(10)]),
         Table("Sum", ["logit", "sum of parts", "|error|", "ln_f scale σ"],
               [[a.logit, a.contributions.sum().item(), a.sum_error, a.scale]])],
        {"target_token": a.target_token, "target_id": a.target_id, "logit": a.logit, "scale": a.scale,
         "parts": dict(zip(a.names, a.contributions.tolist())), "sum_error": a.sum_error}))

    payload = {
        "model": {"source": getattr(model, "source", ""), "random_weights": random_weights,
                  "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
                  "config": {k: getattr(model.cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")}},
        "text": decode_text(model, tokens[0].tolist()), "n_tokens": S,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "trained_only": sorted({x.claim for s in sections for x in s.findings if x.needs_trained}),
        "sections": [{"id": s.id, "title": s.title, "intro": s.intro,
                      "figures": [{"file": shown.file, "caption": shown.caption,
                                   "findings": [x.key for x in shown.findings]} for shown in s.figures],
                      "findings": [{"key": x.key, "claim": x.claim, "holds": x.holds, "detail": x.detail,
                                    "needs_trained_weights": x.needs_trained} for x in s.findings],
                      "verdict": " ".join(x.line() + "." for x in s.findings),
                      "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for t in s.tables],
                      "data": s.data} for s in sections],
    }
    payload["seconds"] = round(time.perf_counter() - started, 2)
    payload = _json_ready(payload)
    (out / "report.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False, allow_nan=False),
                                     encoding="utf-8")
    (out / "index.html").write_text(render_html(payload), encoding="utf-8")
    say(f"done in {payload['seconds']:.1f}s: {out / 'index.html'}")
    return payload


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1500px; margin: 1em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #555; } .text { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; }
.random { background: #fde2e1; border: 3px solid #c0392b; padding: 0.8em 1.2em; margin: 1em 0; }
.random h2 { border: none; margin: 0 0 0.3em 0; color: #c0392b; }
.figure { display: flex; gap: 1.2em; align-items: flex-start; margin: 1.2em 0; }
.figure img { max-width: 68%; border: 1px solid #ddd; } .side { flex: 1; min-width: 18em; }
.caption { font-style: italic; margin-bottom: 0.6em; }
.finding { margin: 0.3em 0; padding: 0.3em 0.5em; border-left: 5px solid #999; background: #fafafa; }
.holds { border-color: #2e8b57; } .fails { border-color: #c0392b; } .na { border-color: #999; }
.tag { font-size: 0.8em; background: #f0e0a0; padding: 0 0.3em; border-radius: 3px; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 0.15em 0.5em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
"""


def _finding_html(x: dict) -> str:
    cls, mark = {True: ("holds", "✔ holds"), False: ("fails", "✘ does not hold"), None: ("na", "measured")}[x["holds"]]
    tag = ' <span class="tag">needs trained weights</span>' if x["needs_trained_weights"] else ""
    return (f'<div class="finding {cls}"><b>{mark}</b>: {html.escape(x["claim"])}{tag}<br>'
            f'<small>{html.escape(x["detail"])}</small></div>')


def _table_html(t: dict) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t["columns"])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in t["rows"])
    return f"<h4>{html.escape(t['title'])}</h4><table><tr>{head}</tr>{rows}</table>"


def render_html(p: dict) -> str:
    """The page, from the JSON payload alone (so every number shown is in report.json)."""
    m = p["model"]
    cfg = m["config"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>minigpt report</title><style>{CSS}</style>"
             "</head><body><h1>minigpt report: inside GPT-2 on one text</h1>",
             f"<p class='meta'>Model: <b>{html.escape(m['source'])}</b> — {cfg['n_layer']} blocks, {cfg['n_head']} "
             f"heads, d_model {cfg['n_embd']}, vocabulary {cfg['vocab_size']}, {m['dtype']}. {p['n_tokens']} tokens. "
             f"Made {p['created']} in {p['seconds']:.1f}s.</p>",
             f"<div class='text'>{html.escape(p['text'])}</div>"]
    if m["random_weights"]:
        items = "".join(f"<li>{html.escape(c)}</li>" for c in p["trained_only"])
        parts.append("<div class='random'><h2>These are RANDOM weights, not a trained GPT-2</h2>"
                     "The numbers describe an untrained network of GPT-2's shape. The architectural facts (the "
                     "reconstruction law, ln_f on the last hidden state, the exact scale edit, the exact "
                     "attribution) hold for any weights. The claims below are about what training produces and "
                     "only hold for trained weights; here they may well fail:"
                     f"<ul>{items}</ul></div>")
    summary = "".join(f"<li><a href='#{s['id']}'>{html.escape(s['title'])}</a>: "
                      f"{sum(x['holds'] is True for x in s['findings'])} hold, "
                      f"{sum(x['holds'] is False for x in s['findings'])} do not, "
                      f"{sum(x['holds'] is None for x in s['findings'])} measured</li>" for s in p["sections"])
    parts.append(f"<h3>Contents</h3><ul>{summary}</ul>"
                 "<p class='meta'>Layer names: emb = embeddings (token + position), bN = output of block N, "
                 "ln_f = the final LayerNorm's output (HuggingFace's hidden_states[-1]).</p>")
    for s in p["sections"]:
        parts.append(f"<h2 id='{s['id']}'>{html.escape(s['title'])}</h2><p>{html.escape(s['intro'])}</p>")
        by_key = {x["key"]: x for x in s["findings"]}
        for fig in s["figures"]:
            side = f"<div class='caption'>{html.escape(fig['caption'])}</div>" + \
                "".join(_finding_html(by_key[k]) for k in fig["findings"])
            parts.append(f"<div class='figure'><img src='{html.escape(fig['file'])}' alt='{html.escape(fig['caption'])}'>"
                         f"<div class='side'>{side}</div></div>")
        parts.extend(_table_html(t) for t in s["tables"])
    parts.append("<p class='meta'>Every number on this page is in report.json beside it.</p></body></html>")
    return "\n".join(parts)
