"""``harvest(...)``: run a corpus through the model and write the taps' rows to disk, resumably.

The loop: the plan (windows.py) gives shards in order; this process takes the shards that are its
own (shard k belongs to rank k mod world size) and not already on disk, runs their windows batch
by batch with a TapCall ``sink`` that copies each tap straight into the shard's preallocated buffers
(converting to the storage dtype on the way), and hands full buffers to the background writer
(storage.py) while it goes on computing. The forward stops after the last tap asked for.
Once every rank is done, rank 0 writes ``manifest.json``.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from .. import distributed
from ..checks import UNSET, renamed_keyword
from ..config import DTYPES, END_OF_TEXT, END_OF_TEXT_ID, is_integer
from ..errors import HarvestError, MiniGPTWarning, TapError
from ..memory import fmt_bytes, row_shape
from ..taps import QUERY_KEY_TAPS, StopForward, TapCall, select
from .. import corpus
from . import storage
from .guard import check_harvest_memory
from .records import DAMAGED, FORMAT, check_planned
from .storage import Buffers, ShardWriter
from .windows import Shard, rows_of, shards, windows

POSITIONS = ("all", "last")


def harvest(model, data: str | Path | Iterable[str | Path], taps: str | Iterable[str], out: str | Path, *,
            context: int | None = None, max_tokens: int | None = None, keep_positions: str | None = None,
            store_dtype: torch.dtype | str | None = None, lines: bool = False, batch_size: int = 8,
            shard_bytes: int = 256 * 2**20, quiet: bool = False, positions: str | None = UNSET,
            dtype: torch.dtype | str | None = UNSET) -> dict:
    """Record ``taps`` over a corpus into ``out``; returns the manifest (also in ``out/manifest.json``).

    model: a GPT (on any device), or a hub name / checkpoint directory (loaded on the CPU).
    data: files or directories of text, JSONL or Parquet (see minigpt/corpus.py); ``lines``: a document per line.
    taps: tap names or glob patterns, shaped [B, S, ...] (not ``attn.scores``/``attn.pattern``).
    context: tokens per window (default: the model's n_positions); ``max_tokens``: stop after that many.
    keep_positions: "all" (a row per token, the default) or "last" (a row per window, its last token).
    store_dtype: how rows are stored (None: bfloat16; float32 stores the model's float32 values exactly).
    shard_bytes: the most bytes one shard file may hold. ``quiet``: no progress bar.
    positions, dtype: the old names of keep_positions and store_dtype (deprecated; DeprecationWarning).

    Run again with the same arguments after a crash, it does only the shards that are missing;
    with different ones over the same ``out``, it raises HarvestError. Under torchrun every rank
    calls this with the same arguments and takes its share of the shards.
    """
    keep_positions = renamed_keyword(keep_positions, positions, ("keep_positions", "positions"), error=HarvestError)
    store_dtype = renamed_keyword(store_dtype, dtype, ("store_dtype", "dtype"), error=HarvestError)
    keep_positions = "all" if keep_positions is None else keep_positions
    store_dtype = torch.bfloat16 if store_dtype is None else store_dtype
    model = _model(model)
    taps = _taps(model, taps)
    context = model.cfg.n_positions if context is None else context
    store_dtype = _check_options(model, context, max_tokens, keep_positions, store_dtype, batch_size, shard_bytes)
    out = Path(out)
    files = corpus.corpus_files(data, HarvestError)
    row_shapes = {tap: row_shape(tap, model.cfg) for tap in taps}
    rows_per_shard = _rows_per_shard(model, taps, row_shapes, store_dtype, context, keep_positions, batch_size,
                                     shard_bytes)
    plan = _plan(model, files, lines, context, max_tokens, rows_per_shard, keep_positions)

    with distributed.process_group(model.unembedding.device) as (rank, world):
        settings = {"format": FORMAT, "model": _model_identity(model), "tokenizer": "gpt2 (tiktoken)",
                    "corpus": {"files": corpus.fingerprint(files), "lines": lines}, "taps": taps,
                    "dtype": str(store_dtype).removeprefix("torch."), "context": context, "max_tokens": max_tokens,
                    "positions": keep_positions, "shard_bytes": shard_bytes, "rows_per_shard": rows_per_shard}
        storage.prepare(out, settings, rank, world)
        done = {k: v for k, v in storage.finished_shards(out).items() if k % world == rank}
        mine = _as_planned((shard for shard in plan if shard.index % world == rank), done, out)
        if quiet or rank != 0:
            todo, progress = (shard for shard in mine if shard.index not in done), None
        else:
            todo, progress = _progress(mine, rank, world, done)
        pin = model.unembedding.device.type == "cuda"
        writer = ShardWriter(out, lambda: Buffers(row_shapes, rows_per_shard, store_dtype, pin))
        try:
            written = _record_shards(Recorder(model, taps, keep_positions), writer, todo, batch_size, progress)
        finally:
            if progress is not None:
                progress.close()
        records = sorted([*done.values(), *written], key=lambda r: r["file"])
        return _finish(out, settings, row_shapes, records, rank, world)


def _rows_per_shard(model, taps: list[str], row_shapes: dict[str, tuple[int, ...]], store_dtype: torch.dtype,
                    context: int, keep_positions: str, batch_size: int, shard_bytes: int) -> int:
    """The rows a shard holds, checked: at least one window, and the harvest's peak within the free memory."""
    row_bytes = sum(store_dtype.itemsize * math.prod(s) for s in row_shapes.values()) + sum(
        kind.itemsize for kind in storage.INDEX.values())
    rows_per_shard = shard_bytes // row_bytes
    rows_per_window = context if keep_positions == "all" else 1
    if rows_per_shard < rows_per_window:
        raise HarvestError(f"a shard of {fmt_bytes(shard_bytes)} cannot hold one window ({context} rows of "
                           f"{fmt_bytes(row_bytes)}): raise the shard size or lower the context")
    check_harvest_memory(model, batch_size, context, 3 * rows_per_shard * row_bytes, logits=taps[-1] == "logits")
    _warn_if_shards_cut_batches(batch_size, rows_per_window, rows_per_shard, row_bytes)
    return rows_per_shard


def _plan(model, files: list[Path], lines: bool, context: int, max_tokens: int | None, rows_per_shard: int,
          keep_positions: str) -> Iterator[Shard]:
    """The shards of the corpus, in order, computed as they are taken (the corpus is tokenized once).

    The first shard is computed here, so that a corpus without a single token is refused before
    anything is written.
    """
    encode = model.tokenizer.encode
    docs = corpus.documents(files, lines, HarvestError)
    wins = windows(docs, lambda text: encode(text, allowed_special={END_OF_TEXT}), context, max_tokens)
    plan = shards(wins, rows_per_shard, keep_positions)
    first = next(plan, None)
    if first is None:
        raise HarvestError(f"the corpus ({len(files)} files) holds no tokens: every document is empty")
    return itertools.chain([first], plan)


def _record_shards(recorder: Recorder, writer: ShardWriter, todo: Iterable[Shard], batch_size: int,
                   progress) -> list[dict]:
    """Each shard of ``todo`` run and handed to the writer; the records of those written."""
    try:
        for shard in todo:
            buffers = writer.take()
            recorder.record(shard, buffers, batch_size, progress)
            writer.put(shard.index, buffers, shard.rows, _describe(shard))
            if progress is not None:
                progress.shards += 1
                progress.set_postfix_str(f"shards {progress.shards}/{progress.shards_total}")
    except BaseException:
        writer.wait()  # the shards handed over are written before the error comes out, nothing after it
        raise
    return writer.close()


class Recorder:
    """Runs a shard's windows batch by batch; as the TapCall sink, copies every recorded tap of a batch
    into the rows of the shard's buffers that belong to it (no allocation: the buffers are reused)."""

    def __init__(self, model, taps: list[str], keep_positions: str):
        self.model, self.keep_positions = model, keep_positions
        self.device = model.unembedding.device
        self.taps = TapCall(taps, stop_at=taps[-1], sink=self)

    def record(self, shard: Shard, buffers: Buffers, batch_size: int, progress=None) -> None:
        row = 0
        for i in range(0, len(shard.windows), batch_size):
            batch = shard.windows[i:i + batch_size]
            lengths = torch.tensor([len(w.tokens) for w in batch])
            B, S = len(batch), int(lengths.max())
            # One tensor from one list (a tensor per window costs more than it seems, batch after batch).
            tokens = torch.tensor([[*w.tokens, *[END_OF_TEXT_ID] * (S - len(w.tokens))] for w in batch], dtype=torch.long)
            ragged = bool((lengths != S).any())
            mask = torch.arange(S) < lengths[:, None] if ragged else None
            n = sum(rows_of(w, self.keep_positions) for w in batch)
            self._index(buffers, row, batch, tokens, mask, lengths)
            # Where this batch's rows go, for __call__.
            self.buffers, self.row, self.n, self.shape = buffers, row, n, (B, S)
            self.mask = None if mask is None else mask.to(self.device)
            self.last = (lengths - 1).to(self.device) if self.keep_positions == "last" else None
            with torch.inference_mode(), contextlib.suppress(StopForward):
                self.model(tokens.to(self.device), self.taps, mask=self.mask)
            row += n
            if progress is not None:
                progress.update(int(lengths.sum()))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last copies into pinned memory have landed
        # The buffers belong to the writer now; the TapCall refers back to this recorder (its sink),
        # a cycle that only the garbage collector would break, so let go of them here.
        self.buffers = self.mask = self.last = None

    def _index(self, buffers: Buffers, row: int, batch, tokens: torch.Tensor, mask: torch.Tensor | None,
               lengths: torch.Tensor) -> None:
        """Document, position in the document and token id of this batch's rows."""
        document = torch.tensor([w.document for w in batch])
        start = torch.tensor([w.start for w in batch])
        if self.keep_positions == "last":
            position, token = start + lengths - 1, tokens[torch.arange(len(batch)), lengths - 1]
        else:
            keep = mask if mask is not None else torch.ones_like(tokens, dtype=torch.bool)
            position = (start[:, None] + torch.arange(tokens.shape[1]))[keep]
            document, token = document.repeat_interleave(lengths), tokens[keep]
        n = len(position)
        buffers.index["index.document"][row:row + n] = document
        buffers.index["index.position"][row:row + n] = position
        buffers.index["index.token"][row:row + n] = token

    def __call__(self, name: str, x: torch.Tensor) -> None:
        """The sink: x [B, S, ...] -> this batch's rows of the tap's buffer, in the storage dtype."""
        into = self.buffers.rows[name][self.row:self.row + self.n]
        if self.last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), self.last]
        elif self.mask is not None:
            x = x[self.mask]
        else:
            into = into.view(*self.shape, *into.shape[1:])
        if x.device != into.device:
            x = x.to(into.dtype)  # convert on the GPU: fewer bytes cross to the pinned buffer
        into.copy_(x, non_blocking=True)


