"""Fuzzing finished harvests and training runs on disk: any field of any JSON file, any byte range or header
of any tensor file, any file or directory replaced by a pipe, a link (inside or out) or a directory; then the
harvest is read or resumed, the run resumed or loaded. Every outcome is the untouched one or a MiniGPTError:

  * no hang: each action runs under a watchdog alarm (a pipe must be refused, never opened);
  * no other exception type;
  * success -> the result equals the untouched run's (rows, index and batches; the manifest; the state,
    losses and exported weights), except for values no checksum covers: a shard's data bytes read without
    ``verify`` (shapes and dtypes must still be right), the weights' bytes and config values of a plain
    HuggingFace directory (``from_pretrained``), and a number in a training log's history;
  * every file, inside the directory and out (a link's target), is afterwards either as it was before the
    action or as the untouched run has it (minigpt may repair what it writes, e.g. the exported weights,
    only to their right content), and nothing else appears.

The pristine directories are made once per module and copied for each example. Each fuzzer draws
``EXAMPLES`` mutated directories (a quarter of them mutated twice): 120 under the "ci" profile (derandomized,
the same every run; the file takes under a minute on 2 cores) and 2,400 under "dev". What the fuzzers found
is kept at the end as plain tests (the fuzzers draw from ``st.data()``, which ``@example`` cannot replay).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, MiniGPTError, TrainingError
from minigpt.harvest import HarvestError, harvest, read
from minigpt.training import Settings, train
from minigpt.training import loop as train_module
from test_fuzz import watchdog
from test_harvest import text as harvest_text
from test_train import text as train_text

EXAMPLES = 8 * settings.default.max_examples
FUZZ = settings(max_examples=EXAMPLES, suppress_health_check=list(HealthCheck))
WATCHDOG_SECONDS = 30
# The smallest model the GPT-2 tokenizer's corpus can feed (its vocabulary is GPT-2's).
CFG = GPTConfig(n_layer=1, n_head=2, n_embd=8, n_positions=16, n_inner=16)
TAP = "blocks.0.resid_post"
HARVEST = dict(context=8, batch_size=4, shard_bytes=2_000, lines=True, quiet=True)
RUN = Settings(steps=3, batch_size=2, grad_accum=1, context=8, lr=3e-3, min_lr=3e-4, warmup=1, dropout=0.1,
               eval_every=2, eval_windows=2, val_fraction=0.2, seed=3)


# ---------------------------------------------------------------------------------------------
# The pristine directories and what the untouched actions give


class World(dict):
    """The pristine directories and the untouched outcomes (shown briefly in a falsifying example)."""

    def __repr__(self) -> str:
        return "world"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("pristine")
    model = GPT.random(CFG, seed=1)
    lines = root / "lines.txt"
    lines.write_text("\n".join(harvest_text(30 + i, 12 + i % 7) for i in range(6)))
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": train_text(i, 30 + i % 13)}) + "\n" for i in range(20)))
    manifest = harvest(model, [lines], TAP, root / "h", **HARVEST)
    assert len(manifest["shards"]) >= 2
    rows = read(root / "h", TAP, verify=True)
    state = train(docs, CFG, root / "t", RUN, save_every=1, quiet=True)
    partial = interrupted(docs, root / "partial")
    unfinished = Path(shutil.copytree(root / "h", root / "unfinished"))  # killed before its last shard
    (unfinished / "manifest.json").unlink()
    for path in (unfinished / "shards").glob(f"shard-{len(manifest['shards']) - 1:06d}.*"):
        path.unlink()
    return World({"model": model, "lines": lines, "docs": docs, "harvest": root / "h", "manifest": manifest,
            "rows": rows_of(rows), "unfinished": unfinished, "run": root / "t", "state": state, "partial": partial,
            "loaded": GPT.from_pretrained(root / "t")})


def interrupted(docs: Path, out: Path) -> Path:
    """The run killed in its last step, after the checkpoint of the step before."""
    real = train_module.learning_rate

    def killed(step: int, s: Settings) -> float:
        if step == RUN.steps - 1:
            raise KeyboardInterrupt
        return real(step, s)

    train_module.learning_rate = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            train(docs, CFG, out, RUN, save_every=1, quiet=True)
    finally:
        train_module.learning_rate = real
    return out


def rows_of(rows) -> dict:
    """All a reader gives: the rows, the index, a row, a slice, a mask and the batches."""
    n = len(rows)
    return {"all": rows[:], "document": rows.document, "position": rows.position, "token": rows.token,
            "one": rows[n // 2], "slice": rows[1:n - 1], "mask": rows[torch.arange(n) % 3 == 0],
            "batches": [(b, i) for b, i in rows.batches(5, seed=2)]}


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# Snapshots: what every path under a directory is


def snapshot(root: Path, history: bool = True) -> dict[str, object]:
    """Relative path -> sha256 of a file, ('link', target), 'dir', 'fifo' (nothing followed, nothing opened
    but regular files). A training state is taken without its speeds, and without its log's numbers unless
    ``history``."""
    seen = {}
    for here, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(here) / name
            mode = os.lstat(path).st_mode
            key = str(path.relative_to(root))
            if stat.S_ISLNK(mode):
                seen[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(mode):
                seen[key] = "dir"
            elif stat.S_ISREG(mode):
                raw = path.read_bytes()
                raw = metrics_without_timings(raw, history) if name == "metrics.jsonl" else without_timings(raw, history)
                seen[key] = hashlib.sha256(raw).hexdigest()
            else:
                seen[key] = "fifo" if stat.S_ISFIFO(mode) else "other"
    return seen


def without_timings(raw: bytes, history: bool = True) -> bytes:
    """A training state's bytes without its log's speeds (the only field two equal runs may differ in), and
    without any of its log's numbers unless ``history``."""
    try:
        state = json.loads(raw)
        assert isinstance(state, dict) and state.get("format", "").startswith("minigpt-train/")
    except (ValueError, AssertionError, AttributeError, RecursionError):
        return raw
    return json.dumps(timeless(state, history), sort_keys=True).encode()  # JSON has no key order


