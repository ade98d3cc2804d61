"""Taps and edits under torch.compile: one graph, no breaks, and the same numbers as eager.

A probe left on in a tight GPU loop only pays if the compiled forward keeps it: these tests
compile the forward of a small model with taps recorded and edits applied, ``fullgraph=True``
(any graph break is an error), and compare every logit and recorded tensor with eager mode.
"""
from __future__ import annotations

import copy

import pytest
import torch

from minigpt import GPT, GPTConfig, edits
from minigpt.taps import TapCall

CFG = GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
RECORD = ["blocks.*.resid_pre", "blocks.*.attn_delta", "blocks.*.mlp_delta", "blocks.*.resid_post",
          "blocks.0.attn.q", "blocks.0.attn.heads", "blocks.1.attn.pattern", "ln_f", "logits"]


def some_edits() -> dict:
    """Fresh closures each call: the notes' interventions plus a plain function and a replacement tensor."""
    return (edits.zero_head_keys(0, 1) | edits.scale_block(1, 0.5)
            | edits.add_vector("blocks.0.mlp.post", torch.linspace(-1.0, 1.0, CFG.d_mlp))
            | {"blocks.1.attn.heads": lambda h: h * 0.9,
               "blocks.1.attn.v": torch.full((2, 12, CFG.n_head, CFG.d_head), 0.25)})


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(CFG, seed=3)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def taps_for(model: GPT, record=(), edit=None, **options) -> TapCall:
    """The TapCall model.run would build (names resolved outside the compiled region)."""
    return TapCall.request(model.tap_names, record, edit, seq=12, **options)


def explain(model: GPT, tokens: torch.Tensor, taps: TapCall):
    torch._dynamo.reset()
    return torch._dynamo.explain(model.forward)(tokens, taps)


@pytest.mark.parametrize("record, with_edits, options", [
    ((), False, {}),
    (RECORD, False, {}),
    (RECORD, True, {}),
    ("*", True, {}),
    (RECORD, True, {"keep_positions": slice(-3, None), "store_dtype": torch.bfloat16}),
    (RECORD, False, {"keep_positions": [0, 5]}),
], ids=["plain", "record", "record+edits", "every-tap+edits", "positions-slice+dtype", "positions-list"])
def test_forward_with_taps_and_edits_has_no_graph_break(model, tokens, record, with_edits, options) -> None:
    taps = taps_for(model, record, some_edits() if with_edits else None, **options)
    report = explain(model, tokens, taps)
    assert report.graph_break_count == 0, [b.reason.splitlines()[0] for b in report.break_reasons]
    assert report.graph_count == 1


@pytest.mark.parametrize("record, fused", [
    (RECORD[:4], True), (["blocks.*.attn.heads", "blocks.*.attn.z"], True),
    (["blocks.1.attn.pattern"], False), (["blocks.0.attn.scores"], False),
])
def test_compiled_graph_keeps_fused_attention_unless_pattern_asked(model, tokens, record, fused) -> None:
    graph = explain(model, tokens, taps_for(model, record)).graphs[0]
    sdpa_calls = sum(node.target is torch.nn.functional.scaled_dot_product_attention for node in graph.graph.nodes)
    # The pattern is asked in one block only: that block computes it, the other stays fused.
    assert sdpa_calls == (CFG.n_layer if fused else CFG.n_layer - 1)


@pytest.mark.slow
def test_compiled_run_equals_eager(model, tokens) -> None:
    """model.compile(fullgraph=True), then model.run with taps and edits: the same logits and trace."""
    eager_logits, eager_trace = model.run(tokens, taps=RECORD, edits=some_edits())
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled.compile(fullgraph=True)
    for _ in range(2):  # the second call reuses the graph, with new edit closures
        logits, trace = compiled.run(tokens, taps=RECORD, edits=some_edits())
        torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
        assert list(trace) == list(eager_trace)
        for name in trace:
            torch.testing.assert_close(trace[name], eager_trace[name], rtol=1e-5, atol=1e-5, msg=name)
    # The edits really acted: the edited run differs from a plain one, compiled or not.
    assert not torch.allclose(compiled(tokens), eager_logits, atol=1e-3)
    torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    # Keep options hold under compile too.
    _, small = compiled.run(tokens, taps="blocks.*.resid_post", keep_positions=slice(-2, None), store_dtype=torch.bfloat16)
    _, full = model.run(tokens, taps="blocks.*.resid_post")
    for name in small:
        assert small[name].dtype == torch.bfloat16 and small[name].shape == (2, 2, CFG.n_embd)
        torch.testing.assert_close(small[name], full[name][:, -2:].to(torch.bfloat16))
