"""The probes' subcommands, ``minigpt report`` and ``minigpt trace``.

They reach the ``minigpt`` command through the ``minigpt.commands`` entry-point group (pyproject.toml),
so the arrow points from probes down to minigpt, never back.
"""
from __future__ import annotations

import argparse

import torch

from minigpt.command import Subcommands, add_model_args, load_model, output_dir
from minigpt.config import OFFLINE_MODEL

from .final_norm import check_final_norm
from .reconstruction import reconstruct


def add_report(commands: Subcommands) -> None:
    p = commands.add_parser("report", help="run every probe on a text: index.html, report.json and figures",
                            description="Run every probe of the lecture notes on TEXT and write OUT/index.html, "
                            "OUT/report.json and the PNG figures. Offline with nothing cached, it falls back to "
                            f"{OFFLINE_MODEL}, the small model trained by minigpt that ships with it (--trained-if-offline "
                            "is on), and the page says so; --random gives random weights of the --model size.")
    p.add_argument("text")
    p.add_argument("--out", default="report", help="directory for the report (created if missing; default: report)")
    p.add_argument("--block", type=int, default=None,
                   help="block the interventions edit (default: block 9, or one 3/4 of the way through a shallower model)")
    p.add_argument("--head", type=int, default=None,
                   help="head whose keys are zeroed (default: head 2, or the last head of a narrower model)")
    add_model_args(p)
    # Offline with nothing cached, the report still runs, on the small trained model shipped with minigpt.
    p.set_defaults(func=report, trained_if_offline=True)


@torch.no_grad()
def report(args: argparse.Namespace) -> None:
    """Run every probe on the text; write index.html, report.json and the PNG figures into --out."""
    from .report import build_report  # matplotlib only for this command

    out = output_dir(args.out)  # before the model loads: a bad --out fails in a second, not after the work
    chosen = {name: getattr(args, name) for name in ("block", "head") if getattr(args, name) is not None}
    build_report(load_model(args), args.text, out, **chosen)


def add_trace(commands: Subcommands) -> None:
    p = commands.add_parser("trace", help="per block: residual norms, the reconstruction law and the ln_f check")
    p.add_argument("text")
    add_model_args(p)
    p.set_defaults(func=trace)


@torch.no_grad()
def trace(args: argparse.Namespace) -> None:
    """Per block: the mean residual norms, then the reconstruction and final-norm probes' numbers and verdicts."""
    model = load_model(args)
    tokens = model.tokens(args.text)  # [1, S]
    parts = ("resid_pre", "attn_delta", "mlp_delta", "resid_post")
    logits, tr = model.run(tokens, taps=[f"blocks.*.{p}" for p in parts])
    rebuilt, final = reconstruct(model, tokens), check_final_norm(model, tokens)

    print(f"{tokens.shape[1]} tokens, {model.cfg.n_layer} blocks; |x| is the mean L2 norm of a token's vector")
    print(f"{'block':>5} " + " ".join(f"{'|' + p + '|':>12}" for p in parts)
          + f" {'max|pre+attn+mlp-next|':>23} {'max|post-H[L+1]|':>17}")
    for layer in range(model.cfg.n_layer):
        norms = " ".join(f"{tr[f'blocks.{layer}.{p}'].float().norm(dim=-1).mean().item():>12.4g}" for p in parts)
        print(f"{layer:>5} {norms} {rebuilt.max_abs_error_next[layer].item():>23.3g} "
              f"{final.block_diff[layer].item():>17.3g}")
    print("\n(the last block's output differs from hidden_states[-1]: HF reports it after ln_f)")
    for finding in rebuilt.findings + final.findings:
        print(f"- {finding.line()}" + (" [needs trained weights]" if finding.needs_trained else ""))
    top = logits[0, -1].topk(5)
    print(f"next-token top 5: {', '.join(repr(model.tokenizer.decode([i])) for i in top.indices.tolist())}")
