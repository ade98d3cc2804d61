"""Edits equal the same interventions made with torch hooks on HF, and leave nothing behind.

Intervention equivalence and no leaks, plus the tap API: glob
selection, errors, the read-only trace, gradients, and the recording options.
"""
from __future__ import annotations

import pytest
import torch
from hf_reference import (Case, assert_close, assert_same_run, cases, first_output, hf_hook_for, replace_first,
                          make_hf, to_minigpt)
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, EditError, GPTConfig, MiniGPTWarning, TapError, edits, tap_names
from minigpt.edits import gaussian

def pair(case: Case):
    hf = make_hf(case.config, case.seed, torch.float64)
    return hf, to_minigpt(hf), case.tokens()


def mix(seed: int):
    """A shape-preserving, non-linear function that mixes the last axis (seeded, so HF gets the same one)."""
    a, b = 0.5 + (seed % 7) / 7, 0.3 + (seed % 5) / 10

    def f(x: torch.Tensor) -> torch.Tensor:
        return a * x + b * torch.tanh(x.roll(1, dims=-1))

    return f


# ---------------------------------------------------------------------------------------------
# (f) built-in edits = the notes' hooks


@given(case=cases(), data=st.data())
def test_zero_head_keys_equals_zeroing_the_k_slice_of_fused_qkv(case: Case, data) -> None:
    hf, model, tokens = pair(case)
    cfg = model.cfg
    block = data.draw(st.integers(0, cfg.n_layer - 1), label="block")
    head = data.draw(st.integers(0, cfg.n_head - 1), label="head")

    def zero_k(module, args, output):  # the notes: columns n_embd + head*d_head .. n_embd + (head+1)*d_head
        output = output.clone()
        start = cfg.n_embd + head * cfg.d_head
        output[..., start:start + cfg.d_head] = 0
        return output

    assert_same_run(hf, model, tokens, edits.zero_head_keys(block, head),
                    [(hf.transformer.h[block].attn.c_attn, zero_k, "forward")])
    _, trace = model.run(tokens, taps=f"blocks.{block}.attn.k", edits=edits.zero_head_keys(block, head))
    assert (trace[f"blocks.{block}.attn.k"][:, :, head] == 0).all()


@given(case=cases(), data=st.data())
def test_noise_neurons_equals_replacing_the_activation_output(case: Case, data) -> None:
    hf, model, tokens = pair(case)
    block = data.draw(st.integers(0, model.cfg.n_layer - 1), label="block")
    d_mlp = model.cfg.d_mlp
    neurons = data.draw(st.sampled_from(["even", "odd", "list"]), label="neurons")
    index = {"even": slice(0, None, 2), "odd": slice(1, None, 2)}.get(neurons)
    if neurons == "list":
        chosen = data.draw(st.lists(st.integers(0, d_mlp - 1), min_size=1, max_size=5, unique=True), label="ids")
        neurons = index = chosen
    mean = data.draw(st.sampled_from([10.0, 0.0, -3.0]), label="mean")
    std = data.draw(st.sampled_from([1.0, 0.1]), label="std")
    seed = data.draw(st.integers(0, 1000), label="seed")

    def noise(module, args, output):
        output = output.clone()
        output[..., index] = gaussian(output[..., index].shape, mean, std, seed, output)
        return output

    our = edits.noise_neurons(block, neurons, mean, std, seed)
    assert_same_run(hf, model, tokens, our, [(hf.transformer.h[block].mlp.act, noise, "forward")])
    # Same seed, same noise: two runs agree bit for bit.
    assert torch.equal(model.run(tokens, edits=our)[0], model.run(tokens, edits=our)[0])


