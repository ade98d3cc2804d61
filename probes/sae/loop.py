"""Training an SAE on a harvest's rows (``minigpt.harvest.read(DIR, tap)``), resumable, on one process or many.

Each step: a batch of rows (``Rows.batches``, shuffled by ``seed + epoch``), the loss, Adam, then every
decoder row put back to unit norm. The loss, per row, summed over the batch and divided by its size:
``||x_hat - x||^2`` + ``l1_coefficient * sum(z)`` (ReLU only; the decoder rows have unit norm, so this
is the usual L1 weighted by decoder norms) + ``aux_coefficient *`` the auxiliary loss.

Dead latents: the auxiliary-k loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"),
not resampling, for both activations. A latent is dead once it fired on none of the last
``dead_after`` tokens; the ``aux_k`` dead latents with the largest pre-activations of a row are asked
to reconstruct what the live latents missed, ``x - x_hat``. It is one more term of the loss: the
gradient carries it, so data parallelism (gradients summed over processes) and resuming (weights,
Adam's moments and the counters of tokens since each latent fired) need nothing more, where
resampling rewrites weights and Adam's state in the middle of a run.

Under ``torchrun`` every process reads every batch and takes its own contiguous share of its rows;
the gradients are summed over processes (all_reduce), which makes the step one process's on the whole
batch, up to float rounding. Rank 0 writes the checkpoints and ``metrics.jsonl``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from minigpt import distributed
from minigpt.checks import check_int
from minigpt.errors import TrainingError

from . import checkpoint
from .model import SAE
from .settings import SAESettings


def train(rows, out: str | Path, settings: SAESettings = SAESettings(), *, model_name: str | None = None,
          save_every: int = 100, stop_after: int | None = None, quiet: bool = False) -> SAE:
    """Train an SAE on ``rows`` (a ``minigpt.harvest.Rows``: rows [N, *row_shape]) into ``out``.

    ``out`` gets the SAE (``sae_weights.safetensors``, ``cfg.json``: ``SAE.load(out)``), ``metrics.jsonl``
    (a line per step: step, loss, mse, l1, aux, l0, explained_variance, dead_fraction, lr) and
    ``training/`` (the checkpoint, every ``save_every`` steps and at the end). Started again over the
    same ``out`` with the same settings and rows, it goes on from the checkpoint to the weights the
    uninterrupted run would have had. ``stop_after``: return after that many steps (a checkpoint is
    written there), as a run killed then would have. Returns the SAE (on the CPU).
    """
    out = Path(out)
    check_int(save_every, "save_every", 1, error=TrainingError)
    if stop_after is not None:
        check_int(stop_after, "stop_after", 1, error=TrainingError)
    if len(rows) == 0:
        raise TrainingError(f"{rows!r} holds no rows; harvest some text first")
    s = settings
    with distributed.process_group(torch.device("cpu")) as (rank, world):
        sae = SAE(math.prod(rows.row_shape), s.d_sae, s.activation, s.k, hook_name=rows.tap,
                  model_name=model_name if model_name is not None else rows.manifest["settings"]["model"]["source"],
                  row_shape=rows.row_shape)
        optimizer = torch.optim.Adam(sae.parameters(), lr=s.lr, betas=(s.beta1, s.beta2))
        identity = {"settings": asdict(s), "tap": rows.tap, "rows": len(rows), "harvest": _harvest_hash(rows)}
        state = checkpoint.resume(out, identity, sae, optimizer)
        if state is None:
            sae.initialise(next(rows.batches(s.init_rows, seed=s.seed))[0], seed=s.seed, b_dec_init=s.b_dec_init)
            state = {"step": 0, "since_fired": torch.zeros(s.d_sae, dtype=torch.long)}
        metrics = checkpoint.Metrics(out, state["step"], write=rank == 0)
        last = min(s.steps, stop_after or s.steps)
        progress = _progress(s.steps, state["step"], quiet or rank != 0)
        for step, (x, _) in zip(range(state["step"], last), _batches(rows, s, state["step"])):
            entry = train_step(sae, optimizer, x.reshape(len(x), -1), s, step, state["since_fired"], rank, world)
            state["step"] = step + 1
            metrics.append(entry)
            progress.update(1)
            progress.set_postfix_str(f"mse {entry['mse']:.4g} L0 {entry['l0']:.1f} "
                                     f"ev {entry['explained_variance']:.3f} dead {entry['dead_fraction']:.2f}")
            if state["step"] % save_every == 0 or state["step"] == last:
                checkpoint.save(out, sae, optimizer, state, identity, rank, world)
        progress.close()
        return sae


def train_step(sae: SAE, optimizer: torch.optim.Optimizer, x: torch.Tensor, s: SAESettings, step: int,
               since_fired: torch.Tensor, rank: int, world: int) -> dict:
    """One Adam step on the whole batch x [n, d_in], of which this process takes its share; updates
    ``since_fired`` [d_sae] (tokens since each latent last fired) in place. Returns the step's metrics."""
    for group in optimizer.param_groups:
        group["lr"] = s.learning_rate(step)
    dead = since_fired >= s.dead_after
    mine = x.tensor_split(world)[rank].to(sae.dtype)
    pre = sae.pre_activations(mine)
    z = sae.activate(pre)
    x_hat = sae.decode(z)
    squared = (x_hat - mine).pow(2).sum(-1)                                  # [n]
    l1 = z.sum(-1) if s.activation == "relu" else torch.zeros_like(squared)  # z >= 0: its L1 norm
    aux = aux_loss(sae, pre, (mine - x_hat).detach(), dead, s.aux_k)
    loss = squared.sum() + s.l1_coefficient * l1.sum() + s.aux_coefficient * aux.sum()
    (loss / len(x)).backward()
    with torch.no_grad():
        if world > 1:
            for p in sae.parameters():
                torch.distributed.all_reduce(p.grad)
        _remove_parallel_gradient(sae.W_dec)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        fired = z.sign().sum(0)  # [d_sae] rows each latent fired in (z >= 0; half the time of (z > 0).sum(0)'s cast)
        sums = torch.cat([torch.stack([loss, squared.sum(), l1.sum(), aux.sum(), fired.sum()]),
                          mine.sum(0), mine.pow(2).sum().reshape(1), fired]).double()
        if world > 1:
            torch.distributed.all_reduce(sums)
    return _account(sums, len(x), sae.d_in, since_fired, s, step)


