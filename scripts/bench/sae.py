"""SAE training step: one step of ``probes.sae`` (``probes.sae.loop.train_step``) beside SAELens's own training
step (``SAETrainer.step``) for the same SAE, on the same batch of harvested bf16 rows.

    .venv/bin/python -m scripts.bench --no-forward --no-load --sae     # this section alone
    .venv/bin/python -m scripts.bench --quick --no-forward --no-load --sae

The rows: ``minigpt.harvest`` of ``blocks.5.resid_post`` of a random-weight GPT-2 small (d_in 768) over a
corpus of one-token words, stored bf16, read back with ``harvest.read(...).batches(4096, seed=0)``: the
first batch, 4096 rows (--quick: the tiny model's ``blocks.0.resid_post``, d_in 64, 256 rows). Both
libraries are given that bf16 batch as it is and convert it to float32 inside their step.

The SAE: d_sae = 8 x d_in latents, float32, in two architectures, each a row pair: ReLU + L1 (coefficient
1e-3; SAELens's StandardTrainingSAE) and top-k (k 32, --quick 8; SAELens's TopKTrainingSAE with its
defaults: pre-activations scaled by the decoder rows' norms, 1 here, and the latents divided by them).
SAELens's copy starts from minigpt's initial weights (``SAE.initialise``: unit decoder rows, b_dec the
batch's geometric median). Both optimise with Adam at the same lr and betas, constant lr. A latent
counts as dead after 1000 steps without firing on either side (SAELens's default window; minigpt counts it
in rows), so no auxiliary loss starts within the bench's calls on either side.

A call is one whole optimizer step as each library's training loop runs it:
  minigpt   encode, decode, loss (squared error + L1, + the auxiliary-k loss of dead latents), backward,
            the decoder gradients' parts along their rows removed, Adam, decoder rows back to unit norm,
            the step's metrics and the dead-latent counters.
  SAELens   ``SAETrainer.step``: encode, decode, loss (squared error + L1 weighted by decoder norms, or
            top-k's auxiliary loss), its firing statistics, backward, gradient-norm clipping at 1, Adam,
            its lr and coefficient schedulers.
Contenders alternate call by call in an order shuffled each round; medians over all calls.

The losses agree where they are defined alike: on the first step, from the same weights (unit decoder rows,
so SAELens's decoder-norm weighting of the L1 term is 1) and with no dead latent (so neither has an auxiliary
term), both are mean over rows of ||x_hat - x||^2 (+ coefficient x L1). That first step is run once
untimed per contender and its losses set side by side. From the second step on the weights part (minigpt
renormalises its decoder rows and projects their gradients; SAELens clips the gradient norm instead).
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from minigpt import GPT
from minigpt.harvest import harvest, read
from probes.sae import SAE, SAESettings
from probes.sae.loop import train_step

from . import harness
from .concern import Concern
from .harvest import QUICK, write_corpus
from .report import table

EXPANSION = 8  # d_sae = EXPANSION x d_in
L1_COEFFICIENT = 1e-3
DEAD_WINDOW_STEPS = 1000  # SAELens's default dead_feature_window: minigpt is given the same window, in rows
ARCHITECTURES = ("relu", "topk")
SAELENS_MISSING = "SAELens is not installed (pip install -e '.[bench]' or pip install sae-lens)"
Step = Callable[[], float]  # one optimizer step, returning its loss


def harvested_rows(quick: bool, directory: Path) -> tuple[torch.Tensor, str]:
    """The first shuffled batch of harvested bf16 rows [n, d_in] (4096 x 768; --quick 256 x 64), and its tap."""
    model = GPT.random(QUICK if quick else "gpt2", seed=0)
    tap = f"blocks.{model.cfg.n_layer // 2 - 1}.resid_post"
    n, context = (256, 64) if quick else (4096, 256)
    corpus = write_corpus(directory / "corpus.jsonl", model, n // context, context)
    harvest(model, corpus, [tap], directory / "harvest", context=context, quiet=True)  # bf16: the default
    rows, _numbers = next(read(directory / "harvest", tap).batches(n, seed=0))
    return rows, tap


def settings_for(activation: str, d_in: int, rows: int, quick: bool) -> SAESettings:
    """The SAE both sides train: 8 x d_in latents, ReLU + L1 or top-k, Adam at minigpt's default lr; a latent
    is dead after SAELens's window (so that neither side's auxiliary loss starts within the bench's calls)."""
    k = (8 if quick else 32) if activation == "topk" else None
    return SAESettings(d_sae=EXPANSION * d_in, activation=activation, k=k, l1_coefficient=L1_COEFFICIENT,
                       batch_size=rows, dead_after=DEAD_WINDOW_STEPS * rows)


def minigpt_step(sae: SAE, s: SAESettings, x: torch.Tensor) -> Step:
    """``probes.sae``'s step on x [n, d_in] as a call returning the step's loss (Adam as ``train`` builds it)."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=s.lr, betas=(s.beta1, s.beta2))
    since_fired = torch.zeros(s.d_sae, dtype=torch.long)
    steps = itertools.count()
    return lambda: train_step(sae, optimizer, x, s, next(steps), since_fired, 0, 1)["loss"]


def saelens_step(ours: SAE, s: SAESettings, x: torch.Tensor) -> Step:
    """SAELens's ``SAETrainer.step`` on x [n, d_in] for a copy of ``ours`` (its weights now), as a call
    returning the step's loss; the trainer's step count moves on as its ``fit`` moves it."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if s.activation == "relu":
        theirs = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=ours.d_in, d_sae=ours.d_sae,
                                                               l1_coefficient=s.l1_coefficient))
    else:
        theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=ours.d_in, d_sae=ours.d_sae, k=s.k))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(theirs, name).copy_(getattr(ours, name))
    config = SAETrainerConfig(total_training_samples=s.steps * len(x), train_batch_size_samples=len(x), lr=s.lr,
                              lr_end=s.lr, adam_beta1=s.beta1, adam_beta2=s.beta2)
    trainer = SAETrainer(config, theirs, data_provider=iter(()))

    def step() -> float:
        loss = trainer.step(x).loss.item()
        trainer.n_training_steps += 1
        return loss

    return step


