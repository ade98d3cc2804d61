"""Files, written and read one way everywhere (weights, harvest, training): whole or not at all, checked first.

Writing: ``write_atomically`` writes under a temporary name (``.NAME.minigpt-PID.tmp``: no two
processes sharing a directory write one file), flushes it to disk, renames it into place and
flushes the directory, so a file under its name is always whole, even after a crash or power loss.
Reading: ``read_json`` bounds a file's size before reading it and refuses JSON nested too deep or
with absurdly long numbers; ``checked_file`` lets through only a regular file inside a given
directory, looked at before it is ever opened (a pipe or a device would hang the reader).
Each raises the caller's error class, naming the file and the way out.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import MiniGPTError

T = TypeVar("T")

# The JSON minigpt reads (configs, indexes, manifests, states) is far below these.
JSON_MAX_BYTES = 256 * 2**20
JSON_MAX_DEPTH = 64
JSON_MAX_NUMBER_CHARS = 64


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once: os.umask can only be read by setting it, which races with other threads creating files.
_UMASK = _current_umask()


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before ``commit`` renames it: beside it, named for minigpt and this process."""
    return path.with_name(f".{path.name}.minigpt-{os.getpid()}.tmp")


def commit(temporary: Path, path: Path) -> None:
    """Flush ``temporary`` to disk, rename it to ``path`` and flush the directory: ``path`` is whole or absent."""
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(temporary, 0o666 & ~_UMASK)  # as any file the user writes (safetensors creates it private)
    os.replace(temporary, path)
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a crash once the directory is on disk
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(path: Path, write: Callable[[Path], T]) -> T:
    """``write(temporary path)``, then ``commit``: never seen half-written. Returns what ``write`` returns."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        result = write(temporary)
        commit(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return result


def write_json(path: Path, value: object, *, indent: int = 2) -> None:
    """``value`` as JSON (then a newline) to ``path``, atomically."""
    text = json.dumps(value, indent=indent, default=_plain_number) + "\n"
    write_atomically(Path(path), lambda temporary: temporary.write_bytes(text.encode("utf-8")))


def _plain_number(value: object) -> object:
    """NumPy's integers and floats (taken wherever Python's are) as Python's; anything else TypeError, as json's."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read 16 MiB at a time (OSError if it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path, error: type[MiniGPTError], way_out: str, *, max_bytes: int = JSON_MAX_BYTES) -> object:
    """The JSON value in ``path``, checked: raises ``error`` ('cannot read PATH as JSON (why); WAY_OUT').

    Refused before reading: anything but a regular file, or more than ``max_bytes``. Refused before
    parsing: nesting deeper than ``JSON_MAX_DEPTH``. While parsing: a number written with more than
    ``JSON_MAX_NUMBER_CHARS`` characters.
    """
    try:
        mode, size = _stat(path)
        if not stat.S_ISREG(mode):
            raise ValueError(f"{_kind(mode)}, not a regular file")
        if size > max_bytes:
            raise ValueError(f"{size:,} bytes, more than the {max_bytes:,} minigpt reads")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise ValueError(f"more than the {max_bytes:,} bytes minigpt reads")
        return parse_json(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"cannot read {path} as JSON ({type(e).__name__}: {e}); {way_out}") from e


def parse_json(text: str) -> object:
    """``json.loads(text)``, refusing (ValueError) nesting deeper than JSON_MAX_DEPTH and numbers written
    with more than JSON_MAX_NUMBER_CHARS characters."""
    _check_depth(text)
    return json.loads(text, parse_int=_number(int), parse_float=_number(float))


