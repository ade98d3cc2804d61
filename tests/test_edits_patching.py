"""Patching and ablation helpers equal the same interventions made with hooks on HF.

``edits.patch`` / ``zero_ablate`` / ``mean_ablate`` at chosen positions and heads against HF hooks
that put HF's own clean values (or zeros, or their mean) in the same places; ``|`` chaining edits of
one tap in order; edit functions that take the tap name; the errors.
"""
from __future__ import annotations

import pytest
import torch
from hf_reference import Case, assert_close, assert_same_run, cases, hf_forward, hf_hook_for, make_hf, to_minigpt
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, EditError, GPTConfig, TapError, edits
from minigpt.edits import Edits

PLAIN = ["resid_pre", "resid_mid", "resid_post", "ln1", "attn_delta", "ln2", "mlp.post", "mlp_delta"]
HEADED = ["attn.q", "attn.k", "attn.v", "attn.z"]


def pair(case: Case):
    hf = make_hf(case.config, case.seed, torch.float64)
    return hf, to_minigpt(hf)


def corrupted(case: Case) -> torch.Tensor:
    """Other random tokens of the same shape as ``case.tokens()``: the run that gets patched."""
    generator = torch.Generator().manual_seed(case.seed + 2)
    return torch.randint(case.config["vocab_size"], (case.batch, case.seq), generator=generator)


def region_by_hand(shape: tuple[int, ...], positions: list[int] | None, heads: list[int] | None) -> torch.Tensor:
    """True at the chosen (position, head) entries of a [B, S, ...] or [B, S, H, d] tap, written out entry by entry."""
    region = torch.zeros(shape, dtype=torch.bool)
    for p in positions if positions is not None else range(shape[1]):
        for h in heads if heads is not None else [None]:
            if h is None:
                region[:, p] = True
            else:
                region[:, p, h] = True
    return region


@st.composite
def where(draw, case: Case, n_layer: int, n_head: int):
    """A tap, and positions and heads (None: all) to act on."""
    kind = draw(st.sampled_from(PLAIN + HEADED), label="tap")
    name = f"blocks.{draw(st.integers(0, n_layer - 1), label='block')}.{kind}"
    positions = draw(st.none() | st.lists(st.integers(0, case.seq - 1), min_size=1, max_size=3, unique=True),
                     label="positions")
    heads = None
    if kind in HEADED:
        heads = draw(st.none() | st.lists(st.integers(0, n_head - 1), min_size=1, max_size=2, unique=True),
                     label="heads")
    return name, positions, heads


# ---------------------------------------------------------------------------------------------
# Against HF hooks


@given(case=cases(), data=st.data())
def test_patch_and_ablations_equal_hf_hooks_doing_the_same(case: Case, data) -> None:
    hf, model = pair(case)
    clean, tokens = case.tokens(), corrupted(case)
    name, positions, heads = data.draw(where(case, model.cfg.n_layer, model.cfg.n_head))
    action = data.draw(st.sampled_from(["patch", "zero", "mean", "mean per position"]), label="action")
    _, hf_clean = hf_forward(hf, clean)
    _, clean_trace = model.run(clean, taps=name)
    region = region_by_hand(tuple(hf_clean[name].shape), positions, heads)
    if action == "patch":
        ours = edits.patch(clean_trace, name, positions=positions, heads=heads)
        value = hf_clean[name]
    elif action == "zero":
        ours = edits.zero_ablate(name, positions=positions, heads=heads)
        value = torch.zeros_like(hf_clean[name])
    else:  # the mean of the clean run, over its batch (and positions), put into the corrupted run
        per_position = action == "mean per position"
        ours = edits.mean_ablate(name, clean_trace, positions=positions, heads=heads, per_position=per_position)
        value = hf_clean[name].mean(dim=(0,) if per_position else (0, 1), keepdim=True).expand_as(hf_clean[name])
    assert_same_run(hf, model, tokens, ours, hf_hook_for(hf, name, lambda x: torch.where(region, value, x)))
    _, trace = model.run(tokens, taps=name, edits=ours)
    assert_close(trace[name][region], value[region])


