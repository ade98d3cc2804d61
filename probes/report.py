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
from minigpt.weights import SHIPPED_MARK

from ._common import Finding, decode_text, single_sequence, verdict_of
from .attribution import attribute
from .distributions import measure_distributions
from .final_norm import check_final_norm
from .interventions import intervene, site
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


def is_shipped_small_model(source: str) -> bool:
    """Whether ``source`` (a model's) names a small model shipped with minigpt (weights.shipped_description)."""
    return SHIPPED_MARK in source


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


@dataclass(frozen=True)
class Prose:
    """The words of one section: its progress line, title, introduction and each figure's caption.

    ``{name}`` fields are filled from the section's numbers when the page is built.
    """

    step: str
    title: str
    intro: str
    captions: dict[str, str]  # figure file -> caption


PROSE: dict[str, Prose] = {
    "reconstruction": Prose(
        "reconstruction law and consecutive-block correlation",
        "1. Rebuilding each block from its input and its two deltas",
        "Each block adds two vectors to the residual stream: attention's output (attn_delta) and the MLP's "
        "output (mlp_delta). So block L's input plus those two deltas must give block L+1's input, which is "
        "also HuggingFace's hidden_states[L+1]. The scatter plots every value of one block's output against "
        "the next block's output; the largest values (mostly at the first token) are left out so the rest "
        "can be read.",
        {"reconstruction.png": "Left: error of input + attn_delta + mlp_delta per block. Middle: Pearson r between "
                               "consecutive states. Right: {x} vs {y}, top {top_fraction:.0%} magnitudes left out."}),
    "final_norm": Prose(
        "the final LayerNorm",
        "2. The last hidden state is different: ln_f",
        "HuggingFace's output_hidden_states gives n_layer + 1 tensors: the embeddings, then each block's output. "
        "But the last one has already been through the final LayerNorm ln_f (the one applied before the "
        "unembedding), so it is not what the last block wrote. The raw last residual exists only at the "
        "block's own output (tap blocks.L.resid_post).",
        {"final_norm.png": "Max |hidden_states[i+1] − block i's output| per block; the green bar compares "
                           "ln_f(last block's output) with hidden_states[−1]."}),
    "interventions": Prose(
        "four interventions (5 forward passes)",
        "3. Interventions at block {block} and their downstream impact",
        "Four edits made inside the forward pass, each in its own run: (1) set the keys of head {head} of "
        "block {block} to zero, so that head attends uniformly; (2) replace the even-numbered MLP neurons "
        "of block {block} (after GELU) by Gaussian noise of mean 10, far outside their usual range; "
        "(3, 4) multiply block {block}'s whole output by 0.1 and by 10. The impact is read from the spread "
        "(std) of every later layer compared with the clean run, and from the change in the next-token "
        "distribution (KL divergence, top-1 token). Layers: emb = embeddings, bN = block N's raw output, "
        "ln_f = the normalised last hidden state HuggingFace returns.",
        {"interventions_overview.png": "Std of every layer after each edit at block {block}, divided by the clean "
                                       "run's (1 = unchanged).",
         "intervention_{name}.png": "{title}: std and mean |value| per layer, clean (blue) vs edited (red)."}),
    "distributions": Prose(
        "activation distributions, covariance and R^2 between layers",
        "4. Distributions of activations across layers",
        "The n_layer + 1 hidden states (emb, the block outputs, and ln_f's output last, as HuggingFace returns "
        "them) looked at as clouds of numbers, with {skipped} (it has no context and carries abnormal values). "
        "The covariance and R² matrices treat each layer as one variable over all token × dimension values.",
        {"values_by_token.png": "Activation value against token index for a few layers ({skipped}).",
         "values_by_dimension.png": "Activation value against dimension: a few dimensions stand out in trained "
                                    "models.",
         "layer_matrices.png": "Covariance and R² between every pair of layers.",
         "histograms.png": "Histograms of each layer's values on shared bins with a log y axis (tails), and their "
                           "width per layer."}),
    "logit_lens": Prose(
        "logit lens",
        "5. Logit lens (beyond the notes)",
        "Every residual state at the last token is decoded as if the model stopped there: through ln_f and "
        "the unembedding. It shows at which depth the final prediction {target} emerges.",
        {"logit_lens.png": "Left: probability of the final prediction per layer. Right: top {k} tokens per layer."}),
    "attribution": Prose(
        "direct logit attribution",
        "6. Direct logit attribution (beyond the notes)",
        "The logit of the predicted token {target} is split exactly into the direct contributions of "
        "the embeddings, every attention head, every attention output bias and every MLP. ln_f is made linear "
        "by freezing its scale at this run's value σ = {scale:.4g}; its bias adds a constant term.",
        {"attribution.png": "Left: each head's direct contribution to the logit. Right: attention and MLP per "
                            "block."}),
}