@given(case=cases(), data=st.data())
def test_scale_block_equals_scaling_element_0_of_the_block_output(case: Case, data) -> None:
    hf, model, tokens = pair(case)
    block = data.draw(st.integers(0, model.cfg.n_layer - 1), label="block")
    factor = data.draw(st.sampled_from([0.1, 10.0, -1.0, 0.0]), label="factor")

    def scale(module, args, output):
        return replace_first(output, first_output(output) * factor)

    assert_same_run(hf, model, tokens, edits.scale_block(block, factor),
                    [(hf.transformer.h[block], scale, "forward")])


def test_built_in_edits_merge_and_match_hf() -> None:
    """The notes' three exercises at once, merged with |."""
    case = Case(dict(vocab_size=64, n_positions=16, n_embd=24, n_layer=3, n_head=4, n_inner=None,
                     layer_norm_epsilon=1e-5, activation_function="gelu_new"), batch=2, seq=16, seed=7)
    hf, model, tokens = pair(case)
    merged = edits.zero_head_keys(0, 2) | edits.noise_neurons(1, "even", 10.0, 1.0, seed=5) | edits.scale_block(2, 0.1)
    assert set(merged) == {"blocks.0.attn.k", "blocks.1.mlp.post", "blocks.2.resid_post"}

    def noise_even(post):
        post = post.clone()
        post[..., ::2] = gaussian(post[..., ::2].shape, 10.0, 1.0, 5, post)
        return post

    hooks = (hf_hook_for(hf, "blocks.0.attn.k", lambda k: k.index_fill(2, torch.tensor([2]), 0.0))
             + hf_hook_for(hf, "blocks.1.mlp.post", noise_even)
             + hf_hook_for(hf, "blocks.2.resid_post", lambda x: x * 0.1))
    assert_same_run(hf, model, tokens, merged, hooks)


# ---------------------------------------------------------------------------------------------
# (f) arbitrary edits

EDITABLE = ["embed", "resid_pre", "ln1", "attn.q", "attn.k", "attn.v", "attn.z", "attn_delta", "resid_mid", "ln2",
            "mlp.pre", "mlp.post", "mlp_delta", "resid_post", "ln_f"]


@given(case=cases(), data=st.data())
def test_function_edits_at_several_taps_equal_hf_hooks(case: Case, data) -> None:
    hf, model, tokens = pair(case)
    n_layer = model.cfg.n_layer
    kinds = data.draw(st.lists(st.sampled_from(EDITABLE), min_size=1, max_size=4, unique=True), label="taps")
    names = set()
    for kind in kinds:
        if kind in ("embed", "ln_f"):
            names.add(kind)
        else:
            names.add(f"blocks.{data.draw(st.integers(0, n_layer - 1), label=kind)}.{kind}")
    order = tap_names(n_layer)
    names = sorted(names, key=order.index)  # HF hooks in forward order, as the notes would add them
    our = {name: mix(i) for i, name in enumerate(names)}
    hooks = [hook for i, name in enumerate(names) for hook in hf_hook_for(hf, name, mix(i))]
    assert_same_run(hf, model, tokens, our, hooks)


@given(case=cases(), data=st.data())
def test_replacement_tensors_equal_hf_hooks_returning_them(case: Case, data) -> None:
    hf, model, tokens = pair(case)
    layer = data.draw(st.integers(0, model.cfg.n_layer - 1), label="block")
    kind = data.draw(st.sampled_from(["ln1", "attn.v", "attn_delta", "mlp.post", "resid_mid", "resid_post"]))
    name = f"blocks.{layer}.{kind}"
    _, clean = model.run(tokens, taps=name)
    generator = torch.Generator().manual_seed(case.seed)
    replacement = torch.randn(clean[name].shape, generator=generator, dtype=torch.float64)
    assert_same_run(hf, model, tokens, {name: replacement}, hf_hook_for(hf, name, lambda x: replacement))
    _, trace = model.run(tokens, taps=name, edits={name: replacement})
    assert torch.equal(trace[name], replacement)


