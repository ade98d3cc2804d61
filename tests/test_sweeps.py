"""Sweeps and one-line conveniences: patching grids equal to the loops they replace (float64),
run(logits=False) never computing the unembedding, tap predicates, and probes.lens / probes.attribute
on batches equal to row-by-row calls."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import probes
from minigpt import GPT, GPTConfig, InputError, TapError, edits
from minigpt.errors import MemoryBudgetError
from minigpt.memory import forward_bytes
from probes.sweeps import HEAD_TAPS, POSITION_TAPS, logit_difference, patch_heads, patch_positions

CLEAN = [5, 17, 3, 44, 9, 12, 30]
CORRUPT = [5, 17, 3, 21, 9, 12, 30]


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(GPTConfig(vocab_size=60, n_positions=16, n_embd=24, n_layer=3, n_head=3), seed=4,
                      dtype=torch.float64)


METRIC = logit_difference(7, 11)


def position_loop(model: GPT, tap: str) -> torch.Tensor:
    """The plain loop a position sweep replaces: one forward per (layer, position), edits.patch."""
    _, clean = model.run(CLEAN, taps=f"blocks.*.{tap}")
    grid = torch.zeros(model.cfg.n_layer, len(CLEAN), dtype=torch.float64)
    for layer in range(model.cfg.n_layer):
        for pos in range(len(CLEAN)):
            logits, _ = model.run(CORRUPT, edits=edits.patch(clean, f"blocks.{layer}.{tap}", positions=pos))
            grid[layer, pos] = METRIC(logits)[0]
    return grid


def head_loop(model: GPT, tap: str) -> torch.Tensor:
    _, clean = model.run(CLEAN, taps=f"blocks.*.{tap}")
    grid = torch.zeros(model.cfg.n_layer, model.cfg.n_head, dtype=torch.float64)
    for layer in range(model.cfg.n_layer):
        for head in range(model.cfg.n_head):
            logits, _ = model.run(CORRUPT, edits=edits.patch(clean, f"blocks.{layer}.{tap}", heads=head))
            grid[layer, head] = METRIC(logits)[0]
    return grid


@pytest.mark.parametrize("tap", ["resid_pre", "attn_delta", "mlp_delta"])
def test_position_sweeps_equal_the_plain_loop(model, tap):
    expected = position_loop(model, tap)
    assert expected.std() > 0  # patching matters somewhere, so equality says something
    for batch in (1, 5, 64):  # one site per forward; chunks that straddle layers; all sites in one forward
        grid = patch_positions(model, CLEAN, CORRUPT, METRIC, tap, batch=batch)
        assert grid.shape == (3, len(CLEAN)) and grid.dtype == torch.float64
        torch.testing.assert_close(grid, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tap", ["attn.z", "attn.heads"])
def test_head_sweeps_equal_the_plain_loop(model, tap):
    expected = head_loop(model, tap)
    assert expected.std() > 0
    for batch in (1, 4, 9):
        grid = patch_heads(model, CLEAN, CORRUPT, METRIC, tap, batch=batch)
        assert grid.shape == (3, 3)
        torch.testing.assert_close(grid, expected, rtol=1e-12, atol=1e-12)


def test_patching_the_clean_run_into_itself_changes_nothing(model):
    clean_value = METRIC(model(torch.tensor([CLEAN])))[0]
    grid = patch_positions(model, CLEAN, CLEAN, METRIC, "resid_pre", batch=4)
    torch.testing.assert_close(grid, clean_value.expand(3, len(CLEAN)), rtol=1e-12, atol=1e-12)
    assert "resid_pre" in POSITION_TAPS and "attn.z" in HEAD_TAPS and "attn.pattern" not in HEAD_TAPS


def test_sweeps_refuse_what_they_cannot_do(model):
    with pytest.raises(InputError, match="tap must be one of 'resid_pre'"):
        patch_positions(model, CLEAN, CORRUPT, METRIC, "attn.pattern")
    with pytest.raises(InputError, match="tap must be one of 'attn.q'"):
        patch_heads(model, CLEAN, CORRUPT, METRIC, "resid_pre")
    with pytest.raises(InputError, match="same number of tokens.* got 7 and 6"):
        patch_positions(model, CLEAN, CORRUPT[:-1], METRIC)
    with pytest.raises(InputError, match="batch must be an integer >= 1, got 0; it is the number of patched rows"):
        patch_positions(model, CLEAN, CORRUPT, METRIC, batch=0)
    with pytest.raises(InputError, match=r"one number per row \[B\], here \[2\]"):
        patch_heads(model, CLEAN, CORRUPT, lambda logits: logits[:, -1], batch=2)
    with pytest.raises(InputError, match="one sequence"):
        patch_positions(model, [CLEAN, CLEAN], CORRUPT, METRIC)


# ---------------------------------------------------------------------------------------------
# run(..., logits=False)


def test_logits_false_never_computes_the_unembedding(model, monkeypatch):
    tokens = torch.tensor([CLEAN, CORRUPT])
    expected_logits, expected = model.run(tokens, taps=["blocks.*.resid_post", "ln_f"])
    weights = []
    linear = F.linear

    def watched(x, weight, *args, **kwargs):
        weights.append(weight)
        return linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "linear", watched)
    logits, trace = model.run(tokens, taps=["blocks.*.resid_post", "ln_f"], logits=False)
    assert logits is None and list(trace) == list(expected)
    assert all(torch.equal(trace[name], expected[name]) for name in expected)
    assert weights and not any(w is model.unembedding or w.shape == model.unembedding.shape for w in weights)
    weights.clear()
    model.run(tokens)  # the watch does see the unembedding when it is computed
    assert any(w is model.unembedding for w in weights)
    # A glob leaves the tap 'logits' out; naming it, editing it or stopping at it is refused.
    _, everything = model.run(tokens, taps="*", logits=False)
    assert "logits" not in everything and "ln_f" in everything
    for kwargs, where in [(dict(taps=["ln_f", "logits"]), "taps"), (dict(taps="logits"), "taps"),
                          (dict(edits={"logits": lambda x: x}), "edits"), (dict(stop_at="logits"), "stop_at")]:
        with pytest.raises(InputError, match=f"logits=False skips the unembedding, but {where} asks for the tap"):
            model.run(tokens, logits=False, **kwargs)
    with pytest.raises(InputError, match="logits must be True or False"):
        model.run(tokens, logits=None)
    assert model.run(tokens, taps="blocks.0.ln1", stop_at="blocks.0.ln1", logits=False)[0] is None
    torch.testing.assert_close(expected_logits, model.run(tokens)[0])


def test_the_memory_guard_leaves_the_logits_out_when_they_are_not_computed(monkeypatch):
    model = GPT.random(GPTConfig(vocab_size=5000, n_positions=64, n_embd=16, n_layer=1, n_head=2), seed=0)
    cfg, batch, seq = model.cfg, 8, 64
    without = forward_bytes(cfg, batch, seq, 4, logits=False)
    with_logits = forward_bytes(cfg, batch, seq, 4)
    assert with_logits - without == batch * seq * cfg.vocab_size * 4
    # Free memory between the two needs: the full forward is refused, the one without logits runs.
    free = int((without + with_logits) / 2 / 0.9)
    monkeypatch.setattr("minigpt.memory.available_memory", lambda device: free)
    tokens = torch.zeros(batch, seq, dtype=torch.long)
    with pytest.raises(MemoryBudgetError, match="the forward's activations and logits"):
        model.run(tokens)
    assert model.run(tokens, logits=False)[0] is None


# ---------------------------------------------------------------------------------------------
# Tap predicates


def test_taps_by_predicate(model):
    _, by_glob = model.run(CLEAN, taps="blocks.*.resid_post")
    _, by_predicate = model.run(CLEAN, taps=lambda name: name.endswith("resid_post"))
    assert list(by_predicate) == list(by_glob)
    _, mixed = model.run(CLEAN, taps=["ln_f", lambda name: name.startswith("blocks.1.attn.z")])
    assert list(mixed) == ["blocks.1.attn.z", "ln_f"]
    _, cut = model.run(CLEAN, taps=lambda name: name.endswith("resid_pre"), stop_at="blocks.1.resid_pre")
    assert list(cut) == ["blocks.0.resid_pre", "blocks.1.resid_pre"]
    with pytest.raises(TapError, match="selects no tap"):
        model.run(CLEAN, taps=lambda name: False)
    with pytest.raises(TapError, match="returned 'yes' for 'embed'; a predicate takes a tap name and returns True"):
        model.run(CLEAN, taps=lambda name: "yes")
    with pytest.raises(ZeroDivisionError) as raised:
        model.run(CLEAN, taps=lambda name: 1 / 0)
    assert "tap predicate" in raised.value.__notes__[0]


# ---------------------------------------------------------------------------------------------
# probes.lens and probes.attribute on batches


ROWS = [[3, 1, 4, 1, 5, 9, 2], [7, 2, 8], [6, 5, 3, 5, 8]]


def test_lens_on_a_ragged_batch_is_each_row_alone(model):
    results = probes.lens(model, ROWS, k=3)
    assert isinstance(results, list) and len(results) == 3
    for row, result in zip(ROWS, results):
        alone = probes.lens(model, [row], k=3)
        assert result.position == alone.position == len(row) - 1 and result.context == alone.context
        assert result.target_id == alone.target_id and torch.equal(result.top_ids, alone.top_ids)
        torch.testing.assert_close(result.target_prob, alone.target_prob, rtol=1e-6, atol=1e-9)
        assert result.findings[0].holds is True
    second = probes.lens(model, ROWS, position=1)
    assert [r.position for r in second] == [1, 1, 1]
    assert second[1].target_id == probes.lens(model, [ROWS[1]], position=1).target_id
    with pytest.raises(InputError, match=r"position \(row 1\) 3 is out of range: .* have 3"):
        probes.lens(model, ROWS, position=3)


def test_attribute_on_a_batch_is_each_row_alone(model):
    results = probes.attribute(model, ROWS, target=[4, 9, 13], position=-2)
    assert [r.target_id for r in results] == [4, 9, 13] and [r.position for r in results] == [5, 1, 3]
    for row, result, target in zip(ROWS, results, [4, 9, 13]):
        alone = probes.attribute(model, [row], target=target, position=-2)
        assert result.sum_error <= 1e-9 and result.findings[0].holds is True
        torch.testing.assert_close(result.contributions, alone.contributions, rtol=1e-9, atol=1e-9)
        assert result.logit == pytest.approx(alone.logit, rel=1e-9)
    predicted = probes.attribute(model, ROWS)
    assert [r.target_id for r in predicted] == [probes.attribute(model, [row]).target_id for row in ROWS]
    with pytest.raises(InputError, match="target gives 2 ids for 3 rows"):
        probes.attribute(model, ROWS, target=[1, 2])
    with pytest.raises(InputError, match="target 60 is out of range"):
        probes.attribute(model, ROWS, target=[1, 2, 60])


def test_a_tensor_batch_with_an_attention_mask(model):
    tokens = torch.tensor([ROWS[0], ROWS[1] + [0] * 4])
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    from_mask = probes.attribute(model, tokens, attention_mask=mask)
    from_rows = probes.attribute(model, ROWS[:2])
    for a, b in zip(from_mask, from_rows):
        assert a.position == b.position and a.target_id == b.target_id
        torch.testing.assert_close(a.contributions, b.contributions)
    assert [r.position for r in probes.lens(model, tokens, attention_mask=mask)] == [6, 2]
