"""minigpt equals HuggingFace's GPT2LMHeadModel, number for number.

Random configs and random weights (hf_reference.make_hf redraws every parameter, biases and
LayerNorm weights included). float64 is compared at a relative tolerance of 1e-10, float32 at 1e-5.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_reference import Case, all_taps, assert_close, cases, hf_forward, make_hf, to_minigpt
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, tap_names
from minigpt.taps import ON_DEMAND, TapCall

DTYPES = [torch.float64, torch.float32]


def cases_for(dtype: torch.dtype):
    """float32 examples get d_model >= 8 (see hf_reference.configs); float64 takes any shape."""
    return cases(min_embd=8 if dtype == torch.float32 else 1)


def pair(case: Case, dtype: torch.dtype = torch.float64):
    """(HF model, the same model in minigpt, tokens [B, S]) for one example."""
    hf = make_hf(case.config, case.seed, dtype)
    return hf, to_minigpt(hf), case.tokens()


# ---------------------------------------------------------------------------------------------
# (a) logits and hidden states


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_logits_and_hidden_states_equal_hf(data, dtype: torch.dtype) -> None:
    case = data.draw(cases_for(dtype), label="case")
    hf, model, tokens = pair(case, dtype)
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    logits, trace = model.run(tokens, taps=["blocks.*.resid_pre", "ln_f"])
    assert logits.dtype == dtype and logits.shape == (case.batch, case.seq, case.config["vocab_size"])
    assert_close(logits, out.logits, msg="logits")
    ours = trace.hidden_states()
    assert len(ours) == len(out.hidden_states) == case.config["n_layer"] + 1
    for i, (a, b) in enumerate(zip(ours, out.hidden_states)):
        assert_close(a, b, msg=f"hidden_states[{i}]")
    # The plain forward gives the same logits as run().
    assert torch.equal(model(tokens), logits)


# ---------------------------------------------------------------------------------------------
# (b) every tap equals what a hook on HF reads at the same point


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_every_tap_equals_hf_hook(data, dtype: torch.dtype) -> None:
    case = data.draw(cases_for(dtype), label="case")
    hf, model, tokens = pair(case, dtype)
    hf_logits, reads = hf_forward(hf, tokens)
    logits, taps = all_taps(model, tokens)
    n_layer = case.config["n_layer"]
    # Every tap but the three HF has no module for (heads, scores; pattern comes from output_attentions).
    expected = {n for n in tap_names(n_layer) if not n.endswith(("attn.heads", "attn.scores"))}
    assert expected <= reads.keys()
    for name in sorted(expected):
        assert taps[name].shape == reads[name].shape, name
        assert_close(taps[name], reads[name], msg=name)
    # HF's last hidden state is the ln_f output.
    assert_close(taps["ln_f"], reads["hidden_states"][-1], msg="ln_f vs hidden_states[-1]")
    assert_close(logits, hf_logits, msg="logits")


# ---------------------------------------------------------------------------------------------
# (c) reconstruction, (d) ln_f


@given(case=cases())
def test_reconstruction_law(case: Case) -> None:
    """H[L+1] = resid_pre[L] + attn_delta[L] + mlp_delta[L], exactly on each side, and across."""
    hf, model, tokens = pair(case)
    _, reads = hf_forward(hf, tokens)
    _, taps = all_taps(model, tokens)
    hidden = reads["hidden_states"]
    for layer in range(case.config["n_layer"]):
        p = f"blocks.{layer}."
        ours = taps[p + "resid_pre"] + taps[p + "attn_delta"] + taps[p + "mlp_delta"]
        theirs = reads[p + "resid_pre"] + reads[p + "attn_delta"] + reads[p + "mlp_delta"]
        # Exact on both sides: the block computes this very sum in this very order.
        assert torch.equal(ours, taps[p + "resid_post"]), p
        assert torch.equal(taps[p + "resid_mid"], taps[p + "resid_pre"] + taps[p + "attn_delta"]), p
        assert torch.equal(theirs, reads[p + "resid_post"]), p
        if layer < case.config["n_layer"] - 1:
            assert torch.equal(theirs, hidden[layer + 1]), p  # the notes' law, on HF
            assert_close(ours, hidden[layer + 1], msg=f"H[{layer + 1}]")
            assert torch.equal(taps[p + "resid_post"], taps[f"blocks.{layer + 1}.resid_pre"])


@given(case=cases())
def test_last_hidden_state_is_ln_f_of_last_resid_post(case: Case) -> None:
    hf, model, tokens = pair(case)
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    _, trace = model.run(tokens, taps=["blocks.*.resid_post", "ln_f"])
    last = trace[f"blocks.{case.config['n_layer'] - 1}.resid_post"]
    with torch.no_grad():
        assert_close(model.ln_f(last), hidden[-1])
        assert_close(hf.transformer.ln_f(last), hidden[-1])
    assert_close(trace["ln_f"], hidden[-1])
    assert not torch.allclose(last, hidden[-1]), "the raw last residual must differ from HF's last hidden state"


# ---------------------------------------------------------------------------------------------
# (e) heads, z, scores and pattern


@given(case=cases())
def test_heads_z_scores_pattern_rebuild_attention(case: Case) -> None:
    _, model, tokens = pair(case)
    _, taps = all_taps(model, tokens)
    cfg = model.cfg
    for layer, block in enumerate(model.blocks):
        p = f"blocks.{layer}.attn."
        delta = taps[f"blocks.{layer}.attn_delta"]
        heads = taps[p + "heads"]
        assert heads.shape == (case.batch, case.seq, cfg.n_head, cfg.n_embd)
        with torch.no_grad():
            assert_close(heads.sum(dim=2) + block.attn.out.bias, delta, msg=p + "heads")
            z = taps[p + "z"]
            assert_close(z.flatten(2) @ block.attn.out.weight.T + block.attn.out.bias, delta, msg=p + "z")
        scores, pattern = taps[p + "scores"], taps[p + "pattern"]
        assert_close(scores.softmax(dim=-1), pattern, msg=p + "softmax(scores)")
        # scores = q.k * scale below the diagonal, -inf above it.
        q, k = taps[p + "q"].transpose(1, 2), taps[p + "k"].transpose(1, 2)
        future = torch.ones(case.seq, case.seq, dtype=torch.bool).triu(1)
        assert torch.isneginf(scores[..., future]).all()
        manual = (q @ k.transpose(-2, -1)) * block.attn.scale
        assert_close(scores[..., ~future], manual[..., ~future], msg=p + "scores")
        expected_scale = 1 / (cfg.d_head ** 0.5 * (layer + 1 if cfg.scale_attn_by_inverse_layer_idx else 1))
        assert block.attn.scale == pytest.approx(expected_scale, rel=1e-15)
        # z = pattern @ v, head by head.
        assert_close(taps[p + "z"], (pattern @ taps[p + "v"].transpose(1, 2)).transpose(1, 2), msg=p + "z")


# ---------------------------------------------------------------------------------------------
# The forward visits every tap once, in order; recording changes nothing


class LoggingTaps(TapCall):
    """A TapCall that logs every name the forward passes through."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.visited: list[str] = []

    def __call__(self, name, x):
        self.visited.append(name)
        return super().__call__(name, x)