@given(case=cases(), data=st.data())
def test_patching_heads_of_attn_heads_equals_patching_their_slice_of_c_proj_input(case: Case, data) -> None:
    """A head's write is z_h @ W_O[h]: patching it (or zeroing it) is patching (zeroing) z_h before c_proj."""
    hf, model = pair(case)
    cfg = model.cfg
    clean, tokens = case.tokens(), corrupted(case)
    layer = data.draw(st.integers(0, cfg.n_layer - 1), label="block")
    heads = data.draw(st.lists(st.integers(0, cfg.n_head - 1), min_size=1, max_size=3, unique=True), label="heads")
    positions = data.draw(st.none() | st.lists(st.integers(-case.seq, case.seq - 1), min_size=1, max_size=2),
                          label="positions")
    zero = data.draw(st.booleans(), label="zero")
    _, hf_clean = hf_forward(hf, clean)
    z_clean = hf_clean[f"blocks.{layer}.attn.z"]  # [B, S, H, d]
    rows = [p % case.seq for p in positions] if positions is not None else None
    region = region_by_hand(tuple(z_clean.shape), rows, heads)

    def patch_z(module, args):
        z = args[0].view(*args[0].shape[:-1], cfg.n_head, cfg.d_head)
        return (torch.where(region, torch.zeros_like(z) if zero else z_clean, z).flatten(-2),)

    name = f"blocks.{layer}.attn.heads"
    _, clean_trace = model.run(clean, taps=name)
    ours = (edits.zero_ablate(name, positions=positions, heads=heads) if zero
            else edits.patch(clean_trace, name, positions=positions, heads=heads))
    assert_same_run(hf, model, tokens, ours, [(hf.transformer.h[layer].attn.c_proj, patch_z, "pre")])


@given(case=cases(), data=st.data())
def test_patching_a_heads_pattern_gives_z_from_the_clean_pattern(case: Case, data) -> None:
    """attn.pattern is [B, H, Q, K]: heads pick axis 1, positions the query axis; z = pattern @ v."""
    _, model = pair(case)
    layer = data.draw(st.integers(0, model.cfg.n_layer - 1), label="block")
    head = data.draw(st.integers(0, model.cfg.n_head - 1), label="head")
    query = data.draw(st.integers(0, case.seq - 1), label="query")
    p = f"blocks.{layer}.attn."
    _, clean = model.run(case.tokens(), taps=p + "pattern")
    _, trace = model.run(corrupted(case), taps=[p + "pattern", p + "v", p + "z"],
                         edits=edits.patch(clean, p + "pattern", heads=head, positions=[query]))
    pattern = trace[p + "pattern"]
    assert torch.equal(pattern[:, head, query], clean[p + "pattern"][:, head, query])
    by_hand = torch.einsum("bk,bkd->bd", pattern[:, head, query], trace[p + "v"][:, :, head])  # [B, K] @ [B, K, d]
    assert_close(trace[p + "z"][:, query, head], by_hand)


# ---------------------------------------------------------------------------------------------
# Fixed small model: sources, padding, glob patterns, composition, errors

CONFIG = GPTConfig(vocab_size=50, n_positions=12, n_embd=16, n_layer=3, n_head=4)
CLEAN = torch.tensor([[1, 7, 3, 9, 4, 2], [5, 5, 6, 1, 2, 3]])
CORRUPT = torch.tensor([[1, 7, 3, 8, 4, 2], [5, 4, 6, 1, 2, 3]])


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(CONFIG, seed=4, dtype=torch.float64)


