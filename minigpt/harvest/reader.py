"""Reading a finished harvest: ``read(DIR, tap)`` -> Rows, memory-mapped, with each row's index."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from ..checks import check_bool, check_int, is_integer
from ..errors import HarvestError
from ..files import checked_file, file_sha256
from .records import check_manifest
from .storage import MANIFEST, SETTINGS, read_json


class Rows:
    """One tap's rows over the whole harvest, shard by shard, without loading them.

    ``len(rows)`` rows of shape ``row_shape``; ``rows[i]``, ``rows[a:b]``, ``rows[index tensor]`` or
    ``rows[bool mask]`` read just those rows (a copy of those only), as torch would index a tensor. ``shards`` are the memory-mapped tensors
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
        """Rows as torch indexes the first dimension of a tensor [len(rows), *row_shape]: an int gives one
        row [*row_shape]; a slice (step > 0), a 1-d tensor or list of row numbers, or a bool mask [len(rows)]
        give [n, *row_shape]. Anything else (a float, a string, None, a tuple, a row out of range) is a
        HarvestError."""
        rows = self._row_numbers(which)
        out = torch.empty(rows.numel(), *self.row_shape, dtype=self.dtype)
        flat = rows.reshape(-1).contiguous()
        shard = torch.searchsorted(self.starts, flat, right=True) - 1
        for s in shard.unique().tolist():
            here = shard == s
            out[here] = self.shards[s][flat[here] - self.starts[s]]
        return out.reshape(*rows.shape, *self.row_shape)

    def _row_numbers(self, which: object) -> torch.Tensor:
        """The row numbers ``which`` selects, in [0, len(self)): 0-d for one row, else 1-d."""
        n, usage = len(self), "index rows with an int, a slice, a 1-d tensor of row numbers or a bool mask"
        if isinstance(which, slice):
            bad = [v for v in (which.start, which.stop, which.step) if v is not None and not is_integer(v)]
            if bad or (which.step is not None and which.step < 1):
                raise HarvestError(f"a slice of rows takes integer bounds and a positive step (as torch's), got "
                                   f"{which}; {usage}")
            return torch.arange(n)[which]
        if isinstance(which, (bool, float, str, bytes, tuple)) or which is None:
            raise HarvestError(f"{usage}, got {which!r}")
        try:
            rows = torch.as_tensor(which).cpu()
        except (TypeError, ValueError, RuntimeError) as e:
            raise HarvestError(f"{usage}, got {type(which).__name__} ({e})") from None
        if rows.dtype == torch.bool:
            if rows.shape != (n,):
                raise HarvestError(f"a bool mask selects rows where it is True and must have shape [{n}] (one "
                                   f"value per row), got shape {list(rows.shape)}")
            return rows.nonzero().reshape(-1)
        if rows.numel() == 0 and rows.dim() == 1:
            return rows.long()  # [] gives no rows, whatever dtype torch guessed for it
        if rows.is_floating_point() or rows.is_complex() or rows.dim() > 1:
            raise HarvestError(f"{usage}, got a {rows.dtype} tensor of shape {list(rows.shape)}")
        if rows.numel() and (rows.min() < -n or rows.max() >= n):
            raise HarvestError(f"row numbers must be in [-{n}, {n}), got {int(rows.min())}..{int(rows.max())}")
        return rows.long() % max(n, 1)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows [b, *row_shape], row numbers [b]) minibatches over every row once, in an order
        shuffled by ``seed`` (the same seed, the same order); the row numbers index ``document``,
        ``position`` and ``token``. Only the rows of the batch are read."""
        check_int(batch_size, "batch_size", 1, error=HarvestError)
        check_bool(shuffle, "shuffle", error=HarvestError)
        check_int(seed, "seed", 0, 2**63 - 1, error=HarvestError)
        check_bool(drop_last, "drop_last", error=HarvestError)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle \
            else torch.arange(len(self))
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            if drop_last and len(rows) < batch_size:
                return
            yield self[rows], rows


def read(directory: str | Path, tap: str, *, verify: bool = False) -> Rows:
    """A finished harvest's rows of ``tap`` (memory-mapped) and their index.

    The manifest is checked field by field and every shard it lists must be that shard's own file
    inside the directory (a regular file: no pipe, no link out), with the rows it says.
    ``verify=True`` also checks every shard's size and sha256 against the manifest (reads everything).
    """
    directory = Path(directory)
    if not os.path.lexists(directory / MANIFEST):
        unfinished = (directory / SETTINGS).is_file()
        raise HarvestError(f"{directory} holds {'an unfinished harvest' if unfinished else 'no harvest'} "
                           f"({MANIFEST} missing); " + ("run the same harvest command again to finish it"
                                                        if unfinished else "give the --out directory of a harvest"))
    manifest = check_manifest(read_json(directory / MANIFEST, directory), directory / MANIFEST)
    if not isinstance(tap, str) or tap not in manifest["row_shapes"]:
        raise HarvestError(f"tap {tap!r} was not harvested in {directory}; it holds {', '.join(manifest['row_shapes'])}")
    shards, index = [], {"document": [], "position": [], "token": []}
    with ExitStack() as stack:
        for record in manifest["shards"]:
            # Only a regular file inside the harvest: a manifest naming a pipe or a path out of it is damaged.
            path = checked_file(directory / record["file"], directory, HarvestError, what="harvest",
                                way_out="harvest again into a new directory")
            if verify:
                _verify(path, record)
            rows, found = _open_shard(path, tap, stack)
            _check_shard(path, record, rows, found, tuple(manifest["row_shapes"][tap]), shards)
            shards.append(rows)
            for name in index:
                index[name].append(found[name])
    return Rows(directory, tap, shards, {k: torch.cat(v) for k, v in index.items()}, manifest)


def _open_shard(path: Path, tap: str, stack: ExitStack) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A shard's rows of ``tap`` and its index, as views of the memory-mapped file (nothing read yet)."""
    from safetensors import safe_open

    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt"))
        return handle.get_tensor(tap), {name: handle.get_tensor(f"index.{name}") for name in ("document", "position",
                                                                                               "token")}
    except Exception as e:  # a missing, truncated or foreign file: the directory is damaged
        raise HarvestError(f"{path} cannot be read ({type(e).__name__}: {e}); the harvest is damaged: "
                           "read(..., verify=True) checks every shard") from None