@given(case=cases())
def test_forward_visits_every_tap_once_in_order(case: Case) -> None:
    _, model, tokens = pair(case)
    names = tap_names(case.config["n_layer"])
    everything = LoggingTaps(names)
    model(tokens, everything)
    assert everything.visited == names
    assert list(everything.trace) == names  # the trace keeps them in forward order too
    # With nothing asked, the on-demand taps are skipped and nothing is kept.
    nothing = LoggingTaps()
    model(tokens, nothing)
    assert nothing.visited == [n for n in names if not n.endswith(ON_DEMAND)]
    assert nothing.trace == {}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_recording_does_not_change_logits(data, dtype: torch.dtype) -> None:
    case = data.draw(cases_for(dtype), label="case")
    _, model, tokens = pair(case, dtype)
    plain = model(tokens)
    # Taps that keep the fused attention and LayerNorm paths leave the logits bit for bit unchanged.
    fused_taps = [n for n in model.tap_names if not n.endswith(("attn.scores", "attn.pattern", ".scale"))]
    logits, trace = model.run(tokens, taps=fused_taps)
    assert torch.equal(logits, plain)
    assert list(trace) == fused_taps
    # Asking for the pattern takes the explicit path: the same numbers up to rounding.
    explicit, trace = model.run(tokens, taps="blocks.*.attn.pattern")
    assert_close(explicit, plain, msg="explicit pattern path vs fused SDPA")
    for layer in range(case.config["n_layer"]):
        pattern = trace[f"blocks.{layer}.attn.pattern"]
        assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