def test_patching_every_block_input_with_a_glob_gives_the_clean_run(model) -> None:
    """Each block takes its own recorded tensor (the edit gets the tap's name): the run becomes the clean one."""
    _, clean = model.run(CLEAN, taps="blocks.*.resid_pre")
    patched, trace = model.run(CORRUPT, taps="blocks.*.resid_pre", edits=edits.patch(clean, "blocks.*.resid_pre"))
    assert torch.equal(patched, model.run(CLEAN)[0])
    for name in trace:
        assert torch.equal(trace[name], clean[name])
    # A {tap name: tensor} dict serves as a source too, and a list of patterns as the taps.
    from_dict, _ = model.run(CORRUPT, edits=edits.patch(dict(clean), ["blocks.0.resid_pre", "blocks.[12].resid_pre"]))
    assert torch.equal(from_dict, patched)


def test_a_source_of_batch_one_serves_every_row_and_other_lengths_need_positions(model) -> None:
    name = "blocks.1.resid_pre"
    _, clean = model.run(CLEAN[:1], taps=name)
    _, trace = model.run(CORRUPT, taps=name, edits=edits.patch(clean, name))
    assert torch.equal(trace[name], clean[name].expand(2, -1, -1))
    # A longer source: -1 is the last position of each run; a slice picks the same count in both.
    _, longer = model.run(torch.cat([CLEAN, CLEAN[:, :2]], dim=1), taps=name)
    _, trace = model.run(CORRUPT, taps=name, edits=edits.patch(longer, name, positions=-1))
    _, plain = model.run(CORRUPT, taps=name)
    assert torch.equal(trace[name][:, -1], longer[name][:, -1])
    assert torch.equal(trace[name][:, :-1], plain[name][:, :-1])
    _, trace = model.run(CORRUPT, taps=name, edits=edits.patch(longer, name, positions=slice(0, 2)))
    assert torch.equal(trace[name][:, :2], longer[name][:, :2])
    with pytest.raises(EditError, match=r"blocks\.1\.resid_pre.*\(2, 8, 16\).*\(2, 6, 16\).*positions="):
        model.run(CORRUPT, edits=edits.patch(longer, name))
    with pytest.raises(EditError, match="picks 8 positions of the source but 6"):
        model.run(CORRUPT, edits=edits.patch(longer, name, positions=slice(None)))
    _, three = model.run(torch.cat([CLEAN, CLEAN[:1]]), taps=name)
    with pytest.raises(EditError, match=r"\(3, 6, 16\)"):
        model.run(CORRUPT, edits=edits.patch(three, name))


def test_mean_ablation_leaves_padding_out_of_the_mean(model) -> None:
    """A ragged source's padding is not averaged in: its mean is that of the real tokens, row by row alone."""
    rows = [[1, 7, 3, 9, 4, 2], [5, 5, 6]]
    name = "blocks.1.mlp.post"
    _, ragged = model.run(rows, taps=name)
    real = torch.cat([model.run([row], taps=name)[1][name][0] for row in rows])  # [9, M]
    _, trace = model.run(CORRUPT, taps=name, edits=edits.mean_ablate(name, ragged))
    assert_close(trace[name], real.mean(0).expand_as(trace[name]))
    # Per position: position 4 has one real token (row 0), position 1 has two.
    _, trace = model.run(CORRUPT, taps=name, edits=edits.mean_ablate(name, ragged, per_position=True))
    alone = [model.run([row], taps=name)[1][name][0] for row in rows]
    assert_close(trace[name][:, 4], alone[0][4].expand(2, -1))
    assert_close(trace[name][:, 1], ((alone[0][1] + alone[1][1]) / 2).expand(2, -1))
    # No source: the mean over the batch being run.
    _, plain = model.run(CORRUPT, taps=name)
    _, trace = model.run(CORRUPT, taps=name, edits=edits.mean_ablate(name, positions=[0, 2]))
    assert_close(trace[name][:, [0, 2]], plain[name].mean((0, 1)).expand(2, 2, -1))
    assert torch.equal(trace[name][:, 1], plain[name][:, 1])
    # A tensor source: every entry counts.
    source = torch.arange(2 * 3 * CONFIG.d_mlp, dtype=torch.float64).view(2, 3, -1)
    _, trace = model.run(CORRUPT, taps=name, edits=edits.mean_ablate(name, source))
    assert_close(trace[name], source.mean((0, 1)).expand_as(trace[name]))
    with pytest.raises(EditError, match="per_position"):
        model.run(CORRUPT, edits=edits.mean_ablate(name, source, per_position=True))


