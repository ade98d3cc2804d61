"""Reading a finished harvest: ``read(DIR, tap)`` -> Rows, memory-mapped, with each row's index."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from ..errors import HarvestError
from ..files import checked_file, file_sha256
from .storage import MANIFEST, SETTINGS, read_json


class Rows:
    """One tap's rows over the whole harvest, shard by shard, without loading them.

    ``len(rows)`` rows of shape ``row_shape``; ``rows[i]``, ``rows[a:b]`` or ``rows[index tensor]``
    read just those rows (a copy of those only). ``shards`` are the memory-mapped tensors
    [rows in shard, *row_shape] themselves. The index, in memory (16 bytes + 4 per row):
    ``document``, ``position`` (in its document) and ``token`` (id), each [len(rows)].
    ``batches(...)`` is a shuffled minibatch iterator for training on them.
    """

    def __init__(self, directory: Path, tap: str, shards: list[torch.Tensor], index: dict[str, torch.Tensor],
                 manifest: dict):
        self.directory, self.tap, self.shards, self.manifest = directory, tap, shards, manifest
        self.document, self.position, self.token = index["document"], index["position"], index["token"]
        sizes = torch.tensor([len(s) for s in shards])
        self.starts = torch.cumsum(sizes, 0) - sizes  # global row number of each shard's first row
        self.row_shape = tuple(manifest["row_shapes"][tap])
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return len(self.document)

    def __repr__(self) -> str:
        return (f"Rows({self.tap!r}: {len(self)} x {list(self.row_shape)} {str(self.dtype).removeprefix('torch.')}, "
                f"{len(self.shards)} shards in {self.directory})")

    def __getitem__(self, which: int | slice | torch.Tensor) -> torch.Tensor:
        if isinstance(which, int):
            return self[torch.tensor([which])][0]
        if isinstance(which, slice):
            which = torch.arange(len(self))[which]
        which = torch.as_tensor(which, dtype=torch.long)
        if which.dim() != 1:
            raise HarvestError(f"index rows with an int, a slice or a 1-d tensor of row numbers, got shape {tuple(which.shape)}")
        if len(which) and (which.min() < -len(self) or which.max() >= len(self)):
            raise HarvestError(f"row numbers must be in [-{len(self)}, {len(self)}), got {which.min()}..{which.max()}")
        which = which % max(len(self), 1)
        shard = torch.searchsorted(self.starts, which, right=True) - 1
        out = torch.empty(len(which), *self.row_shape, dtype=self.dtype)
        for s in shard.unique().tolist():
            here = shard == s
            out[here] = self.shards[s][which[here] - self.starts[s]]
        return out

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows [b, *row_shape], row numbers [b]) minibatches over every row once, in an order
        shuffled by ``seed`` (the same seed, the same order); the row numbers index ``document``,
        ``position`` and ``token``. Only the rows of the batch are read."""
        if batch_size < 1:
            raise HarvestError(f"batch_size must be positive, got {batch_size}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle \
            else torch.arange(len(self))
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            if drop_last and len(rows) < batch_size:
                return
            yield self[rows], rows


def read(directory: str | Path, tap: str, *, verify: bool = False) -> Rows:
    """A finished harvest's rows of ``tap`` (memory-mapped) and their index.

    ``verify=True`` first checks every shard's size and sha256 against the manifest (reads everything).
    """
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        unfinished = (directory / SETTINGS).is_file()
        raise HarvestError(f"{directory} holds {'an unfinished harvest' if unfinished else 'no harvest'} "
                           f"({MANIFEST} missing); " + ("run the same harvest command again to finish it"
                                                        if unfinished else "give the --out directory of a harvest"))
    manifest = read_json(directory / MANIFEST)
    if tap not in manifest["row_shapes"]:
        raise HarvestError(f"tap {tap!r} was not harvested in {directory}; it holds {', '.join(manifest['row_shapes'])}")
    from safetensors import safe_open

    shards, index = [], {"document": [], "position": [], "token": []}
    with ExitStack() as stack:
        for record in manifest["shards"]:
            # Only a regular file inside the harvest: a manifest naming a pipe or a path out of it is damaged.
            path = checked_file(directory / record["file"], directory, HarvestError, what="harvest",
                                way_out="harvest again into a new directory")
            if verify:
                _verify(path, record)
            try:
                # safe_open maps the file; get_tensor gives views of that mapping, nothing is read yet.
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
                shards.append(handle.get_tensor(tap))
                for name in index:
                    index[name].append(handle.get_tensor(f"index.{name}"))
            except Exception as e:  # a missing, truncated or foreign file: the directory is damaged
                raise HarvestError(f"{path} cannot be read ({type(e).__name__}: {e}); the harvest is damaged: "
                                   "read(..., verify=True) checks every shard") from None
    return Rows(directory, tap, shards, {k: torch.cat(v) for k, v in index.items()}, manifest)


def _verify(path: Path, record: dict) -> None:
    try:
        sha256, size = file_sha256(path), path.stat().st_size
    except OSError as e:
        raise HarvestError(f"{path} cannot be read ({e})") from None
    if size != record["bytes"] or sha256 != record["sha256"]:
        raise HarvestError(f"{path} is not the shard the manifest lists (size or sha256 differ); it was changed "
                           "or damaged after the harvest: harvest again into a new directory")
