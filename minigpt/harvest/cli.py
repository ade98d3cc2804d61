"""``minigpt harvest``: the command line of ``minigpt.harvest.harvest``."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from .. import distributed
from ..command import Subcommands, add_model_args, load_model
from ..config import DTYPES
from ..memory import fmt_bytes

EXAMPLE = """examples:
  minigpt harvest --model gpt2 --data corpus.jsonl --taps 'blocks.*.resid_post' --out acts/ --context 128
  torchrun --nproc-per-node 4 -m minigpt harvest --model gpt2 --data corpus/ --taps 'blocks.6.*' --out acts/
"""


def add_command(commands: Subcommands) -> None:
    """Register ``harvest`` on the ``minigpt`` parser's subcommands."""
    p = commands.add_parser(
        "harvest", help="record taps over a corpus into safetensors shards (resumable; torchrun for many processes)",
        description="Run a corpus through the model and write the taps' rows to OUT: safetensors shards and "
        "manifest.json. Killed and started again with the same arguments, it continues where it stopped. "
        "Under torchrun, the ranks share the shards.", epilog=EXAMPLE)
    add_model_args(p)  # --dtype among them: the dtype the model runs in, as on every command
    p.add_argument("--store-dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of the rows on disk (float32 keeps a float32 model's values exactly)")
    p.add_argument("--model-dtype", dest="dtype", choices=DTYPES, action=_Deprecated, help=argparse.SUPPRESS)
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files (one document each), .jsonl (a 'text' field per line), .parquet, or directories")
    p.add_argument("--taps", nargs="+", required=True, metavar="PATTERN",
                   help="tap names or glob patterns, e.g. 'blocks.*.resid_post'")
    p.add_argument("--out", required=True, help="output directory (new, or the one of this harvest to resume)")
    p.add_argument("--context", type=int, default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens of the corpus (default: the whole corpus)")
    p.add_argument("--keep-positions", choices=["all", "last"], default="all",
                   help="a row per token (all), or a row per window, its last token (last)")
    p.add_argument("--positions", dest="keep_positions", choices=["all", "last"], action=_Deprecated,
                   help=argparse.SUPPRESS)
    p.add_argument("--lines", action="store_true", help="in text files, each line is a document")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward: speed only, not which rows")
    p.add_argument("--shard-mb", type=float, default=256, help="most MiB per shard file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


class _Deprecated(argparse.Action):
    """An old spelling of an option, accepted for one release with a DeprecationWarning naming the new one."""

    NEW = {"--model-dtype": "--dtype", "--positions": "--keep-positions"}

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warnings.warn(f"{option_string} is deprecated and goes in the next release; use "
                      f"{self.NEW[option_string]}", DeprecationWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def run(args: argparse.Namespace) -> None:
    from .runner import harvest

    args.device = distributed.local_device(args.device)  # torchrun: one GPU per process on each machine
    model = load_model(args)
    start = time.perf_counter()
    manifest = harvest(model, args.data, args.taps, args.out, context=args.context, max_tokens=args.max_tokens,
                       keep_positions=args.keep_positions, store_dtype=args.store_dtype, lines=args.lines,
                       batch_size=args.batch_size, shard_bytes=int(args.shard_mb * 2**20), quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        seconds = time.perf_counter() - start
        print(f"harvested {manifest['tokens']:,} tokens -> {manifest['rows']:,} rows of {len(manifest['row_shapes'])} "
              f"taps, {len(manifest['shards'])} shards, {fmt_bytes(manifest['bytes'])} in {args.out} "
              f"({seconds:.1f} s this run, {manifest['world_size']} process"
              f"{'es' if manifest['world_size'] > 1 else ''})", file=sys.stderr)