def test_edit_functions_may_take_the_tap_name(model) -> None:
    seen = []

    def halve_late_blocks(x: torch.Tensor, name: str) -> torch.Tensor:
        seen.append(name)
        return x * 0.5 if int(name.split(".")[1]) >= 1 else x

    by_name, _ = model.run(CLEAN, edits={"blocks.*.mlp_delta": halve_late_blocks})
    assert seen == [f"blocks.{i}.mlp_delta" for i in range(3)]
    spelled_out, _ = model.run(CLEAN, edits={"blocks.1.mlp_delta": lambda x: x * 0.5,
                                             "blocks.2.mlp_delta": lambda x: x * 0.5})
    assert torch.equal(by_name, spelled_out)


# ---------------------------------------------------------------------------------------------
# | chains edits of one tap in order


def test_or_chains_edits_of_one_tap_in_order_whichever_side_is_a_plain_dict(model) -> None:
    name = "blocks.1.attn.k"
    both = edits.zero_ablate(name, heads=[0, 2])
    expected = model.run(CLEAN, edits=both)[0]
    first, second = edits.zero_head_keys(1, 0), edits.zero_head_keys(1, 2)
    plain_first, plain_second = dict(first), dict(second)
    assert isinstance(first | second, Edits) and isinstance(plain_first | second, Edits)
    merges = [first | second, plain_first | second, first | plain_second, edits.combine(plain_first, plain_second)]
    for merged in merges:
        assert list(merged) == [name]
        assert torch.equal(model.run(CLEAN, edits=merged)[0], expected)
    accumulated = Edits()
    accumulated |= first
    accumulated |= plain_second
    assert torch.equal(model.run(CLEAN, edits=accumulated)[0], expected)
    # Two plain dicts stay Python's: the last edit of a key wins.
    assert torch.equal(model.run(CLEAN, edits=plain_first | plain_second)[0], model.run(CLEAN, edits=second)[0])


def test_order_matters_and_each_edit_in_a_chain_gets_the_tap_name_and_its_own_copy(model) -> None:
    name = "blocks.0.resid_post"
    _, clean = model.run(CLEAN, taps=name)
    _, plain = model.run(CORRUPT, taps=name)
    patch_then_zero = edits.patch(clean, name) | edits.zero_ablate(name, positions=[0])
    _, trace = model.run(CORRUPT, taps=name, edits=patch_then_zero)
    assert (trace[name][:, 0] == 0).all() and torch.equal(trace[name][:, 1:], clean[name][:, 1:])
    zero_then_patch = edits.zero_ablate(name, positions=[0]) | edits.patch(clean, name)
    _, trace = model.run(CORRUPT, taps=name, edits=zero_then_patch)
    assert torch.equal(trace[name], clean[name])
    # A replacement tensor, then a function that writes into its input: the tensor is left alone.
    replacement = plain[name].clone()

    def double_in_place(x: torch.Tensor, tap: str) -> torch.Tensor:
        assert tap == name
        return x.mul_(2)

    _, trace = model.run(CORRUPT, taps=name, edits={name: replacement} | Edits({name: double_in_place}))
    assert torch.equal(trace[name], 2 * plain[name]) and torch.equal(replacement, plain[name])