def _stat(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_mode, info.st_size


def _number(kind: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        if len(text) > JSON_MAX_NUMBER_CHARS:
            raise ValueError(f"a number of {len(text)} characters, more than {JSON_MAX_NUMBER_CHARS}")
        return kind(text)
    return parse


_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _check_depth(text: str) -> None:
    """ValueError if ``text`` nests arrays and objects deeper than JSON_MAX_DEPTH (strings skipped)."""
    depth = 0
    for match in _BRACKETS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > JSON_MAX_DEPTH:
                raise ValueError(f"nested more than {JSON_MAX_DEPTH} deep")
        elif token in "]}":
            depth -= 1


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")


def checked_file(path: Path, root: Path, error: type[MiniGPTError], *, what: str = "checkpoint",
                 way_out: str = "download it again") -> Path:
    """``path`` resolved, if it is a regular file inside ``root`` (links may point within it).

    Anything else (a pipe, a device, a directory, a link out of ``root``) raises ``error`` without
    the file being opened, so nothing can hang or be read from elsewhere. ``what`` names the
    directory's contents in the messages ("checkpoint"), ``way_out`` ends them.
    """
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(root)):
        raise error(f"{path} is a link to {real}, outside the {what} directory {root}; minigpt reads "
                    "only files inside it: copy the file into the directory")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise error(f"{path} does not exist; the {what} is incomplete: {way_out}") from None
    except OSError as e:
        raise error(f"cannot look at {path} ({e})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path} is {_kind(mode)}, not a regular file; a {what} holds plain files: {way_out}")
    return real


def checked_directory(path: Path, error: type[MiniGPTError], *, what: str, way_out: str) -> Path:
    """``path`` if it is missing or a plain directory (not a link: what minigpt writes there stays inside its
    own output directory); else ``error``, without anything written or read through it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as e:
        raise error(f"cannot look at {path} ({e.strerror or e}); {way_out}") from None
    if not stat.S_ISDIR(mode):
        kind = "a link" if stat.S_ISLNK(mode) else "a regular file" if stat.S_ISREG(mode) else _kind(mode)
        raise error(f"{path} is {kind}, not the directory of the {what} minigpt makes there; {way_out}")
    return path


def check_regular_file(path: Path, error: type[MiniGPTError], way_out: str) -> Path:
    """``path`` if it is a regular file (a link to one counts), looked at without opening it; else ``error``.

    For a file named by the user anywhere (an environment variable, an option): a pipe or a device
    would hang or flood the reader, a directory cannot be read.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise error(f"cannot look at {path} ({e.strerror or e}); {way_out}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path} is {_kind(mode)}, not a regular file; {way_out}")
    return Path(path)


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.minigpt-[0-9]+\.tmp")


def temporary_of(name: str) -> str | None:
    """The file name whose ``temporary_path`` ``name`` is (``.NAME.minigpt-PID.tmp`` -> NAME), else None."""
    match = _TEMPORARY.fullmatch(name)
    return match["name"] if match else None


def remove_temporaries(directory: Path, ours: Callable[[str], bool]) -> None:
    """Remove what killed writers left in ``directory``: regular files named as ``temporary_path`` names
    them, for a NAME that ``ours(NAME)`` says this directory's writer writes. Nothing else, whatever its name."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        target = temporary_of(entry.name)
        if target is not None and ours(target) and stat.S_ISREG(os.lstat(entry).st_mode):
            entry.unlink(missing_ok=True)


# Written first into a directory minigpt creates or is given empty: what makes it minigpt's (train, harvest).
MARKER_FILE = ".minigpt-run.json"
MARKER_FORMAT = "minigpt-directory/1"


def claim_directory(path: Path, kind: str, error: type[MiniGPTError]) -> Path:
    """``path`` as an output directory of minigpt's ``kind`` ("train", "harvest"), checked before anything is written.

    A missing or empty directory is created and marked first (MARKER_FILE, ``{"kind": kind}``); one
    that holds minigpt's marker of this ``kind`` is taken as it is. Anything else (a file, a directory
    holding other files, one marked for another kind) raises ``error`` and nothing is written: minigpt
    never writes into, or cleans, a directory it did not make.
    """
    path = Path(path)
    marker = path / MARKER_FILE
    if os.path.lexists(marker):
        way_out = "give another --out (an empty or new directory)"
        found = read_json(checked_file(marker, path, error, what=f"minigpt {kind}", way_out=way_out), error, way_out)
        if not isinstance(found, dict) or found.get("kind") != kind:
            kind_found = found.get("kind") if isinstance(found, dict) else found
            raise error(f"{path} is not a minigpt {kind} directory: its {MARKER_FILE} says kind {kind_found!r}; "
                        f"{way_out}")
        if found != {"format": MARKER_FORMAT, "kind": kind}:  # exactly what minigpt writes: anything else is damage
            raise error(f"{marker} is damaged: it holds {found!r}, not minigpt's marker "
                        f"{{'format': {MARKER_FORMAT!r}, 'kind': {kind!r}}}; {way_out}")
        return path
    if os.path.lexists(path):
        if not path.is_dir():
            raise error(f"{path} is not a directory; give a directory (it is created if missing)")
        try:
            foreign = sorted(e.name for e in path.iterdir() if temporary_of(e.name) != MARKER_FILE)
        except OSError as e:
            raise error(f"cannot look into {path} ({e.strerror or e}); give a directory you can read and write") from e
        if foreign:
            raise error(f"{path} holds files minigpt did not write ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}); minigpt writes {kind} output only into an empty "
                        f"or new directory, or one of its own {kind} runs (marked by {MARKER_FILE}): give another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        remove_temporaries(path, lambda name: name == MARKER_FILE)  # a claim killed before its rename
        write_json(marker, {"format": MARKER_FORMAT, "kind": kind})
    except OSError as e:
        raise error(f"cannot write into {path} ({e.strerror or e}); give a directory you can write to") from e
    return path
