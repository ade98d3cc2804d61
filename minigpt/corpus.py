"""Reading a corpus as a stream of documents, whatever its files look like (for harvest and training alike).

A document is numbered by its place in the corpus (0, 1, 2, ... over the files in the order given),
so a harvested row can be traced back to the text it came from. Files are read one record at a
time: the corpus never has to fit in memory (one document does).

Formats, chosen by the file's name:
  ``*.jsonl``     one JSON object per line, the document in its ``text`` field (blank lines skipped)
  ``*.parquet``   a ``text`` column, read in record batches (needs pyarrow: ``pip install 'minigpt-taps[corpora]'``)
  anything else   UTF-8 text: the whole file is one document, or with ``lines=True`` each line is one
                  (an empty line is a document with no tokens; it keeps its number)
A directory stands for the files under it, in sorted order.

Each reader takes the caller's error class (HarvestError, TrainingError), which it raises with the
file, what is wrong and the way out.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import MiniGPTError
from .files import parse_json

Error = type[MiniGPTError]


@dataclass(frozen=True)
class Document:
    index: int    # its number in the corpus
    text: str
    source: str   # the file it came from


def corpus_files(data: str | Path | Iterable[str | Path], error: Error) -> list[Path]:
    """The files ``data`` names (a path, or a list of them; a directory gives its files, sorted), checked."""
    paths = ([data] if isinstance(data, (str, os.PathLike)) else None if isinstance(data, (bytes, bytearray))
             else list(data) if isinstance(data, Iterable) else None)
    if paths is None or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise error(f"the corpus must be a path (a str or a pathlib.Path) or a list of them, got {_short(data)}; "
                    "e.g. 'corpus/' or ['a.txt', 'b.jsonl']")
    if not paths:
        raise error("no corpus given: pass one or more files (or directories) of text, JSONL or Parquet")
    files: list[Path] = []
    for given in paths:
        if not str(given).strip():  # Path("") is ".": the working directory would be read as the corpus
            raise error(f"an empty corpus path ({given!r}): name a file or directory")
        path = Path(given)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as e:  # a name too long for the file system, a path it cannot look at
            raise error(f"cannot look at corpus file {_short(path)} ({e.strerror or e}); check the path") from None
        if is_dir:
            inside = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not inside:
                raise error(f"corpus directory {path} holds no files")
            files += inside
        elif is_file:
            files.append(path)
        else:
            raise error(f"corpus file {_short(path)} does not exist (or is not a regular file); check the path")
        if files and files[-1].suffix == ".parquet":
            _pyarrow(files[-1], error)  # say at once that pyarrow is missing, not after hours of other files
    return files


def _short(value: object) -> str:
    """``repr(value)``, cut to 100 characters (a 5,000-character name would drown the message)."""
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= 100 else f"{text[:80]}... ({len(text):,} characters)"


def fingerprint(files: list[Path]) -> list[dict]:
    """What identifies the corpus for a resumed run: each file's path, size and a hash of its ends.

    Cheap on purpose (the first and last MiB), and the same on every machine holding the same files.
    """
    found = []
    for path in files:
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as f:
            digest.update(f.read(2**20))
            if size > 2**20:
                f.seek(max(2**20, size - 2**20))
                digest.update(f.read())
        found.append({"path": str(path), "bytes": size, "ends_sha256": digest.hexdigest()})
    return found


def documents(files: list[Path], lines: bool, error: Error) -> Iterator[Document]:
    """Every document of the corpus, in order, numbered from 0 across files."""
    index = 0
    for path in files:
        if path.suffix == ".jsonl":
            texts = _jsonl(path, error)
        elif path.suffix == ".parquet":
            texts = _parquet(path, error)
        else:
            texts = _text(path, lines, error)
        try:
            for text in texts:
                yield Document(index, text, str(path))
                index += 1
        except OSError as e:  # the file vanished, or the disk failed, halfway through
            raise error(f"cannot read {_short(path)} ({type(e).__name__}: {e}); check the file") from None


# Lines are read with undecodable bytes kept as lone surrogates, so that a file that is not UTF-8
# is refused at the very line that holds them (and lines split exactly as in strict text mode).
_UTF8 = {"encoding": "utf-8", "errors": "surrogateescape"}


def _utf8(text: str, path: Path, where: str, error: Error) -> str:
    """``text`` if it was valid UTF-8 (no byte escaped as a surrogate), else ``error`` naming the place."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{path}, {where}: not UTF-8 (byte {text[e.start].encode('utf-8', 'surrogateescape')!r} at "
                    f"character {e.start + 1}); convert the file to UTF-8") from None
    return text


def _text(path: Path, lines: bool, error: Error) -> Iterator[str]:
    with path.open(newline="", **_UTF8) as f:
        if not lines:
            yield _utf8(f.read(), path, "the text", error)
            return
        for number, line in enumerate(f, start=1):
            yield _utf8(line.rstrip("\r\n"), path, f"line {number}", error)


def _jsonl(path: Path, error: Error) -> Iterator[str]:
    with path.open(**_UTF8) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            _utf8(line, path, f"line {number}", error)
            try:
                record = parse_json(line)
            except (ValueError, RecursionError) as e:
                raise error(f"{path}, line {number}: not JSON ({getattr(e, 'msg', e)}); each line of a .jsonl file "
                            "must be one JSON object with a 'text' field") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise error(f"{path}, line {number}: expected a JSON object with a string 'text' field, "
                        f"got {line.strip()[:80]!r}")
            yield record["text"]


def _pyarrow(path: Path, error: Error):
    try:
        import pyarrow.parquet
    except ImportError:
        raise error(f"{path} is Parquet, which needs pyarrow: pip install pyarrow (or pip install 'minigpt-taps[corpora]')") from None
    return pyarrow.parquet


def _parquet(path: Path, error: Error) -> Iterator[str]:
    parquet = _pyarrow(path, error)
    try:
        table = parquet.ParquetFile(path)
    except Exception as e:  # pyarrow's own errors for a file that is not Parquet
        raise error(f"{path} is not a readable Parquet file ({e})") from None
    if "text" not in table.schema_arrow.names:
        raise error(f"{path} has no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
    batches, row = table.iter_batches(columns=["text"], batch_size=1024), 0
    while True:
        try:
            batch = next(batches, None)
            texts = [] if batch is None else batch.column(0).to_pylist()
        except Exception as e:  # pyarrow's errors (OSError, ArrowInvalid, ...) for a damaged page
            raise error(f"{path}: rows from {row} cannot be read ({type(e).__name__}: {e}); the file is damaged: "
                        "write it again, or leave it out") from None
        if batch is None:
            return
        for text in texts:
            if not isinstance(text, str):
                raise error(f"{path}, row {row}: the 'text' value is {_short(text)}, not a string")
            yield text
            row += 1
