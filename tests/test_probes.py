"""Each probe's numbers against an independent computation, and each figure's axes and data.

Small random models whose every parameter (biases and LayerNorm weights included) is drawn at
random, so that no check can pass thanks to a zero bias or a unit LayerNorm weight.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import probes
from minigpt import GPT, GPTConfig, edits
from minigpt.errors import InputError, MiniGPTError

TOKENS = [5, 17, 3, 42, 8, 91, 23, 7, 64, 2, 11, 30]


def random_model(n_layer: int = 3, n_head: int = 4, n_embd: int = 32, vocab: int = 97, seed: int = 0) -> GPT:
    """A small GPT with every parameter random (LayerNorm weights around 1, everything else around 0)."""
    model = GPT.random(GPTConfig(vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=n_head),
                       seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_ln_weight = (".ln" in name or name.startswith("ln_f")) and name.endswith("weight")
            param.copy_(1 + 0.3 * noise if is_ln_weight else param + 0.1 * noise)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return random_model()


def manual_states(model: GPT, tokens=TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw residual states [n+1, S, D], HF hidden states [n+1, S, D], logits [S, V]) by a plain run."""
    n = model.cfg.n_layer
    logits, tr = model.run(tokens, taps=["blocks.*.resid_pre", "blocks.*.resid_post", "ln_f"])
    raw = torch.stack([tr["blocks.0.resid_pre"][0]] + [tr[f"blocks.{i}.resid_post"][0] for i in range(n)])
    hidden = torch.stack([h[0] for h in tr.hidden_states()])
    return raw, hidden, logits[0]


# --- reconstruction -------------------------------------------------------------------------------

def test_reconstruction_errors_vanish_and_r_matches_numpy(model):
    r = probes.reconstruct(model, TOKENS, outliers="none")
    n = model.cfg.n_layer
    assert r.max_abs_error_next.shape == (n,) and r.rel_error_next.shape == (n,)
    assert r.max_abs_error_next.max() <= 1e-5 and r.rel_error_next.max() <= 1e-6
    assert r.max_abs_error_hidden.max() <= 1e-5 and r.rel_error_hidden.max() <= 1e-6
    raw, _, _ = manual_states(model)
    for layer in range(n):
        expected = np.corrcoef(raw[layer].flatten().numpy(), raw[layer + 1].flatten().numpy())[0, 1]
        assert r.pearson_r[layer].item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(r.pearson_r, r.pearson_r_kept)  # nothing left out
    assert r.pair == (n - 1, n) and r.n_left_out == 0
    # The scatter holds exactly the pair's values, in some order.
    assert torch.equal(r.x.sort().values, raw[n - 1].flatten().sort().values)
    assert torch.equal(r.y.sort().values, raw[n].flatten().sort().values)
    law = next(f for f in r.findings if f.key == "law")
    assert law.holds is True


def test_reconstruction_outlier_rules(model):
    S, D = len(TOKENS), model.cfg.n_embd
    first = probes.reconstruct(model, TOKENS, outliers="first_token")
    assert first.n_left_out == D and first.x.numel() == (S - 1) * D
    top = probes.reconstruct(model, TOKENS, outliers="top", top_fraction=0.05)
    dropped = round(0.05 * S * D)
    assert top.n_left_out == dropped and top.x.numel() == S * D - dropped
    # Every kept point is no larger than any left-out one.
    raw, _, _ = manual_states(model)
    a, b = raw[-2], raw[-1]
    magnitude = torch.maximum(a.abs(), b.abs()).flatten().sort(descending=True).values
    assert torch.maximum(top.x.abs(), top.y.abs()).max() <= magnitude[dropped - 1]
    assert top.range_kept <= top.range_all
    sampled = probes.reconstruct(model, TOKENS, outliers="none", max_points=50)
    assert sampled.x.numel() == 50


def test_reconstruction_bad_input(model):
    with pytest.raises(InputError, match="outlier rule"):
        probes.reconstruct(model, TOKENS, outliers="biggest")
    with pytest.raises(InputError, match="one sequence"):
        probes.reconstruct(model, [TOKENS, TOKENS])
    with pytest.raises(InputError, match="pair"):
        probes.reconstruct(model, TOKENS, pair=(0, 9))


# --- final norm -----------------------------------------------------------------------------------

