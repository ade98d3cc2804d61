"""Path patching, swept over every sender head: ``probes.path_patching.path_patch_sweep`` beside the same
sweep written by hand on HuggingFace's GPT2LMHeadModel with torch hooks.

    .venv/bin/python -m scripts.bench --no-forward --no-load --patching     # this section alone
    .venv/bin/python -m scripts.bench --quick --no-forward --no-load --patching

The experiment is the IOI paper's (the docstring of probes/path_patching.py): random clean and corrupt
prompts of 16 tokens, batch 8 (--quick: the tiny model, batch 2, 8 tokens), receivers two heads of
the last block through their queries, metric the logit difference of two tokens at the last
position; a call is the whole sweep, [n_layer, n_head] metrics. The hand-written version does what
one writes today: record c_proj's input per block in the clean and corrupt runs, then per sender
head one run with pre-hooks on every c_proj before the receivers' block (frozen head outputs, the
sender's from the corrupt run) and forward hooks on the receivers' c_attn keeping their q, then
one run with those q put back. Contenders alternate in an order shuffled each round; medians.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from minigpt import GPT
from probes.path_patching import Head, Metric, logit_difference, path_patch_sweep

from . import harness
from .concern import Concern
from .contenders import QUICK_CONFIG, hf_twin
from .report import table

Hook = Callable[..., object]


def hf_run(hf, tokens: torch.Tensor, pre: Sequence[tuple[torch.nn.Module, Hook]] = (),
           post: Sequence[tuple[torch.nn.Module, Hook]] = ()) -> torch.Tensor:
    """HF's logits [B, S, V] with forward pre-hooks ``pre`` and forward hooks ``post`` in place for the call."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre] + [m.register_forward_hook(fn) for m, fn in post]
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        for handle in handles:
            handle.remove()


