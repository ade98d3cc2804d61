"""The ``minigpt`` command: its subcommands and one way to fail (what they share is in ``command``).

minigpt's own subcommands are listed in ``COMMANDS``. Packages above minigpt add theirs through the
``minigpt.commands`` entry-point group (``probes`` adds ``report`` and ``trace``), so nothing here
imports them. Every failure ends as one ``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

import torch

from .command import Subcommands, add_model_args, load_model
from .errors import MiniGPTError
from .harvest.cli import add_command as add_harvest
from .setup_cmd import add_download, add_setup
from .training.cli import add_command as add_train

DISTRIBUTION = "minigpt-taps"  # the name pip knows it by (pyproject.toml); it is imported as minigpt


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own, and keeps indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(line if line.startswith(" ") or not line else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


class Parser(argparse.ArgumentParser):
    """The ``minigpt`` command's parsers: every option that takes a value says its default in --help."""

    def __init__(self, *args, formatter_class: type[argparse.HelpFormatter] = HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        said = action.help or ""
        if (action.option_strings and not action.required and action.nargs != 0 and said != argparse.SUPPRESS
                and "default" not in said):
            shown = "none" if action.default is None else "%(default)s"  # argparse fills %(default)s in
            action.help = f"{said} (default: {shown})".lstrip()
        return action


def add_generate(commands: Subcommands) -> None:
    # "resolve": the --seed of add_model_args is replaced by one that says what it seeds here.
    p = commands.add_parser("generate", help="continue a text, printing tokens as they come (KV cache)",
                            description="Continue TEXT with the model, printing each token as it is chosen.",
                            conflict_handler="resolve")
    p.add_argument("text", help="the prompt")
    p.add_argument("--max-new-tokens", type=int, default=50, help="how many tokens to add at most")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (default: all of them)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens holding p of the probability (default: all of them)")
    p.add_argument("--no-stop", action="store_true", help="keep going after <|endoftext|> (without it: stop there)")
    add_model_args(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling (the same seed, the same text) and, with --random, of the weights")
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
    add_setup,
    add_download,
    add_generate,
    add_harvest,
    add_train,
]


def package_version() -> str:
    """minigpt's version: from a source tree's pyproject.toml when it runs from one (a clone, installed
    editable or not), else from the installed distribution's metadata."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        try:
            project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        except (OSError, UnicodeError, tomllib.TOMLDecodeError):
            project = {}
        if project.get("name") == DISTRIBUTION and "version" in project:
            return f"{project['version']} (source tree {pyproject.parent})"
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (neither installed nor run from its source tree)"


def _plugin_commands() -> list[Callable[[Subcommands], None]]:
    """The subcommands other installed packages declare in the ``minigpt.commands`` entry-point group."""
    found, seen = [], set()
    for point in sorted(entry_points(group="minigpt.commands"), key=lambda p: p.name):
        if (point.name, point.value) in seen:  # one package on the path twice (an old name's metadata beside)
            continue
        seen.add((point.name, point.value))
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
    parser = Parser(prog="minigpt", description="GPT-2 by hand, with taps and edits. "
                    "'minigpt COMMAND --help' lists a command's options, each with its default.")
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {package_version()}")
    # parser_class: the subcommands' parsers, plug-ins' included, say their defaults too.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
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