def _model(model):
    from ..model import GPT

    if isinstance(model, (str, Path)):
        return GPT.from_pretrained(model)
    if not isinstance(model, GPT):
        raise HarvestError(f"model must be a minigpt GPT, a hub name or a checkpoint directory, got "
                           f"{type(model).__name__}")
    if model.cfg.vocab_size < END_OF_TEXT_ID + 1:
        raise HarvestError(f"harvest tokenizes the corpus with GPT-2's BPE ({END_OF_TEXT_ID + 1} ids), but this "
                           f"model's vocabulary has {model.cfg.vocab_size}")
    if model.training:
        raise HarvestError("the model is in train mode (dropout would make rows random); call model.eval() first")
    return model


def _taps(model, patterns: str | Iterable[str]) -> list[str]:
    try:
        taps = select(patterns, model.tap_names)
    except TapError as e:
        raise HarvestError(f"bad --taps: {e}") from None
    pairs = [t for t in taps if t.endswith(QUERY_KEY_TAPS)]
    if pairs:
        raise HarvestError(f"{pairs[0]} is shaped [B, H, Q, K] (a query-key pair per value), not a row per token; "
                           "harvest records taps shaped [B, S, ...]: leave attn.scores and attn.pattern out "
                           "(attn.z or attn.heads hold attention's result per token)")
    return taps


