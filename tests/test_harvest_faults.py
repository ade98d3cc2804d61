"""A harvest over a hostile or failing directory: --out taken only when it is minigpt's (its marker), nothing
minigpt did not write ever removed, everything read back checked first (a pipe never hangs), a full disk a
clear HarvestError that the same command resumes from, and Rows indexing as torch's or refused."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fuzz import watchdog
from test_harvest import CFG, text

from minigpt import GPT
from minigpt.files import MARKER_FILE
from minigpt.harvest import HarvestError, harvest, read
from minigpt.harvest import storage

TAP = "blocks.0.resid_post"
# Four windows of 8 tokens a shard: the corpus below makes several shards, batches of 4 fill them.
OPTIONS = dict(context=8, batch_size=4, shard_bytes=2_000, quiet=True)


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(CFG, seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("corpus")
    (d / "lines.txt").write_text("\n".join(text(30 + i, 12 + i % 7) for i in range(12)))
    return [d / "lines.txt"]


@pytest.fixture(scope="module")
def whole(model, corpus, tmp_path_factory) -> Path:
    """An uninterrupted harvest: what every resumed one must equal."""
    out = tmp_path_factory.mktemp("whole") / "h"
    manifest = harvest(model, corpus, TAP, out, lines=True, **OPTIONS)
    assert len(manifest["shards"]) >= 4
    return out


@pytest.fixture
def done(whole, tmp_path) -> Path:
    """A copy of the finished harvest, to spoil."""
    return Path(shutil.copytree(whole, tmp_path / "h"))


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def same_harvest(a: Path, b: Path) -> None:
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["shards"] == mb["shards"] and ma["rows"] == mb["rows"]
    ra, rb = read(a, TAP, verify=True), read(b, TAP, verify=True)
    assert torch.equal(ra[:], rb[:]) and torch.equal(ra.document, rb.document) and torch.equal(ra.token, rb.token)


# ---------------------------------------------------------------------------------------------
# --out: a new or empty directory, or one of minigpt's harvests (its marker), nothing else


@pytest.mark.parametrize("name", ["notes.txt", "old.tmp", ".hidden", "settings.json", "shards"])
def test_a_directory_minigpt_did_not_make_is_refused_before_anything_is_written(model, corpus, tmp_path, name) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if name == "shards" else (out / name).write_text("mine")
    before = listing(out)
    with pytest.raises(HarvestError, match=f"holds files minigpt did not write \\({name}\\)"):
        harvest(model, corpus, TAP, out, lines=True, **OPTIONS)
    assert listing(out) == before and (name == "shards" or (out / name).read_text() == "mine")


def test_the_marker_is_written_first_and_names_the_kind(model, corpus, tmp_path) -> None:
    out = tmp_path / "empty"
    out.mkdir()  # an empty directory is taken
    harvest(model, corpus, TAP, out, lines=True, **OPTIONS)
    assert json.loads((out / MARKER_FILE).read_text())["kind"] == "harvest"
    other = tmp_path / "train"
    other.mkdir()
    (other / MARKER_FILE).write_text(json.dumps({"kind": "train"}))
    with pytest.raises(HarvestError, match="not a minigpt harvest directory: its .minigpt-run.json says kind 'train'"):
        harvest(model, corpus, TAP, other, lines=True, **OPTIONS)
    assert listing(other) == [MARKER_FILE]


def test_only_minigpts_own_temporaries_are_removed(model, corpus, whole, done) -> None:
    (done / "manifest.json").unlink()  # unfinished: the run goes on
    ours = [done / "shards" / ".shard-000001.safetensors.minigpt-999999.tmp", done / ".manifest.json.minigpt-5.tmp"]
    theirs = [done / "notes.tmp", done / ".settings.json.tmp", done / "x.minigpt-7.tmp"]
    for path in ours + theirs:
        path.write_text("half")
    harvest(model, corpus, TAP, done, lines=True, **OPTIONS)
    assert not any(p.exists() for p in ours)
    assert all(p.read_text() == "half" for p in theirs)
    same_harvest(whole, done)


@pytest.mark.parametrize("name", ["keep.tmp", "notes.txt", "shard-1.safetensors", "shard-0000001.safetensors",
                                  "shard-000001.safetensors.bak"])
def test_stray_files_in_shards_are_refused_never_taken_nor_removed(model, corpus, done, name) -> None:
    (done / "manifest.json").unlink()
    (done / "shards" / name).write_bytes((done / "shards" / "shard-000001.safetensors").read_bytes())
    with pytest.raises(HarvestError, match=f"did not write \\({name}\\).*move them out"):
        harvest(model, corpus, TAP, done, lines=True, **OPTIONS)
    assert (done / "shards" / name).exists()


# ---------------------------------------------------------------------------------------------
# Everything read back is checked before it is opened


@pytest.mark.parametrize("name", [MARKER_FILE, "settings.json", "shards/shard-000002.json",
                                  "shards/shard-000002.safetensors", "manifest.json"])
def test_a_pipe_in_place_of_a_file_read_back_is_refused_at_once(model, corpus, done, name) -> None:
    if name != "manifest.json":
        (done / "manifest.json").unlink()  # the resume reads the others
    (done / name).unlink()
    os.mkfifo(done / name)  # opening it would wait forever for a writer
    with watchdog(20), pytest.raises(HarvestError, match="named pipe, not a regular file"):
        if name == "manifest.json":
            read(done, TAP)
        else:
            harvest(model, corpus, TAP, done, lines=True, **OPTIONS)


@pytest.mark.parametrize("field, value, message", [
    ("rows", "38", "the field 'rows' must be an integer >= 1, got '38'"),
    ("bytes", -1, "the field 'bytes' must be an integer >= 8"),
    ("sha256", "abc", "the field 'sha256' must be 64 lowercase hex digits"),
    ("file", "../elsewhere.safetensors", "the field 'file' must be 'shards/shard-000002.safetensors'"),
    ("file", "/etc/passwd", "the field 'file' must be"),
    ("shard", 3, "the field 'shard' is 3, but the file belongs to shard 2"),
    ("first", [0], "the field 'first' must be \\[document, position\\]"),
    ("windows", None, "the field 'windows' must be an integer"),
    ("bytes", 10**40, "holds .* bytes, its record"),
])
def test_a_bad_field_of_a_shard_record_is_a_harvest_error_naming_file_and_field(model, corpus, done, field, value,
                                                                              message) -> None:
    (done / "manifest.json").unlink()
    path = done / "shards" / "shard-000002.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, field: value}))
    with pytest.raises(HarvestError, match=f"shard-000002.*{message}"):
        harvest(model, corpus, TAP, done, lines=True, **OPTIONS)


def test_a_record_that_is_not_an_object_or_lacks_a_field_is_refused(model, corpus, done) -> None:
    (done / "manifest.json").unlink()
    path = done / "shards" / "shard-000001.json"
    path.write_text("[1, 2]")
    with pytest.raises(HarvestError, match="shard-000001.json must hold a JSON object"):
        harvest(model, corpus, TAP, done, lines=True, **OPTIONS)
    path.write_text(json.dumps({"shard": 1}))
    with pytest.raises(HarvestError, match="shard-000001.json: the field 'file' is missing"):
        harvest(model, corpus, TAP, done, lines=True, **OPTIONS)


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "link out", "dotdot inside"])
def test_a_manifest_naming_a_file_outside_is_refused_with_verify_on_or_off(done, tmp_path, verify, how) -> None:
    manifest = json.loads((done / "manifest.json").read_text())
    shard = done / manifest["shards"][1]["file"]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.read_bytes())
    if how == "link out":
        shard.unlink()
        shard.symlink_to(outside)
        message = "outside the harvest directory"
    else:
        manifest["shards"][1]["file"] = {"dotdot": "../elsewhere.safetensors", "absolute": str(outside),
                                         "dotdot inside": "shards/../shards/shard-000001.safetensors"}[how]
        (done / "manifest.json").write_text(json.dumps(manifest))
        message = r"shards\[1\]\): the field 'file' must be 'shards/shard-000001.safetensors'"
    with pytest.raises(HarvestError, match=message):
        read(done, TAP, verify=verify)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(row_shapes={TAP: ["16"]}), r"a size in row_shapes\['blocks.0.resid_post'\] must be an integer"),
    (lambda m: m.update(row_shapes={TAP: [17]}), "holds rows of shape \\[.*, 16\\], not \\[.*, 17\\]"),
    (lambda m: m.update(shards=[]), "the field 'shards' must list"),
    (lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] + 1), "it is not the shard the manifest lists"),
    (lambda m: m.update(format="minigpt-harvest/9"), "the field 'format' is 'minigpt-harvest/9'"),
    (lambda m: m.pop("row_shapes"), "the field 'row_shapes' is missing"),
])
def test_a_bad_manifest_is_a_harvest_error_naming_the_field(done, change, message) -> None:
    manifest = json.loads((done / "manifest.json").read_text())
    change(manifest)
    (done / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HarvestError, match=f"manifest.json.*{message}|{message}"):
        read(done, TAP)


# ---------------------------------------------------------------------------------------------
# A full disk: a clear error, nothing half-written, the same command resumes


@pytest.mark.parametrize("code, remedy", [(errno.ENOSPC, "free some space and "),
                                          (errno.EFBIG, "raise the file-size limit .* and ")])
def test_a_full_disk_mid_run_is_a_clear_error_and_the_same_command_resumes(model, corpus, whole, tmp_path,
                                                                           monkeypatch, code, remedy) -> None:
    real, calls = storage.write_shard, []

    def failing(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(b"half a shard")  # the disk fills up part way through the file
            raise OSError(code, os.strerror(code))
        return real(path, tensors, metadata)

    monkeypatch.setattr(storage, "write_shard", failing)
    out = tmp_path / "h"
    with pytest.raises(HarvestError, match=f"{errno.errorcode[code]}.*nothing half-written was left: {remedy}"
                                           "run the same command again"):
        harvest(model, corpus, TAP, out, lines=True, **OPTIONS)
    names = [p.name for p in (out / "shards").iterdir()]
    assert not (out / "manifest.json").exists() and not [n for n in names if n.endswith(".tmp")]
    assert "shard-000002.safetensors" not in names and "shard-000001.safetensors" in names
    monkeypatch.setattr(storage, "write_shard", real)  # space is back
    harvest(model, corpus, TAP, out, lines=True, **OPTIONS)
    same_harvest(whole, out)


def test_a_full_disk_when_writing_the_manifest_is_a_harvest_error(model, corpus, tmp_path, monkeypatch) -> None:
    def full(path, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "h"
    harvest(model, corpus, TAP, out, lines=True, **OPTIONS)
    (out / "manifest.json").unlink()
    monkeypatch.setattr(storage, "write_json", full)
    with pytest.raises(HarvestError, match="writing manifest.json into .* failed.*ENOSPC"):
        harvest(model, corpus, TAP, out, lines=True, **OPTIONS)


# ---------------------------------------------------------------------------------------------
# Rows: indexed as torch indexes a tensor, or refused


@pytest.fixture(scope="module")
def rows(whole):
    return read(whole, TAP)


def test_rows_index_as_a_tensor_does(rows) -> None:
    full = rows[:]
    n = len(rows)
    assert full.shape == (n, 16) and n > 40
    mask = torch.arange(n) % 3 == 1
    cases = [5, -1, n - 1, slice(None), slice(3, 17), slice(3, 17, 4), slice(-5, None), slice(10, 2), slice(0, 10 * n),
             slice(n + 5, None), torch.tensor(4), torch.tensor([3, 40, 3, -2]), [0, n - 1], np.array([7, 1]),
             np.int64(9), mask, mask.tolist(), mask.numpy(), torch.zeros(n, dtype=torch.bool), [],
             torch.tensor([], dtype=torch.long), torch.tensor([2, 5], dtype=torch.int32)]
    for which in cases:
        expected = full[which]
        got = rows[which]
        assert got.shape == expected.shape and torch.equal(got, expected), which
    assert torch.equal(rows[mask], full[mask.nonzero().flatten()])  # not row 0 for every False


@pytest.mark.parametrize("which, message", [
    (1.0, "got 1.0"), ("3", "got '3'"), (None, "got None"), (True, "got True"), ((0, 1), r"got \(0, 1\)"),
    (torch.tensor([1.0, 2.0]), "torch.float32"), (slice(None, None, -1), "positive step"),
    (slice(0.5, 3), "integer bounds"), (slice(None, None, 0), "positive step"),
    (torch.tensor([[1, 2]]), r"shape \[1, 2\]"), (10**6, r"must be in \["), (-(10**6), r"must be in \["),
    ([0, 10**6], r"must be in \["), (2**70, "int"), (torch.ones(3, dtype=torch.bool), r"must have shape \["),
    (torch.tensor(True), "must have shape"), (object(), "object"), ({"a": 1}, "dict"),
])
def test_everything_else_is_a_harvest_error(rows, which, message) -> None:
    with pytest.raises(HarvestError, match=message):
        rows[which]


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be an integer >= 1"), (dict(batch_size=2.5), "batch_size"),
    (dict(batch_size=True), "batch_size"), (dict(batch_size=4, seed=-1), "seed must be an integer"),
    (dict(batch_size=4, seed="0"), "seed"), (dict(batch_size=4, shuffle=1), "shuffle must be True or False"),
    (dict(batch_size=4, drop_last=None), "drop_last must be True or False"),
])
def test_batches_checks_its_arguments(rows, kwargs, message) -> None:
    with pytest.raises(HarvestError, match=message):
        next(rows.batches(**kwargs))


# ---------------------------------------------------------------------------------------------
# token_id agrees with tokens on a model whose vocabulary is smaller than GPT-2's BPE


def test_token_id_refuses_what_tokens_refuses_on_a_small_vocabulary() -> None:
    from minigpt import GPTConfig, InputError

    small = GPT.random(GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=8, n_positions=16), seed=0)
    assert small.token_id("a") == small.tokens("a")[0, 0].item() < 300  # a byte: in every vocabulary
    with pytest.raises(InputError, match="only 300 entries"):
        small.tokens(" Paris")
    with pytest.raises(InputError, match="' Paris' is GPT-2 token id 6342, but this model's vocabulary has only 300"):
        small.token_id(" Paris")
    assert GPT.random(CFG, seed=0).token_id(" Paris") == 6342
