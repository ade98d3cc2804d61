"""The ``minigpt`` command. Subcommands share one way to get a model (``load_model``)."""
from __future__ import annotations

import argparse
import sys

import torch

from .config import DTYPES, OFFICIAL
from .errors import HubUnreachableError, MiniGPTError
from .harvest import cli as harvest_cli
from .model import GPT


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and friends, for every subcommand that needs a model."""
    parser.add_argument("--model", default="gpt2", help="hub name (gpt2, gpt2-medium, ...) or local checkpoint directory")
    parser.add_argument("--random", action="store_true",
                        help="use seeded RANDOM weights of the --model size (one of: " + ", ".join(OFFICIAL) + ")")
    parser.add_argument("--random-if-offline", action="store_true",
                        help="if the hub cannot be reached and nothing is cached, fall back to random weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_model(args: argparse.Namespace) -> GPT:
    """The model that --model/--random/--random-if-offline ask for; says on stderr what it got."""
    kwargs = {"dtype": DTYPES[args.dtype], "device": args.device}
    if args.random:
        model = GPT.random(args.model, seed=args.seed, **kwargs)
    else:
        try:
            model = GPT.from_pretrained(args.model, **kwargs)
        except HubUnreachableError as e:
            if not (args.random_if_offline and args.model in OFFICIAL):
                raise
            print(f"note: {e}\nnote: falling back to RANDOM weights of the {args.model} shape "
                  "(mechanics only: findings that need trained weights will not hold)", file=sys.stderr)
            model = GPT.random(args.model, seed=args.seed, **kwargs)
    print(f"model: {model.source}", file=sys.stderr)
    return model


def trace(args: argparse.Namespace) -> None:
    """Per block: residual norms, the reconstruction law, and the ln_f check."""
    model = load_model(args)
    n = model.cfg.n_layer
    logits, tr = model.run(args.text, taps=["blocks.*.resid_pre", "blocks.*.attn_delta", "blocks.*.mlp_delta",
                                            "blocks.*.resid_post", "ln_f"])
    hidden = tr.hidden_states()
    tokens = tr["ln_f"].shape[1]

    def norm(x: torch.Tensor) -> float:  # mean L2 norm of one token's vector
        return x.float().norm(dim=-1).mean().item()

    print(f"{tokens} tokens, {n} blocks; norms are the mean L2 norm per token")
    print(f"{'block':>5} {'|resid_pre|':>12} {'|attn_delta|':>13} {'|mlp_delta|':>12} {'|resid_post|':>13} "
          f"{'max|pre+attn+mlp-post|':>23} {'max|post-H[L+1]|':>17}")
    for layer in range(n):
        pre, a, m, post = (tr[f"blocks.{layer}.{t}"] for t in ("resid_pre", "attn_delta", "mlp_delta", "resid_post"))
        law = (pre + a + m - post).abs().max().item()
        # hidden_states[L+1] is the next block's input, except after the last block, where it is ln_f's output.
        vs_hidden = (post - hidden[layer + 1]).abs().max().item()
        print(f"{layer:>5} {norm(pre):>12.4g} {norm(a):>13.4g} {norm(m):>12.4g} {norm(post):>13.4g} "
              f"{law:>23.3g} {vs_hidden:>17.3g}")
    last = tr[f"blocks.{n - 1}.resid_post"]
    again = model.ln_f(last)
    print(f"\nln_f check: the last block's raw output differs from hidden_states[-1] by up to "
          f"{(last - hidden[-1]).abs().max().item():.4g};\n            ln_f(raw output) differs from it by "
          f"{(again - hidden[-1]).abs().max().item():.3g}: hidden_states[-1] is normalised by ln_f.")
    top = logits[0, -1].topk(5)
    words = [repr(model.tokenizer.decode([i])) for i in top.indices.tolist()]
    print(f"next-token top 5: {', '.join(words)}")


def generate(args: argparse.Namespace) -> None:
    """Continue the text, printing each token as soon as it is chosen."""
    model = load_model(args)
    tokens = model.stream(args.text, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_at_eos=not args.no_stop)  # checks everything first
    print(args.text, end="", flush=True)
    pending: list[int] = []  # the tokens of a character split across several, until it is whole
    for new in tokens:
        pending.append(int(new[0]))
        try:
            print(model.tokenizer.decode_bytes(pending).decode("utf-8"), end="", flush=True)
            pending = []
        except UnicodeDecodeError:
            pass
    if pending:
        print(model.tokenizer.decode(pending), end="")
    print()


def report(args: argparse.Namespace) -> None:
    """Run every probe on the text; write index.html, report.json and the PNG figures into --out."""
    from probes.report import build_report  # the probes (and matplotlib) only for this command

    model = load_model(args)
    build_report(model, args.text, args.out, block=args.block, head=args.head)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minigpt", description="GPT-2 by hand, with taps and edits.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("trace", help="per-block residual norms, reconstruction law and ln_f check")
    p.add_argument("text")
    add_model_args(p)
    p.set_defaults(func=trace)
    p = commands.add_parser("generate", help="continue a text, printing tokens as they come (KV cache)")
    p.add_argument("text")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding p of the mass")
    p.add_argument("--no-stop", action="store_true", help="keep going after <|endoftext|>")
    add_model_args(p)  # its --seed seeds the sampling too
    p.set_defaults(func=generate)
    p = commands.add_parser("report", help="run every probe on a text: index.html, report.json and figures",
                            description="Run every probe of the lecture notes on TEXT and write OUT/index.html, "
                            "OUT/report.json and the PNG figures. Offline with nothing cached, it falls back to "
                            "random weights of the --model size (--random-if-offline is on), and the page says so.")
    p.add_argument("text")
    p.add_argument("--out", default="report", help="directory for the report (created if missing; default: report)")
    p.add_argument("--block", type=int, default=9, help="block the interventions edit (default 9, clamped to the depth)")
    p.add_argument("--head", type=int, default=2, help="head whose keys are zeroed (default 2, clamped to n_head)")
    add_model_args(p)
    # Offline with nothing cached, the report still runs, on random weights, and says so on the page.
    p.set_defaults(func=report, random_if_offline=True)
    harvest_cli.add_command(commands, add_model_args)
    args = parser.parse_args(argv)
    try:
        with torch.no_grad():
            args.func(args)
    except MiniGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
