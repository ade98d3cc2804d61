"""Count baselines on hand-computed corpora."""
import math

import numpy as np
import pytest

from minigpt.training.baselines import K_GRID, LAMBDA_GRID, baselines, fit_smoothing
from minigpt.training.data import Windows

FIXED = {"unigram_k": 1.0, "bigram_k": 1.0, "lambda": 0.5}


def test_baselines_equal_hand_computed_values():
    train = np.array([0, 1, 0, 1, 2])  # unigram 2,2,1,0 of 5; pairs (0,1) x2, (1,0), (1,2)
    val = Windows(np.array([0, 1, 2, 3]), context=2)  # one window: inputs [0, 1], targets [1, 2]; token 3 unused
    got = baselines(train, val, vocab_size=4, smoothing=FIXED)
    assert got["tokens"] == 2
    assert got["uniform"] == pytest.approx(math.log(4))
    assert got["unigram"] == pytest.approx(-(math.log(3 / 9) + math.log(2 / 9)) / 2)  # (c + 1) / (5 + 4)
    assert got["bigram_add_k"] == pytest.approx(-(math.log(3 / 6) + math.log(2 / 6)) / 2)  # (c(a,b) + 1) / (c(a) + 4)
    p1 = 0.5 * 2 / 2 + 0.5 * 3 / 9  # p(1 | 0)
    p2 = 0.5 * 1 / 2 + 0.5 * 2 / 9  # p(2 | 1)
    assert got["bigram_interpolated"] == pytest.approx(-(math.log(p1) + math.log(p2)) / 2)
    assert got["smoothing"] == FIXED


def test_an_unseen_predecessor_falls_back_to_the_unigram():
    train = np.array([0, 1, 0, 1])
    val = Windows(np.array([2, 0]), context=1)  # 2 never precedes anything in training
    got = baselines(train, val, vocab_size=3, smoothing=FIXED)
    assert got["bigram_interpolated"] == pytest.approx(-math.log(3 / 7))  # unigram (2 + 1) / (4 + 3)
    assert got["bigram_add_k"] == pytest.approx(-math.log(1 / 3))  # (0 + 1) / (0 + 3)


def markov(n: int, vocab: int, seed: int) -> np.ndarray:
    """Mostly prev + 1 (mod vocab), a random token one time in ten."""
    rng = np.random.default_rng(seed)
    tokens = [0]
    for _ in range(n - 1):
        tokens.append((tokens[-1] + 1) % vocab if rng.random() < 0.9 else int(rng.integers(vocab)))
    return np.array(tokens)


def test_the_interpolated_bigram_beats_the_unigram_on_bigram_structure():
    got = baselines(markov(20_000, 50, seed=0), Windows(markov(2_001, 50, seed=1), context=100), vocab_size=50)
    assert got["tokens"] == 2_000
    assert got["bigram_interpolated"] < got["unigram"] - 1.0  # about 0.6 nats against ln 50 = 3.9
    assert got["unigram"] < got["uniform"] + 0.01
    assert got["smoothing"]["lambda"] in LAMBDA_GRID and got["smoothing"]["bigram_k"] in K_GRID


def test_fit_smoothing_takes_the_best_grid_value_on_the_held_out_tail():
    fitted = fit_smoothing(markov(20_000, 50, seed=2), 50)
    assert fitted["lambda"] >= 0.8  # the next token is the bigram's nine times in ten


@pytest.mark.parametrize("tokens, vocab", [([0, 5], 4), ([1], 4), ([-1, 0], 4)])
def test_token_ids_outside_the_vocabulary_are_refused(tokens, vocab):
    from minigpt.errors import TrainingError

    with pytest.raises(TrainingError, match=r"\[0, 4\)"):
        baselines(np.array(tokens), Windows(np.array([0, 1]), context=1), vocab_size=vocab, smoothing=FIXED)
