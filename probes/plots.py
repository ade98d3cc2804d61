"""Figures for the probes' data: each function takes one probe's result and returns a Figure.

matplotlib is installed with minigpt-taps; only this module imports it (lazily, so the rest of
probes works without it), and it draws on the Agg canvas (no display, no pyplot global state).
"""
from __future__ import annotations

import math

import torch

from minigpt import Trace
from minigpt.errors import InputError, MiniGPTError

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise MiniGPTError("the figures need matplotlib, a dependency of minigpt-taps: pip install matplotlib") from e

from ._common import check_index
from .attention_view import attention_pattern
from .attribution import Attribution
from .distributions import Distributions
from .final_norm import FinalNorm
from .induction import Induction
from .interventions import Interventions
from .logit_lens import LogitLens
from .reconstruction import Reconstruction
from .sink import AttentionSink

ZERO_FLOOR = 1e-16  # where an exact 0 is drawn on a log axis
CLEAN, EDITED = "#1f77b4", "#d62728"


def new_figure(width: float, height: float) -> Figure:
    """A Figure on the Agg canvas (so savefig works without pyplot)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _ticks(ax, labels: list[str], rotate: bool = True) -> None:
    """Label the x axis with state names, thinning them when there are many."""
    step = max(1, math.ceil(len(labels) / 26))
    positions = list(range(0, len(labels), step))
    crowded = sum(len(labels[i]) + 2 for i in positions) > 70
    ax.set_xticks(positions, [labels[i] for i in positions], rotation=90 if rotate and crowded else 0, fontsize=8)


def plot_reconstruction(r: Reconstruction) -> Figure:
    """Three panels: reconstruction error per block (log, exact 0 at 1e-16), Pearson r of consecutive
    states, and the scatter of the chosen pair with the y = x line."""
    fig = new_figure(15, 4.4)
    err, corr, scatter = fig.subplots(1, 3)
    blocks = list(range(len(r.max_abs_error_next)))
    err.plot(blocks, r.max_abs_error_next.clamp_min(ZERO_FLOOR), "o-", label="vs next block's input (resid_pre)")
    err.plot(blocks, r.max_abs_error_hidden.clamp_min(ZERO_FLOOR), "s--", mfc="none",
             label="vs HF hidden_states[L+1] (last: after ln_f)")
    err.set_yscale("log")
    err.set_ylim(ZERO_FLOOR / 10, max(1.0, 10 * float(r.max_abs_error_next.max())))
    err.set_xticks(blocks, [f"b{i}" for i in blocks], fontsize=8, rotation=90 if len(blocks) > 14 else 0)
    err.set_xlabel("block L")
    err.set_ylabel("max |input + attn_delta + mlp_delta - target|")
    err.set_title(f"Reconstruction law (exact 0 drawn at {ZERO_FLOOR:g})")
    err.legend(fontsize=8)

    pairs = [f"{r.labels[i]}→{r.labels[i + 1]}" for i in blocks]
    corr.plot(blocks, r.pearson_r, "o-", label="every point")
    corr.plot(blocks, r.pearson_r_kept, "s--", mfc="none", label=f"outliers left out ({r.outliers})")
    _ticks(corr, pairs)
    corr.set_ylabel("Pearson r")
    corr.set_title("Correlation of consecutive residual states")
    corr.legend(fontsize=8)

    i, j = r.pair
    scatter.scatter(r.x, r.y, s=2, alpha=0.3, color=CLEAN, rasterized=True)
    low = float(min(r.x.min(), r.y.min())) if r.x.numel() else -1.0
    high = float(max(r.x.max(), r.y.max())) if r.x.numel() else 1.0
    scatter.plot([low, high], [low, high], "k--", lw=1, label="y = x")
    scatter.set_xlabel(f"{r.labels[i]} value")
    scatter.set_ylabel(f"{r.labels[j]} value")
    kept_r = r.pearson_r_kept[j - 1].item() if j == i + 1 else float("nan")
    scatter.set_title(f"{r.labels[i]} vs {r.labels[j]}: r = {kept_r:.4f}, {r.n_left_out} outliers left out")
    scatter.legend(fontsize=8)
    return fig


def plot_final_norm(f: FinalNorm) -> Figure:
    """Bars: max |hidden_states[i+1] - resid_post[i]| per block, then |ln_f(last) - hidden_states[-1]|."""
    fig = new_figure(max(7.0, 0.45 * len(f.labels) + 3), 4.2)
    ax = fig.subplots()
    values = [*f.block_diff.tolist(), f.ln_f_diff]
    names = [*f.labels, "ln_f(last)"]
    colors = ["#7f7f7f"] * (len(f.labels) - 1) + [EDITED, "#2ca02c"]
    bars = ax.bar(range(len(values)), values, color=colors)
    for bar, value in zip(bars, values):
        ax.annotate("0" if value == 0 else f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    _ticks(ax, names)
    ax.set_ylabel("max |difference|")
    ax.set_title("hidden_states[i+1] vs block i's output: 0 except at the last block; ln_f(last) restores 0")
    ax.set_ylim(0, max(values) * 1.15 if max(values) > 0 else 1)
    return fig


def plot_intervention(run: Interventions, name: str) -> Figure:
    """Two panels for one exercise: std and mean |value| per state, clean vs edited (log y)."""
    item = run[name]
    fig = new_figure(12, 4.2)
    axes = fig.subplots(1, 2)
    x = list(range(len(run.labels)))
    for ax, clean, edited, what in ((axes[0], run.clean_std, item.std, "std"),
                                    (axes[1], run.clean_mean_abs, item.mean_abs, "mean |value|")):
        ax.plot(x, clean, "o-", color=CLEAN, label="clean")
        ax.plot(x, edited, "s--", color=EDITED, label="edited")
        ax.axvline(item.block + 1, color="grey", lw=1, ls=":", label=f"edited block b{item.block}")
        ax.set_yscale("log")
        _ticks(ax, run.labels)
        ax.set_xlabel("state (emb, block outputs, ln_f = HF hidden_states[-1])")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    axes[0].set_title(item.title, fontsize=10)
    axes[1].set_title(f"KL(clean||edited) at the last token {item.kl_last:.3g} nats; top-1 "
                      f"{item.top1_clean} → {item.top1_edited}", fontsize=10)
    return fig


def plot_interventions_overview(run: Interventions) -> Figure:
    """One panel: edited / clean std per state for every exercise (log y; 1 = no change)."""
    fig = new_figure(8, 4.2)
    ax = fig.subplots()
    x = list(range(len(run.labels)))
    for item in run.results:
        ax.plot(x, item.std_ratio, "o-", ms=3, label=item.title)
    ax.axhline(1, color="k", lw=0.8)
    ax.axvline(run.block + 1, color="grey", lw=1, ls=":")
    ax.set_yscale("log")
    _ticks(ax, run.labels)
    ax.set_ylabel("std edited / std clean")
    ax.set_title("Downstream spread after each intervention")
    ax.legend(fontsize=7)
    return fig


def default_layers(d: Distributions) -> list[int]:
    """Embeddings, a middle block, the last raw block output in HF's list, and ln_f's output."""
    L = len(d.labels)
    return sorted({0, L // 2, max(L - 2, 0), L - 1})


def _scatter_grid(d: Distributions, layers: list[int] | None, by: str, max_points: int) -> Figure:
    layers = default_layers(d) if layers is None else layers
    fig = new_figure(4 * len(layers), 3.6)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers):
        x, y = d.by_token(layer) if by == "token" else d.by_dimension(layer)
        if x.numel() > max_points:  # a seeded sample keeps long texts quick to draw
            pick = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:max_points]
            x, y = x[pick], y[pick]
        ax.scatter(x, y, s=1, alpha=0.3, rasterized=True)
        ax.set_title(f"{d.labels[layer]}", fontsize=10)
        ax.set_xlabel("token index" if by == "token" else "dimension")
    axes[0].set_ylabel("activation value")
    skipped = "first token left out" if d.first_token else "every token"
    fig.suptitle(f"Activation value by {'token index' if by == 'token' else 'dimension'} ({skipped})")
    return fig


def plot_by_token(d: Distributions, layers: list[int] | None = None, max_points: int = 40_000) -> Figure:
    """Value vs token index, one panel per chosen layer (default: emb, middle, last block, ln_f)."""
    return _scatter_grid(d, layers, "token", max_points)


def plot_by_dimension(d: Distributions, layers: list[int] | None = None, max_points: int = 40_000) -> Figure:
    """Value vs dimension, one panel per chosen layer."""
    return _scatter_grid(d, layers, "dimension", max_points)


def plot_layer_matrices(d: Distributions) -> Figure:
    """Two heatmaps: covariance and R^2 between the hidden states (numbers written in when few layers)."""
    L = len(d.labels)
    fig = new_figure(13, 5.6)
    axes = fig.subplots(1, 2)
    for ax, matrix, title, limits in ((axes[0], d.covariance, "covariance", {}),
                                      (axes[1], d.r2, "R² (squared correlation)", {"vmin": 0, "vmax": 1})):
        image = ax.imshow(matrix.numpy(), cmap="viridis", **limits)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ticks = list(range(0, L, max(1, math.ceil(L / 26))))
        ax.set_xticks(ticks, [d.labels[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [d.labels[i] for i in ticks], fontsize=7)
        ax.set_title(f"{title} between layers")
        if L <= 16:
            top = float(matrix.max())
            for (a, b), value in zip(((a, b) for a in range(L) for b in range(L)), matrix.flatten().tolist()):
                ax.text(b, a, f"{value:.2g}" if abs(value) < 100 else f"{value:.0f}", ha="center", va="center",
                        fontsize=5.5, color="black" if value > 0.6 * top else "white")
    return fig


def plot_histograms(d: Distributions) -> Figure:
    """Left: per-layer histograms on shared bins, log y, coloured by depth. Right: std and tail width."""
    from matplotlib import colormaps

    fig = new_figure(13, 4.6)
    hist, spread = fig.subplots(1, 2)
    cmap = colormaps["viridis"]
    L = len(d.labels)
    centres = ((d.bin_edges[1:] + d.bin_edges[:-1]) / 2).numpy()
    for layer in range(L):
        counts = d.counts[layer].numpy()
        hist.step(centres, counts, where="mid", color=cmap(layer / max(L - 1, 1)),
                  label=d.labels[layer] if L <= 14 else None, lw=1)
    hist.set_yscale("log")
    hist.set_xlabel("activation value")
    hist.set_ylabel("count (log)")
    hist.set_title("Histograms per layer, shared bins (dark = early, yellow = late)")
    if L <= 14:
        hist.legend(fontsize=6, ncol=2)
    x = list(range(L))
    spread.plot(x, d.tail, "o-", label="99.9th percentile of |value|")
    spread.plot(x, d.std, "s--", label="std")
    spread.set_yscale("log")
    _ticks(spread, d.labels)
    spread.set_title("How wide each layer's values reach")
    spread.legend(fontsize=8)
    return fig


def plot_induction(ind: Induction, heads: list[tuple[int, int]], patterns: torch.Tensor) -> Figure:
    """Left: every head's induction score [L, H]. Right: the patterns [k, T, T] of ``heads`` (block, head)
    on the first repeated row, the induction stripe n - 1 below the diagonal."""
    L, H = ind.scores.shape
    fig = new_figure(4 + 3.2 * len(heads), 3.8)
    axes = fig.subplots(1, 1 + len(heads), squeeze=False)[0]
    image = axes[0].imshow(ind.scores.numpy(), cmap="Reds", vmin=0, vmax=max(1e-6, ind.scores.max().item()),
                           aspect="auto")
    fig.colorbar(image, ax=axes[0], shrink=0.8)
    axes[0].set_xlabel("head")
    axes[0].set_ylabel("block")
    axes[0].set_title(f"Induction score (uniform: {ind.chance:.3f})", fontsize=10)
    for ax, (block, head), pattern in zip(axes[1:], heads, patterns):
        ax.imshow(pattern.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"b{block}.h{head}: score {ind.scores[block, head]:.2f}", fontsize=10)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    return fig


def plot_sink(s: AttentionSink) -> Figure:
    """Left: each block's attention on position 0, per head and averaged, against uniform attention.
    Right: position 0's residual norm over the others' median, per state."""
    fig = new_figure(11, 3.8)
    mass, norm = fig.subplots(1, 2)
    n, H = s.mass.shape
    blocks = [f"b{i}" for i in range(n)]
    for h in range(H):
        mass.plot(range(n), s.mass[:, h], ".", alpha=0.6, label=f"h{h}" if H <= 12 else None)
    mass.plot(range(n), s.block_mass, "o-", color="black", label="mean over heads")
    mass.axhline(s.uniform, color="grey", linestyle="--", label="uniform attention")
    mass.set_ylim(0, 1)
    _ticks(mass, blocks)
    mass.set_ylabel("attention weight on position 0")
    mass.legend(fontsize=7, ncol=2)
    norm.plot(range(len(s.labels)), s.norm_ratio, "o-")
    norm.axhline(1, color="grey", linestyle="--")
    _ticks(norm, s.labels)
    norm.set_ylabel("|x_0| / median |x_i|")
    norm.set_title("Norm of the first position's residual against the rest", fontsize=10)
    return fig


def plot_logit_lens(lens: LogitLens) -> Figure:
    """Left: probability of the final prediction per state (log y). Right: the top tokens per state."""
    L, k = lens.top_probs.shape
    fig = new_figure(14, max(4.0, 0.32 * L + 1.5))
    prob, grid = fig.subplots(1, 2, width_ratios=[1, 1.4])
    x = list(range(L))
    prob.plot(x, lens.target_prob, "o-")
    prob.set_yscale("log")
    _ticks(prob, lens.labels)
    prob.set_ylabel(f"p({lens.target_token})")
    prob.set_title(f"Logit lens: probability of the final prediction {lens.target_token}", fontsize=10)
    grid.imshow(lens.top_probs.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for row in range(L):
        for col in range(k):
            p = lens.top_probs[row, col].item()
            grid.text(col, row, f"{lens.top_tokens[row][col][:14]} {p:.2g}", ha="center", va="center", fontsize=7,
                      color="white" if p > 0.6 else "black")
    grid.set_yticks(x, lens.labels, fontsize=7)
    grid.set_xticks(range(k), [f"top {c + 1}" for c in range(k)], fontsize=8)
    grid.set_title(f"Top {k} next tokens per state (position {lens.position})", fontsize=10)
    return fig


def plot_attribution(a: Attribution) -> Figure:
    """Left: each head's direct contribution (diverging colours around 0). Right: attention and MLP per block."""
    n, H = a.heads.shape
    fig = new_figure(14, max(4.2, 0.3 * n + 1.8))
    heat, bars = fig.subplots(1, 2)
    limit = max(float(a.heads.abs().max()), 1e-12)
    image = heat.imshow(a.heads.numpy(), cmap="RdBu_r", norm=TwoSlopeNorm(0, -limit, limit), aspect="auto")
    fig.colorbar(image, ax=heat, shrink=0.8)
    heat.set_xlabel("head")
    heat.set_ylabel("block")
    heat.set_yticks(range(n), [f"b{i}" for i in range(n)], fontsize=7)
    heat.set_xticks(range(H), range(H), fontsize=7)
    heat.set_title(f"Direct contribution of each head to the logit of {a.target_token}", fontsize=10)
    attn = (a.heads.sum(dim=1) + a.attn_bias).numpy()
    blocks = torch.arange(n).numpy()
    bars.bar(blocks - 0.2, attn, width=0.4, label="attention (heads + bias)")
    bars.bar(blocks + 0.2, a.mlp.numpy(), width=0.4, label="MLP")
    bars.axhline(0, color="k", lw=0.8)
    bars.set_xticks(blocks, [f"b{i}" for i in blocks], fontsize=7, rotation=90 if n > 14 else 0)
    bars.set_ylabel("contribution to the logit")
    bars.set_title(f"Attention and MLP per block. logit {a.logit:.3f} = embed {a.embed:+.3f} + pos "
                   f"{a.pos_embed:+.3f}\n+ blocks {float(a.heads.sum() + a.attn_bias.sum() + a.mlp.sum()):+.3f} "
                   f"+ ln_f bias {a.ln_f_bias:+.3f}   (ln_f scale frozen at σ = {a.scale:.4g})", fontsize=9)
    bars.legend(fontsize=8)
    return fig


