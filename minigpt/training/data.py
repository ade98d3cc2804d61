"""Training data: a corpus tokenized once into two flat token files, cut into windows, served by step.

Tokenizing: every document (read as harvest reads it: text, JSONL, Parquet, see minigpt/corpus.py)
is encoded with GPT-2's BPE and followed by ``<|endoftext|>``, as GPT-2 itself was trained. A seeded
``val_fraction`` of the documents goes, whole, to the validation split; the rest to training. (A
corpus too small to give both a window is split inside its token stream instead: the last
``val_fraction`` of it is held out.) The two streams are written once to ``DIR/data/train.bin`` and
``val.bin`` (uint16, nanoGPT's format) with ``data.json`` beside them (each written atomically:
minigpt.files; data.json lists the two files' sha256, checked when a run is resumed), and memory-mapped
from then on.

Windows: non-overlapping runs of ``context + 1`` tokens, window i starting at token i * context:
inputs are its first ``context`` tokens, targets the ``context`` after each. Order: each epoch is a
seeded permutation of the training windows, one after the other without end, and step s takes the
``global_batch`` windows from s * global_batch on. So where the data stands is the step number alone:
a resumed run, or one over another number of processes with the same global batch, sees the same
windows at the same step.

Repeats (``Settings.repeat``): a seeded fraction of each epoch's windows (drawn after the epoch's
permutation, which is so the same with or without them) write their first L tokens twice and go on
with the text after them: at ``context`` 256, L is drawn from 8 to 128. Predicting the second copy
pays only to a model that finds the earlier occurrence of the current token and copies what came next,
which is what an induction head does. With ``Settings.repeat_tokens`` "random" the repeated run is
instead L token ids drawn uniformly from the whole vocabulary (seeded per window), written twice, with
the window's text after them: nothing but the copy predicts those tokens, as in the induction test.
"""
from __future__ import annotations

import hashlib
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..checks import is_integer
from ..config import END_OF_TEXT, END_OF_TEXT_ID
from .. import corpus, files
from ..errors import TrainingError

TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit
DATA_FORMAT = "minigpt-train-data/1"
_FILES = ("train.bin", "val.bin", "data.json")  # all this module writes


def prepare(data, directory: Path, *, val_fraction: float, seed: int, lines: bool = False) -> dict:
    """Tokenize the corpus ``data`` into ``directory``/{train,val}.bin unless it is there already.

    Returns data.json's contents (the corpus fingerprint, the split and the token counts). A
    directory prepared from another corpus or split raises TrainingError.
    """
    paths = corpus.corpus_files(data, TrainingError)
    identity = {"format": DATA_FORMAT, "corpus": {"files": corpus.fingerprint(paths), "lines": lines},
                "tokenizer": "gpt2 (tiktoken)", "val_fraction": val_fraction, "seed": seed}
    meta_path = directory / "data.json"
    way_out = f"remove {directory} to tokenize again"
    files.checked_directory(directory, TrainingError, what="tokenized corpus", way_out=way_out)
    if not os.path.lexists(meta_path):
        for name in _FILES:  # written by replacing what is there: a directory or a pipe there is not minigpt's
            if os.path.lexists(directory / name) and not stat.S_ISREG(os.lstat(directory / name).st_mode):
                raise TrainingError(f"{directory / name} is not a regular file, so not minigpt's tokens; {way_out}")
        return _tokenize(paths, directory, identity, lines)
    meta = files.read_json(files.checked_file(meta_path, directory, TrainingError, what="tokenized corpus",
                                              way_out=way_out), TrainingError, way_out)
    differing = [k for k in identity if not isinstance(meta, dict) or meta.get(k) != identity[k]]
    if differing:
        names = {"corpus": "corpus (--data, --lines)", "val_fraction": "--val-fraction", "seed": "--seed"}
        raise TrainingError(f"{directory} holds the tokens of another corpus or split (other "
                            f"{', '.join(names.get(k, k) for k in differing)}); train into a new --out "
                            "directory, or give the same options")
    for field in ("train_tokens", "val_tokens"):
        if not (is_integer(meta.get(field)) and 2 <= meta[field] < 2**48):
            raise TrainingError(f"{meta_path}: {field} must be an integer in [2, 2**48), got {meta.get(field)!r}; "
                                f"{way_out}")
    digests = meta.get("sha256")
    for split in ("train", "val"):  # the tokens are read once: a resumed run trains on the very tokens it began with
        name = f"{split}.bin"
        if not (isinstance(digests, dict) and isinstance(digests.get(name), str)):
            raise TrainingError(f"{meta_path}: sha256 must map {name} to its sha256, got {digests!r}; {way_out}")
        if files.file_sha256(token_file(directory, split, meta[f"{split}_tokens"])) != digests[name]:
            raise TrainingError(f"{directory / name} does not have the sha256 {meta_path} lists: it was changed after "
                                f"it was written; {way_out}")
    return meta