def saelens_version() -> str | None:
    """SAELens's version, or None where its trainer cannot be imported (the rows are then skipped)."""
    from importlib.metadata import version

    try:
        import sae_lens.training.sae_trainer  # noqa: F401  (the trainer imports more than the package does)
    except ImportError:
        return None
    return version("sae-lens")


def contenders(x: torch.Tensor, quick: bool, with_saelens: bool) -> tuple[dict[str, Step], dict[str, float]]:
    """Each architecture's steps, minigpt's and (``with_saelens``) SAELens's from the same initial weights,
    and each one's first-step loss (that step run here, untimed)."""
    calls, first = {}, {}
    for activation in ARCHITECTURES:
        s = settings_for(activation, x.shape[1], len(x), quick)
        ours = SAE(x.shape[1], s.d_sae, activation, s.k).initialise(x, seed=s.seed, b_dec_init=s.b_dec_init)
        if with_saelens:
            calls[f"SAELens {activation}"] = saelens_step(ours, s, x)  # copies the weights before any step
        calls[f"minigpt {activation}"] = minigpt_step(ours, s, x)
    for name, call in calls.items():
        first[name] = call()
    return calls, first


TARGET_KEYS = {"relu": "sae.step_vs_saelens", "topk": "sae.topk_step_vs_saelens"}


def table_rows(times: dict[str, harness.Timings], first: dict[str, float], n: int) -> tuple[list[dict], dict]:
    """The table's rows (time, rows/s, time over SAELens's for the same architecture) and the targets' values."""
    rows, values = [], {}
    for name, t in times.items():
        library, activation = name.split()
        theirs = times.get(f"SAELens {activation}")
        ratio = t.headline() / theirs.headline() if theirs else None
        rows.append({"contender": name, "median_s": round(t.headline(), 4), "rows_per_s": round(n / t.headline(), 1),
                     "x_saelens_time": None if ratio is None else round(ratio, 3),
                     "quiet_median_s": round(t.quiet_median(), 4), "calls": len(t.seconds),
                     "first_step_loss": first[name]})
        if library == "minigpt" and ratio is not None:
            values[TARGET_KEYS[activation]] = ratio
    return rows, values


def measure(args: argparse.Namespace, log=print) -> dict:
    """Time minigpt's SAE step beside SAELens's for ReLU + L1 and for top-k, in alternation: the section's JSON."""
    found = saelens_version()
    skipped = None if found else SAELENS_MISSING
    with tempfile.TemporaryDirectory(prefix="bench-sae-") as directory:
        x, tap = harvested_rows(args.quick, Path(directory))
    n, d_in = x.shape
    calls, first = contenders(x, args.quick, with_saelens=found is not None)
    log(f"sae: one training step on {n} harvested bf16 rows of {tap}, d_in {d_in}, d_sae {EXPANSION * d_in}"
        + (f"; {skipped}" if skipped else ""))
    times = harness.time_round_robin(calls, args.device, warmup=args.warmup, repeats=args.repeats,
                                     threads=torch.get_num_threads(), log=log)
    rows, values = table_rows(times, first, n)
    agreement = {a: abs(first[f"minigpt {a}"] - first[f"SAELens {a}"]) / abs(first[f"SAELens {a}"])
                 for a in ARCHITECTURES if f"SAELens {a}" in first}
    return {"rows_per_step": n, "d_in": d_in, "d_sae": EXPANSION * d_in, "tap": tap,
            "k": settings_for("topk", d_in, n, args.quick).k, "l1_coefficient": L1_COEFFICIENT, "device": args.device,
            "model": ("tiny" if args.quick else "GPT-2 small") + " shape, random weights; rows stored bf16, SAE fp32",
            "saelens": found, "saelens_skipped": skipped, "first_step_loss_relative_difference": agreement,
            "rows": rows, "target_values": values}


def markdown(section: dict) -> str:
    skipped = f" **SAELens rows skipped: {section['saelens_skipped']}.**" if section["saelens_skipped"] else ""
    agreement = ", ".join(f"{a} {d:.1e}" for a, d in section["first_step_loss_relative_difference"].items())
    return (f"One SAE training step (encode, decode, loss, backward, Adam, each library's per-step upkeep) on "
            f"{section['rows_per_step']} harvested bf16 rows of {section['tap']} ({section['model']}, "
            f"{section['device']}); d_in {section['d_in']}, d_sae {section['d_sae']}, ReLU + L1 "
            f"({section['l1_coefficient']}) and top-k (k {section['k']}); SAELens {section['saelens'] or '-'}; "
            "contenders alternate in shuffled order, medians over all calls; x_saelens_time: time over SAELens's step "
            f"for the same architecture (lower is better). First-step losses, minigpt vs SAELens, relative "
            f"difference: {agreement or '-'}.{skipped}\n\n"
            + table(section["rows"]))


CONCERN = Concern("sae", "an SAE training step on harvested bf16 rows vs SAELens's training step for the same SAE",
                  default=False, run=measure, markdown=markdown)