def _check_options(model, context, max_tokens, keep_positions, store_dtype, batch_size, shard_bytes) -> torch.dtype:
    if not is_integer(context) or not 1 <= context <= model.cfg.n_positions:
        raise HarvestError(f"context must be a whole number of tokens from 1 to the model's {model.cfg.n_positions}, "
                           f"got {context!r}")
    if max_tokens is not None and (not is_integer(max_tokens) or max_tokens < 1):
        raise HarvestError(f"max_tokens must be a positive whole number (or None for the whole corpus), got {max_tokens!r}")
    if keep_positions not in POSITIONS:
        raise HarvestError(f"keep_positions must be 'all' (a row per token) or 'last' (a row per window), "
                           f"got {keep_positions!r}")
    for name, value in (("batch_size", batch_size), ("shard_bytes", shard_bytes)):
        if not is_integer(value) or value < 1:
            raise HarvestError(f"{name} must be a positive whole number, got {value!r}")
    if isinstance(store_dtype, str):
        if store_dtype not in DTYPES:
            raise HarvestError(f"store_dtype {store_dtype!r} is not one of {', '.join(DTYPES)}")
        store_dtype = DTYPES[store_dtype]
    if store_dtype not in DTYPES.values():
        raise HarvestError(f"store_dtype must be one of {', '.join(DTYPES)}, got {store_dtype!r}")
    return store_dtype