def hf_head_outputs(hf, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each block's c_proj input as heads [B, S, H, d] (what minigpt calls ``attn.z``), one run."""
    seen: dict[int, torch.Tensor] = {}
    H = hf.config.n_head

    def keep(layer: int) -> Hook:
        return lambda module, args: seen.__setitem__(layer, args[0].view(*args[0].shape[:-1], H, -1).clone())

    hf_run(hf, tokens, pre=[(block.attn.c_proj, keep(layer)) for layer, block in enumerate(hf.transformer.h)])
    return [seen[layer] for layer in range(len(hf.transformer.h))]


def hf_path_patch(hf, base: torch.Tensor, base_z: list[torch.Tensor], source_z: list[torch.Tensor],
                  senders: list[Head], receivers: list[Head], inputs: list[str], metric: Metric) -> float:
    """The senders' path into the receivers' ``inputs`` ("q", "k", "v"), the rest frozen at the base run, by hooks.

    base_z, source_z: ``hf_head_outputs`` of the base run and of the run the senders' outputs come from.
    """
    blocks, D = hf.transformer.h, hf.config.n_embd
    d = D // hf.config.n_head
    layers = sorted({layer for layer, _ in receivers})
    captured: dict[int, torch.Tensor] = {}

    def freeze(layer: int) -> Hook:
        def hook(module, args):
            z = base_z[layer].clone()
            for head in (h for l, h in senders if l == layer):
                z[:, :, head] = source_z[layer][:, :, head]
            return (z.flatten(-2),)
        return hook

    def capture(layer: int) -> Hook:
        return lambda module, args, out: captured.__setitem__(layer, out.clone())

    def put(layer: int) -> Hook:
        def hook(module, args, out):  # c_attn's output columns: [Q | K | V], each head by head
            out = out.clone()
            for head in (h for l, h in receivers if l == layer):
                for part in ("qkv".index(x) for x in inputs):
                    columns = slice(part * D + head * d, part * D + (head + 1) * d)
                    out[..., columns] = captured[layer][..., columns]
            return out
        return hook

    hf_run(hf, base, pre=[(blocks[layer].attn.c_proj, freeze(layer)) for layer in range(layers[-1])],
           post=[(blocks[layer].attn.c_attn, capture(layer)) for layer in layers])
    return float(metric(hf_run(hf, base, post=[(blocks[layer].attn.c_attn, put(layer)) for layer in layers])))


def hf_path_patch_sweep(hf, base: torch.Tensor, source: torch.Tensor, receivers: list[Head], inputs: list[str],
                        metric: Metric) -> torch.Tensor:
    """``path_patch_sweep`` written by hand with hooks on HF: the metric per sender head, [L, H] (float64)."""
    base_z, source_z = hf_head_outputs(hf, base), hf_head_outputs(hf, source)
    L, H = hf.config.n_layer, hf.config.n_head
    found = [hf_path_patch(hf, base, base_z, source_z, [(layer, head)], receivers, inputs, metric)
             for layer in range(L) for head in range(H)]
    return torch.tensor(found, dtype=torch.float64).view(L, H)


def measure(args: argparse.Namespace, log=print) -> dict:
    """Time minigpt's sweep and the hand-written HF ones (eager and sdpa) in alternation: the section's JSON."""
    model = GPT.random(QUICK_CONFIG if args.quick else "gpt2", seed=0).to(args.device)
    batch, seq = (2, 8) if args.quick else (8, 16)
    generator = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(model.cfg.vocab_size, (batch, seq), generator=generator).to(args.device)
                      for _ in range(2))
    last = model.cfg.n_layer - 1
    receivers, metric = [(last, 0), (last, 1)], logit_difference(1, 2)
    calls = {"minigpt path_patch_sweep": lambda: path_patch_sweep(model, clean, corrupt, receivers, metric)}
    for attention in ("sdpa", "eager"):
        hf = hf_twin(model)
        hf.config._attn_implementation = attention
        calls[f"HF GPT2LMHeadModel ({attention}) + hooks"] = (
            lambda hf=hf: hf_path_patch_sweep(hf, clean, corrupt, receivers, ["q"], metric))
    grids = {name: call() for name, call in calls.items()}  # once, untimed: they must agree
    ours = grids["minigpt path_patch_sweep"]
    log(f"path patching: every sender head -> {receivers} (q), {batch} x {seq} tokens")
    times = harness.time_round_robin(calls, args.device, warmup=1, repeats=max(2, args.repeats // 3),
                                     threads=torch.get_num_threads(), log=log)
    best_hf = min(t.headline() for name, t in times.items() if name.startswith("HF"))
    rows = [{"contender": name, "median_s": round(t.headline(), 4), "x_best_hf_time": round(t.headline() / best_hf, 3),
             "quiet_median_s": round(t.quiet_median(), 4), "calls": len(t.seconds),
             "max_abs_diff_vs_minigpt": float((grids[name] - ours).abs().max())} for name, t in times.items()]
    return {"batch": batch, "seq": seq, "senders": model.cfg.n_layer * model.cfg.n_head, "receivers": receivers,
            "device": args.device, "model": ("tiny" if args.quick else "GPT-2 small") + " shape, random weights, fp32",
            "rows": rows, "target_values": {"patching.sweep_vs_hf": times["minigpt path_patch_sweep"].headline()
                                            / best_hf}}


def markdown(section: dict) -> str:
    return (f"Path patching swept over all {section['senders']} sender heads into {section['receivers']} (queries), "
            f"{section['batch']} x {section['seq']} tokens ({section['model']}, {section['device']}); a call is the "
            "whole sweep; contenders alternate in shuffled order, medians over all calls; x_best_hf_time: time over "
            "the faster HF row (lower is better).\n\n" + table(section["rows"]))


CONCERN = Concern("patching", "path patching swept over sender heads vs the same sweep by hand with HF hooks",
                  default=False, run=measure, markdown=markdown)
