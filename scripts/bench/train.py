"""Training step throughput: one step of ``minigpt train`` (forward, loss, backward, clipping, AdamW)
beside the same step on HuggingFace's GPT2LMHeadModel with the same optimizer.

    .venv/bin/python -m scripts.bench --no-forward --train     # this section alone
    .venv/bin/python -m scripts.bench --quick --no-forward --train

Every contender starts from the same random weights (GPT-2 small's shape, the config's dropout
0.1, train mode) and is built with ``minigpt.training.make_optimizer`` (AdamW, decay on matrices
and embeddings, the loop's settings), and a call is one whole optimizer step on the same batch of
``--train-batch`` x ``--seq`` tokens: the training loop's own step (``minigpt.training.loop.train_step``:
the loss of ``loss_of``, mean cross-entropy of the logits with bf16 autocast on a GPU, backward,
clipping, AdamW), HF's model wrapped to be called as minigpt's is. Contenders alternate call by call in an order
shuffled each round; medians over all calls. On a GPU the fused AdamW is used, and ``--compile``
adds compiled rows.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from minigpt import GPT
from minigpt.training import Settings, make_optimizer
from minigpt.training.loop import train_step

from . import harness
from .concern import Concern
from .contenders import QUICK_CONFIG, hf_twin
from .report import table


def stepper(model: torch.nn.Module, params_of: GPT, inputs: torch.Tensor, targets: torch.Tensor,
            compiled: bool = False) -> Callable[[], float]:
    """One optimizer step of ``model`` on inputs, targets [B, S] as a call returning the loss: the training
    loop's own ``train_step`` (one micro-batch, no DDP, the default Settings' learning rate and clipping).
    ``params_of`` gives the optimizer's groups."""
    settings = Settings()
    optimizer = make_optimizer(params_of, settings)
    forward = torch.compile(model) if compiled else model
    model.train()

    def step() -> float:
        loss, _norm = train_step(model, None, forward, optimizer, settings.lr, [(inputs, targets)], settings.grad_clip)
        return loss

    return step


class _HFAsGPT(torch.nn.Module):
    """HF's model called as minigpt's is, ``model(tokens) -> logits``, and asked for its parameters the same way."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens).logits

    @property
    def unembedding(self) -> torch.Tensor:
        return self.hf.lm_head.weight


def measure(args: argparse.Namespace, log=print) -> dict:
    device = args.device
    model = GPT.random(QUICK_CONFIG if args.quick else "gpt2", seed=0).to(device)
    batch = args.train_batch or (2 if args.quick else 4)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.cfg.vocab_size, (batch, args.seq + 1), generator=generator).to(device)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    calls = {"minigpt": stepper(model, model, inputs, targets)}
    for attention in ("sdpa", "eager"):
        hf = hf_twin(model)
        hf.config._attn_implementation = attention
        wrapped = _HFAsGPT(hf)
        calls[f"HF GPT2LMHeadModel ({attention})"] = stepper(wrapped, wrapped, inputs, targets)
    if args.compile:
        twin = GPT.random(model.cfg, seed=0).to(device)
        calls["minigpt, torch.compile"] = stepper(twin, twin, inputs, targets, compiled=True)
    log(f"train: one optimizer step on {batch} x {args.seq} tokens, {'tiny' if args.quick else 'GPT-2 small'} shape")
    times = harness.time_round_robin(calls, device, warmup=args.warmup, repeats=args.repeats,
                                     threads=torch.get_num_threads(), log=log)
    tokens = batch * args.seq
    best_hf = min(times[f"HF GPT2LMHeadModel ({a})"].headline() for a in ("sdpa", "eager"))
    rows_out = [{"contender": name, "median_s": round(t.headline(), 4), "tokens_per_s": round(tokens / t.headline(), 1),
                 "x_best_hf_time": round(t.headline() / best_hf, 3),
                 "quiet_median_s": round(t.quiet_median(), 4), "calls": len(t.seconds)} for name, t in times.items()]
    return {"batch": batch, "seq": args.seq, "tokens_per_step": tokens, "device": device,
            "model": ("tiny" if args.quick else "GPT-2 small") + " shape, random weights, dropout 0.1, fp32 weights"
            + (", bf16 autocast" if device.startswith("cuda") else ""), "rows": rows_out,
            "target_values": {"train.step_vs_hf": times["minigpt"].headline() / best_hf}}


def markdown(section: dict) -> str:
    return (f"One optimizer step (forward, loss, backward, clip, AdamW) on {section['batch']} x {section['seq']} tokens "
            f"({section['model']}, {section['device']}); contenders alternate in shuffled order, medians over all calls; "
            "x_best_hf_time: time over the faster HF row (lower is better); quiet_median_s: median of the calls no "
            "other process disturbed (labelled, not the headline).\n\n" + table(section["rows"]))


CONCERN = Concern("train", "a training step (forward, backward, AdamW) vs the same step on HF GPT2LMHeadModel",
                  default=False, run=measure, markdown=markdown)
