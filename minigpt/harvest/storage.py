"""The output directory: its layout, writes that are never seen half-done, and the background writer.

    DIR/settings.json                 what this harvest is (model, corpus, taps, ...): written first,
                                      compared on every restart
    DIR/shards/shard-000042.safetensors   rows of every tap plus their index (see ``INDEX``)
    DIR/shards/shard-000042.json          its rows, bytes and sha256 (written just before the shard)
    DIR/manifest.json                 written last, once every shard is there: the harvest is finished

Every file is written under a temporary name, flushed to disk, then renamed (``os.replace`` is
atomic), so a run killed at any moment leaves either the whole file or none of it under its name.
A shard's name is its final state: a restart redoes exactly the shards whose file is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import HarvestError
from ..weights import SAFETENSORS_DTYPES, write_atomically

_SAFETENSORS_NAME = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

SETTINGS, MANIFEST, SHARDS = "settings.json", "manifest.json", "shards"
# The index of each row, stored in every shard beside the taps' rows (tap names never start with "index.").
INDEX = {"index.document": torch.int64, "index.position": torch.int64, "index.token": torch.int32}


def shard_path(directory: Path, index: int) -> Path:
    return directory / SHARDS / f"shard-{index:06d}.safetensors"


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """``data`` to ``path``, never visible half-written (weights.write_atomically: temporary file, fsync, rename)."""
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(data))


def write_json(path: Path, value: object) -> None:
    write_bytes_atomically(path, (json.dumps(value, indent=1) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HarvestError(f"{path} cannot be read ({e}); the harvest directory is damaged") from None


def finished_shards(directory: Path) -> dict[int, dict]:
    """Shard number -> its record, for every shard whose file is complete (it has its final name)."""
    done = {}
    for path in sorted((directory / SHARDS).glob("shard-*.safetensors")):
        index = int(path.stem.split("-")[1])
        done[index] = read_json(path.with_suffix(".json"))
    return done


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
    """``tensors`` to the file ``path`` in the safetensors format, flushed to disk; (bytes, sha256) of it.

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
        f.flush()
        os.fsync(f.fileno())
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

    def close(self) -> list[dict]:
        """Wait until every shard handed over is on disk; their records."""
        self.todo.put(None)
        self.thread.join()
        self._raise_if_failed()
        return self.written

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise HarvestError(f"writing a shard into {self.directory} failed: {self.error}") from self.error

    def _work(self) -> None:
        while (item := self.todo.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread raises
            index, buffers, rows, meta = item
            try:
                path = shard_path(self.directory, index)
                temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                size, sha256 = write_shard(temporary, buffers.tensors(rows), {"shard": str(index)})
                record = {"file": f"{SHARDS}/{path.name}", "rows": rows, "bytes": size, "sha256": sha256, **meta}
                # The record before the shard's final name: a shard file under its name always has one.
                write_json(path.with_suffix(".json"), record)
                os.replace(temporary, path)
                self.written.append(record)
            except BaseException as e:  # noqa: BLE001 - any failure here must reach the main thread
                self.error = e
            finally:
                self.free.put(buffers)