@pytest.mark.parametrize("taps, edited, fused", [
    ((), (), True),
    (("blocks.*.attn.q", "blocks.*.attn.z", "blocks.*.attn.heads", "blocks.*.resid_post"), (), True),
    ((), ("blocks.*.attn.k",), True),
    (("blocks.*.attn.pattern",), (), False),
    ((), ("blocks.*.attn.scores",), False),
], ids=["nothing", "other-attention-taps", "edit-k", "record-pattern", "edit-scores"])
def test_fused_attention_unless_scores_or_pattern_wanted(monkeypatch, taps, edited, fused) -> None:
    import minigpt.model

    calls = []
    sdpa = minigpt.model.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(minigpt.model.F, "scaled_dot_product_attention", counting)
    model = dropout_model()
    tokens = torch.arange(12).view(1, 12)
    model.run(tokens, taps=list(taps), edits={name: (lambda x: x * 1.0) for name in edited})
    assert len(calls) == (model.cfg.n_layer if fused else 0)


# ---------------------------------------------------------------------------------------------
# (i) modes


@given(case=cases())
def test_eval_is_deterministic(case: Case) -> None:
    _, model, tokens = pair(case)
    assert not model.training
    first, t1 = model.run(tokens, taps="*")
    second, t2 = model.run(tokens, taps="*")
    assert torch.equal(first, second)
    assert all(torch.equal(t1[n], t2[n]) for n in t1)
    assert torch.equal(model(tokens), model(tokens))


def dropout_model(p: float = 0.3) -> GPT:
    cfg = GPTConfig(vocab_size=40, n_positions=12, n_embd=16, n_layer=3, n_head=4,
                    embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)
    return GPT.random(cfg, seed=3, dtype=torch.float64)


def test_fresh_model_is_in_eval_mode() -> None:
    assert not GPT.random(dropout_model().cfg).training


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_train_mode_dropout_varies_and_reconstruction_still_holds(explicit: bool) -> None:
    model = dropout_model()
    tokens = torch.arange(24).view(2, 12) % 40
    clean = model(tokens)
    model.train()
    torch.manual_seed(0)
    taps = ["*"] if explicit else [n for n in model.tap_names if not n.endswith(ON_DEMAND)]
    a, ta = model.run(tokens, taps=taps)
    b, tb = model.run(tokens, taps=taps)
    assert not torch.equal(a, b), "dropout in train mode must make runs differ"
    assert not torch.equal(a, clean)
    for trace in (ta, tb):
        for name, value in trace.items():
            assert not value.requires_grad, f"{name} must be recorded detached"
        for layer in range(model.cfg.n_layer):
            p = f"blocks.{layer}."
            assert torch.equal(trace[p + "resid_post"],
                               trace[p + "resid_pre"] + trace[p + "attn_delta"] + trace[p + "mlp_delta"])
            if layer:
                assert torch.equal(trace[p + "resid_pre"], trace[f"blocks.{layer - 1}.resid_post"])
    # Dropout applies to the embedding sum too: resid_pre[0] is not embed + pos_embed.
    assert not torch.equal(ta["blocks.0.resid_pre"], ta["embed"] + ta["pos_embed"])
    # Same seed, same dropout masks.
    torch.manual_seed(0)
    again, _ = model.run(tokens, taps=taps)
    assert torch.equal(again, a)
    model.eval()
    assert torch.equal(model(tokens), clean)


def test_zero_dropout_train_mode_equals_eval() -> None:
    cfg = dataclasses.replace(dropout_model().cfg, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT.random(cfg, seed=1, dtype=torch.float64)
    tokens = torch.arange(12).view(1, 12)
    evaluated = model(tokens)
    model.train()
    assert torch.equal(model(tokens), evaluated)