def test_final_norm_verdicts(model):
    f = probes.check_final_norm(model, TOKENS)
    assert f.penultimate_diff == 0.0 and (f.block_diff[:-1] == 0).all()
    assert f.last_diff > 0.01
    assert f.ln_f_diff <= 1e-5
    assert {x.key: x.holds for x in f.findings} == {"earlier_equal": True, "last_differs": True,
                                                     "ln_f_restores": True, "normalised": True}
    raw, hidden, _ = manual_states(model)
    assert f.last_diff == pytest.approx((hidden[-1] - raw[-1]).abs().max().item())
    assert f.raw_last_std == pytest.approx(raw[-1].std().item())


def test_final_norm_one_block():
    f = probes.check_final_norm(random_model(n_layer=1), TOKENS)
    assert f.penultimate_diff is None and f.block_diff.shape == (1,)
    holds = {x.key: x.holds for x in f.findings}
    assert holds == {"earlier_equal": None, "last_differs": True, "ln_f_restores": True, "normalised": True}


# --- interventions --------------------------------------------------------------------------------

def kl_numpy(p_logits: torch.Tensor, q_logits: torch.Tensor) -> np.ndarray:
    p = torch.softmax(p_logits.double(), -1).numpy()
    q = torch.softmax(q_logits.double(), -1).numpy()
    return (p * (np.log(p) - np.log(q))).sum(-1)


def test_interventions_against_independent_runs(model):
    n = model.cfg.n_layer
    iv = probes.intervene(model, TOKENS)  # block 9 is clamped to the last block
    assert iv.block == n - 1 and iv.head == 2
    assert [r.name for r in iv.results] == ["head_keys", "mlp_noise", "scale_0.1", "scale_10"]
    assert iv.labels == ["emb", *(f"b{i}" for i in range(n)), "ln_f"]
    raw, hidden, clean_logits = manual_states(model)
    states = torch.cat([raw, hidden[-1:]])
    expected_std = np.array([np.std(s.numpy().ravel(), ddof=1) for s in states])
    np.testing.assert_allclose(iv.clean_std.numpy(), expected_std, rtol=1e-5)
    np.testing.assert_allclose(iv.clean_mean_abs.numpy(), [np.abs(s.numpy()).mean() for s in states], rtol=1e-5)

    edit_of = {"head_keys": edits.zero_head_keys(n - 1, 2), "scale_10": edits.scale_block(n - 1, 10.0),
               "mlp_noise": edits.noise_neurons(n - 1, "even", 10.0, 1.0, 0)}
    for name, edit in edit_of.items():
        logits, _ = model.run(TOKENS, edits=edit)
        kl = kl_numpy(clean_logits, logits[0])
        item = iv[name]
        # The head_keys run records the attention pattern, which takes the unfused attention path:
        # the same maths, rounded differently, so its KL agrees to float32 rounding only.
        rel = 1e-4 if name == "head_keys" else 1e-6
        assert item.kl_last == pytest.approx(kl[-1], rel=rel, abs=1e-12)
        assert item.kl_mean == pytest.approx(kl.mean(), rel=rel, abs=1e-12)
        changed = logits[0].argmax(-1) != clean_logits.argmax(-1)
        assert item.top1_changed == bool(changed[-1])
        assert item.top1_changed_fraction == pytest.approx(changed.double().mean().item())
    # Zeroed keys: the head's attention is uniform over the visible tokens.
    assert iv.head_pattern_deviation <= 1e-6
    assert next(f for f in iv["head_keys"].findings if f.key == "head_uniform").holds is True


@pytest.mark.parametrize("factor", [0.1, 10.0])
def test_scale_edit_multiplies_that_blocks_std_exactly(factor):
    model = random_model(n_layer=4)
    iv = probes.intervene(model, TOKENS, block=1, factors=(factor, 2.0))
    item = iv[f"scale_{factor:g}"]
    assert item.std[2].item() == pytest.approx(factor * iv.clean_std[2].item(), rel=1e-5)  # index 2 = output of b1
    assert item.std_ratio[2].item() == pytest.approx(factor, rel=1e-5)
    # Everything before the edited block is untouched.
    assert torch.equal(item.std[:2], iv.clean_std[:2])
    exact = next(f for f in item.findings if f.key == "exact_factor")
    assert exact.holds is True
    if factor > 1:  # ln_f renormalises what the edit blew up
        assert next(f for f in item.findings if f.key == "ln_f_compensates").holds is True


def test_interventions_default_to_the_last_block_and_head_of_a_small_model_and_refuse_others():
    small = random_model(n_layer=2, n_head=2, n_embd=16)
    iv = probes.intervene(small, TOKENS)  # the notes' block 9 / head 2 do not exist here: the last ones
    assert (iv.block, iv.head) == (1, 1)
    assert (probes.intervene(small, TOKENS, block=-2, head=-1).block, iv.head) == (0, 1)  # Python-style
    for bad in ({"block": 9}, {"block": 2}, {"block": -3}, {"head": 2}, {"head": -3}):
        (name, value), = bad.items()
        with pytest.raises(InputError, match=rf"{name} {value} is out of range: .* have 2 \(valid: 0\.\.1"):
            probes.intervene(small, TOKENS, **bad)


