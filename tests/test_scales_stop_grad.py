"""LayerNorm scale taps, stopping early, and gradients that never vanish."""
from __future__ import annotations

import pytest
import torch
from hf_reference import assert_close, cases, first_output, make_hf, to_minigpt
from hypothesis import given

from minigpt import EditError, InputError, TapError, edits

CONFIG = dict(vocab_size=61, n_positions=16, n_embd=16, n_layer=3, n_head=2)
TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5], [35, 8, 9, 7, 9, 3]])


@pytest.fixture(scope="module")
def hf():
    return make_hf(CONFIG, seed=11)


@pytest.fixture(scope="module")
def model(hf):
    return to_minigpt(hf)


# ---------------------------------------------------------------------------------------------
# LayerNorm scales


def test_a_scale_is_one_over_the_standard_deviation_and_ln_uses_it(model) -> None:
    logits, trace = model.run(TOKENS, taps=["blocks.1.resid_mid", "blocks.1.ln2.scale", "blocks.1.ln2"])
    x = trace["blocks.1.resid_mid"]
    scale = trace["blocks.1.ln2.scale"]
    assert scale.shape == (*TOKENS.shape, 1)
    assert_close(scale, (x.var(-1, unbiased=False, keepdim=True) + model.blocks[1].ln2.eps).rsqrt())
    ln = model.blocks[1].ln2
    assert_close(trace["blocks.1.ln2"], (x - x.mean(-1, keepdim=True)) * scale * ln.weight + ln.bias)
    assert_close(logits, model(TOKENS), msg="the open LayerNorm equals the fused one")


def test_freezing_ln_f_with_a_recorded_scale(model) -> None:
    _, clean = model.run(TOKENS, taps=["ln_f.scale"])
    frozen = clean["ln_f.scale"]
    # Replacing the scale by itself changes nothing (bit for bit, as recording it).
    same, _ = model.run(TOKENS, edits={"ln_f.scale": frozen})
    assert torch.equal(same, model.run(TOKENS, taps="ln_f.scale")[0])
    # After an edit upstream, ln_f divides by the clean run's spread, not the edited one's.
    edited, trace = model.run(TOKENS, taps=["blocks.2.resid_post", "ln_f"],
                              edits=edits.scale_block(2, 3.0) | {"ln_f.scale": frozen})
    x = trace["blocks.2.resid_post"]
    ln = model.ln_f
    assert_close(trace["ln_f"], (x - x.mean(-1, keepdim=True)) * frozen * ln.weight + ln.bias)
    # ... so scaling the residual by 3 triples the centred part of the logits' input.
    free, _ = model.run(TOKENS, edits=edits.scale_block(2, 3.0))
    assert not torch.allclose(edited, free)


# ---------------------------------------------------------------------------------------------
# stop_at


def test_stop_at_ends_the_forward_and_keeps_what_came_before(model) -> None:
    calls = []
    handle = model.blocks[2].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        logits, trace = model.run(TOKENS, taps="blocks.*.resid_post", stop_at="blocks.1.resid_post")
    finally:
        handle.remove()
    assert logits is None and calls == []
    assert list(trace) == ["blocks.0.resid_post", "blocks.1.resid_post"]
    _, full = model.run(TOKENS, taps="blocks.*.resid_post")
    for name in trace:
        assert torch.equal(trace[name], full[name])
    # An on-demand tap can be where it stops; edits before it apply.
    _, trace = model.run(TOKENS, taps="blocks.0.attn.pattern", stop_at="blocks.0.attn.pattern",
                         edits=edits.zero_head_keys(0, 1))
    assert torch.equal(trace["blocks.0.attn.pattern"],
                       model.run(TOKENS, taps="blocks.0.attn.pattern", edits=edits.zero_head_keys(0, 1))[1][
                           "blocks.0.attn.pattern"])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(stop_at="blocks.1.resid_poste"), TapError, "did you mean"),
    (dict(stop_at="blocks.*.resid_post"), TapError, "one exact name"),
    (dict(taps="blocks.2.mlp_delta", stop_at="blocks.1.resid_post"), TapError, "never run"),
    (dict(edits=edits.scale_block(2, 2.0), stop_at="blocks.1.resid_post"), EditError, "never run"),
])
def test_stop_at_refuses_what_would_never_run(model, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        model.run(TOKENS, **kwargs)


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("option", [dict(keep_positions=[-1]), dict(keep_positions="last"),
                                    dict(store_dtype=torch.float32), dict(to="cpu")])
def test_grad_with_a_copying_keep_option_is_refused_by_name(model, option) -> None:
    (name, _), = option.items()
    with pytest.raises(InputError, match=f"grad=True with {name}="):
        model.run(TOKENS, taps="blocks.0.resid_post", grad=True, **option)


def hf_block_output_grads(hf, tokens: torch.Tensor, target: int) -> list[torch.Tensor]:
    """d(sum of the last position's logit for ``target``) / d(each block's output), by retain_grad."""
    outputs = []

    def keep(module, args, output):
        hidden = first_output(output)
        hidden.retain_grad()
        outputs.append(hidden)

    handles = [block.register_forward_hook(keep) for block in hf.transformer.h]
    try:
        hf(tokens).logits[:, -1, target].sum().backward()
    finally:
        for h in handles:
            h.remove()
        hf.zero_grad(set_to_none=True)
    return [o.grad for o in outputs]


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_gradients_at_taps_equal_hf_retain_grad(hf, model, frozen: bool) -> None:
    model.requires_grad_(not frozen)
    try:
        logits, trace = model.run(TOKENS, taps="blocks.*.resid_post", grad=True)
        taps = [trace[f"blocks.{i}.resid_post"] for i in range(model.cfg.n_layer)]
        assert all(t.requires_grad for t in taps)
        ours = torch.autograd.grad(logits[:, -1, 7].sum(), taps)
    finally:
        model.requires_grad_(True)
    for layer, (a, b) in enumerate(zip(ours, hf_block_output_grads(hf, TOKENS, 7))):
        assert_close(a, b, msg=f"d logit / d resid_post[{layer}]")


@given(case=cases(max_batch=2))
def test_in_place_edits_on_q_k_v_work_under_grad(case) -> None:
    model = to_minigpt(make_hf(case.config, case.seed))
    tokens = case.tokens()
    halve = {f"blocks.0.attn.{part}": (lambda x: x.mul_(0.5)) for part in "qkv"}
    outside = {f"blocks.0.attn.{part}": (lambda x: x * 0.5) for part in "qkv"}
    logits, trace = model.run(tokens, taps="blocks.0.attn.k", edits=halve, grad=True)
    expected, _ = model.run(tokens, edits=outside)
    assert torch.equal(logits.detach(), expected)
    (grad,) = torch.autograd.grad(logits.sum(), trace["blocks.0.attn.k"])
    assert grad.shape == trace["blocks.0.attn.k"].shape