def _warn_if_shards_cut_batches(batch_size: int, rows_per_window: int, rows_per_shard: int, row_bytes: int) -> None:
    """MiniGPTWarning if a shard holds fewer full windows than a batch: the forwards then run smaller batches.

    A batch never spans two shards, so that a shard's values depend on the settings alone, not on
    the number of processes or on which shards a resumed run skips (different batches may round
    differently).
    """
    fits = rows_per_shard // rows_per_window
    if fits < batch_size:
        needed = batch_size * rows_per_window * row_bytes
        needed_mib = math.ceil(needed / 2**20 * 10) / 10  # rounded up, so that it is enough
        warnings.warn(f"a shard holds {fits} full window(s) ({rows_per_shard} rows of {fmt_bytes(row_bytes)}), fewer "
                      f"than batch_size={batch_size}; a batch never spans two shards, so each forward runs at most "
                      f"{fits} window(s). For full batches raise the shard size to at least {needed:,} bytes "
                      f"(shard_bytes, or --shard-mb {needed_mib:g}), or lower the batch size to silence this",
                      MiniGPTWarning, stacklevel=4)  # the line that called harvest


def _model_identity(model) -> dict:
    """What identifies the model: where it came from, its config, and a hash of a sample of every weight.

    The sample (16 evenly spaced runs of 4,096 values of each tensor) keeps this cheap for any size
    of model; training or loading other weights changes it.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().reshape(-1)
        step = max(4096, len(values) // 16)
        sample = torch.cat([values[i:i + 4096] for i in range(0, len(values), step)]).cpu()
        digest.update(name.encode() + str(list(tensor.shape)).encode())
        digest.update(sample.view(torch.uint8).numpy())
    return {"source": model.provenance, "config": asdict(model.cfg), "dtype": str(model.unembedding.dtype),
            "weights_sample_sha256": digest.hexdigest()}


def _describe(shard: Shard) -> dict:
    first, last = shard.windows[0], shard.windows[-1]
    return {"shard": shard.index, "tokens": shard.tokens, "windows": len(shard.windows),
            "first": [first.document, first.start], "last": [last.document, last.start + len(last.tokens) - 1]}


def _as_planned(mine: Iterable[Shard], done: dict[int, dict], out: Path) -> Iterator[Shard]:
    """``mine``, each finished shard's record checked against its shard of the plan as it comes, and, at the
    end, no finished shard left that the plan does not make (HarvestError, naming the record)."""
    planned = set()
    for shard in mine:
        if shard.index in done:
            check_planned(done[shard.index], {**_describe(shard), "rows": shard.rows},
                          storage.shard_path(out, shard.index).with_suffix(".json"))
        planned.add(shard.index)
        yield shard
    extra = sorted(set(done) - planned)
    if extra:
        raise HarvestError(f"{storage.shard_path(out, extra[0])} is a shard this harvest does not make (it makes "
                           f"{len(planned)}); {DAMAGED}")


def _progress(mine: Iterable[Shard], rank: int, world: int, done: dict[int, dict]) -> tuple[list[Shard], object]:
    """This rank's shards still to do, and a tqdm bar over this rank's tokens.

    The bar's total needs the whole plan before the first forward: the shards to do are kept from
    that one pass (their windows' tokens, 2 bytes each), so the corpus is tokenized once.
    """
    from tqdm import tqdm

    todo, total, finished, shards_total, shards_done = [], 0, 0, 0, 0
    for shard in mine:
        total += shard.tokens
        shards_total += 1
        if shard.index in done:
            finished += shard.tokens
            shards_done += 1
        else:
            todo.append(shard)
    what = "harvest" if world == 1 else f"harvest, rank {rank} of {world}"
    bar = tqdm(total=total, initial=finished, unit="tok", unit_scale=True, desc=what, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    bar.shards, bar.shards_total = shards_done, shards_total
    bar.set_postfix_str(f"shards {shards_done}/{shards_total}")
    return todo, bar


def _finish(out: Path, settings: dict, row_shapes: dict, mine: list[dict], rank: int, world: int) -> dict:
    """Rank 0 writes the manifest once every rank has written its shards; every rank returns it."""
    records = sorted((r for part in distributed.gather(mine, world) for r in part), key=lambda r: r["shard"])
    manifest = {"format": FORMAT, "settings": settings,
                "row_shapes": {tap: list(shape) for tap, shape in row_shapes.items()},
                "index": {name: str(kind).removeprefix("torch.") for name, kind in storage.INDEX.items()},
                "rows": sum(r["rows"] for r in records), "tokens": sum(r["tokens"] for r in records),
                "bytes": sum(r["bytes"] for r in records), "world_size": world, "shards": records}
    if rank == 0:
        storage.write_manifest(out, manifest)
    distributed.gather(None, world)  # nobody returns before the manifest is there
    return manifest
