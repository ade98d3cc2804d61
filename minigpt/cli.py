"""The ``minigpt`` command: its subcommands, one way to get a model, one way to fail.

minigpt's own subcommands are listed in ``COMMANDS``. Packages above minigpt add theirs through the
``minigpt.commands`` entry-point group (``probes`` adds ``report`` and ``trace``), so nothing here
imports them. Every failure ends as one ``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import torch

from .config import DTYPES, OFFICIAL
from .errors import HubUnreachableError, InputError, MiniGPTError
from .model import GPT

Subcommands = argparse._SubParsersAction  # what add_parser is called on


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


def add_generate(commands: Subcommands) -> None:
    p = commands.add_parser("generate", help="continue a text, printing tokens as they come (KV cache)")
    p.add_argument("text")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding p of the mass")
    p.add_argument("--no-stop", action="store_true", help="keep going after <|endoftext|>")
    add_model_args(p)  # its --seed seeds the sampling too
    p.set_defaults(func=generate)


@torch.no_grad()
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


# minigpt's own subcommands: each function adds one parser whose defaults carry func=the command.
COMMANDS: list[Callable[[Subcommands], None]] = [
    add_generate,
]


def _plugin_commands() -> list[Callable[[Subcommands], None]]:
    """The subcommands other installed packages declare in the ``minigpt.commands`` entry-point group."""
    found = []
    for point in sorted(entry_points(group="minigpt.commands"), key=lambda p: p.name):
        try:
            found.append(point.load())
        except Exception as e:  # a broken plug-in must not take the other commands down with it
            print(f"note: the '{point.name}' command ({point.value}) cannot be loaded: {e}", file=sys.stderr)
    return found


def _as_typed(text: str) -> str:
    """The text as the terminal sent it. Under a C/ASCII locale Python keeps non-ASCII bytes of an
    argument as stand-in characters (surrogate escapes); terminals send UTF-8, so decode them as that."""
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", description="GPT-2 by hand, with taps and edits.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS + _plugin_commands():
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; 0 on success, 2 with an ``error: ...`` line for any failure it can name."""
    for stream in (sys.stdout, sys.stderr):  # a C/ASCII locale must not turn a non-ASCII token into a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)  # a bad option: argparse's own 'error:' line and exit 2
    if isinstance(getattr(args, "text", None), str):
        args.text = _as_typed(args.text)
    try:
        args.func(args)  # each command decides on gradients (only training wants them)
    except MiniGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written, named by the OS's own message
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