@given(case=cases(), data=st.data())
def test_glob_edits_hit_every_matching_tap(case: Case, data) -> None:
    hf, model, tokens = pair(case)
    kind = data.draw(st.sampled_from(["mlp_delta", "attn.k", "ln2", "resid_post"]), label="tap")
    f = mix(3)
    hooks = [h for layer in range(model.cfg.n_layer) for h in hf_hook_for(hf, f"blocks.{layer}.{kind}", f)]
    assert_same_run(hf, model, tokens, {f"blocks.*.{kind}": f}, hooks)


# ---------------------------------------------------------------------------------------------
# Edits at the on-demand taps: heads, scores, pattern (checked against a manual recomputation)


@given(case=cases(), data=st.data())
def test_editing_heads_equals_zeroing_that_head_in_c_proj_input(case: Case, data) -> None:
    hf, model, tokens = pair(case)
    cfg = model.cfg
    layer = data.draw(st.integers(0, cfg.n_layer - 1), label="block")
    head = data.draw(st.integers(0, cfg.n_head - 1), label="head")

    def drop_head(h: torch.Tensor) -> torch.Tensor:  # [B, S, H, D]
        h = h.clone()
        h[:, :, head] = 0
        return h

    def zero_z(module, args):
        z = args[0].clone()
        z[..., head * cfg.d_head:(head + 1) * cfg.d_head] = 0
        return (z,)

    assert_same_run(hf, model, tokens, {f"blocks.{layer}.attn.heads": drop_head},
                    [(hf.transformer.h[layer].attn.c_proj, zero_z, "pre")])
    # Recorded heads are the edited ones, and attn_delta is rebuilt from them.
    _, trace = model.run(tokens, taps=[f"blocks.{layer}.attn.heads", f"blocks.{layer}.attn_delta"],
                         edits={f"blocks.{layer}.attn.heads": drop_head})
    heads = trace[f"blocks.{layer}.attn.heads"]
    assert (heads[:, :, head] == 0).all()
    assert_close(heads.sum(2) + model.blocks[layer].attn.out.bias.detach(), trace[f"blocks.{layer}.attn_delta"])


@given(case=cases(), data=st.data())
def test_editing_the_pattern_equals_recomputing_z_by_hand(case: Case, data) -> None:
    _, model, tokens = pair(case)
    layer = data.draw(st.integers(0, model.cfg.n_layer - 1), label="block")
    p = f"blocks.{layer}.attn."
    S = case.seq
    uniform = torch.tril(torch.ones(S, S, dtype=torch.float64))
    uniform = uniform / uniform.sum(-1, keepdim=True)  # each query attends equally to its past

    logits, trace = model.run(tokens, taps=[p + "pattern", p + "v", p + "z"],
                              edits={p + "pattern": lambda pat: uniform.expand_as(pat).clone()})
    assert torch.equal(trace[p + "pattern"], uniform.expand_as(trace[p + "pattern"]))
    manual_z = (uniform @ trace[p + "v"].transpose(1, 2)).transpose(1, 2)  # [B, S, H, d]
    assert_close(trace[p + "z"], manual_z)
    # Putting the hand-made z in place gives the same logits.
    by_hand, _ = model.run(tokens, edits={p + "z": manual_z})
    assert_close(logits, by_hand)


@given(case=cases(), data=st.data())
def test_editing_scores_goes_through_softmax(case: Case, data) -> None:
    _, model, tokens = pair(case)
    layer = data.draw(st.integers(0, model.cfg.n_layer - 1), label="block")
    p = f"blocks.{layer}.attn."
    clean = model(tokens)
    # Softmax ignores a constant shift of each row: the logits stay (numerically) the same.
    shifted, _ = model.run(tokens, edits={p + "scores": lambda s: s + 3.0})
    assert_close(shifted, clean)
    # Masking every key but the query's own makes the pattern the identity and z = v.
    eye = torch.eye(case.seq, dtype=torch.bool)
    _, trace = model.run(tokens, taps=[p + "pattern", p + "z", p + "v"],
                         edits={p + "scores": lambda s: s.masked_fill(~eye, float("-inf"))})
    assert torch.equal(trace[p + "pattern"], eye.to(torch.float64).expand_as(trace[p + "pattern"]))
    assert_close(trace[p + "z"], trace[p + "v"])


