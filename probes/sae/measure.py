"""How good an SAE is: sparsity, reconstruction, dead and dense latents, the loss spliced in, what its latents read."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minigpt.checks import check_float, check_int
from minigpt.edits import zero_ablate
from minigpt.errors import InputError

from .splice import splice


@dataclass
class Stats:
    """An SAE on ``tokens`` rows. ``l0``: mean latents firing per row; ``explained_variance``: 1 - sum of
    squared errors / sum of squared deviations from the rows' mean; ``mse``: mean squared error per row
    (summed over d_in); ``frequency`` [d_sae]: the fraction of rows each latent fires on; ``dead``:
    latents that fired on none of them, ``dense``: on more than ``dense_threshold`` of them (indices)."""
    tokens: int
    l0: float
    explained_variance: float
    mse: float
    frequency: torch.Tensor
    dead: torch.Tensor
    dense: torch.Tensor
    dense_threshold: float

    @property
    def dead_fraction(self) -> float:
        return len(self.dead) / len(self.frequency)

    @property
    def dense_fraction(self) -> float:
        return len(self.dense) / len(self.frequency)


@torch.no_grad()
def measure(sae, rows, *, max_rows: int | None = None, batch_size: int = 4096, dense_threshold: float = 0.1) -> Stats:
    """``Stats`` of ``sae`` on the first ``max_rows`` rows (all by default) of ``rows`` (Rows, or a tensor [N, *row])."""
    check_int(batch_size, "batch_size", 1)
    check_float(dense_threshold, "dense_threshold", 0, 1)
    count = _row_count(rows, max_rows)
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    totals = torch.zeros(4, dtype=torch.float64)  # squared error, active latents, sum of ||x||^2, rows
    x_sum = torch.zeros(sae.d_in, dtype=torch.float64)
    for start in range(0, count, batch_size):
        x = rows[start:min(start + batch_size, count)].reshape(-1, sae.d_in).to(sae.dtype)
        z = sae.encode(x)
        active = z > 0
        fired += active.sum(0)
        x_sum += x.double().sum(0)
        totals += torch.tensor([(sae.decode(z) - x).double().pow(2).sum(), active.sum(), x.double().pow(2).sum(),
                                len(x)], dtype=torch.float64)
    squared, active, x_square, n = totals.tolist()
    variance = x_square - x_sum.pow(2).sum().item() / n
    frequency = fired / n
    return Stats(tokens=int(n), l0=active / n, explained_variance=1 - squared / variance if variance > 0 else math.nan,
                 mse=squared / n, frequency=frequency, dead=(fired == 0).nonzero().flatten(),
                 dense=(frequency > dense_threshold).nonzero().flatten(), dense_threshold=dense_threshold)


def _row_count(rows, max_rows: int | None) -> int:
    """How many of ``rows`` to read: all, or the first ``max_rows``; InputError if that is none."""
    count = len(rows) if max_rows is None else min(check_int(max_rows, "max_rows", 1), len(rows))
    if count == 0:
        raise InputError(f"{rows!r} holds no rows to measure on; harvest some text first")
    return count


@dataclass
class Recovered:
    """Next-token cross-entropy (nats per token) clean, with the SAE spliced in (no error term) and with the
    tap zeroed; ``recovered`` = (zero_ablation - spliced) / (zero_ablation - clean): 1 for a perfect SAE."""
    clean: float
    spliced: float
    zero_ablation: float
    recovered: float


@torch.no_grad()
def loss_recovered(model, sae, tap: str, inputs) -> Recovered:
    """The cross-entropy loss recovered by ``sae`` at ``tap`` on ``inputs`` (text, texts or ids, as ``model.run``
    takes them; padding is left out)."""
    ids, mask = model.tokens(inputs, return_mask=True)
    if not (mask[:, :-1] & mask[:, 1:]).any():
        raise InputError("loss_recovered needs inputs of two tokens or more (a token and the next one to predict)")
    losses = [_next_token_loss(model.run(ids, edits=edits, attention_mask=mask)[0], ids, mask)
              for edits in (None, splice(sae, tap), zero_ablate(tap))]
    clean, spliced, zero = losses
    return Recovered(clean, spliced, zero, (zero - spliced) / (zero - clean) if zero != clean else math.nan)


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean cross-entropy of logits [B, S, V] predicting ids [B, S] one position on, where both tokens are real."""
    pairs = mask[:, :-1] & mask[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="none")
    return (losses[pairs.flatten()].mean()).item()


@torch.no_grad()
def top_activations(sae, rows, latents: list[int], *, n: int = 5, max_rows: int | None = None,
                    batch_size: int = 4096) -> dict[int, list[tuple[float, int]]]:
    """{latent: [(activation, row number)] for its ``n`` largest activations}, over the first ``max_rows`` rows.

    The row numbers index ``rows.token``, ``rows.document`` and ``rows.position`` (``context`` shows the text).
    """
    check_int(n, "n", 1)
    count = _row_count(rows, max_rows)
    chosen = torch.tensor([check_int(latent, "a latent", 0, sae.d_sae - 1) for latent in latents], dtype=torch.long)
    values = torch.full((len(chosen), 0), -math.inf, dtype=torch.float64)
    where = torch.zeros((len(chosen), 0), dtype=torch.long)
    for start in range(0, count, batch_size):
        x = rows[start:min(start + batch_size, count)].reshape(-1, sae.d_in)
        z = sae.encode(x)[:, chosen].double().T  # [latents, batch]
        values = torch.cat([values, z], 1)
        where = torch.cat([where, torch.arange(start, start + len(x)).expand(len(chosen), -1)], 1)
        values, keep = values.topk(min(n, values.shape[1]), dim=1)
        where = where.gather(1, keep)
    return {latent: [(v, w) for v, w in zip(values[i].tolist(), where[i].tolist()) if v > 0]
            for i, latent in enumerate(chosen.tolist())}


def context(rows, row: int, decode, before: int = 6) -> str:
    """The text of ``row``'s token, with up to ``before`` tokens before it in its document, as
    '...before[[token]]' (``decode``: ids -> text, e.g. ``model.tokenizer.decode``)."""
    same = (rows.document == rows.document[row]) & (rows.position < rows.position[row]) & (
        rows.position >= rows.position[row] - before)
    ahead = rows.token[same][rows.position[same].argsort()].tolist()
    return f"{decode(ahead)}[[{decode([int(rows.token[row])])}]]"