def tidy(directory: Path) -> None:
    """Remove what a killed tokenizing left in ``directory``: the temporaries of its own three files, nothing else."""
    files.remove_temporaries(directory, lambda name: name in _FILES)


def _tokenize(paths: list[Path], directory: Path, identity: dict, lines: bool) -> dict:
    from ..tokenizer import gpt2_tokenizer

    encode = gpt2_tokenizer().encode
    chooser = random.Random(identity["seed"])
    streams: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    documents = 0
    for doc in corpus.documents(paths, lines, TrainingError):
        ids = encode(doc.text, allowed_special={END_OF_TEXT}) + [END_OF_TEXT_ID]
        split = "val" if chooser.random() < identity["val_fraction"] else "train"
        streams[split].append(np.asarray(ids, dtype=TOKEN_DTYPE))
        documents += 1
    train = np.concatenate(streams["train"]) if streams["train"] else np.zeros(0, TOKEN_DTYPE)
    val = np.concatenate(streams["val"]) if streams["val"] else np.zeros(0, TOKEN_DTYPE)
    split = "documents"
    if min(len(train), len(val)) < 2:  # too few documents to hold some out whole
        stream = np.concatenate([train, val])
        cut = len(stream) - max(2, int(len(stream) * identity["val_fraction"]))
        train, val, split = stream[:cut], stream[cut:], "tail of the token stream"
    if len(train) < 2:
        raise TrainingError(f"the corpus ({len(paths)} files, {documents} documents) gives only {len(train)} "
                            "training tokens; give more text")
    meta = {**identity, "documents": documents, "split": split, "train_tokens": len(train), "val_tokens": len(val),
            "sha256": {f"{name}.bin": hashlib.sha256(tokens).hexdigest() for name, tokens in (("train", train),
                                                                                           ("val", val))}}
    _write(directory, {"train": train, "val": val}, meta)
    return meta


def _write(directory: Path, streams: dict[str, np.ndarray], meta: dict) -> None:
    """The token files (uint16 as the machine orders them, as ``tofile`` would, but with the OS's reason on a
    failure), then data.json (last: the tokens are whole once it is there); on a write failure
    (a full disk, a file-size limit) none of the three is left and the error says so."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, tokens in streams.items():
            files.write_atomically(directory / f"{name}.bin", lambda path, tokens=tokens: path.write_bytes(tokens))
        files.write_json(directory / "data.json", meta)
    except OSError as e:
        for name in _FILES:
            (directory / name).unlink(missing_ok=True)
        raise TrainingError(f"cannot write the tokenized corpus into {directory} ({e}); nothing of it is kept: free "
                            "some space (or raise the file-size limit, ulimit -f) and run the same command again") from e


def token_file(directory: Path, split: str, tokens: int | None = None) -> Path:
    """``directory``/``split``.bin, checked before it is opened: a regular file inside ``directory`` holding a
    whole, non-zero number of tokens (``tokens`` of them, when given)."""
    way_out = f"remove {directory} to tokenize again"
    path = files.checked_file(directory / f"{split}.bin", directory, TrainingError, what="tokenized corpus",
                              way_out=way_out)
    size, width = os.stat(path).st_size, np.dtype(TOKEN_DTYPE).itemsize
    if size == 0 or size % width or (tokens is not None and size != tokens * width):
        wanted = f"{tokens:,} tokens ({tokens * width:,} bytes)" if tokens is not None else "a whole number of tokens"
        raise TrainingError(f"{path} holds {size:,} bytes, not {wanted} of {width} bytes each; {way_out}")
    return path


@dataclass
class Windows:
    """The windows of one split: ``windows[i]`` -> (inputs, targets), each [context] int64."""

    tokens: np.ndarray  # the split's token stream, memory-mapped
    context: int

    @classmethod
    def open(cls, directory: Path, split: str, context: int, tokens: int | None = None) -> Windows:
        """``directory``/``split``.bin memory-mapped, checked by ``token_file`` before it is opened."""
        return cls(np.memmap(token_file(directory, split, tokens), dtype=TOKEN_DTYPE, mode="r"), context)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context)

    def batch(self, indices: list[int] | torch.Tensor, device: torch.device, repeats: list[int] | None = None,
              random: tuple[list[int], int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``indices`` -> (inputs, targets), each [len(indices), context] int64 on ``device``.
        ``repeats[j]`` > 0: row j writes its first ``repeats[j]`` tokens twice, then goes on from there;
        with ``random`` = (seeds, vocab_size), row j writes ``repeats[j]`` ids drawn uniformly from
        [0, vocab_size) by a generator seeded with ``seeds[j]`` twice instead, then its own text."""
        rows = np.stack([self.tokens[i * self.context: i * self.context + self.context + 1] for i in indices])
        for j, length in enumerate(repeats or []):
            if length and random is not None:
                drawn = torch.randint(random[1], (length,), generator=torch.Generator().manual_seed(random[0][j]))
                rows[j] = np.concatenate([drawn.numpy(), drawn.numpy(), rows[j, :self.context + 1 - 2 * length]])
            elif length:
                rows[j] = np.concatenate([rows[j, :length], rows[j, :self.context + 1 - length]])
        rows = torch.from_numpy(rows.astype(np.int64)).to(device)
        return rows[:, :-1], rows[:, 1:]


