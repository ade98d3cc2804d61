"""``minigpt train``: the command line of ``minigpt.training.train``; one option per Settings field."""
from __future__ import annotations

import argparse
import os
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path

import torch

from .. import distributed
from ..command import Subcommands

EXAMPLE = """examples:
  minigpt train --data corpus/ --size tiny.json --out run/ --steps 2000
  minigpt train --data corpus.jsonl --size gpt2 --out run/ --device cuda --compile
  torchrun --nproc-per-node 2 -m minigpt train --data corpus/ --size tiny.json --out run/
Started again with the same arguments over the same --out, it goes on from the last checkpoint."""


def add_command(commands: Subcommands) -> None:
    """Register ``train`` and ``eval`` on the ``minigpt`` parser's subcommands."""
    from .settings import CHOICES, Settings

    _add_eval(commands)

    p = commands.add_parser(
        "train", help="train a GPT-2 from scratch on a corpus (resumable; torchrun for data parallel)",
        description="Train the model of minigpt/model.py on a corpus with AdamW, warm-up and cosine decay; "
        "write checkpoints to OUT in HuggingFace's layout (config.json + model.safetensors), which "
        "minigpt and transformers both load.", epilog=EXAMPLE)
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files (one document each), .jsonl (a 'text' field per line), .parquet, or directories")
    p.add_argument("--size", default=None,
                   help="train from scratch a model of this size: gpt2, gpt2-medium, ..., or a config.json (HF's or "
                   "GPTConfig's fields) (default: none; give --size or --init)")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights and config instead (default: none; give --size or --init)")
    p.add_argument("--out", required=True, help="output directory: checkpoints, the tokenized corpus, the log; new, "
                   "empty, or one of minigpt's training runs (anything else is refused, nothing written)")
    p.add_argument("--lines", action="store_true", help="in text files, each line is a document")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train; under torchrun a cuda device becomes cuda:LOCAL_RANK "
                   "(default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    p.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N steps whose loss or gradient norm is NaN or inf (no update, logged) "
                   "instead of stopping at the first")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (without it: eager)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's own choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the summary line is still printed)")
    for f in fields(Settings):
        kind = {int: int, str: str}.get(typing.get_type_hints(Settings)[f.name], float)
        choices = {"choices": CHOICES[f.name]} if f.name in CHOICES else {}
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f.metadata["help"],
                       **choices)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..checks import check_int
    from .loop import train
    from .settings import Settings

    if args.threads is not None:  # torch takes a C int: a huge count would overflow there, not here
        torch.set_num_threads(check_int(args.threads, "--threads", 1, 2**16, way_out="e.g. --threads 8"))
    out = Path(args.out)  # train() claims it, refusing a file or a directory of someone else's
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    started = time.perf_counter()
    state = train(args.data, args.size, out, settings, init=args.init, device=distributed.local_device(args.device),
                  lines=args.lines, save_every=args.save_every, compile=args.compile, quiet=args.quiet,
                  skip_nonfinite=args.skip_nonfinite)
    if int(os.environ.get("RANK", "0")) == 0:
        last = state["log"][-1] if state["log"] else {}
        val = [e["val_loss"] for e in state["log"] if "val_loss" in e]
        print(f"trained to step {state['step']}: loss {last.get('loss', float('nan')):.4f}, validation loss "
              f"{val[-1] if val else float('nan'):.4f} ({time.perf_counter() - started:.1f} s this run); "
              f"checkpoint in {out} (minigpt and transformers load it)", file=sys.stderr)


def _add_eval(commands: Subcommands) -> None:
    p = commands.add_parser(
        "eval", help="loss and perplexity of a checkpoint on a file, in training's windows",
        description="The mean next-token loss (nats/token) and perplexity of MODEL over every window of DATA "
        "(documents tokenized as training does, each followed by <|endoftext|>, cut into non-overlapping "
        "windows of --context + 1 tokens). With MODEL a training run (its data/train.bin), what counting "
        "gets on the same windows (uniform, unigram, bigram: minigpt.training.baselines) is printed beside it.")
    p.add_argument("--model", required=True, help="a checkpoint directory (a training run's --out) or hub name")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="as train's --data")
    p.add_argument("--lines", action="store_true", help="in text files, each line is a document")
    p.add_argument("--context", type=int, default=None, help="tokens per window (default: the model's positions)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    import json

    from ..checks import check_int
    from ..errors import TrainingError
    from ..model import GPT
    from .eval import evaluate_file

    check_int(args.batch_size, "--batch-size", 1, error=TrainingError)
    model = GPT.from_pretrained(args.model, device=args.device)
    result = evaluate_file(model, args.data, context=args.context, batch_size=args.batch_size, lines=args.lines,
                           train_tokens=_training_tokens(Path(args.model)))
    print(json.dumps(result, indent=1))


def _training_tokens(run: Path):
    """A training run's tokens (its data/train.bin, memory-mapped), or None for any other checkpoint."""
    tokens = run / "data" / "train.bin"
    if not tokens.is_file():
        return None
    import numpy as np

    from .data import TOKEN_DTYPE
    return np.memmap(tokens, dtype=TOKEN_DTYPE, mode="r")
