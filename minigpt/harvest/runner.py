"""``harvest(...)``: run a corpus through the model and write the taps' rows to disk, resumably.

The loop: the plan (windows.py) gives shards in order; this process takes the shards that are its
own (shard k belongs to rank k mod world size) and not already on disk, runs their windows batch
by batch with a Taps ``sink`` that copies each tap straight into the shard's preallocated buffers
(converting to the storage dtype on the way), and hands full buffers to the background writer
(storage.py) while it goes on computing. The forward stops after the last tap asked for.
Once every rank is done, rank 0 writes ``manifest.json``.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch

from .. import distributed
from ..config import DTYPES, END_OF_TEXT, END_OF_TEXT_ID, is_integer
from ..errors import HarvestError, MiniGPTWarning, TapError
from ..memory import check_harvest_memory, fmt_bytes, row_shape
from ..taps import QUERY_KEY_TAPS, StopForward, Taps, select
from . import corpus, storage
from .storage import MANIFEST, SETTINGS, SHARDS, Buffers, ShardWriter
from .windows import Shard, rows_of, shards, windows

FORMAT = "minigpt-harvest/1"
POSITIONS = ("all", "last")


def harvest(model, data: str | Path | Iterable[str | Path], taps: str | Iterable[str], out: str | Path, *,
            context: int | None = None, max_tokens: int | None = None, positions: str = "all",
            dtype: torch.dtype | str = torch.bfloat16, lines: bool = False, batch_size: int = 8,
            shard_bytes: int = 256 * 2**20, quiet: bool = False) -> dict:
    """Record ``taps`` over a corpus into ``out``; returns the manifest (also in ``out/manifest.json``).

    model: a GPT (on any device), or a hub name / checkpoint directory (loaded on the CPU).
    data: files or directories of text, JSONL or Parquet (see corpus.py); ``lines``: a document per line.
    taps: tap names or glob patterns, shaped [B, S, ...] (not ``attn.scores``/``attn.pattern``).
    context: tokens per window (default: the model's n_positions); ``max_tokens``: stop after that many.
    positions: "all" (a row per token) or "last" (a row per window, its last token).
    dtype: how rows are stored (bfloat16 by default; float32 stores the model's float32 values exactly).
    shard_bytes: the most bytes one shard file may hold. ``quiet``: no progress bar.

    Run again with the same arguments after a crash, it does only the shards that are missing;
    with different ones over the same ``out``, it raises HarvestError. Under torchrun every rank
    calls this with the same arguments and takes its share of the shards.
    """
    model = _model(model)
    if model.cfg.vocab_size < END_OF_TEXT_ID + 1:
        raise HarvestError(f"harvest tokenizes the corpus with GPT-2's BPE ({END_OF_TEXT_ID + 1} ids), but this "
                           f"model's vocabulary has {model.cfg.vocab_size}")
    taps = _taps(model, taps)
    context = model.cfg.n_positions if context is None else context
    dtype = _check_options(model, context, max_tokens, positions, dtype, batch_size, shard_bytes)
    out = Path(out)
    files = corpus.corpus_files(data)
    row_shapes = {tap: row_shape(tap, model.cfg) for tap in taps}
    row_bytes = sum(dtype.itemsize * math.prod(s) for s in row_shapes.values()) + sum(
        kind.itemsize for kind in storage.INDEX.values())
    rows_per_shard = shard_bytes // row_bytes
    if rows_per_shard < (context if positions == "all" else 1):
        raise HarvestError(f"a shard of {fmt_bytes(shard_bytes)} cannot hold one window ({context} rows of "
                           f"{fmt_bytes(row_bytes)}): raise the shard size or lower the context")
    check_harvest_memory(model, batch_size, context, 3 * rows_per_shard * row_bytes, logits=taps[-1] == "logits")
    _warn_if_shards_cut_batches(batch_size, context if positions == "all" else 1, rows_per_shard, row_bytes)

    with distributed.process_group(model.unembedding.device) as (rank, world):
        settings = {"format": FORMAT, "model": _model_identity(model), "tokenizer": "gpt2 (tiktoken)",
                    "corpus": {"files": corpus.fingerprint(files), "lines": lines}, "taps": taps,
                    "dtype": str(dtype).removeprefix("torch."), "context": context, "max_tokens": max_tokens,
                    "positions": positions, "shard_bytes": shard_bytes, "rows_per_shard": rows_per_shard}

        def plan() -> Iterable[Shard]:
            docs = corpus.documents(files, lines)
            encode = model.tokenizer.encode
            wins = windows(docs, lambda text: encode(text, allowed_special={END_OF_TEXT}), context, max_tokens)
            return shards(wins, rows_per_shard, positions)

        if next(iter(plan()), None) is None:  # before anything is written
            raise HarvestError(f"the corpus ({len(files)} files) holds no tokens: every document is empty")
        _prepare(out, settings, rank, world)
        done = {k: v for k, v in storage.finished_shards(out).items() if k % world == rank}

        progress = None if quiet or rank != 0 else _progress(plan(), rank, world, done)
        recorder = Recorder(model, taps, positions)
        pin = model.unembedding.device.type == "cuda"
        writer = ShardWriter(out, lambda: Buffers(row_shapes, rows_per_shard, dtype, pin))
        try:
            for shard in plan():
                if shard.index % world != rank or shard.index in done:
                    continue
                buffers = writer.take()
                recorder.record(shard, buffers, batch_size, progress)
                writer.put(shard.index, buffers, shard.rows, _describe(shard))
                if progress is not None:
                    progress.shards += 1
                    progress.set_postfix_str(f"shards {progress.shards}/{progress.shards_total}")
            written = writer.close()
        finally:
            if progress is not None:
                progress.close()
        mine = sorted([*done.values(), *written], key=lambda r: r["file"])
        return _finish(out, settings, row_shapes, mine, rank, world)


class Recorder:
    """Runs a shard's windows batch by batch; as the Taps sink, copies every recorded tap of a batch
    into the rows of the shard's buffers that belong to it (no allocation: the buffers are reused)."""

    def __init__(self, model, taps: list[str], positions: str):
        self.model, self.positions = model, positions
        self.device = model.unembedding.device
        self.taps = Taps(taps, stop_at=taps[-1], sink=self)

    def record(self, shard: Shard, buffers: Buffers, batch_size: int, progress=None) -> None:
        row = 0
        for i in range(0, len(shard.windows), batch_size):
            batch = shard.windows[i:i + batch_size]
            lengths = torch.tensor([len(w.tokens) for w in batch])
            B, S = len(batch), int(lengths.max())
            # One tensor from one list (a tensor per window costs more than it seems, batch after batch).
            tokens = torch.tensor([w.tokens + [END_OF_TEXT_ID] * (S - len(w.tokens)) for w in batch], dtype=torch.long)
            ragged = bool((lengths != S).any())
            mask = torch.arange(S) < lengths[:, None] if ragged else None
            n = sum(rows_of(w, self.positions) for w in batch)
            self._index(buffers, row, batch, tokens, mask, lengths)
            # Where this batch's rows go, for __call__.
            self.buffers, self.row, self.n, self.shape = buffers, row, n, (B, S)
            self.mask = None if mask is None else mask.to(self.device)
            self.last = (lengths - 1).to(self.device) if self.positions == "last" else None
            with torch.inference_mode(), contextlib.suppress(StopForward):
                self.model(tokens.to(self.device), self.taps, mask=self.mask)
            row += n
            if progress is not None:
                progress.update(int(lengths.sum()))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last copies into pinned memory have landed
        # The buffers belong to the writer now; the Taps object refers back to this recorder (its sink),
        # a cycle that only the garbage collector would break, so let go of them here.
        self.buffers = self.mask = self.last = None

    def _index(self, buffers: Buffers, row: int, batch, tokens: torch.Tensor, mask: torch.Tensor | None,
               lengths: torch.Tensor) -> None:
        """Document, position in the document and token id of this batch's rows."""
        document = torch.tensor([w.document for w in batch])
        start = torch.tensor([w.start for w in batch])
        if self.positions == "last":
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


def _check_options(model, context, max_tokens, positions, dtype, batch_size, shard_bytes) -> torch.dtype:
    if not is_integer(context) or not 1 <= context <= model.cfg.n_positions:
        raise HarvestError(f"context must be a whole number of tokens from 1 to the model's {model.cfg.n_positions}, "
                           f"got {context!r}")
    if max_tokens is not None and (not is_integer(max_tokens) or max_tokens < 1):
        raise HarvestError(f"max_tokens must be a positive whole number (or None for the whole corpus), got {max_tokens!r}")
    if positions not in POSITIONS:
        raise HarvestError(f"positions must be 'all' (a row per token) or 'last' (a row per window), got {positions!r}")
    for name, value in (("batch_size", batch_size), ("shard_bytes", shard_bytes)):
        if not is_integer(value) or value < 1:
            raise HarvestError(f"{name} must be a positive whole number, got {value!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise HarvestError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise HarvestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


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
                      f"(shard_bytes, or --shard-mb {needed_mib:g}), or lower the batch size to silence this", MiniGPTWarning, stacklevel=3)


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
    return {"source": model.source, "config": asdict(model.cfg), "dtype": str(model.unembedding.dtype),
            "weights_sample_sha256": digest.hexdigest()}


def _prepare(out: Path, settings: dict, rank: int, world: int) -> None:
    """Create ``out`` or check that it holds this very harvest; remove this rank's half-written files.

    Rank 0 goes first (the others may share its directory); every rank learns of any rank's error.
    """
    problem = _check_directory(out, settings) if rank == 0 else None
    problem = distributed.gather(problem, world)[0]
    if problem is None and rank != 0:
        problem = _check_directory(out, settings)
    problems = [p for p in distributed.gather(problem, world) if p]
    if problems:
        raise HarvestError(problems[0])
    for stale in (out / SHARDS).glob("*.tmp"):
        if int(stale.name.split("-")[1].split(".")[0]) % world == rank:
            stale.unlink(missing_ok=True)


def _check_directory(out: Path, settings: dict) -> str | None:
    """None if ``out`` is ready for this harvest (created if new), else what is wrong with it."""
    try:
        if out.exists() and not out.is_dir():
            return f"--out {out} is a file; give a directory (new, or holding this harvest to resume it)"
        if (out / SETTINGS).is_file():
            theirs = storage.read_json(out / SETTINGS)
            differ = _differences(theirs, settings)
            if differ:
                return (f"{out} holds a harvest made with other settings ({'; '.join(differ[:4])}). Run with the "
                        "same arguments to resume it, or choose another --out")
        elif out.exists() and not _fresh(out):
            return (f"{out} is not empty and holds no harvest ({SETTINGS} missing); choose a new or empty "
                    "directory for --out")
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        if not (out / SETTINGS).is_file():
            storage.write_json(out / SETTINGS, settings)
    except OSError as e:
        return f"cannot write into --out {out} ({e.strerror or e}); choose a directory you can write to"
    return None


def _fresh(out: Path) -> bool:
    """Whether ``out`` holds nothing but what ranks starting beside this one may have begun to write."""
    return all(p.name.endswith(".tmp") or (p.name == SHARDS and p.is_dir() and not any(p.iterdir()))
               for p in out.iterdir())


def _differences(theirs: object, ours: object, where: str = "") -> list[str]:
    """'context: 128 there, 64 now' for each setting that differs (nested keys joined with dots)."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        found = []
        for key in dict.fromkeys([*theirs, *ours]):
            found += _differences(theirs.get(key), ours.get(key), f"{where}.{key}" if where else key)
        return found
    if theirs != ours:
        short = lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 60 else repr(v)  # noqa: E731
        return [f"{where}: {short(theirs)} there, {short(ours)} now"]
    return []


def _describe(shard: Shard) -> dict:
    first, last = shard.windows[0], shard.windows[-1]
    return {"shard": shard.index, "tokens": shard.tokens, "windows": len(shard.windows),
            "first": [first.document, first.start], "last": [last.document, last.start + len(last.tokens) - 1]}


def _progress(plan: Iterable[Shard], rank: int, world: int, done: dict[int, dict]):
    """A tqdm bar over this rank's tokens; its total comes from a pass over the plan (tokenizing only)."""
    from tqdm import tqdm

    total = finished = shards_total = shards_done = 0
    for shard in plan:
        if shard.index % world == rank:
            total += shard.tokens
            shards_total += 1
            if shard.index in done:
                finished += shard.tokens
                shards_done += 1
    what = "harvest" if world == 1 else f"harvest, rank {rank} of {world}"
    bar = tqdm(total=total, initial=finished, unit="tok", unit_scale=True, desc=what, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    bar.shards, bar.shards_total = shards_done, shards_total
    bar.set_postfix_str(f"shards {shards_done}/{shards_total}")
    return bar


def _finish(out: Path, settings: dict, row_shapes: dict, mine: list[dict], rank: int, world: int) -> dict:
    """Rank 0 writes the manifest once every rank has written its shards; every rank returns it."""
    records = sorted((r for part in distributed.gather(mine, world) for r in part), key=lambda r: r["shard"])
    manifest = {"format": FORMAT, "settings": settings,
                "row_shapes": {tap: list(shape) for tap, shape in row_shapes.items()},
                "index": {name: str(kind).removeprefix("torch.") for name, kind in storage.INDEX.items()},
                "rows": sum(r["rows"] for r in records), "tokens": sum(r["tokens"] for r in records),
                "bytes": sum(r["bytes"] for r in records), "world_size": world, "shards": records}
    if rank == 0:
        storage.write_json(out / MANIFEST, manifest)
    distributed.gather(None, world)  # nobody returns before the manifest is there
    return manifest