def _check_shard(path: Path, record: dict, rows: torch.Tensor, index: dict[str, torch.Tensor],
                 row_shape: tuple[int, ...], before: list[torch.Tensor]) -> None:
    """HarvestError unless the shard holds the rows its record says, shaped as the manifest says."""
    problem = None
    if tuple(rows.shape) != (record["rows"], *row_shape):
        problem = f"rows of shape {list(rows.shape)}, not [{record['rows']}, {', '.join(map(str, row_shape))}]"
    elif before and rows.dtype != before[0].dtype:
        problem = f"rows of dtype {rows.dtype}, not the other shards' {before[0].dtype}"
    elif any(t.shape != (record["rows"],) or t.is_floating_point() for t in index.values()):
        problem = "an index that is not one whole number per row"
    if problem:
        raise HarvestError(f"{path} holds {problem}; it is not the shard the manifest lists: harvest again into a "
                           "new directory")


def _verify(path: Path, record: dict) -> None:
    try:
        sha256, size = file_sha256(path), path.stat().st_size
    except OSError as e:
        raise HarvestError(f"{path} cannot be read ({e})") from None
    if size != record["bytes"] or sha256 != record["sha256"]:
        raise HarvestError(f"{path} is not the shard the manifest lists (size or sha256 differ); it was changed "
                           "or damaged after the harvest: harvest again into a new directory")
