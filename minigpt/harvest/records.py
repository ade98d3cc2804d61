"""What a harvest reads back from its own directory, checked field by field before it is used.

A shard's record (``shards/shard-N.json``, and its copy in the manifest's ``shards``) and the
manifest are JSON that a crash, a disk fault or a hand edit may have changed: every field the
harvest uses is checked for type and range here, and a bad one is a HarvestError naming the file
and the field. File names are checked against the one name the harvest gives each shard, so a
record can never point outside the directory (an absolute path, ``../``) nor at a file that is
not a shard.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..checks import check_int
from ..errors import HarvestError

FORMAT = "minigpt-harvest/1"
SHARDS = "shards"
DAMAGED = "the harvest directory is damaged: harvest again into a new directory"
# The only names of shards/ that are a shard and its record (shard_path gives them: at least 6 digits, no sign).
SHARD_NAME = re.compile(r"shard-(?P<number>[0-9]{6,})\.(?P<kind>safetensors|json)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_name(index: int) -> str:
    """The file name of shard ``index``."""
    return f"shard-{index:06d}.safetensors"


def _field(record: dict, key: str, path: Path) -> object:
    if key not in record:
        raise HarvestError(f"{path}: the field {key!r} is missing; {DAMAGED}")
    return record[key]


def _int(record: dict, key: str, path: Path, low: int, high: int | None = None) -> int:
    return check_int(_field(record, key, path), f"{path}: the field {key!r}", low, high, way_out=DAMAGED,
                     error=HarvestError)


def check_record(record: object, path: Path, number: int | None = None) -> dict:
    """A shard's record, every field checked (``number``: the shard it must describe); HarvestError otherwise."""
    if not isinstance(record, dict):
        raise HarvestError(f"{path} must hold a JSON object (a shard's record), got {type(record).__name__}; {DAMAGED}")
    shard = _int(record, "shard", path, 0)
    if number is not None and shard != number:
        raise HarvestError(f"{path}: the field 'shard' is {shard}, but the file belongs to shard {number}; {DAMAGED}")
    expected = f"{SHARDS}/{shard_name(shard)}"
    if _field(record, "file", path) != expected:
        raise HarvestError(f"{path}: the field 'file' must be {expected!r} (shard {shard}'s own file; minigpt reads "
                           f"nothing outside the harvest directory), got {record['file']!r}; {DAMAGED}")
    _int(record, "rows", path, 1)
    _int(record, "bytes", path, 8)
    _int(record, "tokens", path, 1)
    _int(record, "windows", path, 1)
    sha256 = _field(record, "sha256", path)
    if not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise HarvestError(f"{path}: the field 'sha256' must be 64 lowercase hex digits, got {sha256!r}; {DAMAGED}")
    for key in ("first", "last"):
        value = _field(record, key, path)
        if not (isinstance(value, list) and len(value) == 2):
            raise HarvestError(f"{path}: the field {key!r} must be [document, position], got {value!r}; {DAMAGED}")
        for i, part in enumerate(value):
            check_int(part, f"{path}: the field {key!r}[{i}]", 0, way_out=DAMAGED, error=HarvestError)
    return record


def check_planned(record: dict, planned: dict, path: Path) -> None:
    """HarvestError unless a finished shard's ``record`` holds what the harvest's plan gives that shard
    (``planned``: its rows, tokens, windows, first and last): a resume keeps only shards of this very plan."""
    for key, value in planned.items():
        if record[key] != value:
            raise HarvestError(f"{path}: the field {key!r} is {record[key]!r}, but this harvest's shard {planned['shard']} "
                               f"has {value!r}; the record was changed after it was written: {DAMAGED}")


def check_manifest(manifest: object, path: Path) -> dict:
    """The manifest, checked where the reader relies on it: its format, ``row_shapes`` and every shard's record."""
    if not isinstance(manifest, dict):
        raise HarvestError(f"{path} must hold a JSON object (a harvest's manifest), got {type(manifest).__name__}; "
                           f"{DAMAGED}")
    if _field(manifest, "format", path) != FORMAT:
        raise HarvestError(f"{path}: the field 'format' is {manifest['format']!r}, not {FORMAT!r}; this minigpt reads "
                           "only harvests in its own format: harvest again with it")
    shapes = _field(manifest, "row_shapes", path)
    if not (isinstance(shapes, dict) and shapes):
        raise HarvestError(f"{path}: the field 'row_shapes' must map each tap to its row shape, got {shapes!r}; "
                           f"{DAMAGED}")
    for tap, shape in shapes.items():
        if not isinstance(shape, list):
            raise HarvestError(f"{path}: row_shapes[{tap!r}] must be a list of sizes, got {shape!r}; {DAMAGED}")
        for size in shape:
            check_int(size, f"{path}: a size in row_shapes[{tap!r}]", 1, 2**31, way_out=DAMAGED, error=HarvestError)
    shards = _field(manifest, "shards", path)
    if not (isinstance(shards, list) and shards):
        raise HarvestError(f"{path}: the field 'shards' must list the harvest's shards, got {shards!r}; {DAMAGED}")
    for number, record in enumerate(shards):
        check_record(record, Path(f"{path} (shards[{number}])"), number)
    return manifest
