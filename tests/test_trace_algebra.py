"""Trace algebra: each identity exact, each quantity equal to HF's.

The accumulated residual against HF's hidden states; the decomposed residual summing to the last
block's output bit for bit (added in the model's order) or to 1e-6 relative in float32; the
per-head split summing to attn_delta; ln_f with its frozen scale, and the logit attributions plus
ln_f's bias term summing to HF's logits (one token, one per row or position, a difference).
"""
from __future__ import annotations

from functools import reduce

import pytest
import torch
from hf_reference import Case, assert_close, cases, hf_forward, make_hf, to_minigpt
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, InputError, TapError, edits

DECOMPOSE = ["embed", "pos_embed", "blocks.*.attn_delta", "blocks.*.mlp_delta", "blocks.*.resid_pre",
             "blocks.*.resid_post", "ln_f.scale", "ln_f"]


def pair(case: Case, dtype: torch.dtype):
    # float32 comparisons want a few dimensions (see configs(min_embd=...)).
    hf = make_hf(case.config, case.seed, dtype)
    return hf, to_minigpt(hf)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| over the largest |expected| (the tensor's scale)."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


DTYPES = st.sampled_from([torch.float32, torch.float64])
# 1e-6 relative in float32 (the bound the toolkit promises), ~1e-14 in float64.
RELATIVE = {torch.float32: 1e-6, torch.float64: 1e-13}


# ---------------------------------------------------------------------------------------------
# Residual stream


@given(case=cases(min_embd=8), dtype=DTYPES)
def test_decomposed_parts_sum_to_the_last_block_output_bit_for_bit(case: Case, dtype) -> None:
    hf, model = pair(case, dtype)
    tokens = case.tokens()
    _, trace = model.run(tokens, taps=DECOMPOSE)
    parts, labels = trace.decomposed_residual()
    n = model.cfg.n_layer
    assert parts.shape == (2 + 2 * n, case.batch, case.seq, model.cfg.n_embd)
    assert labels == ["embed", "pos_embed"] + [f"blocks.{i}.{d}" for i in range(n) for d in ("attn_delta", "mlp_delta")]
    last = trace[f"blocks.{n - 1}.resid_post"]
    # Added one by one in the model's order: the model's own additions, so the same bits.
    assert torch.equal(reduce(torch.add, parts), last)
    assert relative_error(parts.sum(0), last) <= RELATIVE[dtype]
    # The running sums are the accumulated residual, which is HF's hidden states before ln_f.
    accumulated = trace.accumulated_residual()
    running = [parts[0] + parts[1]]
    for i in range(n):
        running.append(running[-1] + parts[2 + 2 * i] + parts[3 + 2 * i])
    assert torch.equal(accumulated, torch.stack(running))
    _, reads = hf_forward(hf, tokens)
    for i, state in enumerate(reads["hidden_states"][:-1]):
        assert_close(accumulated[i], state, msg=f"hidden_states[{i}]")
    assert_close(accumulated[-1], reads[f"blocks.{n - 1}.resid_post"])


@given(case=cases(min_embd=8), dtype=DTYPES)
def test_per_head_parts_sum_to_each_attn_delta_and_the_bias_is_attentions_output_bias(case: Case, dtype) -> None:
    _, model = pair(case, dtype)
    cfg = model.cfg
    _, trace = model.run(case.tokens(), taps=DECOMPOSE + ["blocks.*.attn.heads"])
    parts, labels = trace.decomposed_residual(heads=True)
    per_block = cfg.n_head + 2  # heads, the output bias, the MLP
    assert len(labels) == len(parts) == 2 + cfg.n_layer * per_block
    for layer in range(cfg.n_layer):
        start = 2 + layer * per_block
        assert labels[start:start + per_block] == ([f"blocks.{layer}.attn.heads[{h}]" for h in range(cfg.n_head)]
                                                   + [f"blocks.{layer}.attn.out.bias", f"blocks.{layer}.mlp_delta"])
        attn_delta = trace[f"blocks.{layer}.attn_delta"]
        assert relative_error(reduce(torch.add, parts[start:start + cfg.n_head + 1]), attn_delta) <= RELATIVE[dtype]
        bias = model.blocks[layer].attn.out.bias.detach().expand_as(attn_delta)
        assert_close(parts[start + cfg.n_head], bias, msg="attn.out.bias")
    last = trace[f"blocks.{cfg.n_layer - 1}.resid_post"]
    assert relative_error(reduce(torch.add, parts), last) <= 10 * RELATIVE[dtype]


# ---------------------------------------------------------------------------------------------
# ln_f and the logits


@given(case=cases(min_embd=8), dtype=DTYPES, data=st.data())
def test_parts_through_the_frozen_ln_f_and_the_unembedding_sum_to_hfs_logits(case: Case, dtype, data) -> None:
    hf, model = pair(case, dtype)
    tokens = case.tokens()
    V = model.cfg.vocab_size
    heads = data.draw(st.booleans(), label="heads")
    logits, trace = model.run(tokens, taps=DECOMPOSE + ["blocks.*.attn.heads"])
    parts, _ = trace.decomposed_residual(heads=heads)
    hf_logits, reads = hf_forward(hf, tokens)
    tol = dict(dtype=dtype)
    # ln_f with its scale frozen is linear on the parts: they sum to ln_f's output minus its bias.
    normed = trace.ln_f_frozen(parts, model)
    assert normed.shape == parts.shape
    assert_close(normed.sum(0) + model.ln_f.bias.detach(), reads["hidden_states"][-1], **tol)
    last = trace[f"blocks.{model.cfg.n_layer - 1}.resid_post"]
    assert_close(trace.ln_f_frozen(last, model.ln_f, bias=True), reads["hidden_states"][-1], **tol)
    # One token, one per row, one per position, or a difference of two such.
    a = data.draw(st.integers(0, V - 1), label="a")
    per_row = torch.randint(V, (case.batch,), generator=torch.Generator().manual_seed(case.seed))
    per_position = torch.randint(V, (case.batch, case.seq), generator=torch.Generator().manual_seed(case.seed + 1))
    expected = {a: hf_logits[..., a],
                "row": hf_logits.gather(2, per_row[:, None, None].expand(-1, case.seq, 1))[..., 0],
                "position": hf_logits.gather(2, per_position[..., None])[..., 0]}
    tokens_of = {a: a, "row": per_row, "position": per_position}
    for key in expected:
        contributions = trace.logit_attribution(parts, model, tokens_of[key])
        assert contributions.shape == parts.shape[:3]
        total = contributions.sum(0) + trace.ln_f_bias_attribution(model, tokens_of[key])
        assert_close(total, expected[key], msg=f"tokens {key}", **tol)
    difference = trace.logit_attribution(parts, model, (per_row, a)).sum(0) + trace.ln_f_bias_attribution(
        model, (per_row, a))
    assert_close(difference, expected["row"] - expected[a], msg="logit difference", **tol)
    assert_close(logits, hf_logits, **tol)


def test_attribution_of_the_last_position_of_a_padded_batch() -> None:
    """keep_positions='last' keeps each row's last real token; the attributions follow those rows' logits."""
    model = GPT.random(GPTConfig(vocab_size=60, n_positions=12, n_embd=24, n_layer=2, n_head=3), seed=2,
                       dtype=torch.float64)
    rows = [[3, 9, 14, 15, 2, 6], [7, 1, 8]]
    logits, trace = model.run(rows, taps=DECOMPOSE, keep_positions="last")
    parts, _ = trace.decomposed_residual()
    assert parts.shape == (6, 2, 1, 24)
    target = torch.tensor([5, 40])
    total = trace.logit_attribution(parts, model, target).sum(0) + trace.ln_f_bias_attribution(model, target)
    last = torch.tensor([5, 2])
    assert_close(total[:, 0], logits[torch.arange(2), last, target])


def test_frozen_scale_is_this_runs_and_gradients_flow_through_attributions() -> None:
    model = GPT.random(GPTConfig(vocab_size=60, n_positions=12, n_embd=24, n_layer=2, n_head=3), seed=2,
                       dtype=torch.float64)
    tokens = torch.tensor([[3, 9, 14, 15, 2, 6]])
    # After an edit, the frozen scale is the edited run's own, so the parts still sum to its logits.
    logits, trace = model.run(tokens, taps=DECOMPOSE, edits=edits.zero_head_keys(0, 1))
    parts, _ = trace.decomposed_residual()
    total = trace.logit_attribution(parts, model, 7).sum(0) + trace.ln_f_bias_attribution(model, 7)
    assert_close(total, logits[..., 7])
    assert not total.requires_grad  # a detached trace gives detached numbers, though the weights require grad
    logits, trace = model.run(tokens, taps=DECOMPOSE, grad=True)
    parts, _ = trace.decomposed_residual()
    contribution = trace.logit_attribution(parts, model, 7)[-1, 0, -1]  # the last MLP's, at the last position
    (weight_grad,) = torch.autograd.grad(contribution, model.ln_f.weight)
    assert weight_grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def small() -> GPT:
    return GPT.random(GPTConfig(vocab_size=60, n_positions=12, n_embd=24, n_layer=2, n_head=3), seed=2)


TOKENS = torch.tensor([[3, 9, 14, 15], [2, 6, 7, 1]])


def test_missing_taps_are_named_with_what_to_record(small) -> None:
    _, trace = small.run(TOKENS, taps=["embed", "blocks.*.attn_delta", "blocks.0.resid_pre"])
    with pytest.raises(TapError, match=r"decomposed_residual\(heads=False\) needs taps \['pos_embed', "
                                       r"'blocks.0.mlp_delta', 'blocks.1.mlp_delta'\].*taps=\['embed', 'pos_embed'"):
        trace.decomposed_residual()
    with pytest.raises(TapError, match=r"blocks\.\*\.attn\.heads"):
        trace.decomposed_residual(heads=True)
    with pytest.raises(TapError, match=r"accumulated_residual\(\) needs taps \['blocks.1.resid_pre', "
                                       r"'blocks.1.resid_post'\]"):
        trace.accumulated_residual()
    with pytest.raises(TapError, match=r"stack\('mlp.post'\) needs.*taps='blocks\.\*\.mlp\.post'"):
        trace.stack("mlp.post")
    with pytest.raises(TapError, match="ln_f_frozen needs taps \\['ln_f.scale'\\]"):
        trace.ln_f_frozen(trace["embed"], small)
    with pytest.raises(TapError, match="ln_f.scale"):
        trace.logit_attribution(trace["embed"], small, 3)


def test_wrong_shapes_and_tokens_are_refused(small) -> None:
    _, trace = small.run(TOKENS, taps=DECOMPOSE)
    parts, _ = trace.decomposed_residual()
    with pytest.raises(InputError, match=r"\[\.\.\., B, S, D\] with \(B, S\) = \(2, 4\).*\(2, 3, 24\)"):
        trace.ln_f_frozen(parts[0, :, :3], small)
    with pytest.raises(InputError, match=r"integer ids in \[0, 60\)"):
        trace.logit_attribution(parts, small, 60)
    with pytest.raises(InputError, match="integer ids"):
        trace.logit_attribution(parts, small, 2.5)
    with pytest.raises(InputError, match=r"shape \(3,\) do not fit.*\(2, 4\)"):
        trace.logit_attribution(parts, small, [1, 2, 3])
    with pytest.raises(InputError, match="a pair"):
        trace.logit_attribution(parts, small, (1, 2, 3))


# ---------------------------------------------------------------------------------------------
# The logit lens: each state with its own statistics, beside ln_f_frozen


@given(case=cases(min_embd=8), dtype=DTYPES)
def test_logit_lens_is_hfs_ln_f_and_head_on_each_hidden_state(case: Case, dtype) -> None:
    hf, model = pair(case, dtype)
    tokens = case.tokens()
    logits, trace = model.run(tokens, taps=["blocks.*.resid_pre", "blocks.*.resid_post", "ln_f"])
    hf_logits, reads = hf_forward(hf, tokens)
    last = reads[f"blocks.{model.cfg.n_layer - 1}.resid_post"]
    states = [*reads["hidden_states"][:-1], last]  # HF's last hidden state is after ln_f: take the raw one
    with torch.no_grad():
        expected = torch.stack([hf.lm_head(hf.transformer.ln_f(state)) for state in states])
    lens = trace.logit_lens(model)
    assert lens.shape == (model.cfg.n_layer + 1, *hf_logits.shape) and not lens.requires_grad
    assert_close(lens, expected, dtype=dtype)
    assert_close(lens[-1], logits, dtype=dtype)  # the last state is the model's own output
    assert torch.equal(trace.ln_f_own_stats(trace["resid_post", -1], model), trace["ln_f"])
    ids = torch.randint(model.cfg.vocab_size, tokens.shape, generator=torch.Generator().manual_seed(case.seed))
    assert_close(trace.logit_lens(model, ids), lens.gather(-1, ids.expand(len(lens), -1, -1)[..., None])[..., 0],
                 dtype=dtype)
    top = model.cfg.vocab_size - 1
    assert_close(trace.logit_lens(model, (top, 0)), lens[..., top] - lens[..., 0], dtype=dtype)


def test_frozen_ln_f_is_not_a_lens_and_own_stats_needs_no_tap() -> None:
    """ln_f_frozen uses the final residual's scale, right for attribution and off for earlier states."""
    model = GPT.from_pretrained("pydoc-tiny")
    logits, trace = model.run("def main(argv):\n    return", taps=["blocks.*.resid_pre", "blocks.*.resid_post",
                                                                  "ln_f.scale"])
    states = trace.accumulated_residual()
    own = trace.ln_f_own_stats(states, model) @ model.unembedding.detach().T
    frozen = trace.ln_f_frozen(states, model, bias=True) @ model.unembedding.detach().T
    assert torch.allclose(own[-1], frozen[-1], atol=1e-4) and torch.allclose(own[-1], logits, atol=1e-4)
    assert (own[0] - frozen[0]).abs().max() > 10  # tens of logits at the embeddings
    assert torch.equal(own, trace.logit_lens(model))
    _, bare = model.run("def main", taps="blocks.*.resid_post")
    with pytest.raises(TapError, match="accumulated_residual"):
        bare.logit_lens(model)
    assert bare.ln_f_own_stats(bare["resid_post", 0], model.ln_f).shape == bare["resid_post", 0].shape


# ---------------------------------------------------------------------------------------------
# Access by (tap, layer), and copies on another device or dtype


def test_block_taps_by_name_and_layer(small) -> None:
    _, trace = small.run(TOKENS, taps=["blocks.*.resid_post", "ln_f"])
    assert trace["resid_post", 1] is trace["blocks.1.resid_post"]
    assert trace["resid_post", -2] is trace["blocks.0.resid_post"]
    assert trace["ln_f"].shape == (2, 4, 24)
    assert ("resid_post", 0) in trace and ("resid_pre", 0) not in trace and ("resid_post", 2) not in trace
    for key, message in [(("resid_post", 2), r"blocks 0\.\.1"), (("resid_post", True), "trace\\['resid_post', 3\\]"),
                         (("blocks.0.resid_post", 0), "short name"), (("resid_pre", 0), "was not recorded"),
                         (("resid_post", 0, 1), "was not recorded")]:
        with pytest.raises(TapError, match=message):
            trace[key]


def test_to_returns_a_new_trace_in_another_dtype_or_device(small) -> None:
    _, trace = small.run([[3, 9, 14], [2]], taps=["blocks.*.resid_post", "ln_f"])
    wide = trace.to(torch.float64)
    assert wide is not trace and wide["ln_f"].dtype == torch.float64 and trace["ln_f"].dtype == torch.float32
    assert torch.equal(wide["ln_f"], trace["ln_f"].double()) and wide.mask is trace.mask and wide.n_layer == 2
    moved = trace.to("cpu")
    assert list(moved) == list(trace) and torch.equal(moved.mask, trace.mask) and moved.mask.dtype == torch.bool
    with pytest.raises(InputError, match="not a floating dtype"):
        trace.to(torch.int64)
    with pytest.raises(InputError, match="not a device"):
        trace.to("nowhere")