SMALL_MODEL_BANNER = (
    "<h2>A small model trained by minigpt, not OpenAI's GPT-2</h2>This report runs on the tiny GPT-2 that "
    "ships with minigpt, the one used when no hub can be reached ({source}). Its weights are trained, so the claims about trained "
    "weights are put to a real test; but it is a few minutes of training of a model 35 times smaller than GPT-2 "
    "small, and a claim that fails here may still hold for GPT-2 itself. Pass --model with a GPT-2 checkpoint "
    "directory for the real thing.")

RANDOM_WEIGHTS_BANNER = (
    "<h2>These are RANDOM weights, not a trained GPT-2</h2>The numbers describe an untrained network of GPT-2's "
    "shape. The architectural facts (the reconstruction law, ln_f on the last hidden state, the exact scale edit, "
    "the exact attribution) hold for any weights. The claims below are about what training produces and only "
    "hold for trained weights; here they may well fail:")


@dataclass
class Page:
    """What every section builder needs: the model, the tokens [1, S], the options and where figures go."""

    model: GPT
    tokens: torch.Tensor
    out: Path
    block: int
    head: int
    top_fraction: float
    dpi: int

    def section(self, id: str, figures: list[Shown], findings: list[Finding], tables: list[Table], data: dict,
                **fields) -> Section:
        """A Section whose title and introduction are PROSE[id]'s, filled with ``fields``."""
        prose = PROSE[id]
        return Section(id, prose.title.format(**fields), prose.intro.format(**fields), figures, findings, tables, data)

    def figure(self, section_id: str, fig, findings: list[Finding] = (), file: str | None = None, **fields) -> Shown:
        """Save a matplotlib figure as PNG beside the page, captioned from PROSE (the caption of ``file``,
        or of the section's only figure)."""
        captions = PROSE[section_id].captions
        template = file or next(iter(captions))
        name = template.format(**fields)
        with warnings.catch_warnings():  # tokens in scripts the default font lacks are drawn as boxes
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(self.out / name, dpi=self.dpi)
        return Shown(name, captions[template].format(**fields), list(findings))


def _reconstruction(page: Page, plots) -> Section:
    r = reconstruct(page.model, page.tokens, top_fraction=page.top_fraction)
    x, y = (r.labels[k] for k in r.pair)
    per_block = Table("Per block", ["block", "max abs error vs next input", "relative error", "max abs error vs "
                                    "hidden_states[L+1]", "Pearson r (next state)", "r, outliers left out"],
                      [[f"b{b}", r.max_abs_error_next[b].item(), r.rel_error_next[b].item(),
                        r.max_abs_error_hidden[b].item(), r.pearson_r[b].item(), r.pearson_r_kept[b].item()]
                       for b in range(len(r.rel_error_next))])
    return page.section(
        "reconstruction", [page.figure("reconstruction", plots.plot_reconstruction(r), r.findings, x=x, y=y,
                                       top_fraction=r.top_fraction)],
        r.findings, [per_block],
        {"pair": [x, y], "n_points": r.n_points, "n_left_out": r.n_left_out, "range_all": r.range_all,
         "range_kept": r.range_kept, "outliers": r.outliers, "top_fraction": r.top_fraction})


def _final_norm(page: Page, plots) -> Section:
    f = check_final_norm(page.model, page.tokens)
    rows = [[f"hidden_states[{b + 1}] vs output of b{b}", f.block_diff[b].item()] for b in range(len(f.labels))]
    rows += [["ln_f(last output) vs hidden_states[-1]", f.ln_f_diff], ["std of the raw last output", f.raw_last_std],
             ["std of hidden_states[-1]", f.normalised_last_std]]
    return page.section(
        "final_norm", [page.figure("final_norm", plots.plot_final_norm(f), f.findings)], f.findings,
        [Table("Differences", ["comparison", "max |difference|"], rows)],
        {"penultimate_diff": f.penultimate_diff, "last_diff": f.last_diff, "ln_f_diff": f.ln_f_diff})


