"""The one-command report: every probe on one text, as PNG figures, index.html and report.json.

``build_report(model, text, out_dir)`` writes::

    out_dir/index.html    every figure with a one-line caption and the checked claims beside it
    out_dir/report.json   every number, table and verdict the page shows (same source as the page)
    out_dir/*.png         the figures

The page and the JSON are rendered from the same section records, so they cannot disagree.
This module runs the probes and builds the sections; ``report_page`` holds their words and renders the page.
"""
from __future__ import annotations

import datetime
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

from ._common import Finding, decode_text, record, single_sequence, verdict_of
from .attention_view import MAX_TOKENS, write_attention_view
from .attribution import attribute
from .distributions import measure_distributions
from .final_norm import check_final_norm
from .induction import induction_findings, induction_scores
from .interventions import intervene, site
from .logit_lens import lens
from .reconstruction import reconstruct
from .sink import attention_sink
from .report_page import PROSE, render_html

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
    """Whether the model carries random (untrained) weights, as its ``provenance`` says."""
    provenance = getattr(model, "provenance", "")
    return "RANDOM" in provenance or "untrained" in provenance


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
    named = {item.name: [Finding(f"{item.name}.{x.key}", x.claim, x.holds, x.detail, x.needs_trained, x.testable)
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


INDUCTION_N, INDUCTION_BATCH, TOP_HEADS = 20, 4, 3  # repeated halves of 20 random tokens: fits 41+ positions


def _induction(page: Page, plots) -> Section:
    model = page.model
    n = min(INDUCTION_N, model.cfg.n_positions // 2)
    ind = induction_scores(model, n=n, batch=INDUCTION_BATCH)
    findings = induction_findings(ind)
    H = model.cfg.n_head
    order = ind.scores.flatten().argsort(descending=True)[:min(TOP_HEADS, ind.scores.numel())].tolist()
    heads = [(i // H, i % H) for i in order]
    _, trace = record(model, ind.tokens[:1], [f"blocks.{b}.attn.pattern" for b in sorted({b for b, _ in heads})])
    patterns = torch.stack([trace[f"blocks.{b}.attn.pattern"][0, h] for b, h in heads])  # [k, T, T]
    scores = Table("Induction score per head", ["block", *(f"h{h}" for h in range(H))],
                   [[f"b{b}", *ind.scores[b].tolist()] for b in range(len(ind.scores))])
    losses = Table("Loss on the repeated tokens", ["half", "mean loss (nats)"],
                   [["first", ind.loss_first.mean().item()], ["repeat", ind.induction_loss]])
    return page.section(
        "induction", [page.figure("induction", plots.plot_induction(ind, heads, patterns), findings, n=n,
                                  top=len(heads))], findings, [scores, losses],
        {"n": n, "batch": INDUCTION_BATCH, "chance": ind.chance, "scores": ind.scores,
         "top_heads": [f"b{b}.h{h}" for b, h in heads], "loss_first": ind.loss_first.mean().item(),
         "loss_repeat": ind.induction_loss}, n=n, batch=INDUCTION_BATCH, chance=ind.chance)


def _attention_sink(page: Page, plots) -> Section:
    s = attention_sink(page.model, page.tokens)
    per_block = Table("Per block", ["block", "mean weight on position 0", "heaviest head's"],
                      [[f"b{b}", s.block_mass[b].item(), s.mass[b].max().item()] for b in range(len(s.mass))])
    norms = Table("Residual norm", ["state", "position 0", "median of the rest", "ratio"],
                  [[s.labels[k], s.first_norm[k].item(), s.rest_norm[k].item(), s.norm_ratio[k].item()]
                   for k in range(len(s.labels))])
    return page.section("attention_sink", [page.figure("attention_sink", plots.plot_sink(s), s.findings)],
                        s.findings, [per_block, norms],
                        {"mass": s.mass, "uniform": s.uniform, "labels": s.labels, "first_norm": s.first_norm,
                         "rest_norm": s.rest_norm}, uniform=s.uniform)


# The page's sections in order, each built by one function from the Page (and the plots module).
BUILDERS: dict[str, Callable[[Page, object], Section]] = {
    "reconstruction": _reconstruction, "final_norm": _final_norm, "interventions": _interventions,
    "distributions": _distributions, "logit_lens": _logit_lens, "attribution": _attribution,
    "induction": _induction, "attention_sink": _attention_sink,
}


def build_report(model: GPT, text: str | list | torch.Tensor, out_dir: str | Path, *, block: int | None = None,
                 head: int | None = None, top_fraction: float = 0.01, random_weights: bool | None = None,
                 progress: Progress | None = None, dpi: int = 100) -> dict:
    """Run every probe on ``text`` and write the report into ``out_dir``; returns the JSON payload.

    block, head: where the interventions act (``probes.interventions.site``: by default the notes'
    block 9 and head 2 (docs/NOTES.md, section 3), or the same depth in a shallower model).
    random_weights: whether to flag the weights as random on the page (default: read from model.provenance).
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
    say(f"report on {tokens.shape[1]} tokens with {getattr(model, 'provenance', 'a model')}; writing to {out}/")
    sections = []
    for step, (id, build) in enumerate(BUILDERS.items(), 1):
        say(f"[{step}/{len(BUILDERS)}] {PROSE[id].step}")
        sections.append(build(page, plots))
    payload = _payload(model, tokens, sections, is_random(model) if random_weights is None else random_weights)
    if tokens.shape[1] <= MAX_TOKENS:  # the view grows as tokens²: a longer text gets the figures alone
        say("attention view: every head's pattern, with the logit lens and attribution at each position")
        payload["attention_view"] = write_attention_view(model, tokens, out / "attention.html").name
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
        "model": {"source": getattr(model, "provenance", ""), "random_weights": random_weights,
                  "dtype": str(model.unembedding.dtype).removeprefix("torch."),
                  "config": {k: getattr(model.cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")}},
        "text": decode_text(model, tokens[0].tolist()), "n_tokens": tokens.shape[1],
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "trained_only": sorted({x.claim for s in sections for x in s.findings if x.needs_trained}),
        "sections": [{"id": s.id, "title": s.title, "intro": s.intro,
                      "figures": [{"file": shown.file, "caption": shown.caption,
                                   "findings": [x.key for x in shown.findings]} for shown in s.figures],
                      "findings": [{"key": x.key, "claim": x.claim, "holds": x.holds, "detail": x.detail,
                                    "needs_trained_weights": x.needs_trained, "testable": x.testable} for x in s.findings],
                      "verdict": verdict_of(s.findings),
                      "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for t in s.tables],
                      "data": s.data} for s in sections],
    }
