"""Induction heads: the score of every head on repeated random tokens, and the induction loss.

The test sequence is n random tokens, then the same n again (optionally after a BOS token). A head
that does induction looks, from a token in the second half, at the token that followed the same
token's previous occurrence: n - 1 positions back. Its score is the pattern weight on that key,
averaged over the second half's n queries and the batch. A head that attends uniformly scores
``chance``, the mean over those queries of 1 / (keys visible). Shapes: L n_layer, H heads, B batch,
T = 2n (+1 with a BOS) positions.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from minigpt import GPT
from minigpt.taps import Edit
from minigpt.checks import check_int
from minigpt.errors import InputError

from ._common import Finding, work_dtype


@dataclass
class Induction:
    """What ``induction_scores`` measured on one batch of repeated random tokens."""

    tokens: torch.Tensor       # [B, T] the repeated sequences, BOS first if one was given
    n: int                     # tokens in each half
    bos: int | None            # the BOS id put first, or None
    scores: torch.Tensor       # [L, H] each head's mean weight on the induction key
    chance: float              # the score of a head attending uniformly to every visible key
    loss_first: torch.Tensor   # [B, n - 1] per-token loss on the first half's tokens 1..n-1 (nothing to copy yet)
    loss_second: torch.Tensor  # [B, n - 1] the same tokens in the second half: the induction loss

    @property
    def induction_loss(self) -> float:
        """The mean per-token loss on the second half (after its first token, which no copy predicts)."""
        return self.loss_second.mean().item()


def repeated_tokens(vocab_size: int, n: int, *, batch: int = 1, seed: int = 0, bos: int | None = None) -> torch.Tensor:
    """``batch`` rows of n distinct random ids, each row repeated twice, BOS first if given: [batch, 2n (+1)].

    Distinct within a half (so every token of the second half has exactly one previous occurrence);
    the BOS id is never drawn. The same seed gives the same rows.
    """
    check_int(batch, "batch", 1)
    check_int(seed, "seed", 0, 2**63 - 1)
    pool = vocab_size - (bos is not None)
    check_int(n, "n", 1, pool, way_out=f"each half holds distinct tokens of the {pool} available")
    if bos is not None:
        check_int(bos, "bos", 0, vocab_size - 1, way_out="give a token id of the model's vocabulary, or None")
    generator = torch.Generator().manual_seed(seed)
    half = torch.stack([torch.randperm(pool, generator=generator)[:n] for _ in range(batch)])
    if bos is not None:
        half = half + (half >= bos).long()  # skip the BOS id
    rows = torch.cat([half, half], dim=1)
    return rows if bos is None else torch.cat([torch.full((batch, 1), bos), rows], dim=1)


def induction_stripe(pattern: torch.Tensor, n: int, bos: bool = False) -> torch.Tensor:
    """Each second-half query's weight on its induction key: pattern [..., T, T] -> [..., n].

    The query at position q (q = b + n .. b + 2n - 1, b = 1 with a BOS) and its key q - (n - 1).
    """
    first = int(bos) + n
    if pattern.shape[-2:] != (first + n, first + n):
        raise InputError(f"a pattern of repeated halves of {n} tokens{' after a BOS' if bos else ''} is "
                         f"[..., {first + n}, {first + n}], got shape {tuple(pattern.shape)}")
    return pattern.diagonal(offset=1 - n, dim1=-2, dim2=-1)[..., int(bos) + 1:]


def chance_score(n: int, bos: bool = False) -> float:
    """The score of uniform attention: the mean over the second half's queries q of 1 / (q + 1)."""
    first = int(bos) + n
    return (1 / torch.arange(first + 1, first + n + 1, dtype=torch.float64)).mean().item()


def induction_scores(model: GPT, n: int = 50, *, batch: int = 4, seed: int = 0, bos: int | None = None,
                     edits: Mapping[str, Edit] | None = None) -> Induction:
    """Every head's induction score [L, H] and the per-token losses, on ``repeated_tokens`` (see there).

    ``edits``: applied to the run as in ``model.run`` (e.g. an ablation, to see what it does to the scores).
    """
    b = int(bos is not None)
    check_int(n, "n", 1, (model.cfg.n_positions - b) // 2,
              way_out=f"the two halves{' and the BOS' if b else ''} must fit in {model.cfg.n_positions} positions")
    tokens = repeated_tokens(model.cfg.vocab_size, n, batch=batch, seed=seed, bos=bos)
    dtype = work_dtype(model)
    logits, trace = model.run(tokens, taps="blocks.*.attn.pattern", edits=edits, to="cpu", store_dtype=dtype)
    scores = induction_stripe(trace.stack("attn.pattern"), n, bool(b)).mean(dim=(1, 3))  # [L, B, H, n] -> [L, H]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].to("cpu", dtype).transpose(1, 2), tokens[:, 1:],
                                               reduction="none")  # [B, T - 1]: position p predicts token p + 1
    # The first half's tokens 1..n-1 are predicted at positions b..b+n-2, the second half's at b+n..b+2n-2.
    return Induction(tokens=tokens, n=n, bos=bos, scores=scores, chance=chance_score(n, bool(b)),
                     loss_first=losses[:, b:b + n - 1], loss_second=losses[:, b + n:b + 2 * n - 1])


# Where the findings draw the line (measurements at ``induction_findings``).
INDUCTION_SCORE = 0.3   # a head's weight on the induction key
INDUCTION_OVER_CHANCE = 5.0
LOSS_DROP = 1.0         # nats: second half against first half


def induction_findings(ind: Induction) -> list[Finding]:
    """Whether some head does induction, and whether the repeated half is predicted better than the first."""
    # Random weights attend almost uniformly: their best head scores ``chance`` and both halves cost about
    # log(vocabulary). Measured (n 20, batch 2), random weights of pydoc-tiny's shape, seeds 0-2: best head
    # 0.034 = chance, losses 10.83 vs 10.80-10.83 nats; pydoc-tiny: 0.042, 13.39 vs 13.28 (no induction yet).
    L, H = ind.scores.shape
    best = int(ind.scores.argmax())
    score = ind.scores.flatten()[best].item()
    heads = Finding("heads", "some head does induction: from a repeated token it attends to the token that "
                    "followed its previous occurrence", score >= INDUCTION_SCORE and
                    score >= INDUCTION_OVER_CHANCE * ind.chance,
                    f"best head b{best // H}.h{best % H}: score {score:.3f} (uniform attention {ind.chance:.3f}); "
                    f"{int((ind.scores >= INDUCTION_SCORE).sum())} of {L * H} heads score {INDUCTION_SCORE} or more",
                    needs_trained=True)
    first, second = ind.loss_first.mean().item(), ind.induction_loss
    loss = Finding("loss", "the repeated half is predicted far better than its first occurrence (in-context copying)",
                   first - second >= LOSS_DROP,
                   f"mean loss {first:.3f} nats on the first half, {second:.3f} on the repeat", needs_trained=True)
    return [heads, loss]