def _interventions(page: Page, plots) -> Section:
    iv = intervene(page.model, page.tokens, block=page.block, head=page.head)
    n = page.model.cfg.n_layer
    # Each edit's findings under keys of their own (name.key): the section holds all four edits' claims.
    named = {item.name: [Finding(f"{item.name}.{x.key}", x.claim, x.holds, x.detail, x.needs_trained)
                         for x in item.findings] for item in iv.results}
    figures = [page.figure("interventions", plots.plot_interventions_overview(iv), block=iv.block)]
    figures += [page.figure("interventions", plots.plot_intervention(iv, item.name), named[item.name],
                            file="intervention_{name}.png", name=item.name, title=item.title) for item in iv.results]
    last = n  # index of the last block's raw output among iv.labels
    impact = Table("Impact of each edit", ["edit", "KL at last token (nats)", "mean KL over tokens", "top-1 clean",
                                           "top-1 edited", "tokens whose top-1 changed", f"std ratio at b{iv.block}",
                                           f"std ratio at b{n - 1}", "std ratio after ln_f"],
                   [[item.title, item.kl_last, item.kl_mean, item.top1_clean, item.top1_edited,
                     f"{item.top1_changed_fraction:.0%}", item.std_ratio[iv.block + 1].item(),
                     item.std_ratio[last].item(), item.std_ratio[-1].item()] for item in iv.results])
    per_layer = Table("Std per layer", ["layer", "clean", *(item.name for item in iv.results)],
                      [[label, iv.clean_std[k].item(), *(item.std[k].item() for item in iv.results)]
                       for k, label in enumerate(iv.labels)])
    data = {"labels": iv.labels, "block": iv.block, "head": iv.head, "clean_std": iv.clean_std,
            "clean_mean_abs": iv.clean_mean_abs, "clean_post_gelu_near_zero": iv.clean_post_gelu_near_zero,
            "edits": {item.name: {"title": item.title, "std": item.std, "mean_abs": item.mean_abs,
                                  "std_ratio": item.std_ratio, "kl_last": item.kl_last, "kl_mean": item.kl_mean,
                                  "top1_clean": item.top1_clean, "top1_edited": item.top1_edited,
                                  "top1_changed": item.top1_changed,
                                  "top1_changed_fraction": item.top1_changed_fraction} for item in iv.results}}
    return page.section("interventions", figures, [x for item in iv.results for x in named[item.name]],
                        [impact, per_layer], data, block=iv.block, head=iv.head)


def _distributions(page: Page, plots) -> Section:
    d = measure_distributions(page.model, page.tokens)
    skipped = "the first token left out" if d.first_token else "every token"

    def about(*keys: str) -> list[Finding]:
        return [x for x in d.findings if x.key in keys]

    figures = [page.figure("distributions", plots.plot_by_token(d), about("first_token"), file="values_by_token.png",
                           skipped=skipped),
               page.figure("distributions", plots.plot_by_dimension(d), file="values_by_dimension.png"),
               page.figure("distributions", plots.plot_layer_matrices(d), about("shared_variance", "gradual"),
                           file="layer_matrices.png"),
               page.figure("distributions", plots.plot_histograms(d), about("tails"), file="histograms.png")]
    per_layer = Table("Per layer", ["layer", "std", "99.9th pct |value|", "max |value| at token 0",
                                    "max |value| elsewhere"],
                      [[d.labels[k], d.std[k].item(), d.tail[k].item(), d.first_token_max[k].item(),
                        d.rest_max[k].item()] for k in range(len(d.labels))])
    return page.section("distributions", figures, d.findings, [per_layer],
                        {"labels": d.labels, "first_token": d.first_token, "covariance": d.covariance, "r2": d.r2,
                         "bin_edges": d.bin_edges, "counts": d.counts}, skipped=skipped)


def _logit_lens(page: Page, plots) -> Section:
    ll = lens(page.model, page.tokens)
    k = ll.top_probs.shape[1]
    per_layer = Table("Per layer", ["layer", f"p({ll.target_token})", "rank", "KL(final || layer)", "top tokens"],
                      [[ll.labels[i], ll.target_prob[i].item(), int(ll.target_rank[i]), ll.kl_to_final[i].item(),
                        ", ".join(f"{t} {p:.2f}" for t, p in zip(ll.top_tokens[i], ll.top_probs[i].tolist()))]
                       for i in range(len(ll.labels))])
    return page.section(
        "logit_lens", [page.figure("logit_lens", plots.plot_logit_lens(ll), ll.findings, k=k)], ll.findings,
        [per_layer],
        {"labels": ll.labels, "position": ll.position, "target_token": ll.target_token, "target_id": ll.target_id,
         "target_prob": ll.target_prob, "target_rank": ll.target_rank, "kl_to_final": ll.kl_to_final,
         "top_tokens": ll.top_tokens, "top_probs": ll.top_probs, "final_max_diff": ll.final_max_diff},
        target=ll.target_token)