# --- distributions --------------------------------------------------------------------------------

def test_distributions_match_numpy(model):
    d = probes.measure_distributions(model, TOKENS, bins=40)
    _, hidden, _ = manual_states(model)
    X = hidden[:, 1:].flatten(1).double().numpy()  # first token left out by default
    L = model.cfg.n_layer + 1
    assert d.first_token == 1 and d.labels == ["emb", *(f"b{i}" for i in range(L - 2)), "ln_f"]
    np.testing.assert_allclose(d.covariance.numpy(), np.cov(X), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d.r2.numpy(), np.corrcoef(X) ** 2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d.r2.diagonal().numpy(), np.ones(L), rtol=1e-12)
    assert torch.equal(d.r2, d.r2.T) and torch.equal(d.covariance, d.covariance.T)
    for layer in range(L):
        counts, edges = np.histogram(X[layer], bins=d.bin_edges.numpy())
        np.testing.assert_array_equal(d.counts[layer].numpy(), counts)
    assert d.counts.sum(dim=1).eq(X.shape[1]).all()
    np.testing.assert_allclose(d.std.numpy(), X.std(axis=1, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(d.tail.numpy(), np.quantile(np.abs(X), 0.999, axis=1), rtol=1e-5)
    np.testing.assert_allclose(d.first_token_max.numpy(), hidden[:, 0].abs().amax(dim=1).numpy())
    # Scatter data: token index / dimension against the value.
    index, values = d.by_token(2)
    assert index.min() == 1 and index.max() == len(TOKENS) - 1
    assert torch.equal(values, hidden[2, 1:].flatten())
    assert torch.equal(values[index == 5], hidden[2, 5])
    dims, values = d.by_dimension(2)
    assert torch.equal(values[dims == 7], hidden[2, 1:, 7])


def test_distributions_keep_first_token(model):
    d = probes.measure_distributions(model, TOKENS, skip_first=False)
    assert d.first_token == 0 and d.counts.sum(dim=1).eq(len(TOKENS) * model.cfg.n_embd).all()
    assert d.by_token(0)[0].min() == 0


# --- logit lens -----------------------------------------------------------------------------------

def test_logit_lens_last_layer_is_the_model(model):
    lens = probes.lens(model, TOKENS, k=4)
    _, _, logits = manual_states(model)
    probs = torch.softmax(logits[-1].double(), -1)
    L = model.cfg.n_layer + 1
    assert lens.top_ids.shape == (L, 4) and len(lens.top_tokens) == L
    assert lens.target_id == int(logits[-1].argmax()) and lens.position == len(TOKENS) - 1
    assert lens.final_max_diff <= 1e-5
    assert torch.equal(lens.top_ids[-1], probs.topk(4).indices)
    assert lens.target_prob[-1].item() == pytest.approx(probs.max().item(), rel=1e-5)
    assert lens.target_rank[-1] == 0 and lens.kl_to_final[-1].abs() <= 1e-6
    # An intermediate layer, decoded by hand: ln_f then the tied unembedding.
    raw, _, _ = manual_states(model)
    by_hand = torch.softmax(model.ln_f(raw[1, -1]) @ model.embed.weight.T, -1)
    assert lens.target_prob[1].item() == pytest.approx(by_hand[lens.target_id].item(), rel=1e-4)
    assert next(f for f in lens.findings if f.key == "final_equals_logits").holds is True
    at_three = probes.lens(model, TOKENS, position=3)
    assert at_three.position == 3 and at_three.target_id == int(logits[3].argmax())


# --- attribution ----------------------------------------------------------------------------------

def test_attribution_parts_sum_to_the_logit(model):
    a = probes.attribute(model, TOKENS)
    _, _, logits = manual_states(model)
    n, H = model.cfg.n_layer, model.cfg.n_head
    assert a.target_id == int(logits[-1].argmax())
    assert a.logit == pytest.approx(logits[-1, a.target_id].item(), rel=1e-6)
    assert len(a.names) == len(a.contributions) == 2 + n * (H + 2) + 1
    assert a.contributions.sum().item() == pytest.approx(a.logit, abs=1e-4)
    assert a.sum_error <= 1e-4
    assert a.heads.shape == (n, H) and a.mlp.shape == (n,)
    total = a.embed + a.pos_embed + a.heads.sum() + a.attn_bias.sum() + a.mlp.sum() + a.ln_f_bias
    assert total.item() == pytest.approx(a.logit, abs=1e-4)
    # The attention-bias part, from the weights: centred, divided by the frozen scale, dotted with gamma * W_U[t].
    _, tr = model.run(TOKENS, taps=[f"blocks.{n - 1}.resid_post"])
    resid = tr[f"blocks.{n - 1}.resid_post"][0, -1].double()
    sigma = (resid.var(unbiased=False) + model.ln_f.eps).sqrt()
    assert a.scale == pytest.approx(sigma.item(), rel=1e-9)
    direction = model.ln_f.weight.double() * model.embed.weight[a.target_id].double() / sigma
    for block in range(n):
        bias = model.blocks[block].attn.out.bias.double()
        assert a.attn_bias[block].item() == pytest.approx(((bias - bias.mean()) @ direction).item(), abs=1e-5)
    assert a.ln_f_bias == pytest.approx((model.ln_f.bias.double() @ model.embed.weight[a.target_id].double()).item())
    assert next(f for f in a.findings if f.key == "sum").holds is True


def test_attribution_of_a_chosen_token_and_position(model):
    a = probes.attribute(model, TOKENS, position=4, target=13)
    _, _, logits = manual_states(model)
    assert a.target_id == 13 and a.position == 4
    assert a.contributions.sum().item() == pytest.approx(logits[4, 13].item(), abs=1e-4)
    assert a.top(3)[0][1] == max(a.contributions.tolist(), key=abs)


def test_every_probe_rejects_a_batch(model):
    for probe in (probes.check_final_norm, probes.intervene, probes.measure_distributions):  # lens, attribute: batches
        with pytest.raises(MiniGPTError):
            probe(model, [TOKENS, TOKENS])


# --- figures --------------------------------------------------------------------------------------

plots = pytest.importorskip("probes.plots")


def lines_y(ax) -> list[np.ndarray]:
    return [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]


def test_plot_reconstruction(model):
    r = probes.reconstruct(model, TOKENS)
    fig = plots.plot_reconstruction(r)
    assert isinstance(fig, plots.Figure) and len(fig.axes) == 3
    err, corr, scatter = fig.axes
    assert err.get_yscale() == "log"
    np.testing.assert_allclose(lines_y(corr)[0], r.pearson_r.numpy())
    np.testing.assert_allclose(lines_y(corr)[1], r.pearson_r_kept.numpy())
    np.testing.assert_allclose(scatter.collections[0].get_offsets(), np.stack([r.x, r.y], 1))
    assert scatter.get_xlabel() == f"{r.labels[-2]} value"


def test_plot_final_norm(model):
    f = probes.check_final_norm(model, TOKENS)
    fig = plots.plot_final_norm(f)
    (ax,) = fig.axes
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, [*f.block_diff.tolist(), f.ln_f_diff])


def test_plot_interventions(model):
    iv = probes.intervene(model, TOKENS)
    for item in iv.results:
        fig = plots.plot_intervention(iv, item.name)
        std_ax, mean_ax = fig.axes
        np.testing.assert_allclose(lines_y(std_ax)[0], iv.clean_std.numpy())
        np.testing.assert_allclose(lines_y(std_ax)[1], item.std.numpy())
        np.testing.assert_allclose(lines_y(mean_ax)[1], item.mean_abs.numpy())
        assert std_ax.get_yscale() == "log"
        assert [t.get_text() for t in std_ax.get_xticklabels()] == iv.labels
    (ax,) = plots.plot_interventions_overview(iv).axes
    for item, y in zip(iv.results, lines_y(ax)):
        np.testing.assert_allclose(y, item.std_ratio.numpy())


def test_plot_distributions(model):
    d = probes.measure_distributions(model, TOKENS)
    layers = plots.default_layers(d)
    for plot, data in ((plots.plot_by_token, d.by_token), (plots.plot_by_dimension, d.by_dimension)):
        fig = plot(d)
        assert len(fig.axes) == len(layers)
        for ax, layer in zip(fig.axes, layers):
            x, y = data(layer)
            np.testing.assert_allclose(ax.collections[0].get_offsets(), np.stack([x, y], 1))
    cov_ax, r2_ax, *colorbars = plots.plot_layer_matrices(d).axes
    assert len(colorbars) == 2
    np.testing.assert_allclose(cov_ax.images[0].get_array(), d.covariance.numpy())
    np.testing.assert_allclose(r2_ax.images[0].get_array(), d.r2.numpy())
    hist, spread = plots.plot_histograms(d).axes
    assert hist.get_yscale() == "log" and len(hist.get_lines()) == len(d.labels)
    for line, counts in zip(hist.get_lines(), d.counts):
        np.testing.assert_allclose(line.get_ydata(), counts.numpy())
    np.testing.assert_allclose(lines_y(spread)[0], d.tail.numpy())


def test_plot_logit_lens_and_attribution(model):
    lens = probes.lens(model, TOKENS)
    prob, grid = plots.plot_logit_lens(lens).axes
    np.testing.assert_allclose(lines_y(prob)[0], lens.target_prob.numpy())
    np.testing.assert_allclose(grid.images[0].get_array(), lens.top_probs.numpy())
    assert len(grid.texts) == lens.top_probs.numel()
    a = probes.attribute(model, TOKENS)
    heat, bars, _colorbar = plots.plot_attribution(a).axes
    np.testing.assert_allclose(heat.images[0].get_array(), a.heads.numpy())
    n = model.cfg.n_layer
    heights = [p.get_height() for p in bars.patches]
    np.testing.assert_allclose(heights[n:], a.mlp.numpy(), rtol=1e-6)
    np.testing.assert_allclose(heights[:n], (a.heads.sum(1) + a.attn_bias).numpy(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_architectural_findings_hold_in_other_dtypes(dtype):
    """The claims that follow from the architecture hold within the rounding of the model's dtype."""
    model = random_model().to(dtype)
    checked = []
    for probe in (probes.reconstruct, probes.check_final_norm, probes.lens, probes.attribute):
        checked += [(probe.__name__, f.key, f.holds, f.detail) for f in probe(model, TOKENS).findings
                    if not f.needs_trained and f.holds is not None]
    iv = probes.intervene(model, TOKENS, block=1)
    checked += [(item.name, f.key, f.holds, f.detail) for item in iv.results for f in item.findings
                if f.key in ("exact_factor", "ln_f_compensates")]
    assert len(checked) >= 10
    assert [c for c in checked if c[2] is not True] == []
    if dtype == torch.float64:  # recorded in float64, so the law is exact to float64 rounding
        assert probes.reconstruct(model, TOKENS).rel_error_next.max() <= 1e-14


def test_attention_sink_against_the_patterns_and_states(model):
    """Each head's mean weight on position 0 over the queries after it, and position 0's residual norm
    over the median of the others', recomputed from a plain run."""
    s = probes.attention_sink(model, TOKENS)
    _, tr = model.run(TOKENS, taps=["blocks.*.attn.pattern", "blocks.0.resid_pre", "blocks.*.resid_post"])
    n = model.cfg.n_layer
    for b in range(n):
        pattern = tr[f"blocks.{b}.attn.pattern"][0]  # [H, S, S]
        assert torch.allclose(s.mass[b], pattern[:, 1:, 0].mean(dim=-1), atol=1e-6)
    states = [tr["blocks.0.resid_pre"][0]] + [tr[f"blocks.{b}.resid_post"][0] for b in range(n)]
    for k, x in enumerate(states):
        norms = x.norm(dim=-1)
        assert s.first_norm[k].item() == pytest.approx(norms[0].item(), rel=1e-5)
        assert s.rest_norm[k].item() == pytest.approx(norms[1:].median().item(), rel=1e-5)
    assert s.uniform == pytest.approx(np.mean([1 / (q + 1) for q in range(1, len(TOKENS))]))
    assert {x.key for x in s.findings} == {"sink", "first_norm"}
    with pytest.raises(InputError, match="at least 2 tokens"):
        probes.attention_sink(model, TOKENS[:1])


def test_induction_findings_hold_for_a_copying_pattern_and_not_for_uniform():
    """The findings read the scores and losses: a head on the induction stripe and a repeat predicted
    better pass; chance scores and equal losses do not."""
    n = 10
    base = dict(tokens=torch.zeros(1, 2 * n, dtype=torch.long), n=n, bos=None, chance=0.1,
                loss_first=torch.full((1, n - 1), 5.0))
    copying = probes.Induction(scores=torch.tensor([[0.1, 0.9]]), loss_second=torch.full((1, n - 1), 1.0), **base)
    uniform = probes.Induction(scores=torch.tensor([[0.1, 0.1]]), loss_second=torch.full((1, n - 1), 5.0), **base)
    assert [x.holds for x in probes.induction_findings(copying)] == [True, True]
    assert [x.holds for x in probes.induction_findings(uniform)] == [False, False]
    assert "b0.h1" in probes.induction_findings(copying)[0].detail
