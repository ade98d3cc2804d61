"""The output directory: its layout, writes that are never seen half-done, and the background writer.

    DIR/.minigpt-run.json             written first, into a new or empty directory only: marks it as
                                      a harvest's (files.claim_directory); nothing else is ever taken
    DIR/settings.json                 what this harvest is (model, corpus, taps, ...): written next,
                                      compared on every restart
    DIR/shards/shard-000042.safetensors   rows of every tap plus their index (see ``INDEX``)
    DIR/shards/shard-000042.json          its rows, bytes and sha256 (written just before the shard)
    DIR/manifest.json                 written last, once every shard is there: the harvest is finished

Every file is written under a temporary name, flushed to disk, then renamed (minigpt.files), so a
run killed at any moment leaves either the whole file or none of it under its name; a restart removes
only those temporaries (``.NAME.minigpt-PID.tmp``), nothing else whatever its name. A shard's name is
its final state: a restart redoes exactly the shards whose file is missing. Whatever is read back is
checked first (records.py).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .. import distributed, files
from ..errors import HarvestError
from ..weights.reading import SAFETENSORS_DTYPES
from .records import DAMAGED, SHARD_NAME, SHARDS, check_record, shard_name

_SAFETENSORS_NAME = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

SETTINGS, MANIFEST = "settings.json", "manifest.json"
# The index of each row, stored in every shard beside the taps' rows (tap names never start with "index.").
INDEX = {"index.document": torch.int64, "index.position": torch.int64, "index.token": torch.int32}
KIND = "harvest"  # the kind in the directory's files.MARKER_FILE


def shard_path(directory: Path, index: int) -> Path:
    return directory / SHARDS / shard_name(index)


def write_json(path: Path, value: object) -> None:
    files.write_json(path, value, indent=1)


def read_json(path: Path, directory: Path) -> object:
    """The JSON of ``path``, a regular file inside the harvest ``directory`` (checked before it is opened)."""
    path = files.checked_file(path, directory, HarvestError, what="harvest", way_out=DAMAGED)
    return files.read_json(path, HarvestError, DAMAGED)


def finished_shards(directory: Path) -> dict[int, dict]:
    """Shard number -> its checked record, for every shard whose file is complete (it has its final name).

    shards/ holds only what the harvest writes: shards, their records (a record may be there
    without its shard: written just before it) and temporaries. Anything else is refused, never
    taken for a shard nor removed.
    """
    done, strays = {}, []
    for path in sorted((directory / SHARDS).iterdir()):
        found = SHARD_NAME.fullmatch(path.name)
        if files.temporary_of(path.name) is not None:
            continue  # a killed writer's, removed by prepare
        if found is None or found["number"] != f"{int(found['number']):06d}":
            strays.append(path.name)
        elif found["kind"] == "safetensors":
            number = int(found["number"])
            record = check_record(read_json(path.with_suffix(".json"), directory), path.with_suffix(".json"), number)
            size = files.checked_file(path, directory, HarvestError, what="harvest", way_out=DAMAGED).stat().st_size
            if size != record["bytes"]:
                raise HarvestError(f"{path} holds {size:,} bytes, its record {record['bytes']:,}; {DAMAGED}")
            # The whole shard is read: a resume keeps only shards that are what their records say.
            if files.file_sha256(path) != record["sha256"]:
                raise HarvestError(f"{path} does not have the sha256 its record lists; it was changed after it was "
                                   f"written: {DAMAGED}")
            done[number] = record
    if strays:
        raise HarvestError(f"{directory / SHARDS} holds files the harvest did not write ({', '.join(strays[:5])}); "
                           "it reads nothing else there and removes nothing it did not write: move them out of the "
                           "directory and run again")
    return done


def prepare(out: Path, settings: dict, rank: int, world: int) -> None:
    """Claim ``out`` and check that it holds this very harvest; remove this rank's temporaries.

    Rank 0 goes first (the others may share its directory); every rank learns of any rank's error.
    """
    problem = _check_directory(out, settings) if rank == 0 else None
    problem = distributed.gather(problem, world)[0]
    if problem is None and rank != 0:
        problem = _check_directory(out, settings)
    problems = [p for p in distributed.gather(problem, world) if p]
    if problems:
        raise HarvestError(problems[0])

    def ours(name: str) -> bool:  # only the temporaries of this rank's shards: other ranks may be writing theirs
        found = SHARD_NAME.fullmatch(name)
        return found is not None and int(found["number"]) % world == rank

    files.remove_temporaries(out / SHARDS, ours)
    if rank == 0:
        files.remove_temporaries(out, lambda name: name in (SETTINGS, MANIFEST))


def _check_directory(out: Path, settings: dict) -> str | None:
    """None if ``out`` is ready for this harvest (claimed and marked if new), else what is wrong with it."""
    try:
        files.claim_directory(out, KIND, HarvestError)
        if os.path.lexists(out / SETTINGS):
            theirs = read_json(out / SETTINGS, out)
            differ = _differences(theirs, settings)
            if differ:
                return (f"{out} holds a harvest made with other settings ({'; '.join(differ[:4])}). Run with the "
                        "same arguments to resume it, or choose another --out")
        files.checked_directory(out / SHARDS, HarvestError, what="harvest's shards", way_out=DAMAGED)
        (out / SHARDS).mkdir(exist_ok=True)
        if not os.path.lexists(out / SETTINGS):
            write_json(out / SETTINGS, settings)
    except HarvestError as e:
        return str(e)
    except OSError as e:
        return f"cannot write into --out {out} ({e.strerror or e}); choose a directory you can write to"
    return None


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


class Buffers:
    """Preallocated rows of one shard: ``rows[tap]`` [capacity, *row shape] and ``index[name]`` [capacity].

    Allocated once and refilled shard after shard (pinned memory when the model is on a GPU, so that
    copies from it can run asynchronously).
    """

    def __init__(self, row_shapes: dict[str, tuple[int, ...]], capacity: int, dtype: torch.dtype, pin: bool):
        self.rows = {tap: torch.empty(capacity, *shape, dtype=dtype, pin_memory=pin)
                     for tap, shape in row_shapes.items()}
        self.index = {name: torch.empty(capacity, dtype=kind) for name, kind in INDEX.items()}

    def tensors(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` rows of everything, as safetensors will store them."""
        return {**{tap: t[:n] for tap, t in self.rows.items()}, **{k: t[:n] for k, t in self.index.items()}}


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    """``tensors`` to the file ``path`` in the safetensors format; (bytes, sha256) of it (``files.commit`` flushes it).

    Written straight from the tensors' memory, hashed on the way: no serialised copy of the shard is
    made (safetensors.torch.save would build one in memory). The format: an 8-byte little-endian
    header length, the JSON header (each tensor's dtype, shape and byte range, padded to 8 bytes),
    then the tensors' bytes in that order. Read back with safetensors' own safe_open.
    """
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for piece in [struct.pack("<Q", len(text)), text,
                      *(t.contiguous().view(-1).view(torch.uint8).numpy() for t in tensors.values())]:
            digest.update(piece)
            f.write(piece)
    return 8 + len(text) + offset, digest.hexdigest()


