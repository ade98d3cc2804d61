"""What a validation loss is worth: count-based baselines on the same windows.

``baselines(train_tokens, val_windows, vocab_size)`` gives the loss (mean nats per predicted token)
of four models that need no training, on exactly the (input, target) pairs of the validation
windows the trainer evaluates (``data.Windows``: window i predicts tokens i*context+1 ..
i*context+context, each from the one before):

* uniform: every token 1/V, ln V nats;
* unigram: token counts of the training split, add-k smoothed: (c(b) + k) / (N + kV);
* bigram, add-k: (c(a, b) + k) / (c(a) + kV);
* bigram interpolated: lambda * c(a, b) / c(a) + (1 - lambda) * unigram(b) (the unigram alone where
  c(a) = 0, as the counts say nothing of a).

k and lambda are fitted on the training split only: counts from its first 90%, the value with the
lowest loss on its last 10% taken from a fixed grid; the counts used on validation are then those
of the whole training split. A model that learned anything about text in context beats the
interpolated bigram.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..checks import check_int
from ..errors import TrainingError
from .data import Windows

K_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
HELD_OUT = 0.1  # the last tenth of the training split fits k and lambda
WINDOWS_PER_READ = 256


class Counts:
    """Unigram and bigram counts of a token stream [N] (ids < vocab_size); bigrams kept sparse."""

    def __init__(self, tokens: np.ndarray, vocab_size: int):
        check_int(vocab_size, "vocab_size", 1, error=TrainingError)
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) < 2 or tokens.min() < 0 or tokens.max() >= vocab_size:
            raise TrainingError(f"the baselines need at least 2 training tokens, each an id in [0, {vocab_size}); got "
                                f"{len(tokens)} tokens" + (f" in [{tokens.min()}, {tokens.max()}]" if len(tokens) else "")
                                + ": give the training split's token file and the model's vocabulary size")
        self.vocab_size = vocab_size
        self.unigram = np.bincount(tokens, minlength=vocab_size).astype(np.float64)  # [V]
        self.total = float(len(tokens))
        self.following = np.bincount(tokens[:-1], minlength=vocab_size).astype(np.float64)  # c(a) as a predecessor
        self.pairs, self.pair_counts = np.unique(tokens[:-1] * vocab_size + tokens[1:], return_counts=True)

    def pair_count(self, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        """c(previous[i], following[i]) for each i -> [n] float64."""
        keys = previous.astype(np.int64) * self.vocab_size + following
        at = np.minimum(np.searchsorted(self.pairs, keys), len(self.pairs) - 1)
        return np.where(self.pairs[at] == keys, self.pair_counts[at], 0).astype(np.float64)

    def unigram_nll(self, following: np.ndarray, k: float) -> np.ndarray:
        """-log p(b) per pair, add-k -> [n]."""
        return -np.log((self.unigram[following] + k) / (self.total + k * self.vocab_size))

    def bigram_add_k_nll(self, previous: np.ndarray, following: np.ndarray, k: float) -> np.ndarray:
        """-log p(b | a) per pair, add-k -> [n]."""
        return -np.log((self.pair_count(previous, following) + k) / (self.following[previous] + k * self.vocab_size))

    def interpolated_nll(self, previous: np.ndarray, following: np.ndarray, lam: float, k: float) -> np.ndarray:
        """-log(lambda * p_ML(b | a) + (1 - lambda) * p_unigram(b)) per pair -> [n]; the unigram alone where c(a) = 0."""
        seen = self.following[previous]
        bigram = self.pair_count(previous, following) / np.maximum(seen, 1.0)
        weight = np.where(seen > 0, lam, 0.0)
        return -np.log(weight * bigram + (1 - weight) * np.exp(-self.unigram_nll(following, k)))


def window_pairs(windows: Windows) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, target) pair of every window, as the trainer cuts them -> (previous [n], following [n])."""
    inputs, targets = [], []
    for start in range(0, len(windows), WINDOWS_PER_READ):
        x, y = windows.batch(list(range(start, min(start + WINDOWS_PER_READ, len(windows)))), torch.device("cpu"))
        inputs.append(x.flatten().numpy())
        targets.append(y.flatten().numpy())
    if not inputs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(inputs), np.concatenate(targets)


def fit_smoothing(train_tokens: np.ndarray, vocab_size: int) -> dict:
    """k for the unigram, k for the add-k bigram and lambda for the interpolated one, each the grid value
    with the lowest loss on the last ``HELD_OUT`` of the training split, counted on the rest."""
    tokens = np.asarray(train_tokens, dtype=np.int64)
    cut = int(len(tokens) * (1 - HELD_OUT))
    counts = Counts(tokens[:cut], vocab_size)
    previous, following = tokens[cut:-1], tokens[cut + 1:]
    unigram_k = min(K_GRID, key=lambda k: counts.unigram_nll(following, k).mean())
    bigram_k = min(K_GRID, key=lambda k: counts.bigram_add_k_nll(previous, following, k).mean())
    lam = min(LAMBDA_GRID, key=lambda v: counts.interpolated_nll(previous, following, v, unigram_k).mean())
    return {"unigram_k": unigram_k, "bigram_k": bigram_k, "lambda": lam}


def baselines(train_tokens: np.ndarray, val_windows: Windows, vocab_size: int, *,
              smoothing: dict | None = None) -> dict:
    """Uniform, unigram, add-k bigram and interpolated bigram losses (nats/token) on every pair of
    ``val_windows``, counted on ``train_tokens`` [N] (a 1-D id array, e.g. the memory-mapped train.bin).

    ``smoothing``: {"unigram_k", "bigram_k", "lambda"} to use as they are (default: fitted on
    ``train_tokens``, see ``fit_smoothing``); returned under "smoothing" with the pair count.
    """
    smoothing = smoothing or fit_smoothing(train_tokens, vocab_size)
    counts = Counts(train_tokens, vocab_size)
    previous, following = window_pairs(val_windows)
    return {
        "uniform": math.log(vocab_size),
        "unigram": float(counts.unigram_nll(following, smoothing["unigram_k"]).mean()),
        "bigram_add_k": float(counts.bigram_add_k_nll(previous, following, smoothing["bigram_k"]).mean()),
        "bigram_interpolated": float(counts.interpolated_nll(previous, following, smoothing["lambda"],
                                                             smoothing["unigram_k"]).mean()),
        "smoothing": dict(smoothing), "tokens": int(len(following)),
    }
