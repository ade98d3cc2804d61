"""The report's words and its page: each section's prose, the banners, and index.html rendered from
report.json's payload alone (so every number the page shows is in the JSON)."""
from __future__ import annotations

import html
from dataclasses import dataclass

from minigpt.weights import SHIPPED_MARK


def is_shipped_small_model(source: str) -> bool:
    """Whether ``source`` (a model's) names a small model shipped with minigpt (weights.shipped_description)."""
    return SHIPPED_MARK in source


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
        {"final_norm.png": "Max |hidden_states[i+1] − block i's output| per block; the last column, ln_f(last), "
                           "compares ln_f(last block's output) with hidden_states[−1] (a 0 has no bar)."}),
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
         "values_by_dimension.png": "Activation value against dimension for the same layers and tokens: each "
                                    "column of dots is one dimension.",
         "layer_matrices.png": "Covariance and R² between every pair of layers.",
         "histograms.png": "Histograms of each layer's values on shared bins with a log y axis (tails), and their "
                           "width per layer (the 99.9th percentile of |value| and the std)."}),
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
    "induction": Prose(
        "induction heads on repeated random tokens",
        "7. Induction heads (beyond the notes)",
        "Not the text above: {batch} rows of {n} random tokens, each repeated once. A head that does induction "
        "looks, from a token of the repeat, at the token that followed its first occurrence; its score is the "
        "weight on that key (uniform attention scores {chance:.3f}). A model that copies in context predicts "
        "the repeat far better than the first half.",
        {"induction.png": "Left: every head's induction score. Right: the patterns of the {top} best heads on the "
                          "first row (the stripe {n} - 1 below the diagonal is induction)."}),
    "attention_sink": Prose(
        "attention sink",
        "8. The first token: attention sink and residual norm (beyond the notes)",
        "Trained GPT-2s park attention on the first position when a head has nothing to read, and the first "
        "position's residual grows far larger than the others'. Per block: the attention weight on position 0 "
        "(uniform attention gives {uniform:.3f} on this text), and position 0's residual norm against the rest.",
        {"sink.png": "Left: attention weight on position 0 per block (dots: heads, line: their mean). Right: the "
                     "first position's residual norm over the others' median, per state."}),
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


# Narrow screens: the page reflows (figures beside their findings where there is room, below them where
# not; wide tables scroll inside their own box) and a figure is never drawn larger than its PNG.
CSS = """
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body { font-family: system-ui, sans-serif; max-width: 1500px; margin: 1em auto; padding: 0 1em; color: #222;
       overflow-wrap: break-word; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #555; } .text { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; }
.random { background: #fde2e1; border: 3px solid #c0392b; padding: 0.8em 1.2em; margin: 1em 0; }
.random h2 { border: none; margin: 0 0 0.3em 0; color: #c0392b; }
.small { background: #fff4d6; border-color: #b7791f; }
.small h2 { color: #8a5a00; }
.figure { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; margin: 1.2em 0; }
.figure img { display: block; box-sizing: border-box; max-width: 100%; height: auto; min-width: 0; flex: 0 1 auto;
              border: 1px solid #ddd; }
.side { flex: 1 1 18em; min-width: 0; max-width: 100%; }
.scroll { max-width: 100%; overflow-x: auto; }
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
    if not x.get("testable", True):
        mark = "not testable on this model"
    tag = ' <span class="tag">needs trained weights</span>' if x["needs_trained_weights"] else ""
    return (f'<div class="finding {cls}"><b>{mark}</b>: {html.escape(x["claim"])}{tag}<br>'
            f'<small>{html.escape(x["detail"])}</small></div>')


def _table_html(t: dict) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t["columns"])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in t["rows"])
    return f"<h4>{html.escape(t['title'])}</h4><div class='scroll'><table><tr>{head}</tr>{rows}</table></div>"


def render_html(p: dict) -> str:
    """The page, from the JSON payload alone (so every number shown is in report.json)."""
    m = p["model"]
    cfg = m["config"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             "<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>minigpt report</title><style>{CSS}</style>"
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
                      f"{sum(x['holds'] is None for x in s['findings'])} measured or not testable</li>"
                      for s in p["sections"])
    parts.append(f"<h3>Contents</h3><ul>{summary}</ul>"
                 "<p class='meta'>Layer names: emb = embeddings (token + position), bN = output of block N, "
                 "ln_f = the final LayerNorm's output (HuggingFace's hidden_states[-1]).</p>")
    if p.get("attention_view"):
        parts.append(f"<p><a href='{html.escape(p['attention_view'])}'><b>Attention, seen</b></a>: every block's and "
                     "head's attention pattern over the tokens, beside the logit lens and the direct logit attribution "
                     "at each position (an interactive page).</p>")
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