class ShardWriter:
    """Writes full shards in a background thread while the model computes the next one.

    ``take()`` gives free Buffers to fill (blocks while all are being written), ``put(...)`` hands them
    over; the thread writes the shard file from them and gives them back. Three sets of buffers: one
    being filled while two may wait for the disk. ``close()`` waits for the last one. An error in the
    thread comes out of the next call.
    """

    def __init__(self, directory: Path, make_buffers: Callable[[], Buffers], count: int = 3):
        self.directory = directory
        self.free: queue.Queue[Buffers] = queue.Queue()
        self.todo: queue.Queue = queue.Queue()
        self.make_buffers, self.made, self.count = make_buffers, 0, count
        self.error: BaseException | None = None
        self.written: list[dict] = []
        self.thread = threading.Thread(target=self._work, name="minigpt-shard-writer", daemon=True)
        self.thread.start()

    def take(self) -> Buffers:
        if self.made < self.count:  # allocated on first use: a run with one shard needs one
            self.made += 1
            return self.make_buffers()
        while True:
            self._raise_if_failed()
            try:
                return self.free.get(timeout=0.2)
            except queue.Empty:
                pass

    def put(self, index: int, buffers: Buffers, rows: int, meta: dict) -> None:
        self._raise_if_failed()
        self.todo.put((index, buffers, rows, meta))

    def wait(self) -> None:
        """Wait until every shard handed over is on disk (or its writing failed)."""
        self.todo.put(None)
        self.thread.join()

    def close(self) -> list[dict]:
        """Wait until every shard handed over is on disk; their records."""
        self.wait()
        self._raise_if_failed()
        return self.written

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise HarvestError(write_failed(self.directory, "a shard", self.error)) from self.error

    def _work(self) -> None:
        while (item := self.todo.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread raises
            index, buffers, rows, meta = item
            path = shard_path(self.directory, index)
            temporary = files.temporary_path(path)
            try:
                size, sha256 = write_shard(temporary, buffers.tensors(rows), {"shard": str(index)})
                record = {"file": f"{SHARDS}/{path.name}", "rows": rows, "bytes": size, "sha256": sha256, **meta}
                # The record before the shard's final name: a shard file under its name always has one.
                write_json(path.with_suffix(".json"), record)
                files.commit(temporary, path)
                self.written.append(record)
            except BaseException as e:  # noqa: BLE001 - any failure here must reach the main thread
                temporary.unlink(missing_ok=True)  # nothing half-written stays (a disk full, a file too large)
                self.error = e
            finally:
                self.free.put(buffers)


# A disk full (or a quota reached) and a file over the size limit: the run can go on once the cause is gone.
_DISK_REFUSED = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def write_failed(directory: Path, what: str, error: BaseException) -> str:
    """The message of a write into the harvest that failed: for a full disk or a file too large, what to do."""
    resume = "run the same command again: it resumes after the shards already written"
    if isinstance(error, OSError) and error.errno in _DISK_REFUSED:
        remedy = (f"raise the file-size limit (ulimit -f) and {resume}; or, where the filesystem itself limits it, "
                  "harvest with a lower --shard-mb (shard_bytes) into a new --out" if error.errno == errno.EFBIG
                  else f"free some space and {resume}")
        return (f"writing {what} into {directory} failed: {error.strerror or error} "
                f"({errno.errorcode[error.errno]}); nothing half-written was left: {remedy}")
    return f"writing {what} into {directory} failed ({type(error).__name__}: {error}); {resume}"


def write_manifest(directory: Path, manifest: dict) -> None:
    """``manifest.json``, written last: the harvest is finished (HarvestError if the disk refuses it)."""
    try:
        write_json(directory / MANIFEST, manifest)
    except OSError as e:
        raise HarvestError(write_failed(directory, MANIFEST, e)) from e
