"""Induction scores (probes.induction): the test sequences, the score on hand-built attention patterns (exact),
random weights at chance, and the per-token losses against the logits by hand."""
from __future__ import annotations

import pytest
import torch

from minigpt import GPT, GPTConfig, InputError
from probes.induction import chance_score, induction_scores, induction_stripe, repeated_tokens

CONFIG = GPTConfig(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4)


@pytest.mark.parametrize("bos", [None, 7])
def test_repeated_tokens_are_two_equal_halves_of_distinct_ids(bos: int | None) -> None:
    rows = repeated_tokens(120, 30, batch=3, seed=5, bos=bos)
    b = int(bos is not None)
    assert rows.shape == (3, b + 60) and rows.dtype == torch.int64
    first, second = rows[:, b:b + 30], rows[:, b + 30:]
    assert torch.equal(first, second)
    assert all(len(set(row.tolist())) == 30 for row in first)  # each token's previous occurrence is unique
    assert 0 <= int(rows.min()) and int(rows.max()) < 120
    if bos is not None:
        assert (rows[:, 0] == bos).all() and not (rows[:, 1:] == bos).any()
    assert torch.equal(rows, repeated_tokens(120, 30, batch=3, seed=5, bos=bos))
    assert not torch.equal(rows, repeated_tokens(120, 30, batch=3, seed=6, bos=bos))


def causal_pattern(batch: int, heads: int, length: int, seed: int) -> torch.Tensor:
    """A random attention pattern [B, H, T, T]: each query's weights on the keys up to it, summing to 1."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, length, length, generator=generator, dtype=torch.float64)
    return scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


@pytest.mark.parametrize("bos", [False, True])
def test_the_stripe_is_each_second_half_query_on_the_key_after_the_previous_occurrence(bos: bool) -> None:
    n, b = 6, int(bos)
    pattern = causal_pattern(2, 3, b + 2 * n, seed=0)
    by_hand = torch.stack([pattern[..., b + n + j, b + j + 1] for j in range(n)], dim=-1)  # query n + j, key j + 1
    assert torch.equal(induction_stripe(pattern, n, bos), by_hand)
    perfect = torch.zeros_like(pattern)
    perfect[..., range(b + 2 * n), range(b + 2 * n)] = 1  # each query on itself ...
    perfect[..., range(b + n, b + 2 * n), range(b + 1, b + n + 1)] = 1  # ... but the second half's on its induction key
    perfect[..., range(b + n, b + 2 * n), range(b + n, b + 2 * n)] = 0
    assert torch.equal(induction_stripe(perfect, n, bos), torch.ones(2, 3, n, dtype=torch.float64))
    uniform = torch.ones(b + 2 * n, b + 2 * n, dtype=torch.float64).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    assert induction_stripe(uniform, n, bos).mean().item() == pytest.approx(chance_score(n, bos), rel=1e-12)
    with pytest.raises(InputError, match="repeated halves"):
        induction_stripe(pattern, n + 1, bos)


@pytest.mark.parametrize("bos", [None, 3])
def test_the_scores_of_a_model_whose_pattern_is_hand_built_are_exact(bos: int | None) -> None:
    """Block 1's pattern replaced by a known one (an edit): its scores are that pattern's stripe means, to float64
    rounding (the mean is taken in another order)."""
    model = GPT.random(CONFIG, seed=0).double()
    n, b = 10, int(bos is not None)
    pattern = causal_pattern(4, CONFIG.n_head, b + 2 * n, seed=1)
    found = induction_scores(model, n, batch=4, seed=2, bos=bos, edits={"blocks.1.attn.pattern": pattern})
    stripe = torch.stack([pattern[..., b + n + j, b + j + 1] for j in range(n)], dim=-1)  # [B, H, n]
    torch.testing.assert_close(found.scores[1], stripe.mean(dim=(0, 2)), rtol=1e-14, atol=0)
    assert found.scores.shape == (2, CONFIG.n_head) and found.n == n and found.bos == bos
    assert torch.equal(found.tokens, repeated_tokens(CONFIG.vocab_size, n, batch=4, seed=2, bos=bos))


def test_random_weights_score_near_chance() -> None:
    """GPT-2's initialisation (weights of std 0.02) attends almost uniformly: every head scores about 1/position."""
    model = GPT.random(CONFIG, seed=0)
    found = induction_scores(model, 25, batch=2, bos=0)
    assert found.chance == pytest.approx(sum(1 / (q + 1) for q in range(26, 51)) / 25, rel=1e-12)
    assert torch.allclose(found.scores, torch.full_like(found.scores, found.chance), rtol=0.05)


def test_the_losses_are_the_cross_entropy_of_the_logits_at_each_half() -> None:
    model = GPT.random(CONFIG, seed=1).double()
    n = 8
    found = induction_scores(model, n, batch=3, seed=4)
    log_probs = model.run(found.tokens)[0].log_softmax(-1)

    def loss_of(p: int, row: int) -> float:  # position p predicts token p + 1
        return -log_probs[row, p, found.tokens[row, p + 1]].item()
    first = torch.tensor([[loss_of(p, r) for p in range(n - 1)] for r in range(3)], dtype=torch.float64)
    second = torch.tensor([[loss_of(n + p, r) for p in range(n - 1)] for r in range(3)], dtype=torch.float64)
    torch.testing.assert_close(found.loss_first, first, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(found.loss_second, second, rtol=1e-12, atol=1e-12)
    assert found.induction_loss == pytest.approx(second.mean().item(), rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be"),
    (dict(n=33), "fit in 64 positions"),
    (dict(n=32, bos=1), "fit in 64 positions"),
    (dict(n=5, bos=120), "bos"),
    (dict(n=5, batch=0), "batch"),
    (dict(n=5, seed=-1), "seed"),
])
def test_what_does_not_fit_is_refused_naming_it(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        induction_scores(GPT.random(CONFIG, seed=0), **kwargs)