def test_ablations_apply_at_every_step_of_generation(model) -> None:
    """Position-wise ablations give during generation what they give in a full forward (greedy)."""
    _, source = model.run(CLEAN, taps="blocks.2.mlp.post")
    ablation = edits.zero_ablate("blocks.1.attn.z", heads=[1, 3]) | edits.mean_ablate("blocks.2.mlp.post", source)
    ids = model.generate(CLEAN[:1], 4, temperature=0, edits=ablation)
    for step in range(4):
        logits, _ = model.run(ids[:, :6 + step], edits=ablation)
        assert logits[0, -1].argmax() == ids[0, 6 + step]


# ---------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_tap_and_the_way_out(model) -> None:
    _, clean = model.run(CLEAN, taps=["blocks.0.resid_pre", "blocks.1.attn.z"])
    with pytest.raises(TapError, match=r"did not record \['blocks\.1\.resid_pre', 'blocks\.2\.resid_pre'\].*taps="):
        edits.patch(clean, "blocks.*.resid_pre")
    with pytest.raises(TapError, match="mean_ablate.*blocks.0.mlp.post"):
        edits.mean_ablate("blocks.0.mlp.post", clean)
    with pytest.raises(TapError, match="unknown tap"):
        edits.patch(clean, "blocks.0.resid_psot")
    with pytest.raises(TapError, match="no tensor for tap 'blocks.2.ln1'"):
        model.run(CLEAN, edits=edits.patch(dict(clean), "blocks.2.ln1"))
    with pytest.raises(EditError, match=r"heads=\[1\] given for tap 'blocks.0.mlp.post' \(shape B S M\).*no head axis"):
        model.run(CLEAN, edits=edits.zero_ablate("blocks.0.mlp.post", heads=[1]))
    with pytest.raises(EditError, match="head 4 does not exist: tap 'blocks.1.attn.z' has heads 0..3"):
        model.run(CLEAN, edits=edits.patch(clean, "blocks.1.attn.z", heads=4))
    with pytest.raises(EditError, match="position -7 does not exist.*positions 0..5"):
        model.run(CLEAN, edits=edits.zero_ablate("blocks.0.ln1", positions=[0, -7]))
    with pytest.raises(EditError, match="Trace, a {tap name: tensor} dict or a tensor"):
        edits.patch([1, 2], "blocks.0.ln1")
    with pytest.raises(TapError, match="taps must be"):
        edits.zero_ablate(3)
    with pytest.raises(EditError, match="combine takes edit dicts"):
        edits.combine(edits.zero_head_keys(0, 0), [("blocks.0.ln1", None)])
    # Different patterns over the same tap are not merged by |: run refuses them, naming both.
    with pytest.raises(EditError, match="edited twice"):
        model.run(CLEAN, edits=edits.zero_ablate("blocks.*.attn.k") | edits.zero_head_keys(0, 1))


def test_the_helpers_compile_without_a_graph_break(model) -> None:
    """Patching and ablation inside a compiled forward (a source trace's means are taken beforehand)."""
    from minigpt.taps import TapCall

    _, ragged = model.run([[1, 7, 3, 9, 4, 2], [5, 5, 6]], taps=["blocks.*.resid_pre", "blocks.*.mlp.post",
                                                                  "blocks.0.attn.pattern"])
    chosen = (edits.patch(ragged, "blocks.*.resid_pre", positions=[1, -1])
              | edits.zero_ablate("blocks.1.attn.v", heads=1)
              | edits.mean_ablate("blocks.*.mlp.post", ragged)
              | edits.mean_ablate("blocks.0.attn.pattern", ragged, heads=2)
              | edits.zero_head_keys(2, 0) | edits.zero_head_keys(2, 3))
    torch._dynamo.reset()
    report = torch._dynamo.explain(model.forward)(CORRUPT, TapCall.request(model.tap_names, (), chosen, seq=6))
    assert report.graph_break_count == 0, [b.reason.splitlines()[0] for b in report.break_reasons]