# ---------------------------------------------------------------------------------------------
# (g) no leaks


def small_model(dtype=torch.float64) -> GPT:
    return GPT.random(GPTConfig(vocab_size=50, n_positions=10, n_embd=16, n_layer=4, n_head=4), seed=11, dtype=dtype)


TOKENS = torch.tensor([[1, 7, 3, 9, 4, 2, 8, 0], [5, 5, 6, 1, 2, 3, 4, 49]])


def snapshot(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_clean(model: GPT, clean_logits: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
    assert torch.equal(model(TOKENS), clean_logits)
    assert torch.equal(model.run(TOKENS)[0], clean_logits)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert not model.training
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_no_leaks_after_edits_and_after_failed_edits() -> None:
    model = small_model()
    clean, params = model(TOKENS), snapshot(model)
    every_kind = (edits.zero_head_keys(1, 2) | edits.noise_neurons(2, "even", 10.0, 1.0, seed=0)
                  | edits.scale_block(3, 10.0) | edits.add_vector("blocks.0.resid_mid", torch.ones(16))
                  | {"blocks.*.attn.pattern": lambda p: p * 0 + p.mean(), "blocks.2.attn.heads": lambda h: -h})
    edited, _ = model.run(TOKENS, taps="*", edits=every_kind)
    assert not torch.allclose(edited, clean)
    assert_clean(model, clean, params)

    class Boom(RuntimeError):
        pass

    def explode(x):
        raise Boom("edit failed")

    with pytest.raises(Boom) as info:
        model.run(TOKENS, taps="*", edits=edits.scale_block(0, 2.0) | {"blocks.2.mlp.pre": explode})
    assert any("blocks.2.mlp.pre" in note for note in getattr(info.value, "__notes__", []))
    assert_clean(model, clean, params)

    with pytest.raises(EditError) as info:
        model.run(TOKENS, edits={"blocks.1.attn.v": lambda v: v[:, :-1]})
    message = str(info.value)
    assert "blocks.1.attn.v" in message and "(2, 7, 4, 4)" in message and "(2, 8, 4, 4)" in message
    assert_clean(model, clean, params)

    with pytest.raises(EditError, match="blocks.0.ln1"):  # not a tensor
        model.run(TOKENS, edits={"blocks.0.ln1": lambda x: x.tolist()})
    with pytest.raises(EditError, match="blocks.0.ln2"):  # wrong dtype
        model.run(TOKENS, edits={"blocks.0.ln2": lambda x: x.float()})
    with pytest.raises(EditError, match="shape"):  # a replacement tensor of the wrong shape
        model.run(TOKENS, edits={"blocks.0.mlp.post": torch.zeros(3)})
    assert_clean(model, clean, params)


def test_edit_that_mutates_its_input_in_place_does_not_touch_weights() -> None:
    model = small_model()
    clean, params = model(TOKENS), snapshot(model)

    def in_place(x):
        return x.mul_(2.0)

    edited, _ = model.run(TOKENS, edits={"blocks.*.ln1": in_place, "embed": in_place, "blocks.2.mlp.pre": in_place})
    assert not torch.equal(edited, clean)
    assert_clean(model, clean, params)
    # pos_embed is one row per position broadcast over the batch: an edit gets a copy of its own,
    # so writing into it works and equals the same edit done out of place.
    doubled, _ = model.run(TOKENS, edits={"pos_embed": in_place})
    assert torch.equal(doubled, model.run(TOKENS, edits={"pos_embed": lambda x: x * 2.0})[0])
    assert_clean(model, clean, params)


def test_in_place_edit_does_not_change_what_was_already_recorded() -> None:
    """resid_pre of block L+1 is the very tensor recorded as resid_post of block L."""
    model = small_model()
    _, clean = model.run(TOKENS, taps="blocks.*.resid_post")

    def zero_in_place(x):
        return x.mul_(0)

    _, trace = model.run(TOKENS, taps=["blocks.*.resid_post", "blocks.2.resid_pre"],
                         edits={"blocks.2.resid_pre": zero_in_place})
    assert torch.equal(trace["blocks.1.resid_post"], clean["blocks.1.resid_post"])
    assert (trace["blocks.2.resid_pre"] == 0).all()


def test_nan_from_an_edit_warns() -> None:
    model = small_model()
    with pytest.warns(MiniGPTWarning, match="blocks.1.mlp.post"):
        model.run(TOKENS, edits={"blocks.1.mlp.post": lambda x: x * float("nan")})


# ---------------------------------------------------------------------------------------------
# Tap selection, errors, the trace


def test_glob_selection() -> None:
    model = small_model()
    _, trace = model.run(TOKENS, taps="blocks.*.resid_post")
    assert list(trace) == [f"blocks.{i}.resid_post" for i in range(4)]
    assert trace.stack("resid_post").shape == (4, 2, 8, 16)
    _, trace = model.run(TOKENS, taps=["blocks.3.attn.*"])
    assert list(trace) == [f"blocks.3.attn.{n}" for n in ("q", "k", "v", "scores", "pattern", "z", "heads")]
    _, trace = model.run(TOKENS, taps=["logits", "embed", "blocks.1.mlp.p*"])
    assert list(trace) == ["embed", "blocks.1.mlp.pre", "blocks.1.mlp.post", "logits"]  # forward order
    assert set(dict(model.run(TOKENS, taps="*")[1])) == set(tap_names(4))


def test_unknown_taps_are_refused_with_a_suggestion() -> None:
    model = small_model()
    with pytest.raises(TapError, match=r"blocks\.0\.resid_post"):
        model.run(TOKENS, taps=["blocks.0.resid_psot"])
    with pytest.raises(TapError, match="did you mean"):
        model.run(TOKENS, edits={"blocks.1.mlp_dleta": lambda x: x})
    with pytest.raises(TapError, match="matches no tap"):
        model.run(TOKENS, taps="blocks.9.*")
    with pytest.raises(TapError):
        model.run(TOKENS, taps=[3])
    _, trace = model.run(TOKENS, taps="ln_f")
    with pytest.raises(TapError, match="not recorded"):
        trace["blocks.0.ln1"]
    with pytest.raises(KeyError):  # a TapError is still a KeyError for mapping code
        trace["nope"]


def test_trace_is_read_only_and_detached_by_default() -> None:
    model = small_model()
    model.train()
    logits, trace = model.run(TOKENS, taps="blocks.*.resid_post")
    assert not hasattr(trace, "__setitem__") and not hasattr(trace, "__delitem__")
    with pytest.raises(TypeError):
        trace["blocks.0.resid_post"] = torch.zeros(1)
    assert not logits.requires_grad
    assert all(not t.requires_grad for t in trace.values())


def test_grad_true_lets_gradients_flow_into_an_edit() -> None:
    model = small_model()
    steer = torch.zeros(16, dtype=torch.float64, requires_grad=True)
    logits, trace = model.run(TOKENS, taps=["blocks.1.resid_mid", "blocks.3.resid_post"],
                              edits=edits.add_vector("blocks.1.resid_mid", steer), grad=True)
    assert logits.requires_grad and trace["blocks.3.resid_post"].requires_grad
    logits[0, -1, 7].backward()
    assert steer.grad is not None and steer.grad.abs().sum() > 0
    # Gradient matches a finite difference along the gradient's direction.
    direction = steer.grad / steer.grad.norm()
    eps = 1e-6
    plus, _ = model.run(TOKENS, edits=edits.add_vector("blocks.1.resid_mid", eps * direction))
    minus, _ = model.run(TOKENS, edits=edits.add_vector("blocks.1.resid_mid", -eps * direction))
    numeric = (plus[0, -1, 7] - minus[0, -1, 7]) / (2 * eps)
    assert numeric.item() == pytest.approx(steer.grad.norm().item(), rel=1e-5)


def test_recording_options_to_dtype_positions() -> None:
    model = small_model()
    plain = model(TOKENS)
    logits, trace = model.run(TOKENS, taps=["blocks.0.ln1", "blocks.0.attn.pattern", "blocks.0.attn.q"],
                              store_dtype=torch.float16, to="cpu", keep_positions=[0, 5])
    assert_close(logits, plain)  # the options shape what is kept, not the run
    _, full = model.run(TOKENS, taps=["blocks.0.ln1", "blocks.0.attn.pattern", "blocks.0.attn.q"])
    assert trace["blocks.0.ln1"].dtype == torch.float16 and trace["blocks.0.ln1"].shape == (2, 2, 16)
    assert torch.equal(trace["blocks.0.ln1"], full["blocks.0.ln1"][:, [0, 5]].half())
    assert trace["blocks.0.attn.q"].shape == (2, 2, 4, 4)
    assert trace["blocks.0.attn.pattern"].shape == (2, 4, 8, 8)  # query x key: kept whole
    _, sliced = model.run(TOKENS, taps="blocks.*.resid_post", keep_positions=slice(-1, None))
    assert sliced.stack("resid_post").shape == (4, 2, 1, 16)
    assert torch.equal(sliced["blocks.3.resid_post"], full_resid(model)[:, -1:])


def full_resid(model: GPT) -> torch.Tensor:
    return model.run(TOKENS, taps="blocks.3.resid_post")[1]["blocks.3.resid_post"]


def test_hidden_states_needs_its_taps() -> None:
    model = small_model()
    _, trace = model.run(TOKENS, taps="blocks.*.resid_post")
    with pytest.raises(TapError, match="resid_pre"):
        trace.hidden_states()


def test_combine_runs_edits_on_one_tap_in_order() -> None:
    """combine, and the built-ins' `|`, chain edits of one tap, equal to doing both by hand; plain dicts' `|` keeps the last."""
    model = to_minigpt(make_hf(dict(vocab_size=50, n_positions=8, n_embd=12, n_layer=2, n_head=3), 3))
    tokens = torch.randint(50, (2, 8), generator=torch.Generator().manual_seed(0))

    def both_heads(k: torch.Tensor) -> torch.Tensor:
        k = k.clone()
        k[:, :, [0, 2]] = 0
        return k

    by_hand, _ = model.run(tokens, edits={"blocks.1.attn.k": both_heads})
    combined, trace = model.run(tokens, taps="blocks.1.attn.k",
                                edits=edits.combine(edits.zero_head_keys(1, 0), edits.zero_head_keys(1, 2)))
    assert torch.equal(combined, by_hand)
    assert (trace["blocks.1.attn.k"][:, :, [0, 2]] == 0).all() and (trace["blocks.1.attn.k"][:, :, 1] != 0).any()
    piped, _ = model.run(tokens, edits=edits.zero_head_keys(1, 0) | edits.zero_head_keys(1, 2))
    assert torch.equal(piped, by_hand)
    only_last, _ = model.run(tokens, edits=dict(edits.zero_head_keys(1, 0)) | dict(edits.zero_head_keys(1, 2)))
    assert not torch.equal(only_last, by_hand)
    replaced = torch.ones(2, 8, 12, dtype=torch.float64)
    chained, _ = model.run(tokens, edits=edits.combine({"ln_f": replaced}, edits.add_vector("ln_f", torch.ones(12))))
    direct, _ = model.run(tokens, edits={"ln_f": replaced + 1})
    assert torch.equal(chained, direct)
