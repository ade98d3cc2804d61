"""minigpt.files: atomic writes leave the whole file or none, JSON is read only within its bounds, only
regular files inside a directory are let through, and each refusal is the caller's error naming the file."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from minigpt import files
from minigpt.errors import CheckpointError, HarvestError, TrainingError


def test_an_atomic_write_is_whole_under_its_name_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    files.write_json(target, {"step": 3, "loss": [1.5, float("nan")]})
    text = target.read_text()
    assert text == json.dumps({"step": 3, "loss": [1.5, float("nan")]}, indent=2) + "\n"
    assert os.listdir(tmp_path) == ["state.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask

    def dies(temporary: Path) -> None:
        assert temporary.name == f".state.json.minigpt-{os.getpid()}.tmp" and temporary.parent == tmp_path
        temporary.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(target, dies)
    assert target.read_text() == text, "the file under its name is the previous whole one"
    assert os.listdir(tmp_path) == ["state.json"], "the half-written temporary is removed"
    assert files.write_atomically(tmp_path / "n.bin", lambda t: t.write_bytes(b"12345")) == 5


def test_read_json_reads_what_write_json_wrote(tmp_path: Path) -> None:
    value = {"a": [1, 2.5, None, True, "x"], "b": {"c": -3}}
    files.write_json(tmp_path / "v.json", value, indent=1)
    assert files.read_json(tmp_path / "v.json", HarvestError, "harvest again") == value
    assert files.file_sha256(tmp_path / "v.json") == __import__("hashlib").sha256(
        (tmp_path / "v.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("content, why", [
    ("{model_type: gpt2", "JSONDecodeError"),
    ("[" * 65 + "]" * 65, "nested more than 64 deep"),
    ('{"n": ' + "9" * 65 + "}", "a number of 65 characters"),
    ('{"x": 1e' + "0" * 70 + "}", "a number of 72 characters"),
    (b"\xff\xfe{}", "UnicodeDecodeError"),
])
def test_read_json_refuses_what_is_not_json_or_beyond_its_bounds(tmp_path: Path, content, why) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TrainingError) as refused:
        files.read_json(path, TrainingError, "train into a new --out")
    message = str(refused.value)
    assert message.startswith(f"cannot read {path} as JSON (") and why in message, message
    assert message.endswith("; train into a new --out")


def test_read_json_checks_size_and_kind_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps(["x" * 100]))
    with pytest.raises(HarvestError, match=r"more than the 50 minigpt reads"):
        files.read_json(big, HarvestError, "harvest again", max_bytes=50)
    assert files.read_json(big, HarvestError, "harvest again", max_bytes=200) == ["x" * 100]
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)  # opening it would block forever
    with pytest.raises(HarvestError, match="a named pipe, not a regular file"):
        files.read_json(pipe, HarvestError, "harvest again")
    with pytest.raises(HarvestError, match="FileNotFoundError"):
        files.read_json(tmp_path / "missing.json", HarvestError, "harvest again")
    # Deep nesting inside a string is text, not nesting.
    (tmp_path / "s.json").write_text(json.dumps({"t": "[" * 500}))
    assert files.read_json(tmp_path / "s.json", HarvestError, "") == {"t": "[" * 500}


def test_checked_file_lets_through_only_regular_files_inside_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.bin").write_bytes(b"a")
    (root / "inside").symlink_to("a.bin")
    (outside / "b.bin").write_bytes(b"b")
    (root / "out").symlink_to(outside / "b.bin")
    os.mkfifo(root / "pipe")
    (root / "dir").mkdir()
    assert files.checked_file(root / "a.bin", root, CheckpointError) == (root / "a.bin").resolve()
    assert files.checked_file(root / "inside", root, CheckpointError) == (root / "a.bin").resolve()
    cases = {"out": "outside the harvest directory", "pipe": "is a named pipe, not a regular file; a harvest holds",
             "dir": "is a directory", "nothing": "does not exist; the harvest is incomplete: harvest again"}
    for name, fragment in cases.items():
        with pytest.raises(HarvestError, match=fragment):
            files.checked_file(root / name, root, HarvestError, what="harvest", way_out="harvest again")