def _attribution(page: Page, plots) -> Section:
    a = attribute(page.model, page.tokens)
    tables = [Table("Largest parts", ["part", "contribution"], [[name, value] for name, value in a.top(10)]),
              Table("Sum", ["logit", "sum of parts", "|error|", "ln_f scale σ"],
                    [[a.logit, a.contributions.sum().item(), a.sum_error, a.scale]])]
    return page.section(
        "attribution", [page.figure("attribution", plots.plot_attribution(a), a.findings)], a.findings, tables,
        {"target_token": a.target_token, "target_id": a.target_id, "logit": a.logit, "scale": a.scale,
         "parts": dict(zip(a.names, a.contributions.tolist())), "sum_error": a.sum_error},
        target=a.target_token, scale=a.scale)


# The page's sections in order, each built by one function from the Page (and the plots module).
BUILDERS: dict[str, Callable[[Page, object], Section]] = {
    "reconstruction": _reconstruction, "final_norm": _final_norm, "interventions": _interventions,
    "distributions": _distributions, "logit_lens": _logit_lens, "attribution": _attribution,
}


def build_report(model: GPT, text: str | list | torch.Tensor, out_dir: str | Path, *, block: int | None = None,
                 head: int | None = None, top_fraction: float = 0.01, random_weights: bool | None = None,
                 progress: Progress | None = None, dpi: int = 100) -> dict:
    """Run every probe on ``text`` and write the report into ``out_dir``; returns the JSON payload.

    block, head: where the interventions act (``probes.interventions.site``: by default the notes'
    block 9 and head 2, or the same depth in a shallower model). random_weights: whether to flag the weights
    as random on the page (default: read from model.source).
    """
    from . import plots  # matplotlib only when figures are made

    say = progress or stderr_progress()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory for the report")
    tokens = single_sequence(model, text)
    block, head = site(model, block, head)  # a block or head the model lacks fails now, not after minutes
    out.mkdir(parents=True, exist_ok=True)
    page = Page(model, tokens, out, block, head, top_fraction, dpi)
    started = time.perf_counter()
    say(f"report on {tokens.shape[1]} tokens with {getattr(model, 'source', 'a model')}; writing to {out}/")
    sections = []
    for step, (id, build) in enumerate(BUILDERS.items(), 1):
        say(f"[{step}/{len(BUILDERS)}] {PROSE[id].step}")
        sections.append(build(page, plots))
    payload = _payload(model, tokens, sections, is_random(model) if random_weights is None else random_weights)
    payload["seconds"] = round(time.perf_counter() - started, 2)
    payload = _json_ready(payload)
    (out / "report.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False, allow_nan=False),
                                     encoding="utf-8")
    (out / "index.html").write_text(render_html(payload), encoding="utf-8")
    say(f"done in {payload['seconds']:.1f}s: {out / 'index.html'}")
    return payload


def _payload(model: GPT, tokens: torch.Tensor, sections: list[Section], random_weights: bool) -> dict:
    """Everything the page shows, as one JSON-able dict (the page is rendered from it alone)."""
    return {
        "model": {"source": getattr(model, "source", ""), "random_weights": random_weights,
                  "dtype": str(model.unembedding.dtype).removeprefix("torch."),
                  "config": {k: getattr(model.cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")}},
        "text": decode_text(model, tokens[0].tolist()), "n_tokens": tokens.shape[1],
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "trained_only": sorted({x.claim for s in sections for x in s.findings if x.needs_trained}),
        "sections": [{"id": s.id, "title": s.title, "intro": s.intro,
                      "figures": [{"file": shown.file, "caption": shown.caption,
                                   "findings": [x.key for x in shown.findings]} for shown in s.figures],
                      "findings": [{"key": x.key, "claim": x.claim, "holds": x.holds, "detail": x.detail,
                                    "needs_trained_weights": x.needs_trained} for x in s.findings],
                      "verdict": verdict_of(s.findings),
                      "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for t in s.tables],
                      "data": s.data} for s in sections],
    }


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1500px; margin: 1em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #555; } .text { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; }
.random { background: #fde2e1; border: 3px solid #c0392b; padding: 0.8em 1.2em; margin: 1em 0; }
.random h2 { border: none; margin: 0 0 0.3em 0; color: #c0392b; }
.small { background: #fff4d6; border-color: #b7791f; }
.small h2 { color: #8a5a00; }
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
        parts.append(f"<div class='random'>{RANDOM_WEIGHTS_BANNER}<ul>{items}</ul></div>")
    elif is_shipped_small_model(m["source"]):
        parts.append(f"<div class='random small'>{SMALL_MODEL_BANNER.format(source=html.escape(m['source']))}</div>")
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