SHORTEST_REPEAT = 8  # tokens: a repeated prefix is at least this long (and at most half the window)


class Picks(NamedTuple):
    """One micro-batch: its windows and, for each, the length of its repeated prefix (0: none) and the
    seed of its random prefix (``Order``'s ``random``; else 0)."""

    windows: list[int]
    repeats: list[int]
    seeds: list[int]


class Order:
    """The endless sequence of training windows: epoch after epoch, each a permutation seeded by (seed, epoch),
    a ``repeat`` fraction of each epoch's windows repeating a prefix (see the module's docstring); with
    ``random``, each of those also gets the seed of its random prefix."""

    def __init__(self, n_windows: int, seed: int, repeat: float = 0.0, context: int = 0, random: bool = False):
        self.n, self.seed, self.repeat, self.context, self.random = n_windows, seed, repeat, context, random
        self._epoch, self._permutation = -1, torch.empty(0, dtype=torch.long)
        self._repeats = self._seeds = torch.zeros(0, dtype=torch.long)

    def for_step(self, step: int, batch_size: int, grad_accum: int, rank: int, world: int) -> list[Picks]:
        """This process's windows at ``step``: ``grad_accum`` micro-batches of ``batch_size``.

        The step's ``batch_size * grad_accum * world`` windows are dealt micro-batch by micro-batch,
        rank after rank within each, so any number of processes with the same global batch shares
        out the same set of windows.
        """
        first = step * batch_size * grad_accum * world
        return [self.take(first + (micro * world + rank) * batch_size, batch_size) for micro in range(grad_accum)]

    def take(self, start: int, count: int) -> Picks:
        """Windows ``start`` .. ``start + count - 1`` of the endless sequence."""
        taken = Picks([], [], [])
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.n)
            if epoch != self._epoch:
                self._new_epoch(epoch)
            taken.windows.append(int(self._permutation[offset]))
            taken.repeats.append(int(self._repeats[offset]))
            taken.seeds.append(int(self._seeds[offset]))
        return taken

    def _new_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._epoch, self._permutation = epoch, torch.randperm(self.n, generator=generator)
        self._repeats = self._seeds = torch.zeros(self.n, dtype=torch.long)
        longest = (self.context + 1) // 2
        if self.repeat:  # drawn after the permutation: it is the same without them
            chosen = torch.rand(self.n, generator=generator) < self.repeat
            lengths = torch.randint(SHORTEST_REPEAT, longest + 1, (self.n,), generator=generator)
            self._repeats = torch.where(chosen, lengths, 0)
            if self.random:  # drawn last: the text repeats' draws are the same without them
                self._seeds = torch.randint(0, 2**62, (self.n,), generator=generator)