def metrics_without_timings(raw: bytes, history: bool = True) -> bytes:
    """metrics.jsonl without its speeds (tokens/s and the MFU made of them), line by line, as ``timeless``."""
    try:
        lines = [json.loads(line) for line in raw.decode().splitlines()]
    except (ValueError, UnicodeDecodeError, RecursionError):
        return raw
    entries = timeless({"log": lines}, history)["log"]
    return json.dumps([{k: v for k, v in e.items() if k != "mfu"} if isinstance(e, dict) else e
                       for e in entries], sort_keys=True).encode()


def timeless(state: dict, history: bool = True) -> dict:
    """``state`` without its log's speeds (and numbers, unless ``history``)."""
    log = state.get("log")
    dropped = {"tokens_per_s"} if history else {"tokens_per_s", "loss", "lr", "grad_norm", "val_loss", "val_loss_full",
                                                "sample", "baselines"}
    if isinstance(log, list):
        state = {**state, "log": [{k: v for k, v in e.items() if k not in dropped} if isinstance(e, dict) else e
                                  for e in log]}
    return state


def assert_only_repaired(before: dict, after: dict, *rights: dict) -> None:
    """Every path is as it was, or as one of the untouched outcomes ``rights`` has it (absent counts)."""
    for key in sorted(set(before) | set(after)):
        now = after.get(key)
        if now != before.get(key):
            assert any(now == right.get(key) for right in rights), \
                f"{key} changed from {before.get(key)!r} to {now!r}, which no untouched run has"


# ---------------------------------------------------------------------------------------------
# Mutations