def plot_attention(trace_or_patterns: Trace | torch.Tensor, tokens: list[str], layers: list[int] | None = None,
                   heads: list[int] | None = None) -> Figure:
    """A grid of attention patterns, one row per layer and one column per head, the tokens on both axes.

    trace_or_patterns: a one-sequence Trace with ``blocks.L.attn.pattern`` recorded for the layers shown,
    or the patterns as a tensor [n_layer, H, Q, K]. tokens: Q labels (e.g. ``model.str_tokens(text)``).
    layers, heads: which to draw (default: every recorded layer, every head); each cell is [Q, K].
    """
    is_trace = isinstance(trace_or_patterns, Trace)

    def pattern(layer: int) -> torch.Tensor:  # [H, Q, K]
        return attention_pattern(trace_or_patterns, layer) if is_trace else trace_or_patterns[layer]

    if not is_trace and not (isinstance(trace_or_patterns, torch.Tensor) and trace_or_patterns.dim() == 4):
        raise InputError("plot_attention takes a Trace with attn.pattern recorded or patterns [n_layer, H, Q, K], got "
                         f"{getattr(trace_or_patterns, 'shape', type(trace_or_patterns).__name__)}")
    recorded = ([int(name.split(".")[1]) for name in trace_or_patterns if name.endswith(".attn.pattern")]
                if is_trace else list(range(trace_or_patterns.shape[0])))
    if not recorded:
        raise InputError("this trace holds no attention pattern; run with taps=['blocks.*.attn.pattern']")
    n_layer = trace_or_patterns.n_layer if is_trace else trace_or_patterns.shape[0]
    layers = recorded if layers is None else [check_index("layer", layer, n_layer) for layer in layers]
    n_head, Q, K = pattern(layers[0]).shape
    heads = list(range(n_head)) if heads is None else [check_index("head", h, n_head) for h in heads]
    if len(tokens) != Q:
        raise InputError(f"tokens must label the {Q} positions of the pattern, got {len(tokens)} labels")
    side = min(3.2, max(1.8, 0.12 * Q))
    fig = new_figure(side * len(heads) + 1.2, side * len(layers) + 0.6)
    axes = fig.subplots(len(layers), len(heads), squeeze=False)
    step = max(1, math.ceil(Q / 24))
    labels = [t.replace("\n", "\\n") for t in tokens]
    for row, layer in zip(axes, layers):
        weights = pattern(layer).detach().to("cpu", torch.float32)
        for ax, head in zip(row, heads):
            image = ax.imshow(weights[head].numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"b{layer}.h{head}", fontsize=9)
            ax.set_xticks(range(0, K, step), labels[:K:step], rotation=90, fontsize=6)
            ax.set_yticks(range(0, Q, step), labels[::step], fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle("Attention patterns (rows: queries, columns: keys)")
    return fig
