"""The command line: ``python -m scripts.bench [options]`` from the repository root.

Runs every chosen concern (registry.CONCERNS) in one process, one after the other, and writes
``bench.json`` and ``bench.md`` to ``--out`` (default ``bench-results/``). TransformerLens
(``pip install -e ".[bench]"``) is optional: without it its rows are skipped and the table says so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from minigpt.config import DTYPES

from . import harness, report, targets
from .registry import CONCERNS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench",
                                description="minigpt beside HuggingFace and TransformerLens, side by side in one run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--batch", type=int, default=None, help="forward: default 8 (2 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="forward: default 128 on CPU, 1024 on GPU (16 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="measured rounds (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on CPU; 0 = leave as is)")
    p.add_argument("--skip-tl", action="store_true", help="leave TransformerLens out")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd rows (slow to compile on CPU)")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes, 2 rounds: a smoke run")
    p.add_argument("--memory", choices=["subprocess", "inprocess", "off"], default=None,
                   help="forward: how to measure peak memory (default: subprocess; inprocess with --quick)")
    p.add_argument("--malloc-keep", action="store_true",
                   help="time with glibc keeping freed memory (see harness.keep_freed_memory); memory rows are "
                        "unaffected")
    p.add_argument("--train-batch", type=int, default=None, help="train: windows per step (default 4; 2 with --quick)")
    p.add_argument("--load-rounds", type=int, default=7, help="load: measured rounds (2 with --quick)")
    p.add_argument("--out", default="bench-results")
    for concern in CONCERNS.values():
        p.add_argument(f"--{concern.name}", action=argparse.BooleanOptionalAction, default=concern.default,
                       help=f"{concern.help} (default: {'on' if concern.default else 'off'})")
    # internal: run one concern's child(request) in this fresh process and print its JSON answer
    p.add_argument("--child", nargs=2, metavar=("CONCERN", "REQUEST"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.command = "python -m scripts.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    gpu = args.device.startswith("cuda")
    defaults = dict(dtype="bfloat16" if gpu else "float32", batch=2 if args.quick else 8,
                    seq=16 if args.quick else (1024 if gpu else 128), repeats=2 if args.quick else 10,
                    warmup=1 if args.quick else 2, threads=None if gpu else 2,
                    memory="inprocess" if args.quick else "subprocess")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace, log=print) -> dict:
    """Every chosen concern, one after the other; the report, also written to ``args.out``."""
    found = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "hardware": harness.hardware(args.device), "versions": harness.versions(), "device": args.device,
             "dtype": args.dtype, "threads": torch.get_num_threads(), "command": args.command}
    values: dict[str, float] = {}
    for name, concern in CONCERNS.items():
        if getattr(args, name):
            section = concern.run(args, log)
            found[name] = section
            values |= section.get("target_values", {})
    found["load_average"] = harness.load_average()
    found["targets"] = targets.check(values)
    report.write(found, CONCERNS, Path(args.out))
    return found


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:  # the fresh-process side of harness.in_fresh_process
        name, request = args.child
        print(json.dumps(CONCERNS[name].child(json.loads(request))))
        return
    args.allocator = harness.keep_freed_memory() if args.malloc_keep else "default (glibc as configured)"
    run(args)
    print((Path(args.out) / "bench.md").read_text(encoding="utf-8"))