def aux_loss(sae: SAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """Per row [n]: ||the top ``aux_k`` dead latents' reconstruction (no b_dec) - residual||^2; zeros when none is dead.

    pre [n, d_sae] pre-activations, residual [n, d_in] = x - x_hat (detached), dead [d_sae] bool.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return torch.zeros(len(pre), dtype=pre.dtype, device=pre.device)
    only_dead = pre.masked_fill(~dead, -math.inf)
    values, indices = only_dead.topk(min(aux_k, n_dead), dim=-1, sorted=False)
    z_aux = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    return (z_aux @ sae.W_dec - residual).pow(2).sum(-1)


def _remove_parallel_gradient(W_dec: torch.Tensor) -> None:
    """Each decoder row's gradient without its part along the (unit) row: the step moves it along the sphere."""
    W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec


def _account(sums: torch.Tensor, n: int, d_in: int, since_fired: torch.Tensor, s: SAESettings, step: int) -> dict:
    """The step's metrics from the batch's sums (all processes'); the dead-latent counters moved on."""
    loss, squared, l1, aux, active = sums[:5].tolist()
    x_sum, x_square, fired = sums[5:5 + d_in], sums[5 + d_in].item(), sums[6 + d_in:]
    since_fired += n
    since_fired[fired > 0] = 0
    total_variance = x_square - (x_sum.pow(2).sum() / n).item()  # sum of ||x - batch mean||^2
    return {"step": step + 1, "loss": loss / n, "mse": squared / n, "l1": l1 / n, "aux": aux / n, "l0": active / n,
            "explained_variance": 1 - squared / total_variance if total_variance > 0 else math.nan,
            "dead_fraction": (since_fired >= s.dead_after).double().mean().item(), "lr": s.learning_rate(step)}


def _batches(rows, s: SAESettings, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches from step ``step`` on: epoch e is ``rows.batches`` shuffled by ``seed + e``.

    Where a resumed run stands is the step alone; the batches of its epoch before it are read and dropped.
    """
    per_epoch = math.ceil(len(rows) / s.batch_size)
    epoch, skip = divmod(step, per_epoch)
    for e in itertools.count(epoch):
        yield from itertools.islice(rows.batches(s.batch_size, seed=s.seed + e), skip if e == epoch else 0, None)


def _harvest_hash(rows) -> str:
    """What identifies the rows: the harvest's shard checksums."""
    return hashlib.sha256(json.dumps([r["sha256"] for r in rows.manifest["shards"]]).encode()).hexdigest()


def _progress(total: int, done: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="step", disable=quiet, dynamic_ncols=True, desc="sae")