SENTINEL = "\u0001fuzz\u0001"
RAW_VALUES = ["null", "true", "false", "0", "-1", "-9223372036854775809", "18446744073709551616", "1e308", "-1e308",
              "1e999", "NaN", "Infinity", "-Infinity", "0.5", "2.0", '""', '"x"', '"../../etc"', '"/tmp"',
              '"shards/shard-000000.safetensors"', "[]", "{}", "[1, 2]", '{"a": 1}', "9" * 5000,
              "[" * 3000 + "]" * 3000, '"' + "a" * 100_000 + '"']


def json_paths(value: object, here: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``value`` (the root included)."""
    out = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            out += json_paths(v, here + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += json_paths(v, here + (i,))
    return out


def mutate_json(data, path: Path) -> tuple[str, bool]:
    """A value of the JSON file ``path`` replaced or deleted, or its bytes changed; (what, whether it was only a
    number of a training log replaced by another: history that no checksum covers)."""
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError):  # spoilt by a first mutation already
        return mutate_bytes(data, path), False
    where = data.draw(st.sampled_from(json_paths(doc)), label="json path")
    how = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "bytes"]), label="json op")
    if how == "bytes":
        return mutate_bytes(data, path), False
    if how == "delete" and where:
        parent = doc
        for part in where[:-1]:
            parent = parent[part]
        del parent[where[-1]]
        path.write_text(json.dumps(doc, indent=1))
        return f"deleted {list(where)}", False
    new = data.draw(st.sampled_from(RAW_VALUES) | st.integers().map(str) | st.floats().map(json.dumps)
                    | st.text(max_size=20).map(json.dumps), label="raw value")
    history = path.name == "state.json" and len(where) == 3 and where[0] == "log" and where[2] != "step" and \
        is_finite_number(new)
    if not where:
        path.write_text(new)
    else:
        parent = doc
        for part in where[:-1]:
            parent = parent[part]
        parent[where[-1]] = SENTINEL
        path.write_text(json.dumps(doc, indent=1).replace(json.dumps(SENTINEL), new))
    return f"{list(where)} = {new[:40]}", history


def is_finite_number(text: str) -> bool:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mutate_bytes(data, path: Path) -> str:
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "flip", "truncate", "append"]), label="byte op")
    if how == "flip" and raw:
        start = data.draw(st.integers(0, len(raw) - 1), label="start")
        length = data.draw(st.integers(1, min(64, len(raw) - start)), label="length")
        mask = data.draw(st.integers(1, 255), label="xor")
        for i in range(start, start + length):
            raw[i] ^= mask
        path.write_bytes(bytes(raw))
        return f"flipped {length} bytes at {start}"
    if how == "truncate" and raw:
        size = data.draw(st.integers(0, len(raw) - 1), label="size")
        path.write_bytes(bytes(raw[:size]))
        return f"truncated to {size}"
    tail = data.draw(st.binary(min_size=1, max_size=64), label="tail")
    path.write_bytes(bytes(raw) + tail)
    return f"appended {len(tail)} bytes"


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "X9"]


def mutate_header(data, path: Path) -> str:
    """A safetensors file's header rewritten: one tensor's shape, dtype or offsets changed, the data kept."""
    raw = path.read_bytes()
    try:
        header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        assert isinstance(header, dict) and set(header) - {"__metadata__"}
    except (ValueError, RecursionError, struct.error, AssertionError):  # spoilt by a first mutation already
        return mutate_bytes(data, path)
    size = struct.unpack("<Q", raw[:8])[0]
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor")
    entry = header[name]
    field = data.draw(st.sampled_from(["shape", "dtype", "data_offsets"]), label="field")
    if field == "shape":
        entry["shape"] = data.draw(st.lists(st.integers(0, 2**40), max_size=4)
                                   | st.just(list(reversed(entry["shape"])))
                                   | st.just([*entry["shape"], 1]), label="shape")
    elif field == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(DTYPES), label="dtype")
    else:
        entry["data_offsets"] = data.draw(st.lists(st.integers(-1, 2**63), min_size=2, max_size=2), label="offsets")
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    return f"header of {name}: {field} = {entry[field]}"


def mutate_kind(data, path: Path, outside: Path) -> str:
    """``path`` (a file or a directory) replaced by a pipe, a link out (to a copy), a link in, or a directory."""
    how = data.draw(st.sampled_from(["fifo", "link out", "link in", "directory", "missing"]), label="kind")
    copy = outside / "copy"
    path.rename(copy)  # moved out whole (a pipe a first mutation left inside included)
    if how == "fifo":
        os.mkfifo(path)
    elif how == "link out":
        path.symlink_to(copy)
    elif how == "link in":
        siblings = sorted(p.name for p in path.parent.iterdir())
        if not siblings:
            os.mkfifo(path)
            return "fifo"
        path.symlink_to(data.draw(st.sampled_from(siblings), label="sibling"))
    elif how == "directory":
        path.mkdir()
    return how


def mutate(data, directory: Path, outside: Path) -> tuple[str, str, bool]:
    """One mutation of a file (or directory) of ``directory``: (its relative path, what was done, whether only
    tensor values changed: the bytes of a tensor file's data, its header left whole)."""
    paths = sorted(p for p in directory.rglob("*") if stat.S_ISREG(os.lstat(p).st_mode) or
                   stat.S_ISDIR(os.lstat(p).st_mode))  # not what an earlier mutation made a pipe or a link
    target = data.draw(st.sampled_from(paths), label="target")
    name = str(target.relative_to(directory))
    kinds = ["kind"] if target.is_dir() else ["kind", "json"] if target.suffix == ".json" else \
        ["kind", "bytes", "header", "header", "bytes"] if target.suffix == ".safetensors" else ["kind", "bytes"]
    kind = data.draw(st.sampled_from(kinds), label="mutation")
    values_only = False
    if kind == "kind":
        done = mutate_kind(data, target, outside)
    elif kind == "json":
        done, values_only = mutate_json(data, target)
    elif kind == "header":
        done = mutate_header(data, target)
    else:
        raw = target.read_bytes()
        header_end = 8 + struct.unpack("<Q", raw[:8])[0] if target.suffix == ".safetensors" and len(raw) >= 8 \
            else 0
        done = mutate_bytes(data, target)
        start = int(done.split(" at ")[1]) if done.startswith("flipped") else -1
        values_only = start >= header_end and target.stat().st_size == len(raw)
    event(f"{name}: {kind}")
    return name, done, values_only


def setup(data, pristine: Path, tmp: Path) -> tuple[Path, str, str, bool, object]:
    """A mutated copy of ``pristine`` in ``tmp``/dir: (it, the path mutated, how, values only, how to look at
    ``tmp``: a snapshot function, blind to a training log's numbers if one of them was changed)."""
    directory = Path(shutil.copytree(pristine, tmp / "dir"))
    outside = tmp / "outside"
    outside.mkdir()
    name, done, values_only = mutate(data, directory, outside)
    if data.draw(st.integers(0, 3), label="second mutation") == 0:  # a quarter of the examples: two at once
        if os.path.lexists(outside / "copy"):
            (outside / "copy").rename(outside / "first")
        second = mutate(data, directory, outside)
        name, done, values_only = f"{name} and {second[0]}", f"{done}; {second[1]}", values_only or second[2]
    history = not (values_only and "state.json" in name)
    return directory, name, done, values_only, lambda root: snapshot(root, history)


def outcome(action) -> object:
    """The action's result, or the MiniGPTError it raised (anything else, or a hang, fails the test)."""
    with watchdog(WATCHDOG_SECONDS):
        try:
            return action()
        except MiniGPTError as e:
            event(f"refused: {type(e).__name__}")
            return e


def rights(look, *directories: Path) -> list[dict]:
    """The untouched outcomes, as ``look`` at the example's directory would show them."""
    return [{f"dir/{k}": v for k, v in look(d).items()} for d in directories]


# ---------------------------------------------------------------------------------------------
# The fuzzers


@given(data=st.data())
@FUZZ
def test_a_damaged_harvest_reads_the_same_rows_or_raises(world, data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        directory, name, done, values_only, look = setup(data, world["harvest"], tmp)
        verify = data.draw(st.booleans(), label="verify")
        before = look(tmp)
        got = outcome(lambda: rows_of(read(directory, TAP, verify=verify)))
        if not isinstance(got, MiniGPTError):
            if values_only and not verify:  # unverified reads trust the data bytes (rows and index): not their shapes
                shapes = [{k: (v.dtype, v.shape) for k, v in r.items() if k != "batches"} for r in (got, world["rows"])]
                assert shapes[0] == shapes[1], f"{name}: {done} read back rows of other shapes"
            else:
                assert same(got, world["rows"]), f"{name}: {done} read back other rows"
        assert_only_repaired(before, look(tmp))


@given(data=st.data(), finished=st.booleans())
@FUZZ
def test_a_damaged_harvest_resumes_to_the_same_harvest_or_raises(world, data, finished) -> None:
    """A finished harvest resumed (nothing to record) or one killed before its last shard."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pristine = world["harvest" if finished else "unfinished"]
        directory, name, done, values_only, look = setup(data, pristine, tmp)

        def resume() -> tuple[dict, dict]:
            manifest = harvest(world["model"], [world["lines"]], TAP, directory, **HARVEST)
            return manifest, rows_of(read(directory, TAP, verify=True))

        before = look(tmp)
        got = outcome(resume)
        if not isinstance(got, MiniGPTError):
            assert same(got[0], world["manifest"]) and same(got[1], world["rows"]), f"{name}: {done}"
        assert_only_repaired(before, look(tmp), *rights(look, pristine, world["harvest"]))


@given(data=st.data(), finished=st.booleans())
@FUZZ
def test_a_damaged_run_resumes_to_the_same_run_or_raises(world, data, finished) -> None:
    """A finished run resumed (nothing to train) or one killed before its last step (one step to train)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pristine = world["run" if finished else "partial"]
        directory, name, done, values_only, look = setup(data, pristine, tmp)

        def resume() -> tuple[dict, bytes]:
            state = train(world["docs"], CFG, directory, RUN, save_every=1, quiet=True)
            return state, (directory / "model.safetensors").read_bytes()

        before = look(tmp)
        got = outcome(resume)
        if not isinstance(got, MiniGPTError):
            history = not values_only  # a number of the log changed: the rest must be the same
            assert same(timeless(got[0], history), timeless(world["state"], history)), f"{name}: {done} trained otherwise"
            assert got[1] == (world["run"] / "model.safetensors").read_bytes(), f"{name}: {done} exported otherwise"
        assert_only_repaired(before, look(tmp), *rights(look, pristine, world["run"]))


@given(data=st.data())
@FUZZ
def test_a_damaged_run_loads_the_same_model_or_raises(world, data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        directory, name, done, values_only, look = setup(data, world["run"], tmp)
        before = look(tmp)
        got = outcome(lambda: GPT.from_pretrained(directory))
        if not isinstance(got, MiniGPTError):
            # A plain HuggingFace directory has no checksum: the weights' bytes and config.json's values are
            # what they say. Anything else must load as the untouched run.
            # A run's directory loads the step its state.json commits (its config too), whatever the export holds.
            exported = directory / "config.json"
            if "config.json" in name and exported.is_file() and got.cfg != world["loaded"].cfg:
                assert got.cfg == GPTConfig.from_hf(json.loads(exported.read_text()))
            else:
                assert got.cfg == world["loaded"].cfg, f"{name}: {done} loaded another config"
            if not ("model.safetensors" in name and values_only):
                assert same(got.state_dict(), world["loaded"].state_dict()), f"{name}: {done} loaded other weights"
        assert_only_repaired(before, look(tmp))


# ---------------------------------------------------------------------------------------------
# What the fuzzers found, kept as plain tests


def test_a_data_directory_replaced_by_a_link_is_refused_and_nothing_is_written_through_it(world, tmp_path) -> None:
    """DIR/data linked to DIR/training: the corpus was tokenized into the checkpoint's directory."""
    directory = Path(shutil.copytree(world["partial"], tmp_path / "dir"))
    shutil.rmtree(directory / "data")
    (directory / "data").symlink_to("training")
    before = snapshot(tmp_path)
    with pytest.raises(TrainingError, match="data is a link, not the directory of the tokenized corpus"):
        train(world["docs"], CFG, directory, RUN, save_every=1, quiet=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("field, value, message", [
    ("last", [0, 11], "the field 'last' is \\[0, 11\\], but this harvest's shard 0 has"),
    ("rows", 1, "the field 'rows' is 1, but this harvest's shard 0 has"),
    ("sha256", "0" * 64, "does not have the sha256 its record lists"),
])
def test_a_shard_record_changed_to_other_valid_values_is_refused_on_resume(world, tmp_path, field, value,
                                                                            message) -> None:
    """A resume wrote such a record into the manifest: rows another harvest would have, or a sha256 no shard has."""
    directory = Path(shutil.copytree(world["harvest"], tmp_path / "dir"))
    path = directory / "shards" / "shard-000000.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    before = snapshot(tmp_path)
    with pytest.raises(HarvestError, match=f"shard-000000.*{message}"):
        harvest(world["model"], [world["lines"]], TAP, directory, **HARVEST)
    assert snapshot(tmp_path) == before


def test_a_shard_the_plan_does_not_make_is_refused_on_resume(world, tmp_path) -> None:
    directory = Path(shutil.copytree(world["harvest"], tmp_path / "dir"))
    shards = directory / "shards"
    last = len(world["manifest"]["shards"])
    record = json.loads((shards / "shard-000000.json").read_text())
    shutil.copyfile(shards / "shard-000000.safetensors", shards / f"shard-{last:06d}.safetensors")
    (shards / f"shard-{last:06d}.json").write_text(json.dumps({**record, "shard": last,
                                                                "file": f"shards/shard-{last:06d}.safetensors"}))
    before = snapshot(tmp_path)
    with pytest.raises(HarvestError, match=f"shard-{last:06d}.safetensors is a shard this harvest does not make"):
        harvest(world["model"], [world["lines"]], TAP, directory, **HARVEST)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "file", "link in"])
def test_a_training_directory_replaced_by_another_kind_of_file_is_refused(world, tmp_path, kind) -> None:
    """DIR/training a pipe: the run started again from step 0 and failed with a raw FileExistsError."""
    directory = Path(shutil.copytree(world["partial"], tmp_path / "dir"))
    shutil.rmtree(directory / "training")
    {"fifo": os.mkfifo, "file": lambda p: p.write_text("x"), "link in": lambda p: p.symlink_to("data")}[kind](
        directory / "training")
    before = snapshot(tmp_path)
    with watchdog(WATCHDOG_SECONDS), pytest.raises(TrainingError, match="training is .*, not the directory of the "
                                                                        "checkpoints"):
        train(world["docs"], CFG, directory, RUN, save_every=1, quiet=True)
    assert snapshot(tmp_path) == before


def flip_first_token(directory: Path) -> None:
    path = directory / "data" / "val.bin"
    raw = bytearray(path.read_bytes())
    raw[0] ^= 1
    path.write_bytes(bytes(raw))


def drop_digests(directory: Path) -> None:
    path = directory / "data" / "data.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "sha256"}))


def edit_log(directory: Path, edit) -> None:
    path = directory / "training" / "state.json"
    state = json.loads(path.read_text())
    edit(state["log"][0])
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("damage, message", [
    (flip_first_token, r"val\.bin does not have the sha256 .*data\.json lists"),
    (drop_digests, r"data\.json: sha256 must map train\.bin to its sha256, got None; remove .* to tokenize again"),
    (lambda d: edit_log(d, lambda e: e.pop("loss")), r"state\.json: log\[0\] must be an object with keys"),
    (lambda d: edit_log(d, lambda e: e.update(loss="x")), r"state\.json: log\[0\]\.loss must be a finite number"),
    (lambda d: edit_log(d, lambda e: e.update(step=True)), r"state\.json: log\[0\] must be an object with step 1"),
], ids=["token-flipped", "no-digests", "no-loss", "loss-text", "step-bool"])
def test_a_resume_refuses_tokens_or_a_log_that_changed(world, tmp_path, damage, message) -> None:
    """Found by the fuzzer: a flipped token trained (and validated) on other data; a log without a loss went on."""
    directory = Path(shutil.copytree(world["partial"], tmp_path / "dir"))
    damage(directory)
    before = snapshot(tmp_path)
    with pytest.raises(TrainingError, match=message):
        train(world["docs"], CFG, directory, RUN, save_every=1, quiet=True)
    assert snapshot(tmp_path) == before


def test_a_shards_directory_linked_out_is_refused_and_nothing_is_written_through_it(world, tmp_path) -> None:
    """shards/ a link to an empty directory outside: the resumed harvest wrote its shards there."""
    directory = Path(shutil.copytree(world["unfinished"], tmp_path / "dir"))
    shutil.rmtree(directory / "shards")
    (tmp_path / "outside").mkdir()
    (directory / "shards").symlink_to(tmp_path / "outside")
    before = snapshot(tmp_path)
    with pytest.raises(HarvestError, match="shards is a link, not the directory of the harvest's shards"):
        harvest(world["model"], [world["lines"]], TAP, directory, **HARVEST)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_an_export_that_is_a_directory_is_refused_before_training(world, tmp_path, name) -> None:
    """config.json a directory, the checkpoints gone: the run trained from step 0 and failed at its first save."""
    directory = Path(shutil.copytree(world["partial"], tmp_path / "dir"))
    shutil.rmtree(directory / "training")
    (directory / name).unlink()
    (directory / name).mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(TrainingError, match=f"{name} is a directory, not the file of the model minigpt exports"):
        train(world["docs"], CFG, directory, RUN, save_every=1, quiet=True)
    assert snapshot(tmp_path) == before


def test_a_token_file_that_is_a_directory_is_refused_before_tokenizing(world, tmp_path) -> None:
    """data.json gone and val.bin a directory: tokenizing failed on val.bin and removed the train.bin there."""
    directory = Path(shutil.copytree(world["partial"], tmp_path / "dir"))
    (directory / "data" / "data.json").unlink()
    (directory / "data" / "val.bin").unlink()
    (directory / "data" / "val.bin").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(TrainingError, match="val.bin is not a regular file, so not minigpt's tokens"):
        train(world["docs"], CFG, directory, RUN, save_every=1, quiet=True)
    assert snapshot(tmp_path) == before


def test_a_config_json_in_the_state_with_other_keys_is_refused(world, tmp_path) -> None:
    """state.json's config_json with architectures null: the resume exported that config.json."""
    directory = Path(shutil.copytree(world["run"], tmp_path / "dir"))
    path = directory / "training" / "state.json"
    state = json.loads(path.read_text())
    state["config_json"]["architectures"] = None
    path.write_text(json.dumps(state))
    before = snapshot(tmp_path)
    with pytest.raises(TrainingError, match="state.json: config_json must be the config.json of the model"):
        train(world["docs"], CFG, directory, RUN, save_every=1, quiet=True)
    assert snapshot(tmp_path) == before
