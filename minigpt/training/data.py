"""Training data: a corpus tokenized once into two flat token files, cut into windows, served by step.

Tokenizing: every document (read as harvest reads it: text, JSONL, Parquet, see minigpt/corpus.py)
is encoded with GPT-2's BPE and followed by ``<|endoftext|>``, as GPT-2 itself was trained. A seeded
``val_fraction`` of the documents goes, whole, to the validation split; the rest to training. (A
corpus too small to give both a window is split inside its token stream instead: the last
``val_fraction`` of it is held out.) The two streams are written once to ``DIR/data/train.bin`` and
``val.bin`` (uint16, nanoGPT's format) with ``data.json`` beside them (each written atomically:
minigpt.files), and memory-mapped from then on.

Windows: non-overlapping runs of ``context + 1`` tokens, window i starting at token i * context:
inputs are its first ``context`` tokens, targets the ``context`` after each. Order: each epoch is a
seeded permutation of the training windows, one after the other without end, and step s takes the
``global_batch`` windows from s * global_batch on. So where the data stands is the step number alone:
a resumed run, or one over another number of processes with the same global batch, sees the same
windows at the same step.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import END_OF_TEXT, END_OF_TEXT_ID
from .. import corpus, files
from ..errors import TrainingError

TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit
DATA_FORMAT = "minigpt-train-data/1"


def prepare(data, directory: Path, *, val_fraction: float, seed: int, lines: bool = False) -> dict:
    """Tokenize the corpus ``data`` into ``directory``/{train,val}.bin unless it is there already.

    Returns data.json's contents (the corpus fingerprint, the split and the token counts). A
    directory prepared from another corpus or split raises TrainingError.
    """
    paths = corpus.corpus_files(data, TrainingError)
    identity = {"format": DATA_FORMAT, "corpus": {"files": corpus.fingerprint(paths), "lines": lines},
                "tokenizer": "gpt2 (tiktoken)", "val_fraction": val_fraction, "seed": seed}
    meta_path = directory / "data.json"
    if not meta_path.exists():
        return _tokenize(paths, directory, identity, lines)
    meta = files.read_json(meta_path, TrainingError, f"remove {directory} to tokenize again")
    differing = [k for k in identity if not isinstance(meta, dict) or meta.get(k) != identity[k]]
    if differing:
        names = {"corpus": "corpus (--data, --lines)", "val_fraction": "--val-fraction", "seed": "--seed"}
        raise TrainingError(f"{directory} holds the tokens of another corpus or split (other "
                            f"{', '.join(names.get(k, k) for k in differing)}); train into a new --out "
                            "directory, or give the same options")
    return meta


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
    directory.mkdir(parents=True, exist_ok=True)
    for name, tokens in (("train", train), ("val", val)):
        files.write_atomically(directory / f"{name}.bin", tokens.tofile)
    meta = {**identity, "documents": documents, "split": split, "train_tokens": len(train), "val_tokens": len(val)}
    files.write_json(directory / "data.json", meta)  # last: the tokens above are whole once it is there
    return meta


@dataclass
class Windows:
    """The windows of one split: ``windows[i]`` -> (inputs, targets), each [context] int64."""

    tokens: np.ndarray  # the split's token stream, memory-mapped
    context: int

    @classmethod
    def open(cls, directory: Path, split: str, context: int) -> Windows:
        return cls(np.memmap(directory / f"{split}.bin", dtype=TOKEN_DTYPE, mode="r"), context)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context)

    def batch(self, indices: list[int] | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``indices`` -> (inputs, targets), each [len(indices), context] int64 on ``device``."""
        rows = np.stack([self.tokens[i * self.context: i * self.context + self.context + 1] for i in indices])
        rows = torch.from_numpy(rows.astype(np.int64)).to(device)
        return rows[:, :-1], rows[:, 1:]


class Order:
    """The endless sequence of training windows: epoch after epoch, each a permutation seeded by (seed, epoch)."""

    def __init__(self, n_windows: int, seed: int):
        self.n, self.seed = n_windows, seed
        self._epoch, self._permutation = -1, torch.empty(0, dtype=torch.long)

    def for_step(self, step: int, batch_size: int, grad_accum: int, rank: int, world: int) -> list[list[int]]:
        """This process's windows at ``step``: ``grad_accum`` micro-batches of ``batch_size``.

        The step's ``batch_size * grad_accum * world`` windows are dealt micro-batch by micro-batch,
        rank after rank within each, so any number of processes with the same global batch shares
        out the same set of windows.
        """
        first = step * batch_size * grad_accum * world
        return [self.take(first + (micro * world + rank) * batch_size, batch_size) for micro in range(grad_accum)]

    def take(self, start: int, count: int) -> list[int]:
        """Windows ``start`` .. ``start + count - 1`` of the endless sequence."""
        taken = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.n)
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._permutation = epoch, torch.randperm(self.n, generator=generator)
            taken.append(int(self._permutation[offset]))
        return taken
