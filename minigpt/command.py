"""What every subcommand of the ``minigpt`` command shares: the model options, getting the model they
ask for, and an output directory checked before any work. Commands of minigpt and of the packages
above it (probes) import these; the command itself (``minigpt.cli``) lists them."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from .config import DTYPES, OFFICIAL, OFFLINE_MODEL, config_of
from .errors import HubUnreachableError, InputError
from .model import GPT

Subcommands = argparse._SubParsersAction  # what add_parser is called on


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and friends, for every subcommand that needs a model."""
    parser.add_argument("--model", default="gpt2", help="hub name (gpt2, gpt2-medium, ...) or local checkpoint directory")
    parser.add_argument("--random", action="store_true",
                        help="use seeded RANDOM weights of the --model size: one of " + ", ".join(OFFICIAL)
                        + ", or a config.json (HF's, or GPTConfig's fields) for any shape")
    parser.add_argument("--random-if-offline", action="store_true",
                        help="if the hub cannot be reached and nothing is cached, fall back to random weights")
    parser.add_argument("--trained-if-offline", action="store_true",
                        help="if the hub cannot be reached and nothing is cached, fall back to the small model "
                        f"trained by minigpt that ships with it ({OFFLINE_MODEL})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the dtype the model's weights are held and run in")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs, e.g. cpu or cuda:0 (default: cuda if a GPU is visible, else cpu)")


def load_model(args: argparse.Namespace) -> GPT:
    """The model that --model/--random/--*-if-offline ask for; says on stderr what it got."""
    kwargs = {"dtype": DTYPES[args.dtype], "device": args.device}
    if args.random:
        size = args.model if args.model in OFFICIAL else config_of(args.model, InputError, "--model")
        model = GPT.random(size, seed=args.seed, **kwargs)
    else:
        try:
            model = GPT.from_pretrained(args.model, **kwargs)
        except HubUnreachableError as e:
            if args.trained_if_offline and args.model in OFFICIAL:
                print(f"note: {e}\nnote: falling back to {OFFLINE_MODEL}, the small model trained by minigpt "
                      "that ships with it (not OpenAI's GPT-2; --random for random weights)", file=sys.stderr)
                model = GPT.from_pretrained(OFFLINE_MODEL, **kwargs)
            elif args.random_if_offline and args.model in OFFICIAL:
                print(f"note: {e}\nnote: falling back to RANDOM weights of the {args.model} shape "
                      "(mechanics only: findings that need trained weights will not hold)", file=sys.stderr)
                model = GPT.random(args.model, seed=args.seed, **kwargs)
            else:
                raise
    print(f"model: {model.provenance}", file=sys.stderr)
    return model


def output_dir(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a directory that exists and takes files (created if missing), checked before any work.

    Raises InputError naming the option and why (a file in the way, no permission, a read-only place).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out} is a file, not a directory; give a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # the only sure test that files can be written there
            pass
    except OSError as e:
        raise InputError(f"{option} {out} cannot be used: {e.strerror or e}; give a directory you can write to") from e
    return out
