"""``minigpt setup`` and ``minigpt download``: what an installed minigpt fetches once, for offline use.

``setup`` puts GPT-2's tokenizer vocabulary, checked, where the tokenizer looks for it (see
``minigpt.vocabulary``); ``download`` stores a hub checkpoint (config and safetensors, never pickles)
in a directory that ``--model DIR`` / ``GPT.from_pretrained(DIR)`` takes later, offline.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .command import Subcommands
from .errors import HubError
from .model import GPT
from .vocabulary import WHISPER_SDIST, setup_vocabulary

# Only these files of a hub repository: the config and safetensors weights, one file or sharded.
CHECKPOINT_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


def add_setup(commands: Subcommands) -> None:
    p = commands.add_parser("setup", help="put GPT-2's tokenizer vocabulary on this machine, checked, for offline use",
                            description="Download GPT-2's BPE vocabulary from where tiktoken does, or else take the "
                            f"identical file from {WHISPER_SDIST} on PyPI; store it only if its sha256 is GPT-2's. "
                            "Run it once after installing (nothing is done if a verified copy is in place).")
    p.add_argument("--file", type=Path, default=None,
                   help=f"use a copy you already have: r50k_base.tiktoken, gpt2.tiktoken or {WHISPER_SDIST}")
    p.set_defaults(func=setup)


def setup(args: argparse.Namespace) -> None:
    """Put the verified vocabulary in place (TokenizerError if no source gives GPT-2's)."""
    setup_vocabulary(args.file)


def add_download(commands: Subcommands) -> None:
    p = commands.add_parser("download", help="store a hub checkpoint (config + safetensors) in a directory",
                            description="Download a GPT-2 checkpoint from the HuggingFace hub into DIRECTORY "
                            "(config.json and safetensors files only, never pickles) and check that minigpt "
                            "loads it; later, offline, pass --model DIRECTORY.")
    p.add_argument("name", help="hub name, e.g. gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2")
    p.add_argument("directory", type=Path)
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.set_defaults(func=download)


def download(args: argparse.Namespace) -> None:
    """Download, then load once with minigpt's checks; HubError if the hub does not give it."""
    import huggingface_hub as hub

    try:
        hub.snapshot_download(args.name, revision=args.revision, allow_patterns=CHECKPOINT_PATTERNS,
                              local_dir=args.directory)
    except Exception as e:  # the hub client's errors are many; every one ends the same way here
        said = " ".join(str(e).split())  # the client's text runs over several lines; the error is one
        raise HubError(f"could not download {args.name!r} (revision {args.revision or 'main'}) into "
                       f"{args.directory}: {type(e).__name__}: {said}; check the name and the network "
                       "(HF_ENDPOINT, HF_HUB_OFFLINE), or copy a checkpoint directory here by hand") from e
    model = GPT.from_pretrained(args.directory)  # CheckpointError if what came is not a loadable GPT-2
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.name}: {n_params / 1e6:.1f}M parameters in {args.directory}; use --model {args.directory}")
